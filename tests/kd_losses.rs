//! Logit-distillation losses (`ops::kd`) against PyTorch autograd
//! (tests/reference/gen_kd_losses.py): forward/reverse KL, TRL's generalised JSD scaled by
//! 1/(β(1−β)), MSE, each with and without Sun et al.'s logit standardisation, at T = 0.7 and 2.
//!
//! Torch computes in f64 from the f32 inputs; we compute each row in f64 but take the teacher's
//! log-probabilities rounded to f32 (`teacher_log_probs`) and store gradients in f32. That moves
//! values by ~1e-7 relative and gradients by ~1e-7 of their scale, so the tolerances are:
//! values `|ours − torch| ≤ 1e-5·|torch|`, gradients `max|ours − torch| ≤ 1e-5·max|torch|` (per
//! config, over all rows × vocab). A wrong factor (T², 1/β), sign or term is O(1) off.

use fineprune::ops::kd::{Divergence, LogitKd, mse_row};
use safetensors::{Dtype, SafeTensors};

const REF: &str = "tests/reference/kd_losses_ref";
const VALUE_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;

#[derive(serde::Deserialize)]
struct Config {
    name: String,
    divergence: Divergence,
    temperature: f64,
    standardize: bool,
    loss: f64,
}

#[derive(serde::Deserialize)]
struct Meta {
    rows: usize,
    vocab: usize,
    configs: Vec<Config>,
}

fn floats(st: &SafeTensors, name: &str) -> Vec<f64> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{REF}.safetensors lacks {name}"));
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

#[test]
fn kd_losses_match_torch() {
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(format!("{REF}.json")).unwrap()).unwrap();
    let bytes = std::fs::read(format!("{REF}.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (rows, v) = (meta.rows, meta.vocab);
    let student: Vec<f32> = floats(&st, "student").iter().map(|&x| x as f32).collect();
    let teacher: Vec<f32> = floats(&st, "teacher").iter().map(|&x| x as f32).collect();
    assert_eq!(student.len(), rows * v);
    assert_eq!(meta.configs.len(), 13);
    let scale = 1.0 / rows as f32;
    for c in &meta.configs {
        let want_loss = floats(&st, &format!("{}.loss", c.name))[0];
        // serde_json's default float parser is within an ulp or so, not exact.
        assert!(
            (want_loss - c.loss).abs() <= 1e-14 * want_loss.abs(),
            "{}: json {} and safetensors {want_loss} disagree",
            c.name,
            c.loss
        );
        let want_grad = floats(&st, &format!("{}.grad", c.name));
        let kd = LogitKd {
            divergence: c.divergence,
            temperature: c.temperature as f32,
            standardize: c.standardize,
        };
        kd.validate().unwrap();
        let mut loss = 0.0f64;
        let mut dz = vec![0.0f32; rows * v];
        for ((z, t), g) in student
            .chunks(v)
            .zip(teacher.chunks(v))
            .zip(dz.chunks_mut(v))
        {
            loss += match kd.divergence {
                Divergence::Mse => mse_row(z, t, kd.standardize, scale, g),
                _ => kd.row(z, &kd.teacher_log_probs(t), scale, g).unwrap(),
            };
        }
        loss /= rows as f64;
        let value_err = (loss - want_loss).abs() / want_loss.abs();
        let gscale = want_grad.iter().fold(0f64, |m, x| m.max(x.abs()));
        let grad_err = dz
            .iter()
            .zip(&want_grad)
            .fold(0f64, |m, (&a, b)| m.max((a as f64 - b).abs()))
            / gscale;
        println!(
            "{:14} loss {loss:.6} (torch {want_loss:.6}) rel {value_err:.2e}; grad max-abs / max|grad| {grad_err:.2e} (max|grad| {gscale:.4})",
            c.name
        );
        assert!(
            value_err <= VALUE_TOL,
            "{}: loss {loss} vs torch {want_loss}",
            c.name
        );
        assert!(
            grad_err <= GRAD_TOL,
            "{}: gradient rel err {grad_err:e}",
            c.name
        );
    }
}
