//! Analytic FLOPs (a multiply-add counts 2) of the model's blocks, from the shapes actually run.

use super::config::{TextConfig, VisionConfig};

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

#[cfg(test)]
mod tests {
    use super::*;

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
