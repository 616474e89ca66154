//! The training forward and backward of LLaVA against PyTorch autograd
//! (tests/reference/gen_train_grads.py): loss and the gradient of every parameter, for both tiny
//! fixtures (llava_gqa: GQA, untied head, one feature layer, `default`; llava_tied: MHA, tied
//! embeddings, feature layers [-3, -1], `full`), then one AdamW step that must lower the loss.

mod common;

use common::{load_ref, reference_dir};
use fineprune::train::model::{TrainModel, TrainSeq};
use fineprune::train::optim::{AdamW, GroupConfig, zero_grads};

/// Gradient tolerance, relative to the largest |gradient| of each tensor. Both sides compute in
/// f32 with different summation orders (gemm blocking vs MKL/oneDNN, fused vs split softmax), and
/// the errors of ~10 chained blocks (two CLIP layers, projector, two LLaMA layers, head) compound
/// through the backward (measured worst: 5.3e-6); 5e-5 of the tensor's scale leaves 10x headroom and is far
/// below any real bug (a wrong index or missing term changes gradients by O(1) of their scale).
const GRAD_TOL: f32 = 5e-5;

fn batch(
    name: &str,
) -> (
    Vec<TrainSeq>,
    std::collections::HashMap<String, common::RefTensor>,
) {
    let r = load_ref(&reference_dir().join(format!("{name}_grads.safetensors")));
    let seqs = (0..2)
        .map(|i| TrainSeq {
            input_ids: r[&format!("input_ids.{i}")]
                .i
                .iter()
                .map(|&t| t as u32)
                .collect(),
            labels: r[&format!("labels.{i}")].i.clone(),
            pixel_values: r[&format!("pixel_values.{i}")].f.clone(),
        })
        .collect();
    (seqs, r)
}

fn check(name: &str, tied: bool) {
    let (seqs, r) = batch(name);
    let mut m = TrainModel::from_dir(&reference_dir().join(name)).unwrap();
    assert_eq!(m.tied(), tied);
    let loss = m.forward(&seqs).unwrap();
    let want = r["loss"].f[0];
    let rel = ((loss - want) / want).abs();
    println!("{name}: loss {loss} torch {want} rel {rel:.2e}");
    assert!(rel <= 1e-5, "{name}: loss {loss} vs torch {want}");
    m.backward().unwrap();
    let mut worst = (0.0f32, String::new());
    for p in &m.params {
        let g = r
            .get(&format!("grad.{}", p.name))
            .unwrap_or_else(|| panic!("{name}: torch has no parameter {}", p.name));
        assert_eq!(g.f.len(), p.grad.len(), "{}", p.name);
        let amax = |v: &[f32]| v.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // A key bias adds `q·b` to every score of a query row, which softmax ignores: its true
        // gradient is 0 and both sides hold rounding noise, so it is measured against the scale
        // of the same layer's key weight gradient instead.
        let scale = match p.name.strip_suffix("k_proj.bias") {
            Some(stem) => amax(&r[&format!("grad.{stem}k_proj.weight")].f),
            None => amax(&g.f),
        };
        assert!(scale > 0.0, "{name}: {} has zero torch gradient", p.name);
        let diff = common::max_abs_diff(&p.grad, &g.f);
        let rel = diff / scale;
        if rel > worst.0 {
            worst = (rel, p.name.clone());
        }
        assert!(
            rel <= GRAD_TOL,
            "{name}: {} max diff {diff:e} vs max |grad| {scale:e} (rel {rel:e})",
            p.name
        );
    }
    // Every torch parameter that we do not hold must have had no gradient in torch either.
    for (k, g) in &r {
        if let Some(n) = k.strip_prefix("grad.")
            && m.param(n).is_none()
        {
            assert!(g.f.iter().all(|&v| v == 0.0), "{name}: {n} missing here");
        }
    }
    println!(
        "{name}: {} params, worst grad rel diff {:.2e} ({})",
        m.params.len(),
        worst.0,
        worst.1
    );

    // One AdamW step lowers the loss.
    let groups = ["vision", "projector", "lm"]
        .iter()
        .flat_map(|g| {
            [
                GroupConfig::new(format!("{g}.decay"), 0.01),
                GroupConfig::new(format!("{g}.no_decay"), 0.0),
            ]
        })
        .collect();
    let mut opt = AdamW::new(1e-3, groups).unwrap();
    opt.step(&mut m.params).unwrap();
    zero_grads(&mut m.params);
    let after = m.forward(&seqs).unwrap();
    println!("{name}: loss after one AdamW step {after}");
    assert!(after < loss, "{name}: loss {loss} -> {after}");
}

#[test]
fn gqa_untied_default_strategy() {
    check("llava_gqa", false);
}

#[test]
fn mha_tied_full_strategy_two_feature_layers() {
    check("llava_tied", true);
}

#[test]
fn frozen_vision_gets_no_gradient_and_lm_grads_are_unchanged() {
    let (seqs, _) = batch("llava_gqa");
    let dir = reference_dir().join("llava_gqa");
    let mut full = TrainModel::from_dir(&dir).unwrap();
    full.forward(&seqs).unwrap();
    full.backward().unwrap();
    let mut part = TrainModel::from_dir(&dir).unwrap();
    for p in &mut part.params {
        if p.group.starts_with("vision") {
            p.grad.clear();
        }
    }
    part.forward(&seqs).unwrap();
    part.backward().unwrap();
    for (a, b) in full.params.iter().zip(&part.params) {
        if a.group.starts_with("vision") {
            assert!(b.grad.is_empty(), "{}", b.name);
        } else {
            assert_eq!(a.grad, b.grad, "{}", a.name);
        }
    }
}

#[test]
fn backward_without_forward_is_an_error() {
    let mut m = TrainModel::from_dir(&reference_dir().join("llava_tied")).unwrap();
    assert!(m.backward().is_err());
}

#[test]
fn seeded_init_matches_the_checkpoint_layout_and_trains() {
    use fineprune::model::config::ModelConfig;
    let dir = reference_dir().join("llava_tied");
    let ModelConfig::Llava(cfg) = ModelConfig::from_file(&dir.join("config.json")).unwrap() else {
        panic!("not LLaVA")
    };
    let loaded = TrainModel::from_dir(&dir).unwrap();
    let mut m = TrainModel::init(&cfg, 0.05, 7).unwrap();
    let again = TrainModel::init(&cfg, 0.05, 7).unwrap();
    assert_eq!(m.params, again.params, "init is deterministic per seed");
    assert_eq!(m.params.len(), loaded.params.len());
    for (a, b) in m.params.iter().zip(&loaded.params) {
        assert_eq!(
            (&a.name, &a.group, a.value.len()),
            (&b.name, &b.group, b.value.len())
        );
    }
    assert!(
        m.param("model.language_model.norm.weight")
            .unwrap()
            .value
            .iter()
            .all(|&v| v == 1.0)
    );
    let (seqs, _) = batch("llava_tied");
    let loss = m.forward(&seqs).unwrap();
    // Small weights give near-uniform predictions: loss close to ln(vocab).
    assert!(
        (loss - (cfg.text.vocab_size as f32).ln()).abs() < 0.5,
        "{loss}"
    );
    m.backward().unwrap();
    assert!(
        m.params
            .iter()
            .all(|p| p.grad.iter().all(|g| g.is_finite()))
    );
    let groups = ["vision", "projector", "lm"]
        .iter()
        .flat_map(|g| {
            [
                GroupConfig::new(format!("{g}.decay"), 0.0),
                GroupConfig::new(format!("{g}.no_decay"), 0.0),
            ]
        })
        .collect();
    AdamW::new(1e-3, groups)
        .unwrap()
        .step(&mut m.params)
        .unwrap();
    assert!(m.forward(&seqs).unwrap() < loss);
}
