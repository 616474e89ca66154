//! SparseVLM (Zhang et al. 2024, "SparseVLM: Visual Token Sparsification for Efficient
//! Vision-Language Model Inference"): text raters chosen by relevance vote on the image tokens at
//! a few layers, and the pruned tokens are recycled into a few merged ones.
//!
//! Exact to the official code, v1.0 (its default `USE_VERSION`), github.com/Gumpest/SparseVLMs,
//! `llava/model/language_model/`:
//!
//! 1. **Raters** (`modelling_sparse_llama.py` lines 198-204, paper §3.2): from the LM's input
//!    embeddings, `m = mean_v softmax_t(V · Tᵀ)` with `V` the image tokens' embeddings and `T`
//!    every token after the image; the raters are the text tokens with `m_t > mean(m)`
//!    ([`raters`]). They are chosen once per prompt.
//! 2. **Ranking** at each sparse layer l (`pruning_loc = [2, 6, 15]` of 32, line 70; lines
//!    221-261): layer l runs unpruned; its attention probabilities, averaged over all heads, from
//!    the raters' rows to the image tokens, averaged over the raters, are each image token's
//!    relation ([`relation`]); the top `min(budget, n - 1)` survive (`score.py` lines 23-45,
//!    [`SparseVlm::kept_count`]), and layers l+1.. run without the others.
//! 3. **Recycling** (lines 275-307): of the pruned tokens, the `⌊0.3 p⌋ + 1` with the highest
//!    relation are clustered into `⌊n / 10⌋ + 1` tokens by DPC-KNN (`utils.py` lines 179-239,
//!    [`cluster_and_merge`]) and inserted right after the kept image tokens; they are image
//!    tokens to the later sparse layers ([`SparseVlm::recycled`]).
//! 4. **Positions** are renumbered `0..n` after each stage (line 302), so a decoded token's
//!    position in a layer is that layer's cache length (line 655), as
//!    [`PrunePlan::renumber`](super::PrunePlan::renumber) does.
//!
//! The budgets are the code's fixed per-layer tables (`score.py` lines 11-21, [`PUBLISHED`]), not
//! the paper's rank-adaptive count: the code is followed. Where the code leaves an order open it
//! is fixed here: ties in a relation or a cluster score go to the lower index, and the clustering
//! adds no random noise to the densities (the code adds `rand · 1e-6` to break their ties, which
//! two mutual nearest neighbours always have; the lower index counts as denser here). A
//! LLaVA-NeXT prompt's image tokens are all of its tiles and newlines, ranked alike
//! ([`PrunePlan::sparsevlm`] turns [`PrunePlan::keep_newlines`] off).

use super::PrunePlan;
use super::plan::nearest_setting;
use super::score::{SelectedAttention, top_k_pinned};
use crate::error::{Error, Result};

/// SparseVLM's settings ([`Scorer::SparseVlm`](super::Scorer::SparseVlm)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseVlm {
    /// Recycle the pruned tokens into merged ones (step 3; on in the official v1.0).
    pub recycle: bool,
}

impl Default for SparseVlm {
    fn default() -> Self {
        SparseVlm { recycle: true }
    }
}

/// The official sparse layers (0-based; the ranking layer, the next one runs pruned), of a
/// 32-layer LM.
pub const LAYERS: [usize; 3] = [2, 6, 15];

/// The official budgets per sparse layer for each retained-token setting (`RETAIN_TOKN`) of
/// LLaVA-1.5's 576 image tokens: 192, 128, 96 and 64 image tokens averaged over the 32 layers.
pub const PUBLISHED: [(usize, [usize; 3]); 4] = [
    (192, [300, 200, 110]),
    (128, [303, 110, 36]),
    (96, [238, 48, 26]),
    (64, [66, 30, 17]),
];

/// SparseVLM's plan for a `num_layers`-layer LM with `n_image` image tokens at `avg` image
/// tokens averaged over the layers: the sparse layers at the published ones' fractions of the
/// depth ([`LAYERS`]; rounded, increasing, below the last layer) and the budgets of the
/// published setting nearest in `avg / n_image` ([`PUBLISHED`]), scaled by the factor
/// (bisection, 50 steps) whose realised average (merged tokens included) is nearest `avg`.
///
/// The average counts each layer's input, as [`PrunePlan::avg_image_tokens`] does for every
/// method. The official log ("Equal Tokens", `modelling_sparse_llama.py` line 359) counts a
/// sparse layer at its pruned output instead, so its settings average more than their names
/// here: the "192" table 206.5 tokens, "128" 145.4, "64" 82.25 (32 layers, 576 tokens).
/// Returns the sparse layers and their budgets. An error when the LM has fewer than 2 layers
/// or `avg` is out of reach (at most one merged token per stage below it, or above `n_image`).
pub fn schedule(avg: f64, num_layers: usize, n_image: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let bad = |m: String| Error::arg("sparsevlm", m);
    if num_layers < 2 || n_image < 2 {
        return Err(bad(format!(
            "needs 2 layers and 2 image tokens at least, the LM has {num_layers} and {n_image}"
        )));
    }
    let mut layers: Vec<usize> = vec![];
    for &l in &LAYERS {
        let at = (l as f64 * num_layers as f64 / 32.0).round() as usize;
        let at = layers.last().map_or(at, |&p| at.max(p + 1));
        if at + 1 < num_layers {
            layers.push(at);
        }
    }
    let frac = avg / n_image as f64;
    let (_, shape) = (PUBLISHED.iter())
        .min_by(|a, b| {
            let d = |r: usize| (r as f64 / 576.0 - frac).abs();
            d(a.0).total_cmp(&d(b.0))
        })
        .copied()
        .unwrap_or(PUBLISHED[0]);
    let budgets = |s: f64| -> Vec<usize> {
        (shape.iter().take(layers.len()))
            .map(|&c| ((s * c as f64 * n_image as f64 / 576.0).round() as usize).clamp(1, n_image))
            .collect()
    };
    let realised = |s: f64| -> Option<f64> {
        let plan = PrunePlan::sparsevlm(&layers, &budgets(s), SparseVlm::default()).ok()?;
        plan.avg_image_tokens(num_layers, n_image).ok()
    };
    let hi = 576.0 / shape[0] as f64;
    let (lo_avg, hi_avg) = (realised(0.0), realised(hi));
    let (Some(lo_avg), Some(hi_avg)) = (lo_avg, hi_avg) else {
        return Err(bad(format!("no plan fits a {num_layers}-layer LM")));
    };
    if avg < lo_avg - 0.5 || avg > hi_avg + 0.5 {
        return Err(bad(format!(
            "an average of {avg:.1} image tokens per layer is out of reach of sparse layers \
             {layers:?} of a {num_layers}-layer LM: it must lie in [{lo_avg:.1}, {hi_avg:.1}]"
        )));
    }
    let best = nearest_setting(realised, avg, (0.0, hi)).map_or(hi, |(s, _)| s);
    let budgets = budgets(best);
    Ok((layers, budgets))
}

impl SparseVlm {
    /// Image tokens a stage with `budget` ranks as kept out of `n`: `min(budget, n - 1)`, the
    /// code's `topk` count.
    pub fn kept_count(budget: usize, n: usize) -> usize {
        budget.min(n.saturating_sub(1))
    }

    /// `(candidates, clusters)` recycled from `pruned` pruned tokens: the `⌊0.3 p⌋ + 1` most
    /// related are clustered into `⌊candidates / 10⌋ + 1` merged tokens; `(0, 0)` when nothing
    /// was pruned or recycling is off.
    pub fn recycled(&self, pruned: usize) -> (usize, usize) {
        if !self.recycle || pruned == 0 {
            return (0, 0);
        }
        let candidates = (pruned as f64 * 0.3) as usize + 1;
        (candidates, candidates / 10 + 1)
    }

    /// Image tokens after a stage with `budget` on `n` survivors: ranked-kept plus merged.
    pub fn after(&self, budget: usize, n: usize) -> usize {
        let kept = Self::kept_count(budget, n);
        kept + self.recycled(n - kept).1
    }
}

/// The text raters: indices into the `text` rows (`[nt, d]`, every token after the image) whose
/// relevance `m_t = (1/nv) Σ_v softmax_t(V Tᵀ)[v, t]` to the `visual` rows (`[nv, d]`, the
/// image tokens' input embeddings) exceeds its mean over the text tokens (step 1).
pub fn raters(visual: &[f32], text: &[f32], d: usize) -> Vec<usize> {
    let (nv, nt) = (visual.len() / d.max(1), text.len() / d.max(1));
    if nv == 0 || nt == 0 {
        return vec![];
    }
    let mut m = vec![0f64; nt];
    let mut logits = vec![0f32; nt];
    for v in visual.chunks_exact(d) {
        for (l, t) in logits.iter_mut().zip(text.chunks_exact(d)) {
            *l = v.iter().zip(t).map(|(a, b)| a * b).sum();
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        for (m, &l) in m.iter_mut().zip(&logits) {
            *m += ((l - max) as f64).exp() / z;
        }
    }
    let mean = m.iter().sum::<f64>() / nt as f64;
    (0..nt).filter(|&t| m[t] > mean).collect()
}

/// Each image token's relation: the attention `att` of the raters' rows, averaged over the
/// heads and the rows (step 2; all rows weigh the same).
pub fn relation(att: &SelectedAttention) -> Vec<f32> {
    let n = (att.heads * att.rows.len()).max(1) as f32;
    (0..att.image_cols.len())
        .map(|v| {
            let mut s = 0f32;
            for h in 0..att.heads {
                for r in 0..att.rows.len() {
                    s += att.at(h, r, v);
                }
            }
            s / n
        })
        .collect()
}

/// What one stage keeps and recycles, as indices into its ranked image tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Ranked-kept, ascending.
    pub kept: Vec<usize>,
    /// The recycled candidates, most related first (the order they are clustered in).
    pub candidates: Vec<usize>,
}

impl SparseVlm {
    /// Keeps `min(budget, n - 1)` of the `n` ranked tokens by `relation` (the `pinned` ones
    /// first, then the larger relation, then the lower index) and picks the pruned ones to
    /// recycle: the most related first.
    pub fn select(&self, relation: &[f32], budget: usize, pinned: &[bool]) -> Selection {
        let n = relation.len();
        let kept = top_k_pinned(relation, Self::kept_count(budget, n), pinned);
        let mut is_kept = vec![false; n];
        kept.iter().for_each(|&k| is_kept[k] = true);
        let mut pruned: Vec<usize> = (0..n).filter(|&i| !is_kept[i]).collect();
        let (take, _) = self.recycled(pruned.len());
        pruned.sort_by(|&a, &b| relation[b].total_cmp(&relation[a]).then(a.cmp(&b)));
        pruned.truncate(take);
        Selection {
            kept,
            candidates: pruned,
        }
    }
}

/// DPC-KNN clustering and merging of `x` (`[n, c]` rows) into `clusters` tokens (step 3;
/// `utils.py` `cluster_and_merge`): with `d_ij = ‖x_i - x_j‖ / √c`, each token's density is
/// `ρ_i = exp(-mean of d_ij² over its `clusters` nearest, itself included)`, its distance
/// `δ_i = min d_ij over the denser j` (the largest distance of all for the densest; of equal
/// densities the lower index counts as denser, where the code's noise decides), and the
/// `clusters` tokens of largest `ρ δ` are the centres (in that order; ties -> lower index).
/// Every token joins its nearest centre (ties -> the earlier centre; a centre its own), and a
/// merged token is its cluster's sum times `1 / (size + 1e-6)`, as the code weighs it.
///
pub fn cluster_and_merge(x: &[f32], c: usize, clusters: usize) -> Merged {
    let n = x.len() / c.max(1);
    let clusters = clusters.min(n);
    if clusters == 0 {
        return Merged {
            rows: vec![],
            assign: vec![0; n],
            centres: vec![],
        };
    }
    let row = |i: usize| &x[i * c..(i + 1) * c];
    let scale = (c as f64).sqrt();
    let mut dist = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..i {
            let d2: f64 = (row(i).iter().zip(row(j)))
                .map(|(&a, &b)| ((a - b) as f64).powi(2))
                .sum();
            let d = d2.sqrt() / scale;
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let d = |i: usize, j: usize| dist[i * n + j];
    let density: Vec<f64> = (0..n)
        .map(|i| {
            let mut near: Vec<f64> = (0..n).map(|j| d(i, j)).collect();
            near.sort_by(f64::total_cmp);
            let mean = near[..clusters].iter().map(|v| v * v).sum::<f64>() / clusters as f64;
            (-mean).exp()
        })
        .collect();
    // The code adds `rand · 1e-6` to the densities so that none tie; a tie goes to the lower
    // index here.
    let denser = |j: usize, i: usize| match density[j].total_cmp(&density[i]) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => j < i,
        std::cmp::Ordering::Less => false,
    };
    let dist_max = dist.iter().fold(0f64, |a, &b| a.max(b));
    let score: Vec<f64> = (0..n)
        .map(|i| {
            let delta = (0..n)
                .filter(|&j| denser(j, i))
                .map(|j| d(i, j))
                .fold(dist_max, f64::min);
            delta * density[i]
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let centres = &order[..clusters];
    let mut assign: Vec<usize> = (0..n)
        .map(|i| {
            (0..clusters)
                .min_by(|&a, &b| {
                    d(centres[a], i)
                        .total_cmp(&d(centres[b], i))
                        .then(a.cmp(&b))
                })
                .unwrap_or(0)
        })
        .collect();
    for (k, &ctr) in centres.iter().enumerate() {
        assign[ctr] = k;
    }
    let mut size = vec![0usize; clusters];
    assign.iter().for_each(|&k| size[k] += 1);
    let mut merged = vec![0f32; clusters * c];
    for (i, &k) in assign.iter().enumerate() {
        let w = 1.0 / (size[k] as f32 + 1e-6);
        for (m, &v) in merged[k * c..(k + 1) * c].iter_mut().zip(row(i)) {
            *m += v * w;
        }
    }
    Merged {
        rows: merged,
        assign,
        centres: centres.to_vec(),
    }
}

/// What [`cluster_and_merge`] made.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The merged tokens, `[clusters, c]`, in centre order.
    pub rows: Vec<f32>,
    /// Each input token's cluster.
    pub assign: Vec<usize>,
    /// The input token at the centre of each cluster.
    pub centres: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_counts_follow_the_code() {
        let s = SparseVlm::default();
        // 576 -> 300 at layer 2 of the 192 setting: 276 pruned, 83 recycled into 9.
        assert_eq!(s.recycled(276), (83, 9));
        assert_eq!(s.after(300, 576), 309);
        // Then 309 -> 200 (109 pruned: 33 into 4) and 204 -> 110 (94: 29 into 3).
        assert_eq!(s.after(200, 309), 204);
        assert_eq!(s.after(110, 204), 113);
        // A budget at or above the survivors still drops one (`min(budget, n - 1)`).
        assert_eq!(SparseVlm::kept_count(50, 50), 49);
        assert_eq!(s.recycled(0), (0, 0));
        assert_eq!(SparseVlm { recycle: false }.after(300, 576), 300);
    }

    #[test]
    fn schedules() {
        // The published "192" setting averages 206.5 image tokens over the 32 layers' inputs:
        // (3 x 576 + 4 x 309 + 9 x 204 + 16 x 113) / 32 (the official log counts layer 2 at
        // its output, 309, hence 192.0).
        let avg = |layers: &[usize], budgets: &[usize], l: usize, n: usize| {
            let plan = PrunePlan::sparsevlm(layers, budgets, SparseVlm::default()).unwrap();
            plan.avg_image_tokens(l, n).unwrap()
        };
        assert_eq!(avg(&LAYERS, &PUBLISHED[0].1, 32, 576), 206.5);
        assert!((avg(&LAYERS, &PUBLISHED[1].1, 32, 576) - 145.4).abs() < 0.05);
        assert!((avg(&LAYERS, &PUBLISHED[3].1, 32, 576) - 82.25).abs() < 0.05);
        // Matched to the true average, at the published layers.
        let (layers, budgets) = schedule(192.0, 32, 576).unwrap();
        assert_eq!(layers, LAYERS.to_vec());
        let a = avg(&layers, &budgets, 32, 576);
        assert!((a - 192.0).abs() < 0.5, "{a} {budgets:?}");
        // A 4-layer LM with 144 image tokens: sparse layers 0, 1, 2, budgets scaled to the
        // average asked for.
        let (layers, budgets) = schedule(48.0, 4, 144).unwrap();
        assert_eq!(layers, vec![0, 1, 2]);
        let a = avg(&layers, &budgets, 4, 144);
        assert!((a - 48.0).abs() <= 1.0, "{a} {budgets:?}");
        assert!(schedule(500.0, 4, 144).is_err());
        assert!(schedule(48.0, 1, 144).is_err());
    }

    #[test]
    fn raters_are_the_text_tokens_above_the_mean() {
        // d = 1: visual [1, 2]; text [0, 1, 3]. softmax over text of v * t:
        // v=1: e^0, e^1, e^3; v=2: e^0, e^2, e^6. The last text token dominates both.
        let r = raters(&[1.0, 2.0], &[0.0, 1.0, 3.0], 1);
        assert_eq!(r, vec![2]);
        // Equal relevance: nobody is above the mean.
        assert!(raters(&[0.0], &[1.0, 1.0], 1).is_empty());
    }

    #[test]
    fn selection_keeps_by_relation_and_recycles_the_most_related_pruned() {
        let rel = [0.1, 0.5, 0.3, 0.3, 0.05, 0.2, 0.4];
        let s = SparseVlm::default().select(&rel, 3, &[]);
        assert_eq!(s.kept, vec![1, 2, 6]);
        // 4 pruned (0, 3, 4, 5): int(1.2) + 1 = 2 recycled, by relation: 3 (0.3), 5 (0.2).
        assert_eq!(s.candidates, vec![3, 5]);
    }

    #[test]
    fn clustering_by_hand() {
        // c = 1, two clusters: pairs {0, 0.5} and {5, 5.1}, an outlier 20. Densities (the 2
        // nearest: itself and its pair): 5 and 5.1 densest (tie -> index 2 denser than 3), then
        // 0 and 0.5 (0 denser than 1), then 20. Distances to a denser point: 2 -> the largest
        // (20), 0 -> 5, 1 -> 0.5, 3 -> 0.1, 4 -> 14.9 (but density ~ e^-111). Scores pick
        // centres 2 (19.9) and 0 (4.4); 20 is nearer to 5 than to 0.
        let x = [0.0, 0.5, 5.0, 5.1, 20.0];
        let m = cluster_and_merge(&x, 1, 2);
        assert_eq!(m.centres, vec![2, 0]);
        assert_eq!(m.assign, vec![1, 1, 0, 0, 0]);
        let merged = m.rows;
        let w = |n: f32| 1.0 / (n + 1e-6);
        assert!((merged[0] - 30.1 * w(3.0)).abs() < 1e-5);
        assert!((merged[1] - 0.5 * w(2.0)).abs() < 1e-6);
        // One cluster is the (weighted) mean of everything.
        let one = cluster_and_merge(&x, 1, 1).rows;
        assert!((one[0] - 30.6 * w(5.0)).abs() < 1e-5);
    }
}
