//! Library use of pruning: the same question unpruned, with FastV, and with a two-stage plan using
//! the `variance` head and `text_tokens_only` query strategies; prints what each kept and costs.
//!
//! `cargo run --release --example prune -- tests/reference/llava_gqa tests/reference/images/tiny_scene.png`

use fineprune::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};
use fineprune::{Engine, ImageInput, Model, Request};
use std::sync::Arc;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), fineprune::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: prune MODEL_DIR IMAGE");
        std::process::exit(2);
    };
    let engine = Engine::new(Arc::new(Model::load(&model)?));
    let params = StrategyParams::default();
    let mut two_stage = PrunePlan::new(vec![
        Stage {
            layer: 1,
            keep: Keep::Fraction(0.5),
        },
        Stage {
            layer: 2,
            keep: Keep::Fraction(0.25),
        },
    ]);
    two_stage.head = head_strategy("variance", &params)?;
    two_stage.query = query_strategy("text_tokens_only", &params)?;
    let plans = [None, Some(PrunePlan::fastv()), Some(two_stage)];
    let reqs: Vec<Request> = plans
        .into_iter()
        .map(|prune| {
            let mut r = Request::new(
                "What color is the big square?",
                Some(ImageInput::Path(image.clone().into())),
            );
            r.max_new_tokens = 8;
            r.prune = prune;
            r
        })
        .collect();
    // One batch; each request is pruned by its own plan.
    for g in engine.generate(&reqs)? {
        let s = &g.stats;
        println!(
            "kept after each stage {:?}, {:.1} image tokens averaged over layers, prefill {:.4} GFLOP: {}",
            s.stages.iter().map(|st| st.after).collect::<Vec<_>>(),
            s.avg_image_tokens(),
            s.prefill_flops / 1e9,
            g.text.trim()
        );
    }
    Ok(())
}
