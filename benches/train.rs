//! Training throughput: one optimizer step (forward, backward, AdamW) of the bundled ShapesVQA
//! teacher's shape (`benches/teacher_config.json`: CLIP 4x128 at 192 px / patch 16, LLaMA 4x192,
//! vocabulary 512) on a batch of 8 sequences of 195 tokens (BOS, 30 text, 144 image, 20 text; the
//! last 4 positions trained), in tokens per second.
//!
//! `tests/reference/bench_train.py` runs the same step in PyTorch (HF transformers'
//! `LlavaForConditionalGeneration`, `torch.optim.AdamW`) on the same shape and batch with the same
//! thread count; run both on a quiet machine and compare:
//!
//! ```sh
//! cargo bench --bench train
//! RAYON_NUM_THREADS=2 ...; /tmp/venv-ref/bin/python tests/reference/bench_train.py --threads 2
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fineprune::model::config::{LlavaConfig, ModelConfig};
use fineprune::train::model::{TrainModel, TrainSeq};
use fineprune::train::optim::{AdamW, GroupConfig, zero_grads};
use std::path::Path;

const BATCH: usize = 8;
const TEXT_BEFORE: usize = 30;
const TEXT_AFTER: usize = 20;
const TRAINED: usize = 4;

fn config() -> LlavaConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/teacher_config.json");
    let text = std::fs::read_to_string(&path).expect("benches/teacher_config.json");
    match ModelConfig::from_json(&text, &path).expect("valid config") {
        ModelConfig::Llava(c) => c,
        ModelConfig::Llama(_) => panic!("teacher_config.json is not a LLaVA config"),
    }
}

/// The batch of `bench_train.py`: text ids `3 + (7 i) mod 500`, pixels from a fixed LCG.
fn batch(c: &LlavaConfig) -> Vec<TrainSeq> {
    let text = |n: usize, off: usize| (0..n).map(move |i| 3 + ((7 * (i + off)) % 500) as u32);
    let mut ids = vec![1u32];
    ids.extend(text(TEXT_BEFORE, 0));
    ids.extend(std::iter::repeat_n(c.image_token_id, c.image_tokens()));
    ids.extend(text(TEXT_AFTER, TEXT_BEFORE));
    let n = ids.len();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i >= n - TRAINED { t as i64 } else { -100 })
        .collect();
    let s = c.vision.image_size;
    let mut state = 12345u64;
    (0..BATCH)
        .map(|_| TrainSeq {
            input_ids: ids.clone(),
            labels: labels.clone(),
            pixel_values: (0..3 * s * s)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect(),
            grounding: Vec::new(),
            prompt: Vec::new(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let mut model = TrainModel::init(&cfg, 0.02, 0).unwrap();
    let groups = ["vision", "projector", "lm"]
        .iter()
        .flat_map(|g| {
            [
                GroupConfig::new(format!("{g}.decay"), 0.05),
                GroupConfig::new(format!("{g}.no_decay"), 0.0),
            ]
        })
        .collect();
    let mut opt = AdamW::new(1e-4, groups).unwrap();
    let data = batch(&cfg);
    let tokens: usize = data.iter().map(|s| s.input_ids.len()).sum();
    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements(tokens as u64));
    g.sample_size(10);
    g.bench_function(format!("teacher_b{BATCH}_t{}", tokens / BATCH), |b| {
        b.iter(|| {
            zero_grads(&mut model.params);
            let loss = model.forward(&data).unwrap();
            model.backward().unwrap();
            opt.step(&mut model.params).unwrap();
            loss
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
