//! What a run reports about pruning: analytic FLOPs from the shapes actually run, token counts per
//! layer, and each stage's ranking.

use super::score::Ranking;
use crate::model::anyres::VisualToken;

/// One pruning stage of one request.
#[derive(Debug, Clone)]
pub struct StageReport {
    /// The first layer that runs without the dropped tokens (K).
    pub layer: usize,
    /// Image tokens before and after the stage.
    pub before: usize,
    pub after: usize,
    /// Indices (0..N over the prompt's image tokens) of the tokens that were ranked, in order;
    /// `ranking.importance[i]` belongs to `ranked[i]`.
    pub ranked: Vec<usize>,
    /// Image-token indices kept, ascending.
    pub kept: Vec<usize>,
    /// The image-token indices each merged token averages, ascending, one list per merged
    /// token in row order (SparseVLM's recycling; empty
    /// otherwise). A merged token is an image token of the later stages, where it goes by its
    /// cluster centre's index.
    pub merged: Vec<Vec<usize>>,
    /// Prompt positions of the query rows that voted (`ranking.query_rows` are positions in the
    /// sequence as it was at this stage).
    pub query_positions: Vec<usize>,
    pub ranking: Ranking,
    /// Wall time of the ranking (queries of the voting rows, their attention, strategies, top-k).
    pub rank_secs: f64,
    /// Bytes the ranking allocated beyond the normal forward (see
    /// [`SelectedAttention::nbytes`](super::score::SelectedAttention::nbytes)).
    pub rank_bytes: usize,
    /// Mean pairwise cosine distance of the kept tokens' hidden states entering layer K.
    pub diversity: f64,
}

impl StageReport {
    /// Concentration of the importance s: its normalised entropy `H(s / Σs) / ln N` (1 = spread
    /// evenly over the N ranked tokens, 0 = all on one).
    pub fn importance_entropy(&self) -> f64 {
        normalized_entropy(&self.ranking.importance)
    }
}

/// `H(p) / ln N` for `p = x / Σx` (0 when N <= 1 or Σx = 0).
pub fn normalized_entropy(x: &[f32]) -> f64 {
    let total: f64 = x.iter().map(|&v| v.max(0.0) as f64).sum();
    if x.len() <= 1 || total <= 0.0 {
        return 0.0;
    }
    let h: f64 = x
        .iter()
        .map(|&v| v.max(0.0) as f64 / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h / (x.len() as f64).ln()
}

/// Mean over pairs `i < j` of `1 - cos(v_i, v_j)` (0 for fewer than two vectors).
pub fn mean_cosine_distance(v: &[&[f32]]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let norms: Vec<f64> = v
        .iter()
        .map(|x| {
            x.iter()
                .map(|&a| (a as f64) * (a as f64))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut sum = 0.0;
    for i in 0..v.len() {
        for j in i + 1..v.len() {
            let d: f64 = v[i]
                .iter()
                .zip(v[j])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let cos = if norms[i] > 0.0 && norms[j] > 0.0 {
                d / (norms[i] * norms[j])
            } else {
                0.0
            };
            sum += 1.0 - cos;
        }
    }
    sum / (v.len() * (v.len() - 1) / 2) as f64
}

/// Per-request statistics of a prefill (pruned or not).
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Image tokens present in each LM layer.
    pub image_tokens_per_layer: Vec<usize>,
    /// Sequence length in each LM layer.
    pub tokens_per_layer: Vec<usize>,
    pub stages: Vec<StageReport>,
    /// Analytic FLOPs of the prefill (vision tower, projector, LM layers, LM head for one row).
    pub prefill_flops: f64,
    /// Analytic FLOPs of one decode step right after the prefill.
    pub decode_flops: f64,
    /// The prompt's image tokens per tile (and per image's row newlines), and how many of them
    /// the last layer still has: one entry per image for LLaVA-1.5; the base image, each grid
    /// tile and the newlines for LLaVA-NeXT; image by image, tiles in order, newlines last.
    pub tiles: Vec<TileKept>,
}

/// Image tokens of one tile in the prompt and after pruning ([`RunStats::tiles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileKept {
    /// Which tile ([`VisualToken::Patch`]), or which image's row newlines
    /// ([`VisualToken::Newline`]).
    pub part: VisualToken,
    pub total: usize,
    pub kept: usize,
}

impl TileKept {
    /// Counts `prompt` (what each prompt image token shows) and `kept` (the same for the tokens
    /// left), grouped by tile, ordered as [`RunStats::tiles`].
    pub fn count(
        prompt: impl IntoIterator<Item = VisualToken>,
        kept: impl IntoIterator<Item = VisualToken>,
    ) -> Vec<TileKept> {
        let mut out: Vec<TileKept> = Vec::new();
        let slot = |part: VisualToken, out: &mut Vec<TileKept>| match out
            .iter()
            .position(|t| t.part == part)
        {
            Some(i) => i,
            None => {
                out.push(TileKept {
                    part,
                    total: 0,
                    kept: 0,
                });
                out.len() - 1
            }
        };
        for part in prompt {
            let i = slot(part, &mut out);
            out[i].total += 1;
        }
        for part in kept {
            let i = slot(part, &mut out);
            out[i].kept += 1;
        }
        out.sort_by_key(|t| match t.part {
            VisualToken::Patch { image, tile } => (image, 0, tile),
            VisualToken::Newline { image } => (image, 1, 0),
        });
        out
    }
}

impl RunStats {
    /// Image tokens kept after the last stage (all of them when unpruned).
    pub fn kept_after_last(&self) -> usize {
        self.image_tokens_per_layer.last().copied().unwrap_or(0)
    }

    /// Image tokens averaged over all LM layers, the budget papers report.
    pub fn avg_image_tokens(&self) -> f64 {
        let n = self.image_tokens_per_layer.len().max(1);
        self.image_tokens_per_layer.iter().sum::<usize>() as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_count_by_hand() {
        let (base, t1, nl) = (
            VisualToken::Patch { image: 0, tile: 0 },
            VisualToken::Patch { image: 0, tile: 1 },
            VisualToken::Newline { image: 0 },
        );
        let prompt = [base, base, t1, t1, nl, t1, nl];
        let got = TileKept::count(prompt, [nl, t1, nl]);
        let want = [(base, 2, 0), (t1, 3, 1), (nl, 2, 2)];
        let want: Vec<TileKept> = (want.iter())
            .map(|&(part, total, kept)| TileKept { part, total, kept })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn entropy_and_diversity_by_hand() {
        assert!((normalized_entropy(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert_eq!(normalized_entropy(&[0.0, 3.0, 0.0]), 0.0);
        // p = (1/2, 1/2, 0): H = ln 2, / ln 3.
        assert!((normalized_entropy(&[1.0, 1.0, 0.0]) - 2f64.ln() / 3f64.ln()).abs() < 1e-12);
        let (a, b, c) = ([1.0f32, 0.0], [0.0f32, 2.0], [-1.0f32, 0.0]);
        // pairs: (a,b) cos 0 -> 1, (a,c) cos -1 -> 2, (b,c) cos 0 -> 1; mean 4/3.
        assert!((mean_cosine_distance(&[&a, &b, &c]) - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(mean_cosine_distance(&[&a]), 0.0);
    }
}
