//! Distillation inside the trainer, on the tiny llava_gqa fixture (teacher) and a perturbed copy
//! of it (student, same tokenizer): the logit loss reads exactly the rows that predict answer
//! tokens (HF's shift), and the gradient of the whole objective (cross-entropy + logit KD +
//! hidden alignment through the projectors) matches finite differences in every tensor it
//! reaches. The per-row losses themselves are checked against PyTorch in `tests/kd_losses.rs`.

mod common;

use common::{load_ref, reference_dir};
use fineprune::train::checkpoint::save_checkpoint;
use fineprune::train::distill::{
    DistillConfig, Distiller, DivergenceName, HiddenConfig, HiddenLoss, LogitsConfig, Pairs, Tokens,
};
use fineprune::train::model::{TrainModel, TrainSeq};
use fineprune::train::optim::zero_grads;
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
        })
        .collect()
}

/// The teacher with every weight moved by up to ±`amount` of a seeded pattern, saved in `dir`.
fn perturbed_student(dir: &Path, amount: f32) -> TrainModel {
    let mut m = TrainModel::from_dir(&teacher_dir()).unwrap();
    let mut state = 12345u64;
    for p in &mut m.params {
        for v in &mut p.value {
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
    }
}

/// Every row's logits (the batch's rows end to end) from a model's traced final states.
fn all_logits(m: &mut TrainModel, seqs: &[TrainSeq]) -> Vec<f64> {
    let tr = m.trace(seqs, &[]).unwrap();
    m.head_logits(&tr.final_out)
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
            teacher: teacher_dir(),
            ce_weight: 1.0,
            logits: Some(logits_cfg(DivergenceName::ForwardKl, tokens, t as f32)),
            hidden: None,
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

#[test]
fn distillation_gradient_matches_finite_differences() {
    let seqs = batch();
    let dir = tempfile::tempdir().unwrap();
    let mut m = perturbed_student(dir.path(), 0.05);
    let (wce, wkd, wh) = (0.5f64, 2.0f64, 0.7f64);
    let cfg = DistillConfig {
        teacher: teacher_dir(),
        ce_weight: wce,
        logits: Some(LogitsConfig {
            beta: 0.3,
            weight: wkd,
            ..logits_cfg(DivergenceName::Jsd, Tokens::All, 1.5)
        }),
        hidden: Some(HiddenConfig {
            pairs: Pairs::List(vec![[1, 2], [2, 2]]),
            loss: HiddenLoss::Cosine,
            tokens: Tokens::All,
            weight: wh,
            shared: false,
        }),
    };
    let mut d = Distiller::new(&cfg, &mut m, 3).unwrap();
    let objective = |l: fineprune::train::distill::DistillLosses| {
        wce * l.ce as f64 + wkd * l.kd.unwrap() as f64 + wh * l.hidden.unwrap() as f64
    };
    zero_grads(&mut m.params);
    let l0 = d.forward(&mut m, &seqs).unwrap();
    m.backward().unwrap();
    println!("losses {l0:?}");
    let grads: Vec<Vec<f32>> = m.params.iter().map(|p| p.grad.clone()).collect();
    let mut checked = 0;
    for (i, g) in grads.iter().enumerate() {
        let Some((j, &want)) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        else {
            continue;
        };
        // The projectors' gradients are small (their loss is one term of three, ~0.7/rows).
        let floor = if m.params[i].name.starts_with("align.") {
            2e-3
        } else {
            0.02
        };
        if want.abs() < floor {
            continue;
        }
        let h = 1e-3f32;
        let x0 = m.params[i].value[j];
        let mut at = |x: f32| {
            m.params[i].value[j] = x;
            objective(d.forward(&mut m, &seqs).unwrap())
        };
        let fd = ((at(x0 + h) - at(x0 - h)) / (2.0 * h as f64)) as f32;
        at(x0);
        let err = (fd - want).abs();
        let tol = 1e-2 * want.abs() + 2e-4;
        let name = &m.params[i].name;
        println!(
            "{name} [{j}]: analytic {want:.5} fd {fd:.5} err/tol {:.2}",
            err / tol
        );
        assert!(
            err <= tol,
            "{name} [{j}]: analytic {want} vs finite difference {fd}"
        );
        checked += 1;
    }
    // Every block: vision, projector, each decoder layer, head, and the alignment projectors.
    let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
    println!("checked {checked} of {} tensors", names.len());
    assert!(checked > 30, "{checked}");
    assert_eq!(names.iter().filter(|n| n.starts_with("align.")).count(), 8);
}
