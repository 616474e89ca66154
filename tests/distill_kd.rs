//! Distillation inside the trainer, on the tiny llava_gqa fixture (teacher) and a perturbed copy
//! of it (student, same tokenizer): the logit loss reads exactly the rows that predict answer
//! tokens (HF's shift), and the gradient of the whole objective (cross-entropy + logit KD +
//! hidden alignment through the projectors) matches finite differences in every tensor it
//! reaches. The per-row losses themselves are checked against PyTorch in `tests/kd_losses.rs`.

mod common;

use common::{check_objective_gradient, compare_grads, load_ref, reference_dir};
use fineprune::Model;
use fineprune::train::checkpoint::save_checkpoint;
use fineprune::train::distill::{
    AffinityConfig, AttentionConfig, DistillConfig, Distiller, Gating, HiddenConfig, HiddenLoss,
    Pairs, RelationalConfig, VisionAlignConfig,
};
use fineprune::train::logits::{DivergenceName, LogitsConfig, Tokens};
use fineprune::train::model::{TrainModel, TrainSeq, VISION_FROZEN_GROUP};
use fineprune::train::optim::zero_grads;
use fineprune::train::student::{FreshLm, LayerPick, StudentSpec, init_student};
use std::path::{Path, PathBuf};

fn teacher_dir() -> PathBuf {
    reference_dir().join("llava_gqa")
}

/// The fixture's two training sequences (as `tests/train_grads.rs` uses them).
fn batch() -> Vec<TrainSeq> {
    let r = load_ref(&reference_dir().join("llava_gqa_grads.safetensors"));
    (0..2)
        .map(|i| TrainSeq {
            input_ids: r[&format!("input_ids.{i}")]
                .i
                .iter()
                .map(|&t| t as u32)
                .collect(),
            labels: r[&format!("labels.{i}")].i.clone(),
            pixel_values: r[&format!("pixel_values.{i}")].f.clone(),
            grounding: Vec::new(),
            prompt: Vec::new(),
        })
        .collect()
}

/// The teacher with every weight moved by up to ±`amount` of a seeded pattern, saved in `dir`.
fn perturbed_student(dir: &Path, amount: f32) -> TrainModel {
    let mut m = TrainModel::from_dir(&teacher_dir()).unwrap();
    let mut state = 12345u64;
    for p in &mut m.params {
        for v in p.f32s_mut().unwrap() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            *v += amount * ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
        }
    }
    save_checkpoint(&m, &teacher_dir(), dir).unwrap();
    TrainModel::from_dir(dir).unwrap()
}

fn logits_cfg(divergence: DivergenceName, tokens: Tokens, t: f32) -> LogitsConfig {
    LogitsConfig {
        divergence,
        beta: 0.5,
        temperature: t,
        weight: 1.0,
        tokens,
        standardize: false,
        cache: None,
    }
}

/// Every row's logits (the batch's rows end to end) from a model's traced final states.
fn all_logits(m: &mut TrainModel, seqs: &[TrainSeq]) -> Vec<f64> {
    let tr = m.trace(seqs, &Default::default()).unwrap();
    m.head_logits(&tr.final_out)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// `T² KL(p_T ‖ q_T)` of one row, in f64.
fn fkl(zs: &[f64], zt: &[f64], t: f64) -> f64 {
    // log-softmax at temperature t: z/t − logsumexp(z/t)
    let lsm = |z: &[f64]| {
        let m = z.iter().cloned().fold(f64::MIN, f64::max) / t;
        let lse = m + z.iter().map(|v| (v / t - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v / t - lse).collect::<Vec<f64>>()
    };
    let (lq, lp) = (lsm(zs), lsm(zt));
    t * t
        * lp.iter()
            .zip(&lq)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>()
}

/// Mean forward KL over the rows `pick(seq, t)` selects.
fn manual_kd(
    zs: &[f64],
    zt: &[f64],
    seqs: &[TrainSeq],
    vocab: usize,
    t: f64,
    pick: impl Fn(&TrainSeq, usize) -> bool,
) -> (f64, usize) {
    let (mut sum, mut n, mut r0) = (0.0, 0, 0);
    for s in seqs {
        for t_ in 0..s.input_ids.len() {
            if pick(s, t_) {
                let r = r0 + t_;
                sum += fkl(
                    &zs[r * vocab..(r + 1) * vocab],
                    &zt[r * vocab..(r + 1) * vocab],
                    t,
                );
                n += 1;
            }
        }
        r0 += s.input_ids.len();
    }
    (sum / n as f64, n)
}

#[test]
fn logit_kd_reads_the_rows_that_predict_answers() {
    let seqs = batch();
    let dir = tempfile::tempdir().unwrap();
    let mut student = perturbed_student(dir.path(), 0.02);
    let mut teacher = TrainModel::from_dir(&teacher_dir()).unwrap();
    let vocab = student.config.text.vocab_size;
    let image = student.config.image_token_id;
    let zs = all_logits(&mut student, &seqs);
    let zt = all_logits(&mut teacher, &seqs);
    let t = 2.0;
    let answer = |s: &TrainSeq, t: usize| s.labels.get(t + 1).is_some_and(|&l| l >= 0);
    let (want, n) = manual_kd(&zs, &zt, &seqs, vocab, t, answer);
    // The same loss one row late (the label's own row) or early differs by far more than the
    // tolerance below (1e-5): the test can tell a shift error.
    let late = manual_kd(&zs, &zt, &seqs, vocab, t, |s, t| s.labels[t] >= 0).0;
    let early = manual_kd(&zs, &zt, &seqs, vocab, t, |s, t| {
        s.labels.get(t + 2).is_some_and(|&l| l >= 0)
    })
    .0;
    println!("answer rows {n}: kd {want:.6} (one row late {late:.6}, early {early:.6})");
    assert!((want - late).abs() > 1e-3 * want && (want - early).abs() > 1e-3 * want);
    let all = |s: &TrainSeq, t: usize| t + 1 < s.input_ids.len() && s.input_ids[t + 1] != image;
    let (want_all, n_all) = manual_kd(&zs, &zt, &seqs, vocab, t, all);
    assert!(n_all > n);

    for (tokens, want) in [(Tokens::Answer, want), (Tokens::All, want_all)] {
        let cfg = DistillConfig {
            logits: Some(logits_cfg(DivergenceName::ForwardKl, tokens, t as f32)),
            ..DistillConfig::new(teacher_dir())
        };
        let mut d = Distiller::new(&cfg, &mut student, 0).unwrap();
        let got = d.forward(&mut student, &seqs).unwrap();
        let kd = got.kd.unwrap() as f64;
        println!("{tokens:?}: distiller {kd:.6} manual {want:.6}");
        assert!(
            (kd - want).abs() < 1e-5 * want,
            "{tokens:?}: {kd} vs {want}"
        );
        // The cross-entropy beside it is the plain training loss.
        let ce = student.forward(&seqs).unwrap();
        assert_eq!(got.ce, ce);
    }
}

fn attention_cfg(blocks: &[&str], pairs: Pairs, weight: f64) -> AttentionConfig {
    AttentionConfig {
        blocks: blocks.iter().map(|b| b.to_string()).collect(),
        pairs,
        weight,
    }
}

#[test]
fn distillation_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let m = perturbed_student(dir.path(), 0.05);
    let cfg = DistillConfig {
        ce_weight: 0.5,
        logits: Some(LogitsConfig {
            beta: 0.3,
            weight: 2.0,
            ..logits_cfg(DivergenceName::Jsd, Tokens::All, 1.5)
        }),
        hidden: Some(HiddenConfig {
            pairs: Pairs::List(vec![[1, 2], [2, 2]]),
            loss: HiddenLoss::Cosine,
            tokens: Tokens::All,
            weight: 0.7,
            shared: false,
            gate: Gating::None,
            deep_first_steps: 0,
        }),
        // Attention's squared differences of probabilities are small: a large weight makes
        // its share of the gradient measurable.
        attention: Some(attention_cfg(
            &["answer->image", "text->image", "answer->answer"],
            Pairs::List(vec![[0, 1], [2, 2]]),
            300.0,
        )),
        ..DistillConfig::new(teacher_dir())
    };
    let checked = check_objective_gradient(m, &cfg, 3, &batch(), 1e-3).len();
    // Every block: vision, projector, each decoder layer, head, and the alignment projectors.
    assert!(checked >= 75, "{checked}");
}

/// A student of another shape (2 decoder layers of 2 heads, fresh) against the 4-head teacher:
/// attention alignment maps each student head to the mean of two teacher heads.
#[test]
fn attention_alignment_maps_heads_and_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StudentSpec {
        fresh: Some(FreshLm {
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
        }),
        init_std: 0.15,
        seed: 4,
        ..StudentSpec::default()
    };
    init_student(&teacher_dir(), &spec, &dir.path().join("s")).unwrap();
    let m = TrainModel::from_dir(&dir.path().join("s")).unwrap();
    assert_eq!(m.config.text.num_attention_heads, 2);
    let cfg = DistillConfig {
        ce_weight: 0.0,
        logits: Some(logits_cfg(DivergenceName::ReverseKl, Tokens::Answer, 1.0)),
        attention: Some(attention_cfg(
            &["answer->image", "text->text"],
            Pairs::Named("evenly:2".into()),
            300.0,
        )),
        ..DistillConfig::new(teacher_dir())
    };
    let checked = check_objective_gradient(m, &cfg, 5, &batch(), 1e-3).len();
    assert!(checked >= 20, "{checked}");
}

#[test]
fn attention_alignment_is_the_mse_of_the_blocks_probabilities() {
    // Student = teacher: zero loss. A perturbed student: the loss equals a hand computation
    // over the answer rows' image columns of the last layer, every head.
    let seqs = batch();
    let dir = tempfile::tempdir().unwrap();
    let mut student = perturbed_student(dir.path(), 0.05);
    let cfg = DistillConfig {
        attention: Some(attention_cfg(
            &["answer->image"],
            Pairs::Named("last".into()),
            1.0,
        )),
        ..DistillConfig::new(teacher_dir())
    };
    let mut same = TrainModel::from_dir(&teacher_dir()).unwrap();
    let mut d = Distiller::new(&cfg, &mut same, 0).unwrap();
    assert_eq!(d.forward(&mut same, &seqs).unwrap().attention, Some(0.0));
    let mut d = Distiller::new(&cfg, &mut student, 0).unwrap();
    let got = d.forward(&mut student, &seqs).unwrap().attention.unwrap() as f64;
    let ps: Vec<Vec<f32>> = (0..2)
        .map(|i| student.attention_probs(2, i).unwrap().to_vec())
        .collect();
    let mut teacher = TrainModel::from_dir(&teacher_dir()).unwrap();
    teacher.forward(&seqs).unwrap();
    let image = teacher.config.image_token_id;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (i, s) in seqs.iter().enumerate() {
        let pt = teacher.attention_probs(2, i).unwrap();
        let t = s.input_ids.len();
        for q in (0..t).filter(|&q| s.labels[q] >= 0) {
            for k in (0..q).filter(|&k| s.input_ids[k] == image) {
                for h in 0..4 {
                    let e = (h * t + q) * t + k;
                    sum += (ps[i][e] as f64 - pt[e] as f64).powi(2);
                    n += 1;
                }
            }
        }
    }
    let want = sum / n as f64;
    println!("answer->image attention mse {got:.6e} (hand {want:.6e}, {n} entries)");
    assert!(n > 0 && (got - want).abs() < 1e-5 * want, "{got} vs {want}");
}

/// The adaptive gate over three hidden pairs, affinity and relational distillation together:
/// the whole objective's gradient (student, projectors, gate) matches finite differences; the
/// coarse-to-fine schedule aligns the deepest pair alone at first.
#[test]
fn gate_affinity_and_relational_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let m = perturbed_student(dir.path(), 0.05);
    let hidden = HiddenConfig {
        pairs: Pairs::List(vec![[0, 0], [1, 2], [2, 2]]),
        loss: HiddenLoss::Cosine,
        tokens: Tokens::All,
        weight: 2.0,
        shared: false,
        gate: Gating::Adaptive,
        deep_first_steps: 0,
    };
    let cfg = DistillConfig {
        ce_weight: 0.5,
        hidden: Some(hidden.clone()),
        affinity: Some(AffinityConfig {
            pairs: Pairs::List(vec![[1, 2]]),
            text: Tokens::All,
            weight: 20.0,
        }),
        relational: Some(RelationalConfig {
            pairs: Pairs::Named("last".into()),
            tokens: Tokens::All,
            weight: 20.0,
        }),
        ..DistillConfig::new(teacher_dir())
    };
    let checked = check_objective_gradient(m, &cfg, 2, &batch(), 1e-3).len();
    assert!(checked >= 70, "{checked}");

    // Coarse to fine: during the first steps only the deepest pair (student layer 2) trains.
    let mut m = perturbed_student(dir.path(), 0.05);
    let cfg = DistillConfig {
        hidden: Some(HiddenConfig {
            deep_first_steps: 5,
            ..hidden
        }),
        affinity: None,
        relational: None,
        on_policy: None,
        ..cfg
    };
    let mut d = Distiller::new(&cfg, &mut m, 2).unwrap();
    // The gate's temperature is not weight-decayed (decay would pull it toward 1).
    let group = |n: &str| m.param(n).unwrap().group.clone();
    assert_eq!(group("align.gate.log_temperature"), "align.no_decay");
    assert_eq!(group("align.gate.weight"), "align.decay");
    let projector_grad = |m: &TrainModel, i: usize| {
        m.params
            .iter()
            .filter(|p| p.name.starts_with(&format!("align.{i}.")))
            .map(|p| p.grad.iter().map(|g| g.abs()).sum::<f32>())
            .sum::<f32>()
    };
    for (step, active) in [(0, [false, false, true]), (5, [true, true, true])] {
        fineprune::train::optim::zero_grads(&mut m.params);
        d.set_step(step);
        d.forward(&mut m, &batch()).unwrap();
        m.backward().unwrap();
        for (i, a) in active.iter().enumerate() {
            assert_eq!(projector_grad(&m, i) > 0.0, *a, "step {step}, pair {i}");
        }
    }
}

/// Vision feature alignment against the engine's own projected features (the inference path,
/// HF-checked in `tests/llava.rs`): `mean (f_s − f_t)²` over every element, and
/// `mean over rows (1 − cos)`, of both images' features, within 1e-5 relative.
#[test]
fn vision_alignment_is_the_loss_of_the_engines_projected_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut student = perturbed_student(dir.path(), 0.05);
    let seqs = batch();
    let features = |d: &Path| -> Vec<f64> {
        let m = Model::load(d).unwrap();
        let v = m.vision.as_ref().unwrap();
        seqs.iter()
            .flat_map(|s| {
                v.forward(&m.params, &[&s.pixel_values])
                    .unwrap()
                    .to_vec_f32()
                    .unwrap()
            })
            .map(f64::from)
            .collect()
    };
    let (fs, ft) = (features(dir.path()), features(&teacher_dir()));
    let d = student.config.text.hidden_size;
    assert_eq!(fs.len(), 2 * student.config.image_tokens() * d);
    let mse = fs
        .iter()
        .zip(&ft)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / fs.len() as f64;
    let rows = fs.len() / d;
    let cos = (0..rows)
        .map(|r| {
            let (a, b) = (&fs[r * d..(r + 1) * d], &ft[r * d..(r + 1) * d]);
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            1.0 - dot / (n(a) * n(b))
        })
        .sum::<f64>()
        / rows as f64;
    for (loss, want) in [(HiddenLoss::Mse, mse), (HiddenLoss::Cosine, cos)] {
        let cfg = DistillConfig {
            vision: Some(VisionAlignConfig { loss, weight: 1.0 }),
            ..DistillConfig::new(teacher_dir())
        };
        let mut dist = Distiller::new(&cfg, &mut student, 0).unwrap();
        let got = dist.forward(&mut student, &seqs).unwrap().vision.unwrap() as f64;
        println!("{loss:?}: distiller {got:.7} engine {want:.7}");
        assert!(want > 1e-4, "{want}");
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }
}

/// The gradient of CE + forward KL + vision alignment against finite differences, with only the
/// last vision layer trainable: (a) a student as wide as the teacher, features compared as
/// they are; (b) a smaller ViT student (its tower cut to teacher layers 0 and 2) with a fresh,
/// narrower LM, aligned through the `align.vision` projector. Every trainable vision tensor is
/// reached; the frozen ones have no gradient.
#[test]
fn vision_alignment_matches_finite_differences() {
    let vision = |loss| Some(VisionAlignConfig { loss, weight: 3.0 });
    let dir = tempfile::tempdir().unwrap();
    let mut m = perturbed_student(dir.path(), 0.05);
    m.train_last_vision_layers(1).unwrap();
    let cfg = DistillConfig {
        ce_weight: 0.5,
        logits: Some(logits_cfg(DivergenceName::ForwardKl, Tokens::Answer, 1.0)),
        vision: vision(HiddenLoss::Mse),
        ..DistillConfig::new(teacher_dir())
    };
    let checked = check_objective_gradient(m, &cfg, 3, &batch(), 1e-3);
    let layer = |l: usize| {
        let p = format!("model.vision_tower.encoder.layers.{l}.");
        checked.iter().filter(|n| n.starts_with(&p)).count()
    };
    // q/k/v/out, fc1/fc2 (weights and biases) and both layer norms, but for k_proj.bias, whose
    // gradient is zero (softmax ignores a shift shared by every key).
    assert_eq!(layer(1), 15, "{checked:?}");
    assert_eq!(layer(0), 0, "{checked:?}");
    assert!(!checked.iter().any(|n| n.contains("embeddings")));

    let spec = StudentSpec {
        fresh: Some(FreshLm {
            hidden_size: 48,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
        }),
        vision_layers: Some(LayerPick::List(vec![0, 2])),
        fresh_projector: true,
        init_std: 0.15,
        seed: 6,
        ..StudentSpec::default()
    };
    init_student(&teacher_dir(), &spec, &dir.path().join("small")).unwrap();
    let mut m = TrainModel::from_dir(&dir.path().join("small")).unwrap();
    assert_eq!(m.config.vision.num_hidden_layers, 2);
    m.train_last_vision_layers(1).unwrap();
    let cfg = DistillConfig {
        vision: vision(HiddenLoss::Cosine),
        ..cfg
    };
    let checked = check_objective_gradient(m, &cfg, 4, &batch(), 1e-3);
    let count = |p: &str| checked.iter().filter(|n| n.starts_with(p)).count();
    assert_eq!(
        count("model.vision_tower.encoder.layers.0."),
        15,
        "{checked:?}"
    );
    assert_eq!(count("align.vision."), 4, "{checked:?}");
}

/// With only the last vision layer trainable, every trainable tensor's gradient is bit for bit
/// the fully trainable model's (the backward stops below that layer, nothing else changes), the
/// rest of the tower moves to the frozen group without gradients, and counts out of range are
/// refused.
#[test]
fn training_the_last_vision_layers_keeps_their_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let mut full = perturbed_student(dir.path(), 0.05);
    let mut part = TrainModel::from_dir(dir.path()).unwrap();
    part.train_last_vision_layers(1).unwrap();
    for m in [&mut full, &mut part] {
        m.forward(&batch()).unwrap();
        m.backward().unwrap();
    }
    let mut trainable = 0;
    for (a, b) in full.params.iter().zip(&part.params) {
        if b.name.starts_with("model.vision_tower.")
            && !b.name.starts_with("model.vision_tower.encoder.layers.1.")
        {
            assert!(b.grad.is_empty(), "{}", b.name);
            assert_eq!(b.group, VISION_FROZEN_GROUP, "{}", b.name);
        } else {
            assert!(a.grad == b.grad, "{}", b.name);
            trainable += usize::from(b.name.starts_with("model.vision_tower."));
        }
    }
    assert_eq!(trainable, 16);
    for n in [0, 3] {
        let e = part.train_last_vision_layers(n).unwrap_err().to_string();
        assert!(
            e.contains("vision_trainable_layers") && e.contains("2 encoder layers in use"),
            "{e}"
        );
    }
}

/// The whole objective against PyTorch autograd (tests/reference/gen_distill_grads.py, each loss
/// transcribed there from its doc comment): CE, JSD(0.3) at T 1.5 on "all" rows, hidden MSE
/// through two projectors, attention over two blocks and two pairs, affinity, relational and
/// vision alignment, on a perturbed student of the fixture. Each loss within 1e-5 relative
/// (measured worst: 3e-7) and the gradient of every student and projector parameter within 5e-5
/// of its tensor's scale (measured worst: 4e-6), the tolerances of `tests/train_grads.rs`.
#[test]
fn whole_objective_matches_pytorch() {
    let r = load_ref(&reference_dir().join("llava_gqa_distill_grads.safetensors"));
    let mut m = TrainModel::from_dir(&teacher_dir()).unwrap();
    for p in &mut m.params {
        let k = p.name.bytes().map(f64::from).sum::<f64>() % 97.0;
        for (j, v) in p.f32s_mut().unwrap().iter_mut().enumerate() {
            *v += (0.05 * (0.37 * j as f64 + 1.3 * k).sin()) as f32;
        }
    }
    let cfg = DistillConfig {
        ce_weight: 0.5,
        logits: Some(LogitsConfig {
            beta: 0.3,
            weight: 2.0,
            ..logits_cfg(DivergenceName::Jsd, Tokens::All, 1.5)
        }),
        hidden: Some(HiddenConfig {
            pairs: Pairs::List(vec![[1, 2], [2, 2]]),
            loss: HiddenLoss::Mse,
            tokens: Tokens::All,
            weight: 0.7,
            shared: false,
            gate: Gating::None,
            deep_first_steps: 0,
        }),
        attention: Some(attention_cfg(
            &["answer->image", "text->text"],
            Pairs::List(vec![[0, 1], [2, 2]]),
            300.0,
        )),
        affinity: Some(AffinityConfig {
            pairs: Pairs::List(vec![[1, 2]]),
            text: Tokens::All,
            weight: 20.0,
        }),
        relational: Some(RelationalConfig {
            pairs: Pairs::List(vec![[2, 2]]),
            tokens: Tokens::All,
            weight: 20.0,
        }),
        vision: Some(VisionAlignConfig {
            loss: HiddenLoss::Mse,
            weight: 3.0,
        }),
        ..DistillConfig::new(teacher_dir())
    };
    let mut d = Distiller::new(&cfg, &mut m, 0).unwrap();
    for p in m.params.iter_mut().filter(|p| p.name.starts_with("align.")) {
        let v = &r[&p.name].f;
        p.f32s_mut().unwrap().copy_from_slice(v);
    }
    zero_grads(&mut m.params);
    let l = d.forward(&mut m, &batch()).unwrap();
    m.backward().unwrap();
    let some = |x: Option<f32>| x.unwrap();
    for (what, got) in [
        ("ce", l.ce),
        ("kd", some(l.kd)),
        ("hidden", some(l.hidden)),
        ("attention", some(l.attention)),
        ("affinity", some(l.affinity)),
        ("relational", some(l.relational)),
        ("vision", some(l.vision)),
    ] {
        let want = r[what].f[0];
        let rel = ((got - want) / want).abs();
        println!("{what}: {got} torch {want} rel {rel:.2e}");
        assert!(rel <= 1e-5, "{what}: {got} vs torch {want}");
    }
    compare_grads("distillation", &m, &r, 5e-5);
}
