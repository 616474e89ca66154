//! fineprune's quantized products (`ops::matmul::linear`) against candle-core's `QMatMul` on the same
//! weights, interleaved, 2 threads on rayon, medians of 5: SmolLM2's Q4_1 shapes, its Q8_0 LM head
//! and a 7B Q4_K MLP matrix, one row (decode) and 512 (prefill). Build with the CPU's features,
//! which candle selects at compile time:
//!   cd scripts/candle-bench && RUSTFLAGS="-C target-cpu=native" cargo run --release

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor as CT};
use fineprune::model::gguf::GgmlType;
use fineprune::tensor::{Storage, Tensor};
use std::time::Instant;

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let cases = [
        (GgmlType::Q4_1, GgmlDType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, GgmlDType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, GgmlDType::Q8_0, 49152, 576),
        (GgmlType::Q4_K, GgmlDType::Q4K, 11008, 4096),
    ];
    println!(
        "{:8} {:>6} {:>6} {:>4} {:>12} {:>12} {:>7}",
        "type", "n", "k", "m", "fineprune ms", "candle ms", "ratio"
    );
    rayon::scope(|_| {
        for (ft, ct, n, k) in cases {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 0.1)
                .collect();
            let q = fineprune::model::quantize::quantize(ft, &w).unwrap();
            let ours = Tensor::new(
                &[n, k],
                Storage::Quant {
                    ty: ft,
                    data: q.into(),
                },
            )
            .unwrap();
            let cw = CT::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let theirs = QMatMul::from_qtensor(QTensor::quantize(&cw, ct).unwrap()).unwrap();
            for m in [1usize, 512] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| (i as f32 * 0.377).fract() - 0.5)
                    .collect();
                let cx = CT::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let iters = if m == 1 { 200 } else { 3 };
                let (mut a, mut b) = (vec![], vec![]);
                let mut check = (vec![], vec![]);
                for _ in 0..5 {
                    let t = Instant::now();
                    for _ in 0..iters {
                        check.0 = fineprune::ops::matmul::linear(&x, &ours, None).unwrap();
                    }
                    a.push(t.elapsed().as_secs_f64() * 1e3 / iters as f64);
                    let t = Instant::now();
                    for _ in 0..iters {
                        check.1 = theirs
                            .forward(&cx)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap();
                    }
                    b.push(t.elapsed().as_secs_f64() * 1e3 / iters as f64);
                }
                let diff = check
                    .0
                    .iter()
                    .zip(&check.1)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                let (a, b) = (med(a), med(b));
                println!(
                    "{:8} {:>6} {:>6} {:>4} {:>12.4} {:>12.4} {:>7.2}   (max diff {diff:.2e})",
                    format!("{ft:?}"),
                    n,
                    k,
                    m,
                    a,
                    b,
                    b / a
                );
            }
        }
    });
    println!(
        "load {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
}
