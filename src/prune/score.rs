//! Ranking image tokens from the attention of a few selected query rows.
//!
//! Only the rows the query strategy asks for are computed:
//! `A[h, q, :] = softmax(q_h · Kᵀ / √d + causal mask)` for each selected position q, then restricted
//! to the image columns. Memory is `heads x rows x positions` for the rows scored, never the
//! `heads x positions x positions` attention tensor of the layer.

use super::head::HeadStrategy;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

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
    /// Indices into `importance` of pruned tokens recycled into merged ones, in the order they
    /// are clustered ([`Scorer::SparseVlm`](super::Scorer::SparseVlm); empty otherwise).
    pub recycle: Vec<usize>,
}

/// `a_h = Σ_q w_q A[h, q, V]`, head weights beta, importance `s = Σ_h beta_h a_h` and the top
/// `keep` image tokens by s (ties -> lower index; `pinned` ones first, [`top_k_pinned`]),
/// returned in ascending order.
pub fn rank(
    att: &SelectedAttention,
    query_weights: Vec<f32>,
    head: &dyn HeadStrategy,
    head_keep: f64,
    keep: usize,
    pinned: &[bool],
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
    let kept = top_k_pinned(&importance, keep, pinned);
    Ranking {
        query_weights,
        query_rows: att.rows.clone(),
        head_scores,
        head_weights,
        importance,
        kept,
        recycle: vec![],
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
    top_k_pinned(s, k, &[])
}

/// Indices of the first `k` in the order: pinned (`pinned[i]`; missing entries are false)
/// before the rest, then the larger value, then the lower index; ascending. LLaVA-NeXT's kept
/// row newlines are pinned.
pub fn top_k_pinned(s: &[f32], k: usize, pinned: &[bool]) -> Vec<usize> {
    let pin = |i: usize| pinned.get(i).copied().unwrap_or(false);
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| {
        pin(b)
            .cmp(&pin(a))
            .then(s[b].total_cmp(&s[a]))
            .then(a.cmp(&b))
    });
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
        // Pinned first (by value among themselves), then the rest by value.
        let pin = [false, true, false, true, true];
        assert_eq!(
            top_k_pinned(&[0.9, 0.1, 0.8, 0.3, 0.2], 2, &pin),
            vec![3, 4]
        );
        assert_eq!(
            top_k_pinned(&[0.9, 0.1, 0.8, 0.3, 0.2], 4, &pin),
            vec![0, 1, 3, 4]
        );
    }
}
