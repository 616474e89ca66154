//! Knowledge-distillation losses on logits, one row (one next-token distribution over the
//! vocabulary `V`) at a time.
//!
//! Every row function returns the row's loss and ADDS `scale · dL/dz_student` into a caller's
//! gradient slice, so a caller averages over `n` rows with `scale = 1/n` and may split rows into
//! chunks freely. Inputs and outputs are f32; the row is computed in f64 throughout (a handful of
//! `exp`/`ln` per vocabulary entry, small next to the logits' matmul), so the only f32 rounding is
//! that of the inputs and of the stored gradient.
//!
//! Notation of the doc comments: `z` student logits, `s = zscore(z)` when `standardize` else `z`,
//! `T` the temperature, `q = softmax(s/T)` the student, `p = exp(teacher_logp)` the teacher at `T`
//! (see [`LogitKd::teacher_log_probs`]). Terms with `p_i = 0` (or `q_i = 0`) contribute 0
//! (`0·log 0 = 0`). The KL-type losses carry Hinton's `T²` so their gradients keep their scale
//! across temperatures.

use crate::error::{Error, Result};

/// Which divergence a logit-distillation loss uses. TOML/JSON form: `kind = "forward_kl"`,
/// `kind = "reverse_kl"`, `kind = "mse"`, or `kind = "jsd"` with `beta = 0.5` (required).
/// Unknown keys are refused for `jsd`; serde ignores extra keys next to the unit kinds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Divergence {
    /// `L = T² Σ_i p_i (log p_i − log q_i) = T²·KL(p‖q)` (mode-covering; Hinton et al. 2015),
    /// torch's `F.kl_div(log_q, log_p, log_target=True) · T²`.
    /// `dL/ds = T (q·Σp − p)` (`= T (q − p)` for a normalised teacher).
    ForwardKl,
    /// `L = T² Σ_i q_i (log q_i − log p_i) = T²·KL(q‖p)` (mode-seeking).
    /// With `r = log q − log p`: `dL/ds_i = T q_i (r_i − Σ_j q_j r_j)`.
    ReverseKl,
    /// Generalised Jensen–Shannon with mixture `m = β·p + (1−β)·q` (computed in log space:
    /// `log m = logsumexp(log p + ln β, log q + ln(1−β))`):
    /// `J = β·KL(p‖m) + (1−β)·KL(q‖m)` (GKD, Agarwal et al. 2024; TRL's `generalized_jsd_loss`)
    /// and `L = T²·J / (β(1−β))`, whose limits are exactly `T²·KL(p‖q)` at `β → 0` and
    /// `T²·KL(q‖p)` at `β → 1` (Huszár 2015); `β = 0` computes [`ForwardKl`](Self::ForwardKl)
    /// and `β = 1` [`ReverseKl`](Self::ReverseKl) exactly. `β = 0.5` gives `4·T²·JSD`.
    /// Gradient: `∂J/∂q_i = (1−β)·log(q_i/m_i)` (the `+1` of `d(q log q)` cancels against
    /// `−(βp_i + (1−β)q_i)/m_i = −1`), so with `r = log q − log m`:
    /// `dL/ds_i = (T/β) q_i (r_i − Σ_j q_j r_j)`.
    Jsd { beta: f64 },
    /// Mean squared error between raw logits, see [`mse_row`]: no softmax, no temperature.
    Mse,
}

/// Settings of a logit-distillation loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitKd {
    pub divergence: Divergence,
    /// Softmax temperature `T` (both sides), finite and > 0. Unused by [`Divergence::Mse`].
    pub temperature: f32,
    /// Z-score both sides' logits first (Sun et al., CVPR 2024, "Logit Standardization in
    /// Knowledge Distillation"), see [`zscore`].
    pub standardize: bool,
}

impl LogitKd {
    /// Checks the settings: temperature finite and > 0, `beta` finite and in `[0, 1]`. The error
    /// names the configuration field at fault.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::arg(
                "distill.logits.temperature",
                format!("{t} must be finite and > 0"),
            ));
        }
        if let Divergence::Jsd { beta } = self.divergence
            && !(beta.is_finite() && (0.0..=1.0).contains(&beta))
        {
            return Err(Error::arg(
                "distill.logits.divergence.beta",
                format!("{beta} must be in [0, 1]"),
            ));
        }
        Ok(())
    }

    /// The teacher's log-probabilities at this loss's temperature for one row of teacher logits:
    /// `log_softmax(s(z_t) / T)` with `s` the z-score when `standardize`, the identity otherwise.
    /// This is what [`row`](Self::row) takes (and what a top-k cache stores).
    pub fn teacher_log_probs(&self, teacher_logits: &[f32]) -> Vec<f32> {
        let s = standardized(teacher_logits, self.standardize);
        log_softmax(&s, self.temperature as f64)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    /// One row: the loss (f64) of student logits `z` against the teacher log-probabilities
    /// `teacher_logp` (from [`teacher_log_probs`](Self::teacher_log_probs) or a dense row rebuilt
    /// from a top-k cache; assumed finite, a tail need not make `Σp` exactly 1), adding
    /// `scale · dL/dz` into `dz`. The formulas are on [`Divergence`]'s variants; with
    /// `standardize`, `dL/dz = zscore_backward(z, dL/ds)`.
    ///
    /// Errors: invalid settings (see [`validate`](Self::validate)), lengths that differ or are 0,
    /// and [`Divergence::Mse`], which needs the teacher's raw logits: use [`mse_row`].
    pub fn row(&self, z: &[f32], teacher_logp: &[f32], scale: f32, dz: &mut [f32]) -> Result<f64> {
        self.validate()?;
        let v = z.len();
        if v == 0 || teacher_logp.len() != v || dz.len() != v {
            return Err(Error::Shape {
                name: "distillation row (student logits, teacher log-probs, gradient)".into(),
                expected: vec![v.max(1); 3],
                got: vec![v, teacher_logp.len(), dz.len()],
            });
        }
        let t = self.temperature as f64;
        let logq = log_softmax(&standardized(z, self.standardize), t);
        let mut ds = vec![0.0f64; v];
        let loss = match self.divergence {
            Divergence::ForwardKl => forward_kl(&logq, teacher_logp, t, &mut ds),
            Divergence::ReverseKl => reverse_kl(&logq, teacher_logp, t, &mut ds),
            // The end points exactly (the scaled JSD's limits; TRL's special cases).
            Divergence::Jsd { beta: 0.0 } => forward_kl(&logq, teacher_logp, t, &mut ds),
            Divergence::Jsd { beta: 1.0 } => reverse_kl(&logq, teacher_logp, t, &mut ds),
            Divergence::Jsd { beta } => jsd(&logq, teacher_logp, beta, t, &mut ds),
            Divergence::Mse => {
                return Err(Error::arg(
                    "distill.logits.divergence",
                    "mse compares raw logits, not log-probabilities: use ops::kd::mse_row",
                ));
            }
        };
        accumulate(z, &ds, self.standardize, scale, dz);
        Ok(loss)
    }
}

/// MSE between the raw logits of one row, `L = (1/V) Σ_i (s_i − t_i)²` as
/// `F.mse_loss(reduction="mean")` on the row, with `s, t` the student's and teacher's logits,
/// z-scored first (each on its own) when `standardize`; no temperature. Adds
/// `scale · dL/dz` into `dz`, where `dL/ds = (2/V)(s − t)`. Returns `L`.
///
/// # Panics
/// If the three slices' lengths differ.
pub fn mse_row(z: &[f32], teacher_z: &[f32], standardize: bool, scale: f32, dz: &mut [f32]) -> f64 {
    assert!(
        teacher_z.len() == z.len() && dz.len() == z.len(),
        "mse_row: lengths {} (student), {} (teacher), {} (gradient) differ",
        z.len(),
        teacher_z.len(),
        dz.len()
    );
    if z.is_empty() {
        return 0.0;
    }
    let inv_v = 1.0 / z.len() as f64;
    let mut ds = standardized(z, standardize);
    let t = standardized(teacher_z, standardize);
    let mut loss = 0.0f64;
    for (d, t) in ds.iter_mut().zip(&t) {
        let diff = *d - t;
        loss += diff * diff;
        *d = 2.0 * inv_v * diff;
    }
    accumulate(z, &ds, standardize, scale, dz);
    loss * inv_v
}

/// The z-score of logit standardisation, `s = (z − mean) / (std + 1e-7)` with the UNBIASED
/// standard deviation `std = sqrt(Σ(z − mean)² / (V − 1))`, as `normalize(logit)` in the official
/// code of Sun et al. (CVPR 2024), which uses `torch.std`'s default (`correction=1`). A row of one
/// entry has `std = 0` here (torch: NaN), so its z-score is 0.
pub fn zscore(z: &[f32]) -> Vec<f32> {
    zscore64(z).into_iter().map(|v| v as f32).collect()
}

/// Backward of [`zscore`]: given `ds = dL/ds`, returns `dL/dz`. With `c = z − mean`,
/// `σ` the unbiased std and `d = σ + 1e-7`:
/// `dL/dz_j = (ds_j − mean(ds))/d − c_j·(Σ_i ds_i c_i) / (d²·(V−1)·σ)`
/// (`∂σ/∂z_j = c_j / ((V−1)σ)`; the second term is dropped where `σ = 0`).
pub fn zscore_backward(z: &[f32], ds: &[f32]) -> Vec<f32> {
    assert_eq!(z.len(), ds.len(), "zscore_backward: lengths");
    let ds: Vec<f64> = ds.iter().map(|&v| v as f64).collect();
    let mut dz = vec![0.0f32; z.len()];
    accumulate(z, &ds, true, 1.0, &mut dz);
    dz
}

const ZSCORE_EPS: f64 = 1e-7;

/// Mean, unbiased std of `z` (f64, two passes).
fn moments(z: &[f32]) -> (f64, f64) {
    let n = z.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let ss: f64 = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
    (mean, (ss / (n - 1) as f64).sqrt())
}

fn zscore64(z: &[f32]) -> Vec<f64> {
    let (mean, std) = moments(z);
    let inv = 1.0 / (std + ZSCORE_EPS);
    z.iter().map(|&v| (v as f64 - mean) * inv).collect()
}

/// `z` in f64, z-scored when `standardize`.
fn standardized(z: &[f32], standardize: bool) -> Vec<f64> {
    if standardize {
        zscore64(z)
    } else {
        z.iter().map(|&v| v as f64).collect()
    }
}

/// `log_softmax(s / t)`, max subtracted.
fn log_softmax(s: &[f64], t: f64) -> Vec<f64> {
    let max = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = s.iter().map(|&v| ((v - max) / t).exp()).sum();
    let lse = sum.ln();
    s.iter().map(|&v| (v - max) / t - lse).collect()
}

/// `dz += scale · dL/dz` from `ds = dL/ds` (through the z-score when `standardize`).
fn accumulate(z: &[f32], ds: &[f64], standardize: bool, scale: f32, dz: &mut [f32]) {
    let scale = scale as f64;
    if !standardize {
        for (g, &d) in dz.iter_mut().zip(ds) {
            *g += (scale * d) as f32;
        }
        return;
    }
    let n = z.len();
    let (mean, std) = moments(z);
    let d = std + ZSCORE_EPS;
    let ds_mean = ds.iter().sum::<f64>() / n as f64;
    let dot: f64 = ds.iter().zip(z).map(|(&g, &v)| g * (v as f64 - mean)).sum();
    let k = if std > 0.0 {
        dot / (d * d * (n - 1) as f64 * std)
    } else {
        0.0
    };
    for ((g, &dsj), &zj) in dz.iter_mut().zip(ds).zip(z) {
        let c = zj as f64 - mean;
        *g += (scale * ((dsj - ds_mean) / d - k * c)) as f32;
    }
}

/// `T²·KL(p‖q)`; `ds = T (q·Σp − p)`.
fn forward_kl(logq: &[f64], logp: &[f32], t: f64, ds: &mut [f64]) -> f64 {
    let mut kl = 0.0f64;
    let mut sum_p = 0.0f64;
    for (&lq, &lp) in logq.iter().zip(logp) {
        let lp = lp as f64;
        let p = lp.exp();
        if p > 0.0 {
            kl += p * (lp - lq);
        }
        sum_p += p;
    }
    for ((d, &lq), &lp) in ds.iter_mut().zip(logq).zip(logp) {
        *d = t * (lq.exp() * sum_p - (lp as f64).exp());
    }
    t * t * kl
}

/// Shared tail of the reverse-type losses: with `r_i = log q_i − log x_i`, writes
/// `ds_i = c·q_i (r_i − Σ_j q_j r_j)` (r in `ds` on entry) and returns `Σ_j q_j r_j`.
fn softmax_backward_of_q_r(logq: &[f64], c: f64, ds: &mut [f64]) -> f64 {
    let mut kl = 0.0f64;
    for (&r, &lq) in ds.iter().zip(logq) {
        let q = lq.exp();
        if q > 0.0 {
            kl += q * r;
        }
    }
    for (d, &lq) in ds.iter_mut().zip(logq) {
        let q = lq.exp();
        *d = if q > 0.0 { c * q * (*d - kl) } else { 0.0 };
    }
    kl
}

/// `T²·KL(q‖p)`; `ds_i = T q_i (r_i − KL)`, `r = log q − log p`.
fn reverse_kl(logq: &[f64], logp: &[f32], t: f64, ds: &mut [f64]) -> f64 {
    for ((d, &lq), &lp) in ds.iter_mut().zip(logq).zip(logp) {
        *d = lq - lp as f64;
    }
    t * t * softmax_backward_of_q_r(logq, t, ds)
}

/// `T²·(β KL(p‖m) + (1−β) KL(q‖m)) / (β(1−β))`, `0 < β < 1`;
/// `ds_i = (T/β) q_i (r_i − KL(q‖m))`, `r = log q − log m`.
fn jsd(logq: &[f64], logp: &[f32], beta: f64, t: f64, ds: &mut [f64]) -> f64 {
    let (ln_b, ln_1b) = (beta.ln(), (1.0 - beta).ln());
    let mut kl_pm = 0.0f64;
    for ((d, &lq), &lp) in ds.iter_mut().zip(logq).zip(logp) {
        let lp = lp as f64;
        let (a, b) = (lp + ln_b, lq + ln_1b);
        let hi = a.max(b);
        let logm = hi + ((a - hi).exp() + (b - hi).exp()).ln();
        let p = lp.exp();
        if p > 0.0 {
            kl_pm += p * (lp - logm);
        }
        *d = lq - logm;
    }
    let kl_qm = softmax_backward_of_q_r(logq, t / beta, ds);
    t * t * (beta * kl_pm + (1.0 - beta) * kl_qm) / (beta * (1.0 - beta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    // ---- f64 transcriptions (direct formulas: m = βp + (1−β)q in linear space) ----

    fn zscore_ref(z: &[f64]) -> Vec<f64> {
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let std = (z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        z.iter().map(|v| (v - mean) / (std + 1e-7)).collect()
    }

    fn log_softmax_ref(s: &[f64], t: f64) -> Vec<f64> {
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let lse = s.iter().map(|v| ((v - m) / t).exp()).sum::<f64>().ln();
        s.iter().map(|v| (v - m) / t - lse).collect()
    }

    fn kl_ref(lp: &[f64], lq: &[f64]) -> f64 {
        lp.iter()
            .zip(lq)
            .map(|(a, b)| {
                if a.exp() == 0.0 {
                    0.0
                } else {
                    a.exp() * (a - b)
                }
            })
            .sum()
    }

    /// The row loss of `kd` in f64 as a function of the student logits.
    fn loss_ref(kd: &LogitKd, z: &[f64], lp: &[f64]) -> f64 {
        let s = if kd.standardize {
            zscore_ref(z)
        } else {
            z.to_vec()
        };
        let t = kd.temperature as f64;
        let lq = log_softmax_ref(&s, t);
        t * t
            * match kd.divergence {
                Divergence::ForwardKl => kl_ref(lp, &lq),
                Divergence::ReverseKl => kl_ref(&lq, lp),
                Divergence::Jsd { beta: 0.0 } => kl_ref(lp, &lq),
                Divergence::Jsd { beta: 1.0 } => kl_ref(&lq, lp),
                Divergence::Jsd { beta } => {
                    let lm: Vec<f64> = lp
                        .iter()
                        .zip(&lq)
                        .map(|(a, b)| (beta * a.exp() + (1.0 - beta) * b.exp()).ln())
                        .collect();
                    (beta * kl_ref(lp, &lm) + (1.0 - beta) * kl_ref(&lq, &lm))
                        / (beta * (1.0 - beta))
                }
                Divergence::Mse => unreachable!(),
            }
    }

    fn mse_ref(z: &[f64], tz: &[f64], standardize: bool) -> f64 {
        let (s, t) = if standardize {
            (zscore_ref(z), zscore_ref(tz))
        } else {
            (z.to_vec(), tz.to_vec())
        };
        s.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / z.len() as f64
    }

    fn rel(got: f64, want: f64) -> f64 {
        (got - want).abs() / want.abs().max(1e-12)
    }

    const V: usize = 23;

    fn row_pair(seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let z: Vec<f32> = rng.vec(V).iter().map(|v| 8.0 * v).collect();
        let zt: Vec<f32> = rng.vec(V).iter().map(|v| 8.0 * v).collect();
        (z, zt)
    }

    fn all_settings() -> Vec<LogitKd> {
        let mut out = vec![];
        for standardize in [false, true] {
            for temperature in [0.7f32, 2.0] {
                for divergence in [
                    Divergence::ForwardKl,
                    Divergence::ReverseKl,
                    Divergence::Jsd { beta: 0.1 },
                    Divergence::Jsd { beta: 0.5 },
                    Divergence::Jsd { beta: 0.9 },
                    Divergence::Jsd { beta: 0.0 },
                    Divergence::Jsd { beta: 1.0 },
                ] {
                    out.push(LogitKd {
                        divergence,
                        temperature,
                        standardize,
                    });
                }
            }
        }
        out
    }

    /// Values against the f64 transcription (1e-5 relative) and gradients against central
    /// differences of it (`check`, 1e-5 of the largest gradient), for every divergence, T in
    /// {0.7, 2}, with and without standardisation; the gradient is ADDED with `scale`.
    #[test]
    fn rows_match_f64_and_finite_differences() {
        for (i, kd) in all_settings().iter().enumerate() {
            let (z, zt) = row_pair(100 + i as u64);
            let lp = kd.teacher_log_probs(&zt);
            let lpd = f64s(&lp);
            let mut g = vec![0.0f32; V];
            let loss = kd.row(&z, &lp, 1.0, &mut g).unwrap();
            let zd = f64s(&z);
            let want = loss_ref(kd, &zd, &lpd);
            let err = rel(loss, want);
            println!("{kd:?}: loss {loss:.6} rel err {err:.2e}");
            assert!(err < 1e-5, "{kd:?}: {loss} vs {want}");
            check(
                &format!("kd {kd:?}"),
                &g,
                &fd(|z| loss_ref(kd, z, &lpd), &zd, 1e-6),
                1e-5,
            );
            // Accumulation: `dz += scale·g` (scale 0.5 is exact in f32), same loss.
            let prefill = Rng::new(7).vec(V);
            let mut dz = prefill.clone();
            assert_eq!(kd.row(&z, &lp, 0.5, &mut dz).unwrap(), loss);
            for ((a, b), c) in dz.iter().zip(&prefill).zip(&g) {
                assert_eq!(*a, b + 0.5 * c);
            }
        }
    }

    /// The teacher side: `teacher_log_probs` is log_softmax(s(z_t)/T) of the transcription.
    #[test]
    fn teacher_log_probs_match_f64() {
        for kd in all_settings() {
            let (_, zt) = row_pair(3);
            let got = kd.teacher_log_probs(&zt);
            let ztd = f64s(&zt);
            let s = if kd.standardize {
                zscore_ref(&ztd)
            } else {
                ztd
            };
            check(
                "teacher_log_probs",
                &got,
                &log_softmax_ref(&s, kd.temperature as f64),
                1e-6,
            );
        }
    }

    #[test]
    fn mse_matches_f64_and_finite_differences() {
        for standardize in [false, true] {
            let (z, zt) = row_pair(11);
            let mut dz = vec![0.0f32; V];
            let loss = mse_row(&z, &zt, standardize, 1.0, &mut dz);
            let (zd, ztd) = (f64s(&z), f64s(&zt));
            let want = mse_ref(&zd, &ztd, standardize);
            assert!(rel(loss, want) < 1e-5, "{loss} vs {want}");
            check(
                &format!("mse standardize={standardize}"),
                &dz,
                &fd(|z| mse_ref(z, &ztd, standardize), &zd, 1e-6),
                1e-5,
            );
        }
        // Hand case: s = (1, 2, 3), t = 0: L = 14/3, dL/dz = (2/3)(1, 2, 3), added with scale 3.
        let mut dz = [1.0f32, 0.0, 0.0];
        let l = mse_row(&[1.0, 2.0, 3.0], &[0.0; 3], false, 3.0, &mut dz);
        assert!((l - 14.0 / 3.0).abs() < 1e-12);
        assert_eq!(dz, [3.0, 4.0, 6.0]);
    }

    #[test]
    fn zscore_and_backward_match_finite_differences() {
        let mut rng = Rng::new(5);
        let z: Vec<f32> = rng.vec(V).iter().map(|v| 8.0 * v + 3.0).collect();
        let r = rng.vec(V);
        let zd = f64s(&z);
        check("zscore", &zscore(&z), &zscore_ref(&zd), 1e-6);
        let s = zscore(&z);
        let mean = s.iter().map(|&v| v as f64).sum::<f64>() / V as f64;
        let var = s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (V - 1) as f64;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{mean} {var}"
        );
        check(
            "zscore_backward",
            &zscore_backward(&z, &r),
            &fd(|z| dot(&zscore_ref(z), &r), &zd, 1e-6),
            1e-5,
        );
        // A constant row: std 0, the z-score is 0 and so is its (sub)gradient's std term.
        assert_eq!(zscore(&[2.0; 4]), vec![0.0; 4]);
        assert!(
            zscore_backward(&[2.0; 4], &[1.0, 0.0, 0.0, 0.0])
                .iter()
                .all(|v| v.is_finite())
        );
    }

    /// Identical teacher and student: every KL/JSD is 0 with gradient 0 (up to the f32
    /// rounding of the teacher's log-probabilities, ~1e-7 relative).
    #[test]
    fn identical_distributions_give_zero() {
        let (z, _) = row_pair(21);
        for kd in all_settings() {
            let lp = kd.teacher_log_probs(&z);
            let mut dz = vec![0.0f32; V];
            let loss = kd.row(&z, &lp, 1.0, &mut dz).unwrap();
            let gmax = dz.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(loss.abs() < 1e-6 && gmax < 1e-6, "{kd:?}: {loss} {gmax}");
        }
    }

    /// Two classes by hand: q = (1/2, 1/2) (student logits equal), p = (1/4, 3/4).
    /// KL(p‖q) = ¼ln½ + ¾ln(3/2), dL/dz = T(q − p) = T(¼, −¼);
    /// KL(q‖p) = ½ln2 + ½ln(2/3), dL/dz = T·q(r − KL) = T(¼ln3, −¼ln3). Loss × T².
    #[test]
    fn two_class_hand_case() {
        let lp = [0.25f32.ln(), 0.75f32.ln()];
        let fwd = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        let rev = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        let l3 = 3f64.ln();
        for t in [1.0f32, 2.0] {
            for (divergence, want, g0) in [
                (Divergence::ForwardKl, fwd, 0.25),
                (Divergence::ReverseKl, rev, 0.25 * l3),
            ] {
                let kd = LogitKd {
                    divergence,
                    temperature: t,
                    standardize: false,
                };
                let mut dz = [0.0f32; 2];
                let loss = kd.row(&[5.0, 5.0], &lp, 1.0, &mut dz).unwrap();
                let t = t as f64;
                assert!(rel(loss, t * t * want) < 1e-6, "{divergence:?} {loss}");
                let g0 = t * g0;
                assert!(
                    (dz[0] as f64 - g0).abs() < 1e-6 && (dz[1] as f64 + g0).abs() < 1e-6,
                    "{divergence:?} {dz:?}"
                );
            }
        }
    }

    /// The scaled JSD tends to forward KL as β → 0 and to reverse KL as β → 1. The gap is of
    /// order β·max(p/q) (resp. (1−β)·max(q/p)): `log m` departs from `log q` wherever `β p_i`
    /// is not ≪ `q_i`. So the 1e-3 value check at β = 1e-4 uses a mild row (logits ±2); the
    /// gradient's gap (relative to its largest entry, not averaged over p like the value) is
    /// checked to shrink linearly with the distance ε to the end point: each 100× step of ε
    /// (1e-2 → 1e-8) cuts the value's and the gradient's gap by ≥ 50× until they reach the f32
    /// floor (1e-6). On the peaked row (±8, ratios up to e^30, not yet linear at ε = 1e-8) the
    /// gaps only have to shrink monotonically.
    #[test]
    fn jsd_limits_are_the_kls() {
        let run = |kd: LogitKd, divergence, z: &[f32], zt: &[f32]| {
            let kd = LogitKd { divergence, ..kd };
            let lp = kd.teacher_log_probs(zt);
            let mut dz = vec![0.0f32; z.len()];
            (kd.row(z, &lp, 1.0, &mut dz).unwrap(), dz)
        };
        let (z8, zt8) = row_pair(31);
        let (z2, zt2): (Vec<f32>, Vec<f32>) = (
            z8.iter().map(|v| v / 4.0).collect(),
            zt8.iter().map(|v| v / 4.0).collect(),
        );
        let grad_gap = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs() as f64));
            a.iter()
                .zip(b)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64))
                / scale
        };
        for (standardize, temperature) in [(false, 0.7f32), (false, 2.0), (true, 0.7), (true, 2.0)]
        {
            let kd = LogitKd {
                divergence: Divergence::ForwardKl,
                temperature,
                standardize,
            };
            for (to_one, limit) in [
                (false, Divergence::ForwardKl),
                (true, Divergence::ReverseKl),
            ] {
                let beta = |eps: f64| if to_one { 1.0 - eps } else { eps };
                let (lj, _) = run(kd, Divergence::Jsd { beta: beta(1e-4) }, &z2, &zt2);
                let (lk, _) = run(kd, limit, &z2, &zt2);
                println!(
                    "{kd:?} {limit:?} eps 1e-4: {lj} vs {lk}: rel {:.2e}",
                    rel(lj, lk)
                );
                assert!(rel(lj, lk) < 1e-3, "{limit:?}: {lj} vs {lk}");
                for (mild, z, zt) in [(true, &z2, &zt2), (false, &z8, &zt8)] {
                    let (lk, gk) = run(kd, limit, z, zt);
                    let gaps: Vec<(f64, f64)> = [1e-2, 1e-4, 1e-6, 1e-8]
                        .iter()
                        .map(|&e| {
                            let (l, g) = run(kd, Divergence::Jsd { beta: beta(e) }, z, zt);
                            (rel(l, lk), grad_gap(&g, &gk))
                        })
                        .collect();
                    println!("  gaps (value, gradient) at eps 1e-2..1e-8: {gaps:?}");
                    let rate = if mild { 50.0 } else { 1.0 };
                    for w in gaps.windows(2) {
                        assert!(w[1].0 < (w[0].0 / rate).max(1e-6), "{gaps:?}");
                        assert!(w[1].1 < (w[0].1 / rate).max(1e-6), "{gaps:?}");
                    }
                }
            }
        }
    }

    /// A +1e4 offset on both sides' logits (and ±30 magnitudes) stays finite and matches the
    /// f64 transcription at the same (f32-rounded) inputs.
    #[test]
    fn large_logits_do_not_overflow() {
        for kd in all_settings() {
            let (z, zt) = row_pair(41);
            let z: Vec<f32> = z.iter().map(|v| 30.0 / 8.0 * v + 1e4).collect();
            let zt: Vec<f32> = zt.iter().map(|v| 30.0 / 8.0 * v + 1e4).collect();
            let lp = kd.teacher_log_probs(&zt);
            assert!(lp.iter().all(|v| v.is_finite()));
            let mut dz = vec![0.0f32; V];
            let loss = kd.row(&z, &lp, 1.0, &mut dz).unwrap();
            assert!(loss.is_finite() && dz.iter().all(|v| v.is_finite()));
            let want = loss_ref(&kd, &f64s(&z), &f64s(&lp));
            assert!(rel(loss, want) < 1e-5, "{kd:?}: {loss} vs {want}");
        }
        let mut dz = vec![0.0f32; 3];
        let l = mse_row(&[1e4, 1e4 + 1.0, 1e4 + 2.0], &[1e4; 3], true, 1.0, &mut dz);
        assert!(l.is_finite() && dz.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn settings_are_checked() {
        let ok = LogitKd {
            divergence: Divergence::Jsd { beta: 0.5 },
            temperature: 1.0,
            standardize: false,
        };
        assert!(ok.validate().is_ok());
        for t in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
            let e = LogitKd {
                temperature: t,
                ..ok
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("distill.logits.temperature"), "{e}");
        }
        for beta in [-0.1, 1.1, f64::NAN] {
            let e = LogitKd {
                divergence: Divergence::Jsd { beta },
                ..ok
            }
            .validate()
            .unwrap_err();
            assert!(
                e.to_string().contains("distill.logits.divergence.beta"),
                "{e}"
            );
        }
        let mut dz = [0.0f32; 2];
        let mse = LogitKd {
            divergence: Divergence::Mse,
            ..ok
        };
        assert!(mse.row(&[0.0, 1.0], &[-1.0, -1.0], 1.0, &mut dz).is_err());
        assert!(ok.row(&[0.0, 1.0], &[-1.0], 1.0, &mut dz).is_err());
        assert!(ok.row(&[], &[], 1.0, &mut []).is_err());
    }

    #[test]
    fn divergence_serde_form() {
        #[derive(serde::Deserialize)]
        struct Cfg {
            divergence: Divergence,
        }
        let parse = |s: &str| toml::from_str::<Cfg>(s).map(|c| c.divergence);
        assert_eq!(
            parse("divergence = { kind = \"jsd\", beta = 0.5 }").unwrap(),
            Divergence::Jsd { beta: 0.5 }
        );
        assert_eq!(
            parse("[divergence]\nkind = \"forward_kl\"").unwrap(),
            Divergence::ForwardKl
        );
        assert_eq!(
            parse("divergence = { kind = \"reverse_kl\" }").unwrap(),
            Divergence::ReverseKl
        );
        assert_eq!(
            parse("divergence = { kind = \"mse\" }").unwrap(),
            Divergence::Mse
        );
        assert!(parse("divergence = { kind = \"jsd\" }").is_err());
        assert!(parse("divergence = { kind = \"jsd\", beta = 0.5, temp = 1 }").is_err());
        assert!(parse("divergence = { kind = \"kl\" }").is_err());
        let json = serde_json::to_string(&Divergence::Jsd { beta: 0.25 }).unwrap();
        assert_eq!(json, r#"{"kind":"jsd","beta":0.25}"#);
    }
}
