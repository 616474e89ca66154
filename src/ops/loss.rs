//! Losses for the trainer.

use crate::error::{Error, Result};

/// The target that marks a row as not counted (torch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Softmax cross-entropy over `logits: [rows, vocab]` with one target per row, as torch's
/// `F.cross_entropy(logits, targets, ignore_index=ignore_index)` (mean reduction): rows whose target
/// is `ignore_index` (non-answer tokens) are skipped and the loss is the mean over the `n` counted
/// rows, `L = (1/n) Σ (logsumexp(z) − z[target])`. Returns `(L, dlogits)` in one pass, with
/// `dlogits = (softmax(z) − onehot(target)) / n` on counted rows and 0 on ignored ones.
/// With no counted row, torch returns NaN; this returns `(0, zeros)` so a batch of prompts
/// without answers contributes nothing. A target outside `0..vocab` (other than `ignore_index`)
/// is an error.
pub fn cross_entropy(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
) -> Result<(f32, Vec<f32>)> {
    if vocab == 0 || logits.len() != targets.len() * vocab {
        return Err(Error::Shape {
            name: "cross_entropy logits".into(),
            expected: vec![targets.len(), vocab],
            got: vec![logits.len()],
        });
    }
    if let Some(&t) = targets
        .iter()
        .find(|&&t| t != ignore_index && !(0..vocab as i64).contains(&t))
    {
        return Err(Error::arg(
            "cross_entropy target",
            format!("{t} is outside the vocabulary of {vocab} (ignore index {ignore_index})"),
        ));
    }
    let counted = targets.iter().filter(|&&t| t != ignore_index).count();
    let mut grad = vec![0.0f32; logits.len()];
    if counted == 0 {
        return Ok((0.0, grad));
    }
    let inv_n = 1.0 / counted as f32;
    let mut loss = 0.0f64;
    for ((z, g), &t) in logits
        .chunks(vocab)
        .zip(grad.chunks_mut(vocab))
        .zip(targets)
    {
        if t == ignore_index {
            continue;
        }
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for (g, &v) in g.iter_mut().zip(z) {
            *g = (v - max).exp();
            sum += *g;
        }
        let t = t as usize;
        loss += (sum.ln() + max - z[t]) as f64;
        let scale = inv_n / sum;
        for g in g.iter_mut() {
            *g *= scale;
        }
        g[t] -= inv_n;
    }
    Ok(((loss / counted as f64) as f32, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    /// f64 transcription of the mean over counted rows.
    fn ce64(z: &[f64], vocab: usize, targets: &[i64]) -> f64 {
        let mut loss = 0.0;
        let mut n = 0;
        for (z, &t) in z.chunks(vocab).zip(targets) {
            if t == IGNORE_INDEX {
                continue;
            }
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            loss += lse - z[t as usize];
            n += 1;
        }
        loss / n as f64
    }

    #[test]
    fn hand_case() {
        // Row 0: logits (0, ln 3) target 1: p = (1/4, 3/4), loss = ln(4/3).
        // Row 1: ignored. Row 2: logits (2, 2) target 0: loss ln 2, p = (1/2, 1/2).
        let z = [0.0, 3f32.ln(), 5.0, -5.0, 2.0, 2.0];
        let (loss, g) = cross_entropy(&z, 2, &[1, IGNORE_INDEX, 0], IGNORE_INDEX).unwrap();
        let want = ((4.0f64 / 3.0).ln() + 2f64.ln()) / 2.0;
        assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
        let want_g = [0.125, -0.125, 0.0, 0.0, -0.25, 0.25];
        for (a, b) in g.iter().zip(want_g) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
        let (l0, g0) = cross_entropy(&z[2..4], 2, &[IGNORE_INDEX], IGNORE_INDEX).unwrap();
        assert!(l0 == 0.0 && g0 == [0.0, 0.0]);
        assert!(cross_entropy(&z, 2, &[2, 0, 0], IGNORE_INDEX).is_err());
        assert!(cross_entropy(&z, 2, &[-1, 0, 0], IGNORE_INDEX).is_err());
        assert!(cross_entropy(&z, 4, &[0, 0, 0], IGNORE_INDEX).is_err());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, vocab) = (6, 23);
        let mut rng = Rng::new(6);
        // Logits of a trained model's magnitude (±8) so the softmax is peaked.
        let z: Vec<f32> = rng.vec(rows * vocab).iter().map(|v| 8.0 * v).collect();
        let targets = [4, IGNORE_INDEX, 0, 22, IGNORE_INDEX, 4];
        let (loss, g) = cross_entropy(&z, vocab, &targets, IGNORE_INDEX).unwrap();
        let zd = f64s(&z);
        let want = ce64(&zd, vocab, &targets);
        let err = (loss as f64 - want).abs() / want.abs();
        println!("gradcheck cross_entropy fwd: rel err {err:.2e}");
        assert!(err < 1e-5);
        check(
            "cross_entropy dlogits",
            &g,
            &fd(|z| ce64(z, vocab, &targets), &zd, 1e-6),
            1e-5,
        );
        // A large logit offset (bf16-era magnitudes) must not overflow: the max is subtracted.
        let big: Vec<f32> = z.iter().map(|v| v + 1e4).collect();
        let (lb, _) = cross_entropy(&big, vocab, &targets, IGNORE_INDEX).unwrap();
        assert!((lb - loss).abs() < 1e-2 * loss.abs(), "{lb} vs {loss}");
    }
}
