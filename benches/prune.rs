//! Pruning on a LLaVA-1.5-7B-shaped LM (Vicuna-7B width; random f32 weights; 6 layers so it fits
//! and runs in minutes here) with a 616-token prompt (system 5 + 576 image + 30 question +
//! 5 template): prefill time unpruned and with FastV at keep 0.5 and 0.25 (K = 2), next to the
//! analytic FLOPs ratio, plus what the ranking costs: its bytes against the full attention map it
//! avoids, and its share of the prefill time.
//!
//! With `FINEPRUNE_BENCH_IMAGE=next`, the prompt holds a LLaVA-NeXT-7B image instead: a 672x672
//! image's 2880 tile features (the base tile's 576, then its 2x2 grid's 48x48 map) and 48 row
//! newlines, 2968 tokens in all, pruned at keep 0.5, 0.25 and 0.11 (newlines kept), and the
//! table adds attention's share of one layer's time at the unpruned length.
//!
//! `cargo bench --bench prune` (FINEPRUNE_BENCH_LAYERS changes the depth; `-- none` prints the
//! side-by-side table and skips criterion's timings).

mod common;

use common::{config_7b, random, random_llama};
use criterion::{Criterion, criterion_group, criterion_main};
use fineprune::engine::Prepared;
use fineprune::model::anyres::{self, VisualToken};
use fineprune::model::config::{ModelConfig, TextConfig};
use fineprune::model::flops::lm_layer_flops;
use fineprune::model::llama::{KvCache, SeqRows};
use fineprune::model::template::Prompt;
use fineprune::model::tokenizer::Tokenizer;
use fineprune::ops::attention::{AttnShape, attention};
use fineprune::prune::{
    Keep, PrunePlan, Segment, Stage, StrategyParams, head_strategy, query_strategy,
};
use fineprune::{Engine, Model, Tensor};
use std::sync::Arc;
use std::time::Instant;

fn model(layers: usize) -> Model {
    let c = config_7b(layers);
    let vocab = [("<unk>".to_string(), 0u32)].into_iter().collect();
    let wl = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab)
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let (params, lm) = random_llama(&c, false);
    Model {
        params,
        lm,
        config: ModelConfig::Llama(c),
        vision: None,
        tokenizer: Tokenizer::from_inner(
            tokenizers::Tokenizer::new(wl),
            std::path::Path::new("wordlevel"),
        ),
        image_processor: None,
        system: None,
        chat_template: None,
        source: "random".into(),
        layout: vec![],
        tensors: vec![],
    }
}

/// System 5 + the image's tokens + question 30 + template 5, random embeddings: LLaVA-1.5's
/// 576 image tokens, or (`next`) the LLaVA-NeXT-7B packing of a 672x672 image.
fn input(h: usize, next: bool) -> Prepared {
    let visual: Vec<VisualToken> = if next {
        let pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
        let (rows, _) = anyres::pack_rows((672, 672), &pins, (336, 14)).unwrap();
        (rows.into_iter())
            .map(|r| match r {
                Some(i) => VisualToken::Patch {
                    image: 0,
                    tile: i / 576,
                },
                None => VisualToken::Newline { image: 0 },
            })
            .collect()
    } else {
        vec![VisualToken::Patch { image: 0, tile: 0 }; 576]
    };
    let mut segments = vec![Segment::System; 5];
    segments.extend(vec![Segment::Image; visual.len()]);
    segments.extend([Segment::Text; 30]);
    segments.extend([Segment::Template; 5]);
    let n = segments.len();
    Prepared {
        prompt: Prompt {
            ids: vec![0; n],
            segments,
            visual,
            patches: vec![],
        },
        embeds: Tensor::from_f32(&[n, h], random(n * h, 3, 1.0)).unwrap(),
    }
}

/// Median seconds of `f` over `runs` runs.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Seconds of one decoder layer's prefill of `n` rows, and of its attention alone (causal,
/// random q/k/v of the layer's shapes), medians of 3.
fn attention_share(c: &TextConfig, n: usize) -> (f64, f64) {
    let one = c.clone();
    let (p, lm) = random_llama(
        &TextConfig {
            num_hidden_layers: 1,
            ..one
        },
        false,
    );
    let h = c.hidden_size;
    let x = random(n * h, 5, 1.0);
    let layer = median_secs(3, || {
        let mut cache = KvCache::new(1);
        let mut x = Tensor::from_f32(&[n, h], x.clone()).unwrap();
        let seqs = [SeqRows {
            positions: (0..n).collect(),
        }];
        lm.layer_forward(&p, 0, &mut x, &seqs, &mut [&mut cache], false)
            .unwrap();
    });
    let (qd, kvd) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let (q, k, v) = (
        random(n * qd, 6, 1.0),
        random(n * kvd, 7, 1.0),
        random(n * kvd, 8, 1.0),
    );
    let sh = AttnShape {
        t: n,
        s: n,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        causal: true,
    };
    let attn = median_secs(3, || {
        attention(&q, &k, &v, sh).unwrap();
    });
    (layer, attn)
}

fn fastv(keep: f64, head: &str, query: &str) -> PrunePlan {
    let p = StrategyParams::default();
    let mut plan = PrunePlan::new(vec![Stage {
        layer: 2,
        keep: Keep::Fraction(keep),
    }]);
    plan.head = head_strategy(head, &p).unwrap();
    plan.query = query_strategy(query, &p).unwrap();
    plan
}

fn benches(cr: &mut Criterion) {
    let layers = std::env::var("FINEPRUNE_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let next = std::env::var("FINEPRUNE_BENCH_IMAGE").is_ok_and(|v| v == "next");
    let engine = Engine::new(Arc::new(model(layers)));
    let c = engine.model().lm.config.clone();
    let x = [input(c.hidden_size, next)];
    let keeps: &[f64] = if next {
        &[0.5, 0.25, 0.11]
    } else {
        &[0.5, 0.25]
    };
    let mut configs: Vec<(String, Option<PrunePlan>)> = vec![("unpruned".into(), None)];
    for &k in keeps {
        configs.push((
            format!("fastv_keep{k}"),
            Some(fastv(k, "sum", "last_token")),
        ));
    }
    configs.push((
        "variance_text_keep0.25".into(),
        Some(fastv(0.25, "variance", "text_tokens_only")),
    ));
    // Side by side in one run: median of 3 prefills each.
    let time = |plan: &Option<PrunePlan>| {
        let mut t: Vec<(f64, fineprune::prune::metrics::RunStats)> = (0..3)
            .map(|_| {
                let t0 = Instant::now();
                let s = engine
                    .prefill_prepared(&x, &[plan.as_ref()])
                    .unwrap()
                    .remove(0);
                (t0.elapsed().as_secs_f64(), s)
            })
            .collect();
        t.sort_by(|a, b| a.0.total_cmp(&b.0));
        t.swap_remove(1)
    };
    let (base_secs, base) = time(&None);
    let n = x[0].prompt.ids.len();
    let full_map = 4 * c.num_attention_heads * n * n;
    eprintln!(
        "{layers}-layer 7B-width LM, {n}-token prompt, K=2; full attention map of one layer = {full_map} bytes"
    );
    eprintln!(
        "{:<24} {:>10} {:>8} {:>8} {:>12} {:>12} {:>9}",
        "config", "prefill s", "speedup", "FLOPs x", "rank bytes", "rank share", "avg img"
    );
    for (name, plan) in &configs {
        let (secs, s) = if plan.is_none() {
            (base_secs, base.clone())
        } else {
            time(plan)
        };
        let (rb, rs) = s
            .stages
            .first()
            .map(|st| (st.rank_bytes, st.rank_secs))
            .unwrap_or((0, 0.0));
        eprintln!(
            "{name:<24} {secs:>10.3} {:>8.2} {:>8.2} {rb:>12} {:>11.2}% {:>9.1}",
            base_secs / secs,
            base.prefill_flops / s.prefill_flops,
            100.0 * rs / secs,
            s.avg_image_tokens()
        );
    }
    if next {
        // Attention's share of one layer at the unpruned length and at keep 0.11's.
        let small =
            n - x[0].prompt.visual.len() + (0.11 * x[0].prompt.visual.len() as f64).ceil() as usize;
        for rows in [n, small] {
            let (layer, attn) = attention_share(&c, rows);
            let pairs = rows * (rows + 1) / 2;
            let attn_flops = 4.0 * (c.num_attention_heads * c.head_dim * pairs) as f64;
            eprintln!(
                "one layer at {rows} tokens: {layer:.3} s, attention {attn:.3} s = {:.1}% of the time, {:.1}% of the FLOPs",
                100.0 * attn / layer,
                100.0 * attn_flops / lm_layer_flops(&c, rows, pairs)
            );
        }
    }
    let mut g = cr.benchmark_group(format!("prefill_{layers}x7b_{n}"));
    g.sample_size(10);
    for (name, plan) in &configs {
        g.bench_function(name.as_str(), |b| {
            b.iter(|| engine.prefill_prepared(&x, &[plan.as_ref()]).unwrap())
        });
    }
    g.finish();
}

// Criterion's own plots need a system font; the figures we report are printed above.
criterion_group! {
    name = prune_benches;
    config = Criterion::default().without_plots();
    targets = benches
}
criterion_main!(prune_benches);
