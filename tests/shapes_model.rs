//! The bundled ShapesVQA teacher (`models/shapes-llava`, trained by `distill` from
//! `configs/shapes-teacher.toml` through `configs/shapes-teacher-5.toml`; each header lists the
//! commands between) and its distilled student (`models/shapes-llava-student`), on held-out
//! questions. The teacher: every family beats the best blind answer
//! ([`blind_share`]) and stays within [`SLACK`] of the accuracy measured when the model was
//! bundled, and FastV's attention ranking (`sum` heads, `last_token` query) keeps the patches the
//! question is about far more often than chance.
//!
//! The ranking is taken after layer 1 (K = 1), which no grounding loss supervised: this model
//! routes the question to the object in its first layer (relevant-patch recall 0.78 at keep 0.25,
//! against 0.25 for a random keep, on `prune-bench`'s 200 default questions). Layers 1 and 2
//! (K = 2 and 3) are the layers its training grounded, so they are not the test of routing
//! learned from the answers alone.

use fineprune::bench::shapes::ShapesConfig;
use fineprune::bench::sweep::{self, BenchItem, SweepConfig, SweepOptions};
use fineprune::prune::{Keep, StrategyParams};
use fineprune::{Engine, Model};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Held-out questions asked (seed 1: other scenes than `prune-bench`'s default seed 0), about 60
/// per family.
const N: usize = 300;

/// Accuracy per family on these `N` questions, unpruned, measured when the model was bundled.
/// Every family must also beat the best blind answer (relative position's, 0.55, is always naming
/// the question's first option).
const MEASURED: [(&str, f64); 5] = [
    ("color", 0.950),
    ("count", 0.733),
    ("existence", 0.967),
    ("relative_position", 0.950),
    ("shape", 0.883),
];
/// Overall accuracy measured with them.
const MEASURED_OVERALL: f64 = 0.897;
/// Allowed drop of a family below its measured accuracy: greedy decoding is deterministic, but
/// another CPU's summation order can flip a near-tie answer or two of a family's ~60.
const SLACK: f64 = 0.1;
/// Allowed drop of the overall accuracy (300 questions).
const SLACK_OVERALL: f64 = 0.05;

/// What a model that never looks at the image can answer: the answer itself, or, where the
/// question offers two ("left or right"), which of them it is.
fn blind_key(it: &BenchItem) -> &str {
    let answer = it.answers[0].as_str();
    let offered = it
        .question
        .split(|c: char| !c.is_alphanumeric())
        .collect::<Vec<_>>()
        .windows(3)
        .find(|w| w[1] == "or")
        .map(|w| (w[0], w[2]));
    match offered {
        Some((first, _)) if first == answer => "first option",
        Some((_, second)) if second == answer => "second option",
        _ => answer,
    }
}

/// Share of a family's questions the best blind answer gets right: a blind model's best.
fn blind_share(items: &[BenchItem], family: &str) -> f64 {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut n = 0;
    for it in items.iter().filter(|it| it.family == family) {
        *counts.entry(blind_key(it)).or_default() += 1;
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
    let size = vc.image_size as u32;
    let geometry = sweep::PatchGeometry::Square {
        size,
        patch: vc.patch_size as u32,
    };
    let items = sweep::shapes_items(0..N, 1, &shapes, (size, size), &geometry, tmp.path()).unwrap();
    let configs = SweepConfig::grid(
        &["sum".to_string()],
        &["last_token".to_string()],
        &[Keep::Fraction(0.25)],
        &[1],
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
    println!(
        "unpruned accuracy {:.3} (bundled at {MEASURED_OVERALL:.3})",
        unpruned.accuracy
    );
    assert!(
        unpruned.accuracy >= MEASURED_OVERALL - SLACK_OVERALL,
        "overall accuracy {:.3}, bundled at {MEASURED_OVERALL:.3}",
        unpruned.accuracy
    );
    for (family, measured) in MEASURED {
        let got = unpruned.families[family].accuracy;
        let blind = blind_share(&items, family);
        println!("{family}: {got:.3} (best blind answer {blind:.3}, bundled at {measured:.3})");
        assert!(
            got > blind && got >= measured - SLACK,
            "{family}: accuracy {got:.3}, best blind answer {blind:.3}, bundled at {measured:.3}"
        );
    }
    let fastv = &summaries[1];
    let (recall, random) = (fastv.recall.unwrap(), fastv.random_recall.unwrap());
    println!("sum/last_token keep 0.25 K1: recall {recall:.3}, random keep {random:.3}");
    assert!(
        recall >= 2.0 * random,
        "recall {recall:.3} vs random {random:.3}"
    );
}

/// The bundled distilled student (`models/shapes-llava-student`, `configs/shapes-student.toml`)
/// served by `prune-bench --model` on the same `N` questions: its accuracy, unpruned and with
/// FastV (sum/last_token, keep 0.25, K 1), as measured when it was bundled, within
/// [`SLACK_OVERALL`].
const STUDENT_MEASURED: [(&str, f64); 2] = [("unpruned", 0.760), ("sum/last_token/0.25/K1", 0.757)];

#[test]
fn the_bundled_student_serves_in_prune_bench_as_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prune-bench"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--model", "models/shapes-llava-student", "--data"])
        .arg(format!("shapes:{N}"))
        .args(["--seed", "1", "--head", "sum", "--query", "last_token"])
        .args(["--keep", "0.25", "--prune-layer", "1", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(tmp.path().join("results.csv")).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), STUDENT_MEASURED.len(), "{csv}");
    for (row, (config, measured)) in rows.iter().zip(STUDENT_MEASURED) {
        assert_eq!(row[col("config")], config);
        let acc: f64 = row[col("accuracy")].parse().unwrap();
        println!("{config}: accuracy {acc:.3} (bundled at {measured:.3})");
        assert!(
            acc >= measured - SLACK_OVERALL,
            "{config}: accuracy {acc:.3}, bundled at {measured:.3}"
        );
    }
}
