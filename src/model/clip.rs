//! The CLIP vision tower (HF `CLIPVisionModel`): patch embedding (a stride-p convolution, run as a
//! matmul over unfolded patches) + CLS token + learned positions, `pre_layrnorm`, then encoder layers
//! of LayerNorm -> bidirectional self-attention -> residual -> LayerNorm -> MLP (quick_gelu) -> residual.
//! LLaVA reads hidden states, never the pooled output, so `post_layernorm` is not loaded.

use super::config::VisionConfig;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::attention::{AttnShape, attention};
use crate::ops::matmul::Linear;
use crate::ops::{self, act, norm};
use crate::tensor::Tensor;

/// LayerNorm weight and bias.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(w: &mut Weights, name: &str, d: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.take(&format!("{name}.weight"), &[d])?,
            bias: w.take(&format!("{name}.bias"), &[d])?,
        })
    }

    fn forward(&self, x: &[f32], eps: f64) -> Vec<f32> {
        norm::layer_norm(x, &self.weight, &self.bias, eps)
    }
}

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

/// The vision tower.
pub struct ClipVision {
    pub config: VisionConfig,
    /// `[hidden, channels * patch * patch]`, the conv kernel flattened in (c, y, x) order.
    patch_embedding: Tensor,
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
            .map(|i| {
                let n = format!("vision.encoder.layers.{i}");
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(w, &format!("{n}.layer_norm1"), h)?,
                    q_proj: w.linear(&format!("{n}.self_attn.q_proj"), h, h, true)?,
                    k_proj: w.linear(&format!("{n}.self_attn.k_proj"), h, h, true)?,
                    v_proj: w.linear(&format!("{n}.self_attn.v_proj"), h, h, true)?,
                    out_proj: w.linear(&format!("{n}.self_attn.out_proj"), h, h, true)?,
                    layer_norm2: LayerNorm::load(w, &format!("{n}.layer_norm2"), h)?,
                    fc1: w.linear(&format!("{n}.mlp.fc1"), c.intermediate_size, h, true)?,
                    fc2: w.linear(&format!("{n}.mlp.fc2"), h, c.intermediate_size, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVision {
            config: c.clone(),
            patch_embedding: w
                .take("vision.embeddings.patch_embedding.weight", &[h, ch, p, p])?
                .reshape(&[h, ch * p * p])?,
            class_embedding: w.take("vision.embeddings.class_embedding", &[h])?,
            position_embedding: w
                .take("vision.embeddings.position_embedding.weight", &[num_pos, h])?,
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
    pub fn forward(&self, pixel_values: &[f32]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (h, g) = (c.hidden_size, c.grid());
        let patches = unfold_patches(c, pixel_values)?;
        let pe = crate::ops::matmul::linear(&patches, &self.patch_embedding, None)?;
        let mut x = self.class_embedding.to_f32().into_f32_vec();
        x.extend_from_slice(&pe);
        let pos = self.position_embedding.f32_cow();
        for (a, b) in x.iter_mut().zip(pos.iter()) {
            *a += b;
        }
        let mut x = self.pre_layrnorm.forward(&x, c.layer_norm_eps);
        ops::check_finite(&x, h, |t| format!("the vision embeddings (token {t})"))?;
        let tokens = g * g + 1;
        let (nh, hd) = (c.num_attention_heads, h / c.num_attention_heads);
        let mut states = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            let xn = layer.layer_norm1.forward(&x, c.layer_norm_eps);
            let q = layer.q_proj.forward(&xn)?;
            let k = layer.k_proj.forward(&xn)?;
            let v = layer.v_proj.forward(&xn)?;
            let shape = AttnShape {
                t: tokens,
                s: tokens,
                heads: nh,
                kv_heads: nh,
                head_dim: hd,
                causal: false,
            };
            ops::add(
                &mut x,
                &layer.out_proj.forward(&attention(&q, &k, &v, shape))?,
            );
            let xn = layer.layer_norm2.forward(&x, c.layer_norm_eps);
            let mut m = layer.fc1.forward(&xn)?;
            match c.hidden_act.as_str() {
                "gelu" => act::gelu(&mut m),
                _ => act::quick_gelu(&mut m),
            }
            ops::add(&mut x, &layer.fc2.forward(&m)?);
            ops::check_finite(&x, h, |t| {
                format!("the output of vision layer {i} (token {t})")
            })?;
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
