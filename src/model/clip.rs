//! The CLIP vision tower (HF `CLIPVisionModel`): patch embedding (a stride-p convolution, run as a
//! matmul over unfolded patches) + CLS token + learned positions, `pre_layrnorm`, then encoder layers
//! of LayerNorm -> bidirectional self-attention -> residual -> LayerNorm -> MLP (quick_gelu) -> residual.
//! LLaVA reads hidden states, never the pooled output, so `post_layernorm` is not loaded.
//!
//! A batch of images travels as their rows end to end (`grid² + 1` per image); attention stays
//! within an image. `forward` runs on any backend; with `keep` it also returns what `backward`
//! (CPU, f32) needs.

use super::config::VisionConfig;
use super::nn::{LayerNorm, Linear, Param, ParamBuilder, accumulate, host};
use crate::error::{Error, Result};
use crate::ops::attention::{AttnShape, attention_backward, attention_with_probs};
use crate::ops::{self, act};
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

/// What one encoder layer's backward needs (rows of every image, end to end).
pub struct EncoderCache {
    x: Tensor,
    xn1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `[heads, t, t]` per image.
    probs: Vec<Vec<f32>>,
    o: Tensor,
    x_mid: Tensor,
    xn2: Tensor,
    pre_act: Tensor,
    act: Tensor,
}

/// What one encoder layer's attention says of each image, averaged over heads
/// ([`ClipVision::attention_summary`]).
pub struct AttentionSummary {
    /// The CLS row's attention probabilities, `[images, tokens]`.
    pub cls: Vec<f32>,
    /// Every row's key (before attention), `[images · tokens, head_dim]`.
    pub keys: Vec<f32>,
}

/// Bidirectional attention over one image's `t` rows.
fn attn_shape(c: &VisionConfig, t: usize) -> AttnShape {
    AttnShape {
        t,
        s: t,
        heads: c.num_attention_heads,
        kv_heads: c.num_attention_heads,
        head_dim: c.hidden_size / c.num_attention_heads,
        causal: false,
    }
}

impl EncoderLayer {
    fn load(c: &VisionConfig, b: &mut ParamBuilder, n: &str) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(EncoderLayer {
            q_proj: b.linear(&format!("{n}.self_attn.q_proj"), h, h, true)?,
            k_proj: b.linear(&format!("{n}.self_attn.k_proj"), h, h, true)?,
            v_proj: b.linear(&format!("{n}.self_attn.v_proj"), h, h, true)?,
            out_proj: b.linear(&format!("{n}.self_attn.out_proj"), h, h, true)?,
            layer_norm1: b.layer_norm(&format!("{n}.layer_norm1"), h)?,
            fc1: b.linear(&format!("{n}.mlp.fc1"), i, h, true)?,
            fc2: b.linear(&format!("{n}.mlp.fc2"), h, i, true)?,
            layer_norm2: b.layer_norm(&format!("{n}.layer_norm2"), h)?,
        })
    }

    /// Indices of the layer's parameters.
    fn params(&self) -> impl Iterator<Item = usize> {
        let lins = [
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.out_proj,
            self.fc1,
            self.fc2,
        ];
        lins.into_iter()
            .flat_map(|l| std::iter::once(l.w).chain(l.b))
            .chain(self.layer_norm1.params())
            .chain(self.layer_norm2.params())
    }

    /// `x: [images · t, hidden]` through LayerNorm -> attention (within each image) -> residual
    /// -> LayerNorm -> MLP -> residual, in place. With `keep` (host f32 only) it returns the
    /// activations [`EncoderLayer::backward`] needs.
    fn forward(
        &self,
        p: &[Param],
        c: &VisionConfig,
        x: &mut Tensor,
        t: usize,
        keep: bool,
    ) -> Result<Option<EncoderCache>> {
        let eps = c.layer_norm_eps;
        let x_in = keep.then(|| x.clone());
        let xn1 = self.layer_norm1.forward(p, x, eps)?;
        let q = self.q_proj.forward(p, &xn1)?;
        let k = self.k_proj.forward(p, &xn1)?;
        let v = self.v_proj.forward(p, &xn1)?;
        let images = x.rows() / t.max(1);
        let mut outs = Vec::with_capacity(images);
        let mut probs = Vec::new();
        for i in 0..images {
            let (qi, ki, vi) = (
                q.rows_cow(i * t, t)?,
                k.rows_cow(i * t, t)?,
                v.rows_cow(i * t, t)?,
            );
            if keep {
                let (o, pr) =
                    attention_with_probs(host(&qi)?, host(&ki)?, host(&vi)?, attn_shape(c, t))?;
                outs.push(Tensor::from_f32(qi.shape(), o)?);
                probs.push(pr);
            } else {
                outs.push(qi.attention(&ki, &vi, attn_shape(c, t), false)?.0);
            }
        }
        let o = match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat_rows(&outs.iter().collect::<Vec<_>>())?,
        };
        x.add(&self.out_proj.forward(p, &o)?)?;
        let x_mid = keep.then(|| x.clone());
        let xn2 = self.layer_norm2.forward(p, x, eps)?;
        let mut a = self.fc1.forward(p, &xn2)?;
        let pre_act = keep.then(|| a.clone());
        match c.hidden_act.as_str() {
            "gelu" => a.gelu()?,
            _ => a.quick_gelu()?,
        }
        x.add(&self.fc2.forward(p, &a)?)?;
        let (Some(x), Some(x_mid), Some(pre_act)) = (x_in, x_mid, pre_act) else {
            return Ok(None);
        };
        Ok(Some(EncoderCache {
            x,
            xn1,
            q,
            k,
            v,
            probs,
            o,
            x_mid,
            xn2,
            pre_act,
            act: a,
        }))
    }

    /// For the input `x: [images · t, hidden]`: the attention probabilities of each image's CLS
    /// row (its first of `t` rows), averaged over the heads, `[images, t]` (HF's
    /// `attentions[layer][:, :, 0]` averaged over dim 1), and every row's keys averaged over the
    /// heads, `[images · t, head_dim]` (VisionZip's `metric`).
    fn attention_summary(
        &self,
        p: &[Param],
        c: &VisionConfig,
        x: &Tensor,
        t: usize,
    ) -> Result<AttentionSummary> {
        let xn1 = self.layer_norm1.forward(p, x, c.layer_norm_eps)?;
        let images = x.rows() / t.max(1);
        let cls_rows: Vec<usize> = (0..images).map(|i| i * t).collect();
        let q = self
            .q_proj
            .forward(p, &xn1.gather_rows(&cls_rows)?)?
            .to_vec_f32()?;
        let k = self.k_proj.forward(p, &xn1)?.to_vec_f32()?;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let d = h / heads.max(1);
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; images * t];
        for i in 0..images {
            for hd in 0..heads {
                let qh = &q[i * h + hd * d..][..d];
                let mut row: Vec<f32> = (0..t)
                    .map(|j| {
                        let kj = &k[(i * t + j) * h + hd * d..][..d];
                        qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .collect();
                crate::ops::attention::softmax_scaled(&mut row, t, scale);
                for (o, pr) in out[i * t..(i + 1) * t].iter_mut().zip(&row) {
                    *o += pr / heads as f32;
                }
            }
        }
        let keys = k
            .chunks(h)
            .flat_map(|row| {
                (0..d)
                    .map(move |e| (0..heads).map(|hd| row[hd * d + e]).sum::<f32>() / heads as f32)
            })
            .collect();
        Ok(AttentionSummary { cls: out, keys })
    }

    /// `dx` is the gradient of the layer's output on entry and of its input on return.
    fn backward(
        &self,
        p: &mut [Param],
        c: &VisionConfig,
        t: usize,
        cache: &EncoderCache,
        dx: &mut [f32],
    ) -> Result<()> {
        let eps = c.layer_norm_eps;
        let w = t * c.hidden_size;
        let da = self.fc2.backward(p, host(&cache.act)?, dx)?;
        let pre = host(&cache.pre_act)?;
        let dpre = match c.hidden_act.as_str() {
            "gelu" => act::gelu_backward(pre, &da)?,
            _ => act::quick_gelu_backward(pre, &da)?,
        };
        let dxn2 = self.fc1.backward(p, host(&cache.xn2)?, &dpre)?;
        ops::add(
            dx,
            &self
                .layer_norm2
                .backward(p, host(&cache.x_mid)?, eps, &dxn2)?,
        );
        let d_o = self.out_proj.backward(p, host(&cache.o)?, dx)?;
        let (q, k, v) = (host(&cache.q)?, host(&cache.k)?, host(&cache.v)?);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; d_o.len()],
            vec![0.0; d_o.len()],
            vec![0.0; d_o.len()],
        );
        for (i, pr) in cache.probs.iter().enumerate() {
            let r = i * w..(i + 1) * w;
            let (a, b, d) = attention_backward(
                &q[r.clone()],
                &k[r.clone()],
                &v[r.clone()],
                Some(pr),
                None,
                &d_o[r.clone()],
                attn_shape(c, t),
            )?;
            dq[r.clone()].copy_from_slice(&a);
            dk[r.clone()].copy_from_slice(&b);
            dv[r].copy_from_slice(&d);
        }
        let xn1 = host(&cache.xn1)?;
        let mut dxn1 = self.q_proj.backward(p, xn1, &dq)?;
        ops::add(&mut dxn1, &self.k_proj.backward(p, xn1, &dk)?);
        ops::add(&mut dxn1, &self.v_proj.backward(p, xn1, &dv)?);
        ops::add(
            dx,
            &self.layer_norm1.backward(p, host(&cache.x)?, eps, &dxn1)?,
        );
        Ok(())
    }
}

/// The vision tower.
pub struct ClipVision {
    pub config: VisionConfig,
    /// The conv kernel `[hidden, channels, patch, patch]`, a Linear over unfolded patches.
    patch_embedding: Linear,
    class_embedding: usize,
    position_embedding: usize,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

/// The vision activations of a batch of images (rows end to end, image by image).
pub struct VisionCache {
    patches: Tensor,
    pre_ln_in: Tensor,
    layers: Vec<EncoderCache>,
}

impl ClipVision {
    /// Loads `vision.*`, only the first `num_layers` encoder layers (the rest are never read).
    pub fn load(config: &VisionConfig, b: &mut ParamBuilder, num_layers: usize) -> Result<Self> {
        let c = config;
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let class_embedding = b.add("vision.embeddings.class_embedding", &[h])?;
        let patch_embedding = Linear {
            w: b.add("vision.embeddings.patch_embedding.weight", &[h, ch, p, p])?,
            b: None,
        };
        let position_embedding = b.add(
            "vision.embeddings.position_embedding.weight",
            &[c.grid() * c.grid() + 1, h],
        )?;
        let pre_layrnorm = b.layer_norm("vision.pre_layrnorm", h)?;
        let layers = (0..num_layers)
            .map(|i| EncoderLayer::load(c, b, &format!("vision.encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVision {
            config: c.clone(),
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
        })
    }

    /// Encoder layers loaded (and run).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens per image, `grid² + 1`.
    pub fn tokens(&self) -> usize {
        self.config.grid() * self.config.grid() + 1
    }

    /// HF's `hidden_states` list for a batch of images (`pixel_values: [channels, size, size]`
    /// each): entry 0 is the embeddings after `pre_layrnorm`, entry i the output of layer i;
    /// `[images · tokens, hidden]` each, for as many layers as were loaded. With `keep` (a
    /// host f32 model), also what [`ClipVision::backward`] needs.
    pub fn forward(
        &self,
        p: &[Param],
        pixels: &[&[f32]],
        keep: bool,
    ) -> Result<(Vec<Tensor>, Option<VisionCache>)> {
        let c = &self.config;
        let t = self.tokens();
        let w = &p[self.patch_embedding.w].value;
        let cpp = w.len() / c.hidden_size.max(1);
        let mut unfolded = Vec::with_capacity(pixels.len() * (t - 1) * cpp);
        for px in pixels {
            unfolded.extend(unfold_patches(c, px)?);
        }
        let patches =
            Tensor::from_f32(&[pixels.len() * (t - 1), cpp], unfolded)?.activation_like(w)?;
        let pe = self.patch_embedding.forward(p, &patches)?;
        let cls = p[self.class_embedding]
            .value
            .clone()
            .reshape(&[1, c.hidden_size])?
            .activation_like(w)?;
        let pos = p[self.position_embedding]
            .value
            .clone()
            .activation_like(w)?;
        let mut rows = Vec::with_capacity(pixels.len());
        for i in 0..pixels.len() {
            let mut xi = Tensor::cat_rows(&[&cls, &pe.narrow_rows(i * (t - 1), t - 1)?])?;
            xi.add(&pos)?;
            rows.push(xi);
        }
        let x = match rows.len() {
            1 => rows.swap_remove(0),
            _ => Tensor::cat_rows(&rows.iter().collect::<Vec<_>>())?,
        };
        let mut h = self.pre_layrnorm.forward(p, &x, c.layer_norm_eps)?;
        h.check_finite(|r| format!("the vision embeddings (image {}, token {})", r / t, r % t))?;
        let mut states = vec![h.clone()];
        let mut caches = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for (i, layer) in self.layers.iter().enumerate() {
            caches.extend(layer.forward(p, c, &mut h, t, keep)?);
            h.check_finite(|r| {
                format!(
                    "the output of vision layer {i} (image {}, token {})",
                    r / t,
                    r % t
                )
            })?;
            states.push(h.clone());
        }
        let cache = keep.then_some(VisionCache {
            patches,
            pre_ln_in: x,
            layers: caches,
        });
        Ok((states, cache))
    }

    /// The CLS token's attention and the keys in encoder layer `layer` (both averaged over
    /// heads, [`AttentionSummary`]) for `states`, [`ClipVision::forward`]'s hidden states (layer
    /// `layer` reads `states[layer]`).
    pub fn attention_summary(
        &self,
        p: &[Param],
        states: &[Tensor],
        layer: usize,
    ) -> Result<AttentionSummary> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::arg(
                "vision layer",
                format!("{layer} is not one of the {} loaded", self.layers.len()),
            )
        })?;
        l.attention_summary(p, &self.config, &states[layer], self.tokens())
    }

    /// `dstates[i]`: the gradient reaching hidden state `i` directly (from the feature
    /// selection). Stops below the lowest layer with a trainable parameter when the embeddings
    /// and `pre_layrnorm` are frozen (nothing below would use the gradient).
    pub fn backward(
        &self,
        p: &mut [Param],
        cache: &VisionCache,
        dstates: &[Vec<f32>],
    ) -> Result<()> {
        let c = &self.config;
        let n = self.layers.len();
        let (h, t) = (c.hidden_size, self.tokens());
        let embeddings = [
            Some(self.patch_embedding.w),
            self.patch_embedding.b,
            Some(self.class_embedding),
            Some(self.position_embedding),
            Some(self.pre_layrnorm.w),
            Some(self.pre_layrnorm.b),
        ];
        let embeddings_frozen = embeddings.into_iter().flatten().all(|i| p[i].frozen());
        let lowest = if embeddings_frozen {
            (0..n)
                .find(|&i| self.layers[i].params().any(|j| !p[j].frozen()))
                .unwrap_or(n)
        } else {
            0
        };
        let mut dx = dstates[n].clone();
        for i in (lowest..n).rev() {
            self.layers[i].backward(p, c, t, &cache.layers[i], &mut dx)?;
            ops::add(&mut dx, &dstates[i]);
        }
        if embeddings_frozen {
            return Ok(());
        }
        let dx = self
            .pre_layrnorm
            .backward(p, host(&cache.pre_ln_in)?, c.layer_norm_eps, &dx)?;
        for dxi in dx.chunks(t * h) {
            accumulate(&mut p[self.position_embedding], dxi);
            accumulate(&mut p[self.class_embedding], &dxi[..h]);
        }
        if !p[self.patch_embedding.w].frozen() {
            let dpe: Vec<f32> = dx
                .chunks(t * h)
                .flat_map(|d| d[h..].iter().copied())
                .collect();
            self.patch_embedding
                .backward(p, host(&cache.patches)?, &dpe)?;
        }
        Ok(())
    }

    /// Indices of every parameter of the tower (the embeddings, `pre_layrnorm`, the layers).
    pub fn param_indices(&self, from_layer: usize) -> Vec<usize> {
        self.layers[from_layer.min(self.layers.len())..]
            .iter()
            .flat_map(|l| l.params())
            .collect()
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
