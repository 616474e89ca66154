//! Quantised matrix products (`ops::quant::quant_linear`) against the f32 path
//! (`ops::matmul::linear` on the dequantised matrix) for SmolLM2-135M's Q4_1 shapes
//! (576x576... : 576x1536, 1536x576 and the 49152x576 head), decode (m = 1) and a 64-row
//! prefill. Prints a table (median of several runs: ms, GB/s of weight bytes streamed, per ISA
//! tier) before criterion's own timings.
//!
//! `cargo bench --bench quant` (FINEPRUNE_BENCH_QUICK=1 prints the table only).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fineprune::model::gguf::{GgmlType, dequantize};
use fineprune::ops::matmul::linear;
use fineprune::ops::quant::{Isa, quant_linear, quant_linear_on};
use fineprune::tensor::Tensor;
use half::f16;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;
use std::time::Instant;

/// `[n, k]` (rows of W, row length).
const SHAPES: [(usize, usize); 3] = [(1536, 576), (576, 1536), (49152, 576)];
const MS: [usize; 2] = [1, 64];

/// Random blocks of `ty` with f16 scales (and mins) of magnitude 1e-3..5e-2.
fn random_weights(ty: GgmlType, n: usize, k: usize, rng: &mut StdRng) -> Vec<u8> {
    let len = n * (k / ty.block_size()) * ty.type_size();
    let mut w: Vec<u8> = (0..len).map(|_| rng.random::<u8>()).collect();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    };
    for blk in w.chunks_exact_mut(ty.type_size()) {
        for &o in fields {
            let v = rng.random_range(1e-3f32..5e-2) * if rng.random::<bool>() { 1.0 } else { -1.0 };
            blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    w
}

/// Median wall time of `f` in milliseconds (runs for about 0.3 s, at least 5 times).
fn time_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut v = Vec::new();
    let start = Instant::now();
    while v.len() < 5 || (start.elapsed().as_secs_f64() < 0.3 && v.len() < 1000) {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Case {
    ty: GgmlType,
    n: usize,
    k: usize,
    w: Vec<u8>,
    wf: Tensor,
}

fn case(ty: GgmlType, n: usize, k: usize, rng: &mut StdRng) -> Case {
    let w = random_weights(ty, n, k, rng);
    let wf = Tensor::from_f32(&[n, k], dequantize(ty, &w, n * k).unwrap()).unwrap();
    Case { ty, n, k, w, wf }
}

fn table() {
    let mut rng = StdRng::seed_from_u64(1);
    println!(
        "\nquant_linear vs f32 linear, {} threads, best tier {:?}",
        rayon::current_num_threads(),
        Isa::detect()
    );
    println!(
        "| type | shape [n, k] | m | f32 ms | quant ms | speed-up | GB/s (weights) | AVX2 ms | portable ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut cases: Vec<Case> = SHAPES
        .iter()
        .map(|&(n, k)| case(GgmlType::Q4_1, n, k, &mut rng))
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        cases.push(case(ty, 1536, 576.max(ty.block_size() * 3), &mut rng));
    }
    for c in &cases {
        for m in MS {
            let x: Vec<f32> = (0..m * c.k)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let f32_ms = time_ms(|| {
                black_box(linear(&x, &c.wf, None).unwrap());
            });
            let run = |isa: Isa| {
                isa.available().then(|| {
                    time_ms(|| {
                        black_box(quant_linear_on(isa, c.ty, &c.w, c.n, c.k, &x, m).unwrap());
                    })
                })
            };
            let best = run(Isa::detect()).unwrap();
            let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
            println!(
                "| {} | [{}, {}] | {m} | {f32_ms:.3} | {best:.3} | {:.1}x | {:.1} | {} | {} |",
                c.ty,
                c.n,
                c.k,
                f32_ms / best,
                c.w.len() as f64 / (best * 1e-3) / 1e9,
                fmt(run(Isa::Avx2)),
                fmt(run(Isa::Portable)),
            );
            if m == 1 {
                // Cold: cycle through copies worth >= 256 MB of f32, as decoding a whole model
                // does, so neither path finds its matrix in cache.
                let copies = (256 << 20) / (c.n * c.k * 4) + 1;
                let ws: Vec<Vec<u8>> = (0..copies).map(|_| c.w.clone()).collect();
                let wfs: Vec<Tensor> = (0..copies)
                    .map(|_| {
                        Tensor::from_f32(&[c.n, c.k], c.wf.f32_cow().unwrap().into_owned()).unwrap()
                    })
                    .collect();
                let mut it = 0;
                let f32_cold = time_ms(|| {
                    it += 1;
                    black_box(linear(&x, &wfs[it % copies], None).unwrap());
                });
                let q_cold = time_ms(|| {
                    it += 1;
                    black_box(quant_linear(c.ty, &ws[it % copies], c.n, c.k, &x, m).unwrap());
                });
                println!(
                    "| {} cold | [{}, {}] | {m} | {f32_cold:.3} | {q_cold:.3} | {:.1}x | {:.1} | | |",
                    c.ty,
                    c.n,
                    c.k,
                    f32_cold / q_cold,
                    c.w.len() as f64 / (q_cold * 1e-3) / 1e9,
                );
            }
        }
    }
    println!();
}

fn bench(c: &mut Criterion) {
    table();
    if std::env::var_os("FINEPRUNE_BENCH_QUICK").is_some() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("quant_linear_q4_1");
    for (n, k) in SHAPES {
        let cs = case(GgmlType::Q4_1, n, k, &mut rng);
        for m in MS {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            g.throughput(Throughput::Bytes(cs.w.len() as u64));
            g.bench_function(format!("q4_1 {n}x{k} m={m}"), |b| {
                b.iter(|| quant_linear(GgmlType::Q4_1, &cs.w, n, k, &x, m).unwrap())
            });
            g.bench_function(format!("f32 {n}x{k} m={m}"), |b| {
                b.iter(|| linear(&x, &cs.wf, None).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
