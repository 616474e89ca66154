//! Pruning on a LLaVA-1.5-7B-shaped LM (Vicuna-7B width; random f32 weights; 6 layers so it fits
//! and runs in minutes here) with a 616-token prompt (system 5 + 576 image + 30 question +
//! 5 template): prefill time unpruned and with FastV at keep 0.5 and 0.25 (K = 2), next to the
//! analytic FLOPs ratio, plus what the ranking costs: its bytes against the full attention map it
//! avoids, and its share of the prefill time.
//!
//! `cargo bench --bench prune` (FINEPRUNE_BENCH_LAYERS changes the depth).

mod common;

use common::{config_7b, random, random_llama};
use criterion::{Criterion, criterion_group, criterion_main};
use fineprune::engine::Prepared;
use fineprune::model::config::ModelConfig;
use fineprune::model::template::Prompt;
use fineprune::model::tokenizer::Tokenizer;
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

fn input(h: usize) -> Prepared {
    let mut segments = vec![Segment::System; 5];
    segments.extend([Segment::Image; 576]);
    segments.extend([Segment::Text; 30]);
    segments.extend([Segment::Template; 5]);
    let n = segments.len();
    Prepared {
        prompt: Prompt {
            ids: vec![0; n],
            segments,
            visual: vec![],
        },
        embeds: Tensor::from_f32(&[n, h], random(n * h, 3, 1.0)).unwrap(),
    }
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
    let engine = Engine::new(Arc::new(model(layers)));
    let c = engine.model().lm.config.clone();
    let x = [input(c.hidden_size)];
    let configs: Vec<(String, Option<PrunePlan>)> = vec![
        ("unpruned".into(), None),
        (
            "fastv_keep0.5".into(),
            Some(fastv(0.5, "sum", "last_token")),
        ),
        (
            "fastv_keep0.25".into(),
            Some(fastv(0.25, "sum", "last_token")),
        ),
        (
            "variance_text_keep0.25".into(),
            Some(fastv(0.25, "variance", "text_tokens_only")),
        ),
    ];
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
