//! Scaled dot-product attention with grouped-query heads, causal (LM) or bidirectional (vision).

use super::matmul::{matmul_nn, matmul_nt};
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
pub fn attention(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Vec<f32> {
    let AttnShape {
        t,
        s,
        heads,
        kv_heads,
        head_dim: d,
        causal,
    } = sh;
    assert_eq!(q.len(), t * heads * d);
    assert_eq!(k.len(), s * kv_heads * d);
    assert_eq!(v.len(), s * kv_heads * d);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut p = vec![0.0f32; t * s];
            matmul_nt(
                t,
                s,
                d,
                &q[h * d..],
                heads * d,
                &k[kvh * d..],
                kv_heads * d,
                &mut p,
                false,
            );
            for (i, row) in p.chunks_mut(s).enumerate() {
                let visible = if causal { s - t + i + 1 } else { s };
                softmax_scaled(row, visible, scale);
            }
            let mut o = vec![0.0f32; t * d];
            matmul_nn(t, d, s, &p, s, &v[kvh * d..], kv_heads * d, &mut o);
            o
        })
        .collect();
    let mut out = vec![0.0f32; t * heads * d];
    for (h, o) in per_head.iter().enumerate() {
        for i in 0..t {
            out[(i * heads + h) * d..][..d].copy_from_slice(&o[i * d..][..d]);
        }
    }
    out
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

    /// Direct triple loop on the definition.
    fn naive(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Vec<f32> {
        let (d, g) = (sh.head_dim, sh.heads / sh.kv_heads);
        let mut out = vec![0.0; sh.t * sh.heads * d];
        for h in 0..sh.heads {
            for i in 0..sh.t {
                let lim = if sh.causal { sh.s - sh.t + i + 1 } else { sh.s };
                let sc: Vec<f32> = (0..lim)
                    .map(|j| {
                        (0..d)
                            .map(|e| {
                                q[(i * sh.heads + h) * d + e] * k[(j * sh.kv_heads + h / g) * d + e]
                            })
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f32::MIN, f32::max);
                let z: f32 = sc.iter().map(|x| (x - m).exp()).sum();
                for (j, x) in sc.iter().enumerate() {
                    let p = (x - m).exp() / z;
                    for e in 0..d {
                        out[(i * sh.heads + h) * d + e] += p * v[(j * sh.kv_heads + h / g) * d + e];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_definition_gqa_causal_and_full() {
        for &causal in &[true, false] {
            let sh = AttnShape {
                t: 3,
                s: 5,
                heads: 4,
                kv_heads: 2,
                head_dim: 6,
                causal,
            };
            let f = |n: usize, a: f32| (0..n).map(|i| (i as f32 * a).sin()).collect::<Vec<f32>>();
            let q = f(sh.t * 4 * 6, 0.31);
            let k = f(sh.s * 2 * 6, 0.77);
            let v = f(sh.s * 2 * 6, 1.13);
            let got = attention(&q, &k, &v, sh);
            let want = naive(&q, &k, &v, sh);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-5, "causal={causal} err={err}");
        }
    }
}
