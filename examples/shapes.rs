//! Generates a ShapesVQA split and exports it in LLaVA's evaluation format, with timings.
//!
//! `cargo run --release --example shapes -- OUT_DIR [N=1000] [SEED=0] [SIZE=336]`

use fineprune::bench::shapes::{ShapesConfig, Split, export_llava_eval, generate};
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), fineprune::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: shapes OUT_DIR [N] [SEED] [SIZE]");
        std::process::exit(2);
    };
    let num = |i: usize, default: u64, name: &str| -> Result<u64, fineprune::Error> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse()
                .map_err(|_| fineprune::Error::arg(name, format!("`{s}` is not a number")))
        })
    };
    let (n, seed, size) = (num(1, 1000, "N")?, num(2, 0, "SEED")?, num(3, 336, "SIZE")?);
    let cfg = ShapesConfig::default();
    let t = Instant::now();
    let samples = generate(Split::Test, n as usize, seed, &cfg)?;
    let t_gen = t.elapsed().as_secs_f64();
    let t = Instant::now();
    export_llava_eval(&samples, out.as_ref(), size as u32, size as u32)?;
    let t_export = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let relevant: usize = samples
        .iter()
        .filter_map(|s| s.relevance(cfg.image_size, cfg.patch_size))
        .map(|m| m.iter().filter(|&&b| b).count())
        .sum();
    let t_mask = t.elapsed().as_secs_f64();
    println!(
        "{n} samples: generate {t_gen:.3}s, render+encode+write at {size}px {t_export:.3}s \
         ({} threads), masks {t_mask:.3}s ({relevant} relevant patches) -> {out}",
        rayon::current_num_threads()
    );
    Ok(())
}
