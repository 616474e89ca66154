//! The CLIP vision tower (HF `CLIPVisionModel`): patch embedding (a stride-p convolution, run as a
//! matmul over unfolded patches) + CLS token + learned positions, `pre_layrnorm`, then encoder layers
//! of LayerNorm -> bidirectional self-attention -> residual -> LayerNorm -> MLP (quick_gelu) -> residual.
//! LLaVA reads hidden states, never the pooled output, so `post_layernorm` is not loaded.

use super::config::VisionConfig;
use super::nn::{LayerNorm, Linear};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::attention::AttnShape;
use crate::tensor::Tensor;

/// One encoder layer (HF `CLIPEncoderLayer`).
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(c: &VisionConfig, w: &mut Weights, n: &str) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(w, &format!("{n}.layer_norm1"), h)?,
            q_proj: w.linear(&format!("{n}.self_attn.q_proj"), h, h, true)?,
            k_proj: w.linear(&format!("{n}.self_attn.k_proj"), h, h, true)?,
            v_proj: w.linear(&format!("{n}.self_attn.v_proj"), h, h, true)?,
            out_proj: w.linear(&format!("{n}.self_attn.out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(w, &format!("{n}.layer_norm2"), h)?,
            fc1: w.linear(&format!("{n}.mlp.fc1"), i, h, true)?,
            fc2: w.linear(&format!("{n}.mlp.fc2"), h, i, true)?,
        })
    }

    /// `x: [tokens, hidden]` through LayerNorm -> bidirectional attention -> residual ->
    /// LayerNorm -> MLP -> residual, in place.
    fn forward(&self, c: &VisionConfig, x: &mut Tensor) -> Result<()> {
        let heads = c.num_attention_heads;
        let xn = self.layer_norm1.forward(x, c.layer_norm_eps)?;
        let q = self.q_proj.forward(&xn)?;
        let k = self.k_proj.forward(&xn)?;
        let v = self.v_proj.forward(&xn)?;
        let shape = AttnShape {
            t: x.rows(),
            s: x.rows(),
            heads,
            kv_heads: heads,
            head_dim: c.hidden_size / heads,
            causal: false,
        };
        let (o, _) = q.attention(&k, &v, shape, false)?;
        x.add(&self.out_proj.forward(&o)?)?;
        let xn = self.layer_norm2.forward(x, c.layer_norm_eps)?;
        let mut m = self.fc1.forward(&xn)?;
        match c.hidden_act.as_str() {
            "gelu" => m.gelu()?,
            _ => m.quick_gelu()?,
        }
        x.add(&self.fc2.forward(&m)?)
    }
}

/// The vision tower.
pub struct ClipVision {
    pub config: VisionConfig,
    /// `[hidden, channels * patch * patch]`, the conv kernel flattened in (c, y, x) order.
    patch_embedding: Tensor,
    /// `[1, hidden]` and `[tokens, hidden]`, as activations (they are added to them).
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl ClipVision {
    /// Loads `vision.*`, only the first `num_layers` encoder layers (the rest are never read).
    pub fn load(config: &VisionConfig, w: &mut Weights, num_layers: usize) -> Result<Self> {
        let c = config;
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let num_pos = c.grid() * c.grid() + 1;
        let layers = (0..num_layers)
            .map(|i| EncoderLayer::load(c, w, &format!("vision.encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let patch_embedding = w
            .take("vision.embeddings.patch_embedding.weight", &[h, ch, p, p])?
            .reshape(&[h, ch * p * p])?;
        let class_embedding = w
            .take("vision.embeddings.class_embedding", &[h])?
            .reshape(&[1, h])?
            .activation_like(&patch_embedding)?;
        let position_embedding = w
            .take("vision.embeddings.position_embedding.weight", &[num_pos, h])?
            .activation_like(&patch_embedding)?;
        Ok(ClipVision {
            config: c.clone(),
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm: LayerNorm::load(w, "vision.pre_layrnorm", h)?,
            layers,
        })
    }

    /// Encoder layers loaded (and run).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// HF's `hidden_states` list for one image `pixel_values: [channels, size, size]`: entry 0 is the
    /// embeddings after `pre_layrnorm`, entry i the output of layer i; `[tokens, hidden]` each, for
    /// as many layers as were loaded.
    pub fn forward(&self, pixel_values: &[f32]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let patches = Tensor::from_f32(
            &[c.grid() * c.grid(), self.patch_embedding.cols()],
            unfold_patches(c, pixel_values)?,
        )?
        .activation_like(&self.patch_embedding)?;
        let pe = patches.linear(&self.patch_embedding, None)?;
        let mut x = Tensor::cat_rows(&[&self.class_embedding, &pe])?;
        x.add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x, c.layer_norm_eps)?;
        x.check_finite(|t| format!("the vision embeddings (token {t})"))?;
        let mut states = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(c, &mut x)?;
            x.check_finite(|t| format!("the output of vision layer {i} (token {t})"))?;
            states.push(x.clone());
        }
        Ok(states)
    }
}

/// Unfolds one image `[channels, size, size]` into `[patches, channels * p * p]`, patches in
/// row-major grid order and each in the conv kernel's (c, y, x) order, so the stride-p patch
/// convolution is a matmul with the kernel viewed as `[hidden, channels * p * p]`.
pub fn unfold_patches(c: &VisionConfig, pixel_values: &[f32]) -> Result<Vec<f32>> {
    let (p, ch, g, s) = (c.patch_size, c.num_channels, c.grid(), c.image_size);
    if pixel_values.len() != ch * s * s {
        return Err(Error::Shape {
            name: "pixel_values".into(),
            expected: vec![ch, s, s],
            got: vec![pixel_values.len()],
        });
    }
    let mut patches = Vec::with_capacity(g * g * ch * p * p);
    for gy in 0..g {
        for gx in 0..g {
            for cc in 0..ch {
                for y in 0..p {
                    let row = (cc * s + gy * p + y) * s + gx * p;
                    patches.extend_from_slice(&pixel_values[row..row + p]);
                }
            }
        }
    }
    Ok(patches)
}
