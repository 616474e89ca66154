//! Prefill and decode through one LLaVA-1.5-7B-shaped LLaMA decoder block (hidden 4096, 32 heads,
//! MLP 11008) with random weights, f32 and bf16, plus the `gemm` f32 peak on this machine for
//! comparison. Prints achieved GFLOP/s next to criterion's timings.
//!
//! First an interleaved prefill comparison (rounds of f32, bf16 on the f32 path and, where the CPU
//! has AVX512-BF16, bf16 through `ops::bf16` with bf16 activations; medians and ratios, with the
//! load average), then criterion's timings.
//!
//! `cargo bench --bench block` (FINEPRUNE_BENCH_LEN sets the prompt length, default 616 =
//! 576 image tokens + 40 text; FINEPRUNE_BENCH_ROUNDS the interleaved rounds, default 3).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
mod common;

use common::{config_7b, random, random_llama};
use fineprune::model::config::TextConfig;
use fineprune::model::flops::lm_layer_flops;
use fineprune::model::llama::{KvCache, Llama, SeqRows};
use fineprune::model::nn::Param;
use fineprune::ops::matmul::matmul_nt;
use fineprune::tensor::Tensor;
use std::time::Instant;

/// FLOPs of one block for `t` new rows attending to `s` keys in total (causal).
fn block_flops(c: &TextConfig, t: usize, s: usize) -> f64 {
    let visible: usize = (0..t).map(|r| s - t + r + 1).sum();
    lm_layer_flops(c, t, visible)
}

fn run_prefill((p, lm): &(Vec<Param>, Llama), x: &[f32], len: usize) -> KvCache {
    let mut cache = KvCache::new(1);
    let mut x = Tensor::from_f32(&[len, lm.config.hidden_size], x.to_vec()).unwrap();
    let seqs = [SeqRows {
        positions: (0..len).collect(),
    }];
    lm.layer_forward(p, 0, &mut x, &seqs, &mut [&mut cache], false)
        .unwrap();
    cache
}

fn run_decode((p, lm): &(Vec<Param>, Llama), cache: &KvCache, x1: &[f32], pos: usize) {
    let mut c = cache.clone();
    let mut x = Tensor::from_f32(&[1, x1.len()], x1.to_vec()).unwrap();
    lm.layer_forward(
        p,
        0,
        &mut x,
        &[SeqRows {
            positions: vec![pos],
        }],
        &mut [&mut c],
        false,
    )
    .unwrap();
}

fn gflops(f: impl Fn(), flops: f64, reps: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// A model's parameters and the model.
type Lm = (Vec<Param>, Llama);

/// Interleaved prefill rounds of the block with f32 weights, bf16 weights on the f32 path, and
/// bf16 weights through `ops::bf16` (where available): medians and ratios to f32.
fn prefill_side_by_side(c: &TextConfig, x: &[f32], len: usize) {
    let rounds: usize = std::env::var("FINEPRUNE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (f32_lm, bf16_lm) = (random_llama(c, false), random_llama(c, true));
    let native = fineprune::ops::bf16::available();
    let mut runs: Vec<(&str, &Lm, bool)> = vec![
        ("f32", &f32_lm, false),
        ("bf16 (f32 path)", &bf16_lm, false),
    ];
    if native {
        runs.push(("bf16 native (bf16 activations)", &bf16_lm, true));
    }
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let before = load();
    let mut t = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (i, (_, lm, nat)) in runs.iter().enumerate() {
            fineprune::ops::bf16::set_native(*nat);
            let s = Instant::now();
            drop(run_prefill(lm, x, len));
            t[i].push(s.elapsed().as_secs_f64());
        }
    }
    fineprune::ops::bf16::set_native(false);
    eprintln!(
        "7B block prefill, {len} tokens, {rounds} interleaved rounds (load average {} before, {} after):",
        before.trim(),
        load().trim()
    );
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = med(&mut t[0]);
    for ((name, ..), v) in runs.iter().zip(&mut t) {
        let m = med(v);
        eprintln!(
            "  {name}: {:.0} ms, {:.0} tokens/s, {:.2}x f32",
            m * 1e3,
            len as f64 / m,
            base / m
        );
    }
}

fn benches(cr: &mut Criterion) {
    let len: usize = std::env::var("FINEPRUNE_BENCH_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(616);
    let c = config_7b(1);
    let h = c.hidden_size;
    // The machine's matmul roofline through gemm, for comparison.
    let n = 2048;
    let (a, b) = (random(n * n, 100, 1.0), random(n * n, 101, 1.0));
    let peak = gflops(
        || {
            let mut o = vec![0.0f32; n * n];
            matmul_nt(n, n, n, &a, n, &b, n, &mut o, true)
        },
        2.0 * (n as f64).powi(3),
        3,
    );
    eprintln!("gemm f32 {n}x{n}x{n}: {peak:.1} GFLOP/s");

    let x = random(len * h, 7, 1.0);
    let x1 = random(h, 8, 1.0);
    prefill_side_by_side(&c, &x, len);
    for bf16 in [false, true] {
        let dt = if bf16 { "bf16" } else { "f32" };
        let lm = random_llama(&c, bf16);
        let cache = run_prefill(&lm, &x, len);
        let pf = gflops(
            || drop(run_prefill(&lm, &x, len)),
            block_flops(&c, len, len),
            2,
        );
        let dc = gflops(
            || run_decode(&lm, &cache, &x1, len),
            block_flops(&c, 1, len + 1),
            5,
        );
        eprintln!(
            "7B block, {dt} weights: prefill {len} tokens {pf:.1} GFLOP/s ({:.0}% of gemm peak), decode at {len} cached {dc:.1} GFLOP/s",
            100.0 * pf / peak
        );
        let mut g = cr.benchmark_group(format!("7b_block_{dt}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(format!("prefill_{len}"), |bn| {
            bn.iter(|| run_prefill(&lm, &x, len))
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("decode_after_{len}"), |bn| {
            bn.iter(|| run_decode(&lm, &cache, &x1, len))
        });
        g.finish();
    }
}

// Criterion's own plots need a system font; the figures we report are printed above.
criterion_group! {
    name = block_benches;
    config = Criterion::default().without_plots();
    targets = benches
}
criterion_main!(block_benches);
