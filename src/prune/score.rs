//! Ranking image tokens from the attention of a few selected query rows.
//!
//! Only the rows the query strategy asks for are computed:
//! `A[h, q, :] = softmax(q_h · Kᵀ / √d + causal mask)` for each selected position q, then restricted
//! to the image columns. Memory is `heads x rows x positions` for the rows scored, never the
//! `heads x positions x positions` attention tensor of the layer.

use super::head::HeadStrategy;
use crate::ops::attention::softmax_scaled;
use crate::ops::matmul::matmul_nt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

/// Attention of selected query rows to the image columns: `probs[h][r][v]`.
pub struct SelectedAttention {
    pub heads: usize,
    /// Positions (in the current sequence) of the scored query rows.
    pub rows: Vec<usize>,
    /// Positions of the image tokens in the current sequence.
    pub image_cols: Vec<usize>,
    /// `[heads, rows, image_cols]`, row-major.
    pub probs: Vec<f32>,
    /// Key positions the rows were scored against.
    pub positions: usize,
}

impl SelectedAttention {
    /// Attention that row `r` of head `h` pays to image column `v`.
    pub fn at(&self, h: usize, r: usize, v: usize) -> f32 {
        let (nr, nv) = (self.rows.len(), self.image_cols.len());
        self.probs[(h * nr + r) * nv + v]
    }

    /// Bytes held or transiently allocated to compute this: the kept probabilities plus one
    /// `rows x positions` score buffer per head in flight (at most one per thread).
    pub fn nbytes(&self) -> usize {
        let in_flight = self.heads.min(rayon::current_num_threads());
        4 * (self.probs.len() + in_flight * self.rows.len() * self.positions)
    }

    /// m_q: mean over heads of each row's total attention to the image.
    pub fn image_mass(&self) -> Vec<f32> {
        (0..self.rows.len())
            .map(|r| {
                (0..self.heads)
                    .map(|h| {
                        (0..self.image_cols.len())
                            .map(|v| self.at(h, r, v))
                            .sum::<f32>()
                    })
                    .sum::<f32>()
                    / self.heads as f32
            })
            .collect()
    }
}

/// Computes [`SelectedAttention`] from the ranking layer's queries of the selected rows
/// `q: [rows, heads, d]` (RoPE applied) and its keys `k: [positions, kv_heads, d]`; row `i` sits at
/// position `rows[i]` and sees keys `0..=rows[i]`.
pub fn selected_attention(
    q: &[f32],
    k: &[f32],
    rows: &[usize],
    image_cols: &[usize],
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> SelectedAttention {
    let (nr, s) = (rows.len(), k.len() / (kv_heads * d));
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
            let mut out = Vec::with_capacity(nr * image_cols.len());
            for (i, row) in p.chunks_mut(s).enumerate() {
                softmax_scaled(row, rows[i] + 1, scale);
                out.extend(image_cols.iter().map(|&c| row[c]));
            }
            out
        })
        .collect();
    SelectedAttention {
        heads,
        rows: rows.to_vec(),
        image_cols: image_cols.to_vec(),
        probs,
        positions: s,
    }
}

/// Everything a ranking produced, for reports.
#[derive(Debug, Clone)]
pub struct Ranking {
    /// Query weights w over the scored rows.
    pub query_weights: Vec<f32>,
    /// Scored rows (positions in the ranked sequence).
    pub query_rows: Vec<usize>,
    /// One score per head from the head strategy.
    pub head_scores: Vec<f32>,
    /// Head weights beta.
    pub head_weights: Vec<f32>,
    /// Importance s of every image token present, in sequence order.
    pub importance: Vec<f32>,
    /// Indices into `importance` of the kept tokens, ascending.
    pub kept: Vec<usize>,
}

/// `a_h = Σ_q w_q A[h, q, V]`, head weights beta, importance `s = Σ_h beta_h a_h` and the top
/// `keep` image tokens by s (ties -> lower index), returned in ascending order.
pub fn rank(
    att: &SelectedAttention,
    query_weights: Vec<f32>,
    head: &dyn HeadStrategy,
    head_keep: f64,
    keep: usize,
) -> Ranking {
    let nv = att.image_cols.len();
    let a: Vec<Vec<f32>> = (0..att.heads)
        .map(|h| {
            (0..nv)
                .map(|v| {
                    (0..att.rows.len())
                        .map(|r| query_weights[r] * att.at(h, r, v))
                        .sum()
                })
                .collect()
        })
        .collect();
    let head_scores = head.scores(&a);
    let head_weights = head.weights(&head_scores, head_keep);
    let importance: Vec<f32> = (0..nv)
        .map(|v| a.iter().zip(&head_weights).map(|(a, b)| b * a[v]).sum())
        .collect();
    let kept = top_k(&importance, keep);
    Ranking {
        query_weights,
        query_rows: att.rows.clone(),
        head_scores,
        head_weights,
        importance,
        kept,
    }
}

/// The random-keep baseline's importance: one uniform draw in `[0, 1)` for each of `n` image
/// tokens from rand's `StdRng` seeded by `seed ^ n`, so each stage of a plan (fewer survivors)
/// draws afresh. The draws depend on nothing else: engine and trainer keep the same tokens for
/// the same seed, and a study varies the seed per sample (prune-bench mixes in the sample id).
pub fn random_importance(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ n as u64);
    (0..n).map(|_| rng.random::<f32>()).collect()
}

/// Indices of the `k` largest values (ties -> lower index), ascending.
pub fn top_k(s: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2, 0.5], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.3, 0.1, 0.3], 3), vec![0, 1, 2]);
    }

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
        let att = selected_attention(&sel, &k, &rows, &[1, 2], h, 1, d);
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
                    assert!((att.at(hh, ri, vi) - want).abs() < 1e-6);
                }
            }
        }
    }
}
