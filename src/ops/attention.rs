//! Scaled dot-product attention with grouped-query heads, causal (LM) or bidirectional (vision).

use super::matmul::{matmul_nn, matmul_nt, matmul_tn_acc};
use crate::error::{Error, Result};
use crate::ops;
use rayon::prelude::*;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query rows.
    pub t: usize,
    /// Key/value rows (for causal attention the queries are the last `t` of them).
    pub s: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// `softmax(q·kᵀ/√d + mask)·v` per head. `q: [t, heads, d]`, `k, v: [s, kv_heads, d]`,
/// output `[t, heads, d]`. Query head `h` reads key/value head `h / (heads / kv_heads)`. Under the
/// causal mask query row `i` sees keys `0..=s-t+i`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Result<Vec<f32>> {
    sh.check(q.len(), k.len(), v.len())?;
    Ok(attend(q, k, v, sh, false).0)
}

impl AttnShape {
    /// Fails unless the heads group evenly and `q`, `k`, `v` have `t`, `s`, `s` rows of their
    /// widths (and, for causal attention, the queries fit in the keys).
    pub fn check(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let d = self.head_dim;
        if self.kv_heads == 0 || d == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::arg(
                "attention",
                format!(
                    "{} query heads of dimension {d} do not group over {} key/value heads",
                    self.heads, self.kv_heads
                ),
            ));
        }
        let (qw, kw) = (self.heads * d, self.kv_heads * d);
        for (name, got, rows, w) in [
            ("q", q, self.t, qw),
            ("k", k, self.s, kw),
            ("v", v, self.s, kw),
        ] {
            if got != rows * w {
                return Err(Error::Shape {
                    name: format!("attention {name}"),
                    expected: vec![rows, w],
                    got: vec![got / w, w],
                });
            }
        }
        if self.causal && self.t > self.s {
            return Err(Error::arg(
                "attention",
                format!(
                    "{} causal query rows need at least that many keys, got {}",
                    self.t, self.s
                ),
            ));
        }
        Ok(())
    }
}

/// [`attention`] that also returns the attention probabilities `[heads, t, s]` (0 where masked),
/// to be handed to [`attention_backward`]. The output is bitwise the same as [`attention`]'s.
pub fn attention_with_probs(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
) -> Result<(Vec<f32>, Vec<f32>)> {
    sh.check(q.len(), k.len(), v.len())?;
    let (out, probs) = attend(q, k, v, sh, true);
    Ok((out, probs.unwrap_or_default()))
}

/// Up to this many query rows (decoding), [`attend`] runs [`HeadRows::attend`]: `gemm`'s set-up
/// costs more than such a product.
const DIRECT_ROWS: usize = 8;

/// Query rows per gemm block of the many-row path: each block multiplies only the keys its
/// last row sees, so a causal prefill skips about half the score matrix.
const BLOCK_ROWS: usize = 128;

/// One head's queries, keys and values for direct loops: row `i` of `q` at `i · q_rs`, key and
/// value row `j` at `j · kv_rs`, each `d` long.
struct HeadRows<'a> {
    q: &'a [f32],
    q_rs: usize,
    k: &'a [f32],
    v: &'a [f32],
    kv_rs: usize,
    d: usize,
    scale: f32,
}

impl HeadRows<'_> {
    /// `p[i, j] = softmax_j(scale · q_i · k_j)` over `j < visible(i)` (0 beyond) and
    /// `o[i] = Σ_j p[i, j] · v_j`, for the rows of `p: [t, s]` and `o: [t, d]`, in fused
    /// multiply-adds (as `gemm` computes). With AVX2 + FMA the same loops are compiled for them
    /// (same operations in the same order, so the same bits; without FMA `mul_add` is a libm
    /// call).
    fn attend(&self, s: usize, p: &mut [f32], o: &mut [f32], visible: impl Fn(usize) -> usize) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                h: &HeadRows,
                s: usize,
                p: &mut [f32],
                o: &mut [f32],
                vis: &dyn Fn(usize) -> usize,
            ) {
                h.loops(s, p, o, vis)
            }
            // SAFETY: AVX2 was detected just above.
            return unsafe { avx2(self, s, p, o, &visible) };
        }
        self.loops(s, p, o, &visible)
    }

    #[inline(always)]
    fn loops(&self, s: usize, p: &mut [f32], o: &mut [f32], visible: &dyn Fn(usize) -> usize) {
        let d = self.d;
        for (i, (row, oi)) in p.chunks_mut(s).zip(o.chunks_mut(d)).enumerate() {
            let n = visible(i);
            let qi = &self.q[i * self.q_rs..][..d];
            for (j, x) in row[..n].iter_mut().enumerate() {
                *x = fused_dot(qi, &self.k[j * self.kv_rs..][..d]);
            }
            softmax_scaled(row, n, self.scale);
            for (j, &pj) in row[..n].iter().enumerate() {
                for (o, &x) in oi.iter_mut().zip(&self.v[j * self.kv_rs..][..d]) {
                    *o = pj.mul_add(x, *o);
                }
            }
        }
    }
}

/// `Σ a_e b_e` in eight partial sums of fused multiply-adds.
#[inline(always)]
fn fused_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(0.0f32, |s, (x, y)| x.mul_add(*y, s));
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The forward of [`attention`], keeping the probabilities when `keep_probs`.
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    keep_probs: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let AttnShape {
        t,
        s,
        heads,
        kv_heads,
        head_dim: d,
        causal,
    } = sh;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let visible = |i: usize| if causal { s - t + i + 1 } else { s };
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut o = vec![0.0f32; t * d];
            if t <= DIRECT_ROWS {
                let mut p = vec![0.0f32; t * s];
                let rows = HeadRows {
                    q: &q[h * d..],
                    q_rs: heads * d,
                    k: &k[kvh * d..],
                    v: &v[kvh * d..],
                    kv_rs: kv_heads * d,
                    d,
                    scale,
                };
                rows.attend(s, &mut p, &mut o, visible);
                return (o, if keep_probs { p } else { Vec::new() });
            }
            // Blocks of query rows through gemm, each against the keys its last row sees (under
            // the causal mask about half of them on average, not all `s`).
            let mut p = vec![0.0f32; if keep_probs { t * s } else { 0 }];
            let mut blk = vec![0.0f32; BLOCK_ROWS.min(t) * s];
            for r0 in (0..t).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(t - r0);
                let n = visible(r0 + rows - 1);
                let pb = &mut blk[..rows * n];
                let qb = &q[r0 * heads * d + h * d..];
                matmul_nt(
                    rows,
                    n,
                    d,
                    qb,
                    heads * d,
                    &k[kvh * d..],
                    kv_heads * d,
                    pb,
                    false,
                );
                for (i, row) in pb.chunks_mut(n).enumerate() {
                    softmax_scaled(row, visible(r0 + i), scale);
                }
                let ob = &mut o[r0 * d..(r0 + rows) * d];
                matmul_nn(rows, d, n, pb, n, &v[kvh * d..], kv_heads * d, ob, false);
                if keep_probs {
                    for (i, row) in pb.chunks(n).enumerate() {
                        p[(r0 + i) * s..][..n].copy_from_slice(row);
                    }
                }
            }
            (o, if keep_probs { p } else { Vec::new() })
        })
        .collect();
    let mut out = vec![0.0f32; t * heads * d];
    for (h, (o, _)) in per_head.iter().enumerate() {
        for i in 0..t {
            out[(i * heads + h) * d..][..d].copy_from_slice(&o[i * d..][..d]);
        }
    }
    let probs = keep_probs.then(|| per_head.into_iter().flat_map(|(_, p)| p).collect());
    (out, probs)
}

/// Backward of [`attention`] for `dout: [t, heads, d]`, returning `(dq, dk, dv)` shaped as
/// `q`, `k`, `v`. `probs` are those of [`attention_with_probs`] (`[heads, t, s]`); with `None`
/// they are recomputed. `dprobs` (`[heads, t, s]`) is a loss's own gradient on the
/// probabilities (an attention-grounding or attention-alignment loss), added to the one through
/// the output. Per query head `h` reading key/value head `g = h / (heads / kv_heads)`, with `P`
/// its probabilities and `σ = 1/√d`:
/// `dV_g += Pᵀ·dO_h`, `dP = dO_h·V_gᵀ (+ dprobs_h)`, `dS = σ·P ⊙ (dP − rowsum(P ⊙ dP))`,
/// `dQ_h = dS·K_g`, `dK_g += dSᵀ·Q_h` (masked entries have `P = 0`, hence no gradient).
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: Option<&[f32]>,
    dprobs: Option<&[f32]>,
    dout: &[f32],
    sh: AttnShape,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    sh.check(q.len(), k.len(), v.len())?;
    let AttnShape {
        t,
        s,
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = sh;
    let n_probs = heads * t * s;
    let bad = [("dout", dout.len(), t * heads * d)]
        .into_iter()
        .chain(probs.map(|p| ("probs", p.len(), n_probs)))
        .chain(dprobs.map(|p| ("dprobs", p.len(), n_probs)))
        .find(|(_, got, want)| got != want);
    if let Some((name, got, want)) = bad {
        return Err(Error::Shape {
            name: format!("attention_backward {name}"),
            expected: vec![want],
            got: vec![got],
        });
    }
    let recomputed;
    let probs = match probs {
        Some(p) => p,
        None => {
            recomputed = attend(q, k, v, sh, true).1.unwrap_or_default();
            &recomputed
        }
    };
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per key/value head, so its dk/dv accumulate without sharing.
    let per_kv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..kv_heads)
        .into_par_iter()
        .map(|g| {
            let (mut dk, mut dv) = (vec![0.0f32; s * d], vec![0.0f32; s * d]);
            let mut dq = vec![0.0f32; group * t * d];
            let mut ds = vec![0.0f32; t * s];
            for (hi, dq) in dq.chunks_mut(t * d).enumerate() {
                let h = g * group + hi;
                let p = &probs[h * t * s..][..t * s];
                let d_o = &dout[h * d..];
                matmul_tn_acc(s, d, t, p, s, d_o, heads * d, &mut dv, false);
                matmul_nt(
                    t,
                    s,
                    d,
                    d_o,
                    heads * d,
                    &v[g * d..],
                    kv_heads * d,
                    &mut ds,
                    false,
                );
                if let Some(dp) = dprobs {
                    ops::add(&mut ds, &dp[h * t * s..][..t * s]);
                }
                for (dsr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dsr.iter_mut().zip(pr) {
                        *x = scale * pv * (*x - dot);
                    }
                }
                matmul_nn(t, d, s, &ds, s, &k[g * d..], kv_heads * d, dq, false);
                matmul_tn_acc(s, d, t, &ds, s, &q[h * d..], heads * d, &mut dk, false);
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for (g, (gq, gk, gv)) in per_kv.iter().enumerate() {
        for (hi, gq) in gq.chunks(t * d).enumerate() {
            let h = g * group + hi;
            for i in 0..t {
                dq[(i * heads + h) * d..][..d].copy_from_slice(&gq[i * d..][..d]);
            }
        }
        for j in 0..s {
            dk[(j * kv_heads + g) * d..][..d].copy_from_slice(&gk[j * d..][..d]);
            dv[(j * kv_heads + g) * d..][..d].copy_from_slice(&gv[j * d..][..d]);
        }
    }
    Ok((dq, dk, dv))
}

/// Causal attention probabilities of a few query rows to chosen key columns, `[heads, rows, cols]`
/// (what pruning ranks by, `prune::score::SelectedAttention`): `q: [rows, heads, d]` the queries
/// (RoPE applied) of the rows at positions `rows`, `k: [positions, kv_heads, d]` the keys; row
/// `i` sees keys `0..=rows[i]`, normalised over all of them, and `cols` are read out. Memory is
/// `heads x rows x positions`, never the layer's `heads x positions x positions`.
pub fn selected_probs(
    q: &[f32],
    k: &[f32],
    rows: &[usize],
    cols: &[usize],
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<Vec<f32>> {
    let (nr, s) = (rows.len(), k.len() / (kv_heads * d).max(1));
    AttnShape {
        t: nr,
        s,
        heads,
        kv_heads,
        head_dim: d,
        causal: false,
    }
    .check(q.len(), k.len(), k.len())?;
    if let Some(&bad) = rows.iter().chain(cols).find(|&&p| p >= s) {
        return Err(Error::arg(
            "selected_probs",
            format!("position {bad} of {s} keys"),
        ));
    }
    let scale = 1.0 / (d as f32).sqrt();
    let group = heads / kv_heads;
    let probs: Vec<f32> = (0..heads)
        .into_par_iter()
        .flat_map_iter(|h| {
            let mut p = vec![0.0f32; nr * s];
            matmul_nt(
                nr,
                s,
                d,
                &q[h * d..],
                heads * d,
                &k[(h / group) * d..],
                kv_heads * d,
                &mut p,
                false,
            );
            let mut out = Vec::with_capacity(nr * cols.len());
            for (i, row) in p.chunks_mut(s).enumerate() {
                softmax_scaled(row, rows[i] + 1, scale);
                out.extend(cols.iter().map(|&c| row[c]));
            }
            out
        })
        .collect();
    Ok(probs)
}

/// In place: `row[..visible] = softmax(scale · row[..visible])`, the rest set to 0.
pub fn softmax_scaled(row: &mut [f32], visible: usize, scale: f32) {
    let max = row[..visible]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0.0f32;
    for x in &mut row[..visible] {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    for x in &mut row[..visible] {
        *x /= sum;
    }
    row[visible..].fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_rows_equal_the_full_attention_rows() {
        // 1 kv head shared by 2 query heads, 4 positions, image at 1 and 2; score rows 2 and 3.
        let (h, d, s) = (2, 2, 4);
        let q: Vec<f32> = (0..s * h * d).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..s * d).map(|i| (i as f32 * 1.3).cos()).collect();
        let rows = [2, 3];
        let sel: Vec<f32> = rows
            .iter()
            .flat_map(|&r| q[r * h * d..(r + 1) * h * d].to_vec())
            .collect();
        let att = selected_probs(&sel, &k, &rows, &[1, 2], h, 1, d).unwrap();
        for hh in 0..h {
            for (ri, &r) in rows.iter().enumerate() {
                let logits: Vec<f32> = (0..=r)
                    .map(|j| {
                        (0..d)
                            .map(|e| q[(r * h + hh) * d + e] * k[j * d + e])
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let z: f32 = logits.iter().map(|x| x.exp()).sum();
                for (vi, &c) in [1usize, 2].iter().enumerate() {
                    let want = logits[c].exp() / z;
                    assert!((att[(hh * 2 + ri) * 2 + vi] - want).abs() < 1e-6);
                }
            }
        }
    }

    /// Both paths: direct loops (t ≤ DIRECT_ROWS) and gemm, the latter in one block and in
    /// several (t > BLOCK_ROWS, the last one partial), with more keys than queries (a prefill
    /// after cached rows).
    #[test]
    fn matches_definition_gqa_causal_and_full() {
        let cases = [
            (true, 3),
            (false, 3),
            (true, 11),
            (false, 11),
            (true, 300),
            (false, 300),
        ];
        for (causal, t) in cases {
            let sh = AttnShape {
                t,
                s: t + 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 6,
                causal,
            };
            let f = |n: usize, a: f32| (0..n).map(|i| (i as f32 * a).sin()).collect::<Vec<f32>>();
            let q = f(sh.t * 4 * 6, 0.31);
            let k = f(sh.s * 2 * 6, 0.77);
            let v = f(sh.s * 2 * 6, 1.13);
            let got = attention(&q, &k, &v, sh).unwrap();
            let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let want = attn64(&wide(&q), &wide(&k), &wide(&v), sh);
            let err = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "causal={causal} t={t} err={err}");
            // The kept probabilities: the same output bits, rows summing to 1, 0 where masked.
            let (out, probs) = attention_with_probs(&q, &k, &v, sh).unwrap();
            assert_eq!(out, got);
            for (r, row) in probs.chunks(sh.s).enumerate() {
                let vis = if causal { sh.s - t + r % t + 1 } else { sh.s };
                assert!((row[..vis].iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row[vis..].iter().all(|&x| x == 0.0));
            }
        }
    }

    /// The direct loops give the same bits with and without AVX2 + FMA (where this CPU has them).
    #[test]
    fn direct_loops_same_on_every_isa() {
        let (t, s, d) = (3, 37, 24);
        let f = |n: usize, a: f32| (0..n).map(|i| (i as f32 * a).sin()).collect::<Vec<f32>>();
        let (q, k, v) = (f(t * 2 * d, 0.31), f(s * d, 0.77), f(s * d, 1.13));
        let rows = HeadRows {
            q: &q[d..],
            q_rs: 2 * d,
            k: &k,
            v: &v,
            kv_rs: d,
            d,
            scale: 0.2,
        };
        let visible = |i: usize| s - t + i + 1;
        let (mut p0, mut o0) = (vec![0.0; t * s], vec![0.0; t * d]);
        rows.loops(s, &mut p0, &mut o0, &visible);
        let (mut p1, mut o1) = (vec![0.0; t * s], vec![0.0; t * d]);
        rows.attend(s, &mut p1, &mut o1, visible);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p0), bits(&p1));
        assert_eq!(bits(&o0), bits(&o1));
        // Row 0 sees keys 0..s − t + 1.
        assert!(o0.iter().any(|&x| x != 0.0) && p0[s - t + 1] == 0.0 && p0[s - t] != 0.0);
    }

    /// Direct f64 transcription of the definition (GQA, causal or not).
    fn attn64(q: &[f64], k: &[f64], v: &[f64], sh: AttnShape) -> Vec<f64> {
        attn64_with_probs(q, k, v, sh).0
    }

    /// [`attn64`] and its probabilities `[heads, t, s]` (0 where masked).
    fn attn64_with_probs(q: &[f64], k: &[f64], v: &[f64], sh: AttnShape) -> (Vec<f64>, Vec<f64>) {
        let (d, g) = (sh.head_dim, sh.heads / sh.kv_heads);
        let mut out = vec![0.0; sh.t * sh.heads * d];
        let mut probs = vec![0.0; sh.heads * sh.t * sh.s];
        for h in 0..sh.heads {
            for i in 0..sh.t {
                let lim = if sh.causal { sh.s - sh.t + i + 1 } else { sh.s };
                let sc: Vec<f64> = (0..lim)
                    .map(|j| {
                        (0..d)
                            .map(|e| {
                                q[(i * sh.heads + h) * d + e] * k[(j * sh.kv_heads + h / g) * d + e]
                            })
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (j, x) in sc.iter().enumerate() {
                    let p = (x - m).exp() / z;
                    probs[(h * sh.t + i) * sh.s + j] = p;
                    for e in 0..d {
                        out[(i * sh.heads + h) * d + e] += p * v[(j * sh.kv_heads + h / g) * d + e];
                    }
                }
            }
        }
        (out, probs)
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let cases = [(3, 5, true), (5, 5, true), (3, 5, false), (4, 4, false)];
        for (seed, &(t, s, causal)) in cases.iter().enumerate() {
            let sh = AttnShape {
                t,
                s,
                heads: 6,
                kv_heads: 3,
                head_dim: 5,
                causal,
            };
            let mut rng = Rng::new(10 + seed as u64);
            // Scores of a few units so the softmax is neither flat nor one-hot.
            let q: Vec<f32> = rng.vec(t * 6 * 5).iter().map(|x| 2.0 * x).collect();
            let k: Vec<f32> = rng.vec(s * 3 * 5).iter().map(|x| 2.0 * x).collect();
            let v = rng.vec(s * 3 * 5);
            let r = rng.vec(t * 6 * 5);
            let (qd, kd, vd) = (f64s(&q), f64s(&k), f64s(&v));
            let (out, probs) = attention_with_probs(&q, &k, &v, sh).unwrap();
            assert_eq!(out, attention(&q, &k, &v, sh).unwrap());
            let tag = format!("attention t={t} s={s} causal={causal}");
            check(
                &format!("{tag} fwd"),
                &out,
                &attn64(&qd, &kd, &vd, sh),
                1e-5,
            );
            // The objective `out·r + probs·w`: the output's gradient and a loss's own on the
            // probabilities (as an attention-grounding loss gives), checked together.
            let w = rng.vec(6 * t * s);
            let (dq, dk, dv) =
                attention_backward(&q, &k, &v, Some(&probs), Some(&w), &r, sh).unwrap();
            let h = 1e-6;
            let f = |q: &[f64], k: &[f64], v: &[f64]| {
                let (o, p) = attn64_with_probs(q, k, v, sh);
                dot(&o, &r) + dot(&p, &w)
            };
            check(
                &format!("{tag} dq"),
                &dq,
                &fd(|x| f(x, &kd, &vd), &qd, h),
                1e-5,
            );
            check(
                &format!("{tag} dk"),
                &dk,
                &fd(|x| f(&qd, x, &vd), &kd, h),
                1e-5,
            );
            check(
                &format!("{tag} dv"),
                &dv,
                &fd(|x| f(&qd, &kd, x), &vd, h),
                1e-5,
            );
            let again = attention_backward(&q, &k, &v, None, Some(&w), &r, sh).unwrap();
            assert!(again.0 == dq && again.1 == dk && again.2 == dv);
        }
    }
}
