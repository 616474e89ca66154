//! Prefill and decode through one LLaVA-1.5-7B-shaped LLaMA decoder block (hidden 4096, 32 heads,
//! MLP 11008) with random weights, f32 and bf16, plus the `gemm` f32 peak on this machine for
//! comparison. Prints achieved GFLOP/s next to criterion's timings.
//!
//! `cargo bench --bench block` (FINEPRUNE_BENCH_LEN sets the prompt length, default 616 =
//! 576 image tokens + 40 text).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fineprune::model::config::TextConfig;
use fineprune::model::llama::{KvCache, Llama, SeqRows};
use fineprune::model::weights::Weights;
use fineprune::ops::matmul::matmul_nt;
use fineprune::tensor::{Storage, Tensor};
use std::collections::HashMap;
use std::time::Instant;

fn config() -> TextConfig {
    TextConfig {
        vocab_size: 1024,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 1,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn block(bf16: bool) -> Llama {
    let c = config();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![c.vocab_size, h]),
        ("model.norm.weight", vec![h]),
        ("model.layers.0.input_layernorm.weight", vec![h]),
        ("model.layers.0.post_attention_layernorm.weight", vec![h]),
        ("model.layers.0.self_attn.q_proj.weight", vec![h, h]),
        ("model.layers.0.self_attn.k_proj.weight", vec![h, h]),
        ("model.layers.0.self_attn.v_proj.weight", vec![h, h]),
        ("model.layers.0.self_attn.o_proj.weight", vec![h, h]),
        ("model.layers.0.mlp.gate_proj.weight", vec![i, h]),
        ("model.layers.0.mlp.up_proj.weight", vec![i, h]),
        ("model.layers.0.mlp.down_proj.weight", vec![h, i]),
    ];
    let map: HashMap<String, Tensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let v = random(shape.iter().product(), k as u64, 0.02);
            let storage = if bf16 {
                Storage::BF16(v.into_iter().map(half::bf16::from_f32).collect())
            } else {
                Storage::F32(v)
            };
            (name.to_string(), Tensor::new(&shape, storage).unwrap())
        })
        .collect();
    Llama::load(
        &c,
        &mut Weights::from_tensors(map, "random 7B-shaped block"),
    )
    .unwrap()
}

/// FLOPs of one block for `t` new tokens attending to `s` keys in total (causal: row i sees
/// `s - t + i + 1`), counting a multiply-add as 2.
fn block_flops(c: &TextConfig, t: usize, s: usize) -> f64 {
    let (h, i, d) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.head_dim as f64,
    );
    let (qd, kvd) = (
        c.num_attention_heads as f64 * d,
        c.num_key_value_heads as f64 * d,
    );
    let linear = 2.0 * t as f64 * (h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * i);
    let visible: f64 = (0..t).map(|r| (s - t + r + 1) as f64).sum();
    linear + 4.0 * c.num_attention_heads as f64 * d * visible
}

fn run_prefill(lm: &Llama, x: &[f32], len: usize) -> KvCache {
    let mut cache = KvCache::new(1);
    let mut x = x.to_vec();
    let seqs = [SeqRows {
        positions: (0..len).collect(),
    }];
    lm.layer_forward(0, &mut x, &seqs, &mut [&mut cache])
        .unwrap();
    cache
}

fn run_decode(lm: &Llama, cache: &KvCache, x1: &[f32], pos: usize) {
    let mut c = cache.clone();
    let mut x = x1.to_vec();
    lm.layer_forward(
        0,
        &mut x,
        &[SeqRows {
            positions: vec![pos],
        }],
        &mut [&mut c],
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

fn benches(cr: &mut Criterion) {
    let len: usize = std::env::var("FINEPRUNE_BENCH_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(616);
    let c = config();
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
    for bf16 in [false, true] {
        let dt = if bf16 { "bf16" } else { "f32" };
        let lm = block(bf16);
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

criterion_group!(block_benches, benches);
criterion_main!(block_benches);
