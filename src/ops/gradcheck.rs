//! Test helpers for the backward passes: a seeded generator, central differences in f64 and a
//! scale-relative error check. Every op's test transcribes its forward in f64 and checks (1) the
//! crate's f32 forward against that transcription and (2) the f32 backward against central
//! differences of it, for the scalar loss `L = Σ y ⊙ r` with `r` random (so `dy = r`).
//!
//! Tolerances: errors are relative to the largest reference gradient. The f32 backward carries
//! f32 rounding (2⁻²⁴ ≈ 6e-8 per operation, a few times that after sums over tens of terms);
//! the f64 central difference with h = 1e-6 adds O(h²·f''') ≈ 1e-12 truncation and ≈ 1e-16/h ≈
//! 1e-10 cancellation. So 1e-5 (forwards and backwards alike) leaves about 50× margin over the
//! measured ≤ 2e-7, yet catches any wrong term, factor or index (those give errors of order 1).

/// Small xorshift generator: tests stay deterministic without depending on `rand`'s API.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `Σ y ⊙ r`.
pub fn dot(y: &[f64], r: &[f32]) -> f64 {
    assert_eq!(y.len(), r.len());
    y.iter().zip(r).map(|(a, &b)| a * b as f64).sum()
}

/// Central differences of `f` at `x` with step `h`.
pub fn fd(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let dn = f(&x);
            x[i] = x0;
            (up - dn) / (2.0 * h)
        })
        .collect()
}

/// `max |got - want| / max(max |want|, 1e-3)`, asserted below `tol` and printed (run the tests
/// with `--nocapture` to see the measured values).
pub fn check(name: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&a, b)| m.max((a as f64 - b).abs()))
        / scale;
    println!("gradcheck {name}: rel err {err:.2e} (scale {scale:.3}, tol {tol:.0e})");
    assert!(err < tol, "{name}: rel err {err:e} >= {tol:e}");
    err
}
