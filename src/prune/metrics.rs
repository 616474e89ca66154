//! What a run reports about pruning: analytic FLOPs from the shapes actually run, token counts per
//! layer, and each stage's ranking.

use super::score::Ranking;
use crate::model::config::{TextConfig, VisionConfig};

/// FLOPs (a multiply-add counts 2) of one LLaMA decoder layer for `t` new rows whose attention
/// spans `visible` (query, key) pairs in total (`t(t+1)/2` for a causal prefill of `t` rows).
pub fn lm_layer_flops(c: &TextConfig, t: usize, visible: usize) -> f64 {
    let (h, i, d) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.head_dim as f64,
    );
    let (qd, kvd) = (
        c.num_attention_heads as f64 * d,
        c.num_key_value_heads as f64 * d,
    );
    let linear = 2.0 * t as f64 * (h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * i);
    linear + 4.0 * c.num_attention_heads as f64 * d * visible as f64
}

/// FLOPs of the CLIP tower's first `layers` layers plus the projector (`proj_in` -> `text_hidden`)
/// for one image.
pub fn vision_flops(
    c: &VisionConfig,
    layers: usize,
    proj_in: usize,
    text_hidden: usize,
    image_tokens: usize,
) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let t = (c.grid() * c.grid() + 1) as f64;
    let patch = 2.0 * (t - 1.0) * h * (c.num_channels * c.patch_size * c.patch_size) as f64;
    let layer = 2.0 * t * (4.0 * h * h + 2.0 * h * i) + 4.0 * t * t * h;
    let th = text_hidden as f64;
    let proj = 2.0 * image_tokens as f64 * (proj_in as f64 * th + th * th);
    patch + layers as f64 * layer + proj
}

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

    #[test]
    fn layer_flops_by_hand() {
        let c = TextConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        // q 8x8, k/v 8x4 each, o 8x8, MLP 3 x 8x16: 64+32+32+64+384 = 576 MACs per row.
        // 3 causal rows see 1+2+3 = 6 keys; QK and PV cost 2 heads x 4 dims MACs per pair each.
        let want = 2.0 * (3.0 * 576.0 + 6.0 * 2.0 * 4.0 * 2.0);
        assert_eq!(lm_layer_flops(&c, 3, 6), want);
    }
}
