//! bf16 weights multiplied at the bf16 rate: on x86-64 CPUs with AVX512-BF16, [`linear`] computes
//! `out[m, n] = x̂[m, k] · Wᵀ` for a bf16 `W: [n, k]` through `vdpbf16ps` (32 multiply-adds per
//! instruction, twice AVX-512's f32 FMA), where `x̂` is the activations rounded to bf16.
//!
//! # Numerics
//! - `x̂ = bf16(x)`, rounded to nearest, ties to even (`half::bf16::from_f32`, as torch's
//!   `x.to(torch.bfloat16)`): each activation moves by at most 2⁻⁹ of its magnitude. This is what
//!   HF transformers computes when a model runs in bf16 (its activations are bf16), except that
//!   the outputs stay f32 instead of being rounded to bf16.
//! - Every output element has one f32 accumulator that runs over `k` in pairs, as `vdpbf16ps`
//!   defines it (Intel SDM): `acc += x̂[2p+1]·w[2p+1]; acc += x̂[2p]·w[2p]`, each product exact in
//!   f32 (8-bit by 8-bit significands) and each addition rounded to nearest even, denormal inputs
//!   and results flushed to zero. An odd `k` is padded with a zero pair element.
//!
//! Rounding the activations changes results against the f32 path (widen `W`, multiply in f32),
//! so the path is opt-in ([`set_native`]); [`crate::ops::matmul::linear`] takes it for bf16
//! weights when [`enabled`], and the f32 path otherwise and on CPUs without AVX512-BF16.
//!
//! # Kernel
//! The activations are rounded and packed in pairs once per call (`[m, ⌈k/2⌉]` of `u32`); the
//! weight is split into panels of 48 rows, each packed pair-interleaved (`[⌈k/2⌉, 48]`, a panel of
//! a 4096-wide matrix is 384 KiB, in L2) into a per-thread buffer, and a register tile of up to 8
//! activation rows by the panel's 48 columns (24 zmm accumulators, each activation pair broadcast
//! once per 3 `vdpbf16ps`) runs over all of `k`. Panels run in parallel on rayon.

use crate::error::{Error, Result};
use half::bf16;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static NATIVE: AtomicBool = AtomicBool::new(false);

/// Opts in (or out) of bf16 activations for bf16 weights: while on, and where [`available`],
/// [`crate::ops::matmul::linear`] multiplies bf16 weights through [`linear`] (see the module docs
/// for what changes numerically). Off by default. Process-wide.
pub fn set_native(on: bool) {
    NATIVE.store(on, Ordering::Relaxed);
}

/// Whether this CPU has the instructions [`linear`] needs (AVX-512 F and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 weights are multiplied through [`linear`]: opted in by [`set_native`] and
/// [`available`].
pub fn enabled() -> bool {
    NATIVE.load(Ordering::Relaxed) && available()
}

/// Weight rows per packed panel: three 16-lane vectors.
const NC: usize = 48;
/// Activation rows per register tile.
const MR: usize = 8;

/// The bf16 bits of `x[i]` and `x[i + 1]` (zero past the end) packed as one `u32`, the first in
/// the low half: the operand layout of `vdpbf16ps`.
fn pair<T: Copy>(x: &[T], i: usize, bits: impl Fn(T) -> u16) -> u32 {
    let lo = bits(x[i]) as u32;
    let hi = x.get(i + 1).map_or(0, |&v| bits(v) as u32);
    lo | hi << 16
}

/// `out[m, n] = bf16(x)[m, k] · Wᵀ` for `W: [n, k]` (see the module docs for the numerics).
/// [`Error::Unsupported`] (and `out` untouched) where this CPU lacks AVX512-BF16 ([`available`]).
///
/// # Panics
/// If `x`, `w` or `out` is not `[m, k]`, `[n, k]`, `[m, n]`.
pub fn linear(
    x: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    if !available() {
        return Err(Error::Unsupported {
            what: "instruction set for bf16 products (AVX512-BF16) on this CPU",
            value: "bf16::linear".into(),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let kp = k.div_ceil(2);
    let mut xp = vec![0u32; m * kp];
    xp.par_chunks_mut(kp)
        .zip(x.par_chunks(k.max(1)))
        .for_each(|(d, s)| {
            for (p, d) in d.iter_mut().enumerate() {
                *d = pair(s, 2 * p, |v| bf16::from_f32(v).to_bits());
            }
        });
    let dst = super::matmul::SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(NC)).into_par_iter().for_each_init(
        || vec![0u32; kp * NC],
        |pack, panel| {
            let (j0, nc) = (panel * NC, NC.min(n - panel * NC));
            for c in 0..NC {
                if c < nc {
                    let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
                    for p in 0..kp {
                        pack[p * NC + c] = pair(row, 2 * p, bf16::to_bits);
                    }
                } else {
                    for p in 0..kp {
                        pack[p * NC + c] = 0;
                    }
                }
            }
            for i0 in (0..m).step_by(MR) {
                let tile = Tile {
                    xp: &xp[i0 * kp..],
                    kp,
                    pack,
                    // SAFETY: rows i0.. of `out` at columns j0..j0 + nc, which only this panel
                    // writes while `out` is borrowed by this function.
                    out: unsafe { dst.get().add(i0 * n + j0) },
                    os: n,
                    nc,
                };
                // SAFETY: `available()` checked the features; `tile` indexes within `xp` (rows
                // i0..i0 + r of kp pairs), `pack` ([kp, NC]) and `out` (r rows of n, nc columns).
                unsafe {
                    match (m - i0).min(MR) {
                        8 => tile.run::<8>(),
                        7 => tile.run::<7>(),
                        6 => tile.run::<6>(),
                        5 => tile.run::<5>(),
                        4 => tile.run::<4>(),
                        3 => tile.run::<3>(),
                        2 => tile.run::<2>(),
                        _ => tile.run::<1>(),
                    }
                }
            }
        },
    );
    Ok(())
}

/// One register tile: activation rows `xp[r * kp..]` (packed pairs) by a packed weight panel,
/// written to `out[r * os + c]` for `c < nc`.
struct Tile<'a> {
    xp: &'a [u32],
    kp: usize,
    pack: &'a [u32],
    out: *mut f32,
    os: usize,
    nc: usize,
}

impl Tile<'_> {
    /// `R` activation rows against the panel.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `xp` holds `R` rows of `kp` pairs, `pack` `kp · NC`
    /// values, and `out` is writable at `r · os + c` for `r < R`, `c < nc ≤ NC`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        assert!(self.xp.len() >= R * self.kp && self.pack.len() >= self.kp * NC && self.nc <= NC);
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        let (xp, wp) = (self.xp.as_ptr(), self.pack.as_ptr());
        for p in 0..self.kp {
            // SAFETY (loads): p < kp, so p · NC + 48 ≤ pack.len() and r · kp + p < xp.len().
            let b: [__m512bh; 3] = std::array::from_fn(|v| unsafe {
                std::mem::transmute(_mm512_loadu_ps(wp.add(p * NC + 16 * v) as *const f32))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let a: __m512bh = unsafe {
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(r * self.kp + p) as i32))
                };
                for (acc, b) in acc.iter_mut().zip(b) {
                    *acc = _mm512_dpbf16_ps(*acc, a, b);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                let lanes = self.nc.saturating_sub(16 * v).min(16);
                if lanes > 0 {
                    let mask = (((1u32 << lanes) - 1) & 0xffff) as __mmask16;
                    // SAFETY: row r < R, columns 16 v + lane < nc (masked).
                    unsafe {
                        _mm512_mask_storeu_ps(self.out.add(r * self.os + 16 * v), mask, *acc)
                    };
                }
            }
        }
    }

    /// Never called: [`available`] is false off x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const R: usize>(&self) {
        unreachable!("bf16::linear runs only where AVX512-BF16 is available")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module's numerics in scalar f32: `x̂ = bf16(x)`, one accumulator per output over `k` in
    /// pairs, the odd element of each pair added first (`vdpbf16ps`'s order).
    fn reference(x: &[f32], w: &[bf16], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let (a, b) = (&xr[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                let mut acc = 0.0f32;
                for p in (0..k).step_by(2) {
                    if p + 1 < k {
                        acc += a[p + 1] * b[p + 1].to_f32();
                    }
                    acc += a[p] * b[p].to_f32();
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.7311 + seed).sin() * 1.7).powi(3))
            .collect()
    }

    /// Against the scalar reference of the same numerics on odd shapes (k odd and not a
    /// multiple of 32, n not a multiple of 48, m not of 8): equal within 2⁻²⁰ of `Σ|x̂ w|`,
    /// room for an implementation that rounds the pair's two additions differently (on Zen 5 the
    /// results are bit-identical; bf16 rounding of the activations is 2¹¹ times larger); and
    /// within 2⁻⁸ of `Σ|x̂ w|` of the exact product of the unrounded activations.
    #[test]
    fn avx512_matches_the_scalar_reference_on_odd_shapes() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to compare");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (9, 50, 77),
            (17, 97, 64),
            (3, 48, 33),
            (23, 5, 130),
        ] {
            let x = data(m * k, 0.3);
            let w: Vec<bf16> = data(n * k, 1.1).into_iter().map(bf16::from_f32).collect();
            let mut got = vec![f32::NAN; m * n];
            linear(&x, &w, (m, n, k), &mut got).unwrap();
            let want = reference(&x, &w, (m, n, k));
            for i in 0..m {
                for j in 0..n {
                    let mag: f32 = (0..k)
                        .map(|t| {
                            (bf16::from_f32(x[i * k + t]).to_f32() * w[j * k + t].to_f32()).abs()
                        })
                        .sum();
                    let (g, r) = (got[i * n + j], want[i * n + j]);
                    assert!(
                        (g - r).abs() <= mag * 2f32.powi(-20),
                        "[{m},{n},{k}] ({i},{j}): {g} vs {r}"
                    );
                    let exact: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64())
                        .sum();
                    assert!(
                        (g as f64 - exact).abs() <= mag as f64 * 2f64.powi(-8),
                        "({i},{j})"
                    );
                }
            }
        }
    }
}
