//! Prefill-sized products `x[m, k] · Wᵀ` through `ops::matmul::linear` for weights not stored as
//! f32, side by side with the whole-matrix path `linear` used to take (widen or dequantise all of
//! `W` to f32 per call, then one gemm) and with plain f32 gemm on a pre-widened `W`: SmolLM2-135M's
//! Q4_1 shapes at m = 512 and LLaVA-1.5-7B's bf16 shapes at m = 616. Interleaved rounds, medians
//! in milliseconds, the load average printed beside them. bf16 weights also through
//! `ops::bf16::linear` (bf16 activations, `vdpbf16ps`) where the CPU has AVX512-BF16.
//!
//! `cargo bench --bench linear` (FINEPRUNE_BENCH_ROUNDS sets the rounds, default 5).

use fineprune::model::gguf::{GgmlType, dequantize};
use fineprune::ops::matmul::{linear, matmul_nt};
use fineprune::tensor::{Storage, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;
use std::time::Instant;

/// Random Q4_1 blocks with f16 scales and mins of magnitude 1e-3..5e-2.
fn random_q4_1(n: usize, k: usize, rng: &mut StdRng) -> Vec<u8> {
    let ty = GgmlType::Q4_1;
    let mut w: Vec<u8> = (0..n * k / 32 * ty.type_size())
        .map(|_| rng.random::<u8>())
        .collect();
    for blk in w.chunks_exact_mut(ty.type_size()) {
        for o in [0, 2] {
            let v = rng.random_range(1e-3f32..5e-2) * if rng.random::<bool>() { 1.0 } else { -1.0 };
            blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    w
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("FINEPRUNE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut rng = StdRng::seed_from_u64(1);
    // (label, weight as stored, m)
    let mut cases: Vec<(String, Tensor, usize)> = Vec::new();
    for (n, k) in [(576, 576), (1536, 576), (576, 1536)] {
        let w = random_q4_1(n, k, &mut rng);
        let t = Tensor::new(
            &[n, k],
            Storage::Quant {
                ty: GgmlType::Q4_1,
                data: w.into(),
            },
        )
        .unwrap();
        cases.push((format!("Q4_1 [{n}, {k}]"), t, 512));
    }
    for (n, k) in [(4096, 4096), (11008, 4096), (4096, 11008)] {
        let w: Vec<bf16> = (0..n * k)
            .map(|_| bf16::from_f32(rng.random_range(-0.05f32..0.05)))
            .collect();
        cases.push((
            format!("bf16 [{n}, {k}]"),
            Tensor::new(&[n, k], Storage::BF16(w.into())).unwrap(),
            616,
        ));
    }
    println!(
        "\nlinear, {} threads, {rounds} interleaved rounds, medians in ms (load average {})",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| weight | m | whole-matrix f32 | panels (linear) | f32 gemm | whole / panels | f32 / panels | bf16 native | f32 / native |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, w, m) in &cases {
        let (n, k) = (w.shape()[0], w.shape()[1]);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let wf = match w.storage() {
            Storage::Quant { ty, data } => dequantize(*ty, data, n * k).unwrap(),
            _ => w.f32_cow().unwrap().into_owned(),
        };
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        };
        let whole = || {
            let mut out = vec![0.0f32; m * n];
            matmul_nt(*m, n, k, &x, k, &w.f32_cow().unwrap(), k, &mut out, true);
            black_box(out);
        };
        let panels = || drop(black_box(linear(&x, w, None).unwrap()));
        let f32_gemm = || {
            let mut out = vec![0.0f32; m * n];
            matmul_nt(*m, n, k, &x, k, &wf, k, &mut out, true);
            black_box(out);
        };
        let native = || {
            if let Storage::BF16(wb) = w.storage() {
                let mut out = vec![0.0f32; m * n];
                fineprune::ops::bf16::linear(&x, wb, (*m, n, k), &mut out).unwrap();
                black_box(out);
            }
        };
        let has_native =
            matches!(w.storage(), Storage::BF16(_)) && fineprune::ops::bf16::available();
        let mut t = [vec![], vec![], vec![], vec![]];
        for _ in 0..rounds {
            for (i, f) in [&whole as &dyn Fn(), &panels, &f32_gemm, &native]
                .iter()
                .enumerate()
            {
                if i < 3 || has_native {
                    t[i].push(time(*f));
                }
            }
        }
        let [a, b, c] = [0, 1, 2].map(|i| median(t[i].clone()));
        let nat = if has_native {
            let d = median(t[3].clone());
            format!("{d:.2} | {:.2}x", c / d)
        } else {
            "- | -".into()
        };
        println!(
            "| {label} | {m} | {a:.2} | {b:.2} | {c:.2} | {:.2}x | {:.2}x | {nat} |",
            a / b,
            c / b
        );
    }
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
