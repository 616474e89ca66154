//! The LLaVA model as the trainer sees it (llm.c style): every weight is an f32 [`Param`] (value +
//! gradient) owned here, [`TrainModel::forward`] runs a batch and keeps what the backward needs,
//! [`TrainModel::backward`] walks the same blocks in reverse and accumulates into the gradients.
//! The numerics follow the inference model in `crate::model` (itself HF-exact): CLIP tower ->
//! selected hidden states -> projector (linear, exact GELU, linear) -> merged into the token
//! embeddings at `<image>` positions -> LLaMA layers -> final RMSNorm -> LM head -> cross-entropy
//! on answer tokens. Checked against PyTorch autograd in `tests/train_grads.rs`.
//!
//! Parameter names are transformers 5.x in-memory keys (`model.named_parameters()` of
//! `LlavaForConditionalGeneration`): `model.vision_tower.embeddings.patch_embedding.weight`,
//! `model.vision_tower.encoder.layers.{i}.self_attn.q_proj.weight`,
//! `model.multi_modal_projector.linear_1.weight`, `model.language_model.layers.{i}.mlp.up_proj.weight`,
//! `model.language_model.norm.weight`, `lm_head.weight` (absent when tied). Only the vision layers
//! up to the deepest selected feature layer exist (the rest never influence the loss), and
//! `post_layernorm` is not a parameter. Shapes are HF's, flattened row-major (the patch embedding
//! is `[hidden, channels, p, p]`, used as `[hidden, channels·p·p]`).
//!
//! Groups: `{vision,projector,lm}.{decay,no_decay}` from [`decay_group`] (biases and norms do not
//! decay). A group whose parameters have empty gradients (frozen, see [`Param::grad`]) gets no
//! weight gradient computed; when every vision and projector parameter is frozen the backward stops
//! at the merged embeddings, and within the vision tower it stops at the lowest encoder layer
//! with a trainable parameter ([`TrainModel::train_last_vision_layers`]).

use super::optim::{Param, decay_group};
use crate::error::{Error, Result};
use crate::model::config::{LlavaConfig, ModelConfig, SelectStrategy};
use crate::model::template::Segment;
use crate::model::weights::Weights;
use crate::ops::attention::{AttnShape, attention_backward, attention_with_probs};
use crate::ops::loss::{IGNORE_INDEX, cross_entropy};
use crate::ops::matmul::{linear_backward, matmul_nt};
use crate::ops::{self, act, embed, norm, rope};
use crate::prune::{PrunePlan, score};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Group of the vision parameters [`TrainModel::train_last_vision_layers`] freezes.
pub const VISION_FROZEN_GROUP: &str = "vision.frozen";

/// One training sequence with its image.
#[derive(Debug, Clone)]
pub struct TrainSeq {
    /// Token ids, `<image>` already expanded to the vision tower's token count.
    pub input_ids: Vec<u32>,
    /// HF-style labels, one per position: the token id where it is an answer token to learn,
    /// [`IGNORE_INDEX`] elsewhere. Position `t` is trained to predict `labels[t + 1]`.
    pub labels: Vec<i64>,
    /// `[channels, size, size]`, preprocessed.
    pub pixel_values: Vec<f32>,
    /// Rows whose attention a [`GroundingLoss`] supervises (none: the sequence adds nothing to it).
    pub grounding: Vec<Grounding>,
    /// Segments of the first turn's prompt (its positions before the answer), as the engine
    /// labels an inference prompt; a pruned forward ([`TrainModel::set_prune`]) ranks the image
    /// tokens from them exactly as the engine would for that question. May be empty otherwise.
    pub prompt: Vec<Segment>,
}

/// A row of a sequence whose attention should fall on some of the sequence's image tokens: the
/// target of a [`GroundingLoss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grounding {
    /// Row of the sequence, after the image: the one predicting an answer's first token, or a
    /// referring phrase's last token.
    pub position: usize,
    /// The image tokens the answer is about, as indices among the sequence's image tokens
    /// (row-major patches), increasing, without repeats.
    pub patches: Vec<usize>,
    /// Which of the two the row is; [`GroundingLoss`] may supervise them at different layers.
    pub row: GroundedRow,
    /// The heads whose attention is supervised: all of them, or one share of them when an
    /// answer compares several objects and each share should look at one.
    pub heads: HeadShare,
}

/// Share `index` of `count` equal shares of a layer's attention heads: with `H` heads, heads
/// `index·H/count .. (index+1)·H/count`. An answer comparing objects ("Is the circle left of the
/// square?") grounds one share on each, so different heads bring each object's features to the
/// answer row and the layers above see both side by side instead of their average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShare {
    pub index: usize,
    pub count: usize,
}

impl HeadShare {
    /// Every head.
    pub const ALL: HeadShare = HeadShare { index: 0, count: 1 };

    /// The heads of this share among `heads`; `None` when there are fewer heads than shares or
    /// `index` is not below `count`.
    pub fn range(&self, heads: usize) -> Option<std::ops::Range<usize>> {
        (self.index < self.count && self.count <= heads)
            .then(|| self.index * heads / self.count..(self.index + 1) * heads / self.count)
    }
}

/// What a [`Grounding`] row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroundedRow {
    /// The last token of a phrase naming objects ("the red circle").
    Phrase,
    /// The row predicting an answer's first token.
    Answer,
}

/// Attention grounding, an auxiliary loss on where the language model looks: at decoder layer
/// `layer` (answer rows: `answer_layer`, when set), the head-averaged attention `P_h` of every
/// grounded row `t` (the row predicting an answer about some objects, the last token of a phrase
/// naming some) should fall on its relevant image tokens `R`,
///
/// `L_ground = −mean_rows ln( (1/|H_t|) Σ_{h∈H_t} Σ_{j∈R} P_h[t, j] )`,
///
/// where `H_t` is every head, or the row's [`HeadShare`] when an answer compares objects (one
/// share per object, each a row of its own here).
/// and training minimises `cross-entropy + weight · L_ground`. The two layers make a two-hop
/// lookup: a phrase's own token finds its object early, while the answer row, which knows what
/// the question names only after attending to the question, looks at a later layer. The mass is
/// averaged over heads inside the logarithm, so a few heads may carry it while the others attend
/// elsewhere. This is attention supervision as in VQA with human attention maps (Qiao et al.,
/// AAAI 2018) and grounding losses of visual-grounding models; it trains the very quantity FastV
/// ranks by at `K = layer + 1` (and `answer_layer + 1`), so pruning studies on such a model say
/// so.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingLoss {
    /// Decoder layer (0-based) whose attention probabilities are supervised.
    pub layer: usize,
    /// Weight of `L_ground` next to the cross-entropy (positive).
    pub weight: f64,
    /// Decoder layer (0-based) of the answer rows ([`GroundedRow::Answer`]); `None`: `layer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_layer: Option<usize>,
}

impl GroundingLoss {
    /// The decoder layer whose attention a row of kind `row` is supervised at.
    pub fn layer_of(&self, row: GroundedRow) -> usize {
        match row {
            GroundedRow::Phrase => self.layer,
            GroundedRow::Answer => self.answer_layer.unwrap_or(self.layer),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameter plumbing
// ---------------------------------------------------------------------------------------------

/// Builds the parameter list, asking `get(canonical_name, shape)` for each value (canonical names
/// are those of [`Weights`]: `vision.*`, `projector.*`, `lm.*`, `lm_head.weight`).
struct Builder<'a> {
    params: Vec<Param>,
    shapes: Vec<Vec<usize>>,
    get: &'a mut ValueSource<'a>,
}

/// The transformers 5.x in-memory key (what `named_parameters()` and `save_pretrained` use) of a
/// canonical [`Weights`] name, with its group prefix (`vision`, `projector` or `lm`).
pub fn hf_name(canonical: &str) -> (&'static str, String) {
    if let Some(r) = canonical.strip_prefix("vision.") {
        ("vision", format!("model.vision_tower.{r}"))
    } else if let Some(r) = canonical.strip_prefix("projector.") {
        ("projector", format!("model.multi_modal_projector.{r}"))
    } else if let Some(r) = canonical.strip_prefix("lm.") {
        ("lm", format!("model.language_model.{r}"))
    } else {
        ("lm", canonical.to_string())
    }
}

/// Initial values of parameter `name` (canonical) for [`TrainModel::init`]: biases 0, norm
/// weights 1, everything else uniform with standard deviation `std` from the LCG `state`.
pub(crate) fn init_values(name: &str, shape: &[usize], std: f32, state: &mut u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let last = name.rsplit('.').nth(1).unwrap_or("");
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    if last.contains("norm") || name == "lm.norm.weight" {
        return vec![1.0; n];
    }
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (*state >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * std * 3f32.sqrt()
        })
        .collect()
}

/// Gives the value of a parameter from its canonical name and shape.
type ValueSource<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>> + 'a;

impl Builder<'_> {
    fn add(&mut self, canonical: &str, shape: &[usize]) -> Result<usize> {
        let value = (self.get)(canonical, shape)?;
        let (prefix, hf) = hf_name(canonical);
        self.params
            .push(Param::new(hf.clone(), decay_group(prefix, &hf), value));
        self.shapes.push(shape.to_vec());
        Ok(self.params.len() - 1)
    }

    fn lin(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Lin> {
        Ok(Lin {
            w: self.add(&format!("{name}.weight"), &[out, inp])?,
            b: if bias {
                Some(self.add(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
            out,
            inp,
        })
    }

    fn ln(&mut self, name: &str, d: usize) -> Result<Ln> {
        Ok(Ln {
            w: self.add(&format!("{name}.weight"), &[d])?,
            b: self.add(&format!("{name}.bias"), &[d])?,
        })
    }
}

fn frozen(p: &[Param], i: usize) -> bool {
    p[i].grad.is_empty()
}

/// `y = x·Wᵀ + b` over parameters `w` (`[out, inp]`) and `b`.
#[derive(Debug, Clone, Copy)]
struct Lin {
    w: usize,
    b: Option<usize>,
    out: usize,
    inp: usize,
}

impl Lin {
    fn forward(&self, p: &[Param], x: &[f32]) -> Vec<f32> {
        let m = x.len() / self.inp;
        let mut y = vec![0.0f32; m * self.out];
        matmul_nt(
            m,
            self.out,
            self.inp,
            x,
            self.inp,
            &p[self.w].value,
            self.inp,
            &mut y,
            true,
        );
        if let Some(b) = self.b {
            for row in y.chunks_mut(self.out) {
                ops::add(row, &p[b].value);
            }
        }
        y
    }

    /// Returns `dx`; accumulates `dW`, `db` unless frozen.
    fn backward(&self, p: &mut [Param], x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let skip = frozen(p, self.w);
        let mut dw = if skip {
            vec![0.0f32; p[self.w].value.len()]
        } else {
            std::mem::take(&mut p[self.w].grad)
        };
        let dx = match self.b.filter(|&b| !frozen(p, b)) {
            Some(b) => {
                let mut db = std::mem::take(&mut p[b].grad);
                let r = linear_backward(x, &p[self.w].value, self.inp, dy, &mut dw, Some(&mut db));
                p[b].grad = db;
                r
            }
            None => linear_backward(x, &p[self.w].value, self.inp, dy, &mut dw, None),
        };
        if !skip {
            p[self.w].grad = dw;
        }
        dx
    }
}

/// LayerNorm with weight and bias.
#[derive(Debug, Clone, Copy)]
struct Ln {
    w: usize,
    b: usize,
}

impl Ln {
    fn forward(&self, p: &[Param], x: &[f32], eps: f64) -> Result<Vec<f32>> {
        let d = p[self.w].value.len();
        norm::layer_norm(
            x,
            &Tensor::from_f32(&[d], p[self.w].value.clone())?,
            &Tensor::from_f32(&[d], p[self.b].value.clone())?,
            eps,
        )
    }

    fn backward(&self, p: &mut [Param], x: &[f32], eps: f64, dy: &[f32]) -> Vec<f32> {
        let d = p[self.w].value.len();
        let mut dw = std::mem::take(&mut p[self.w].grad);
        let mut db = std::mem::take(&mut p[self.b].grad);
        let (mut tw, mut tb) = (vec![0.0; d], vec![0.0; d]);
        let dx = norm::layer_norm_backward(
            x,
            &p[self.w].value,
            eps,
            dy,
            if dw.is_empty() { &mut tw } else { &mut dw },
            if db.is_empty() { &mut tb } else { &mut db },
        );
        p[self.w].grad = dw;
        p[self.b].grad = db;
        dx
    }
}

fn rms_forward(p: &[Param], w: usize, x: &[f32], eps: f64) -> Result<Vec<f32>> {
    let d = p[w].value.len();
    norm::rms_norm(x, &Tensor::from_f32(&[d], p[w].value.clone())?, eps)
}

fn rms_backward(p: &mut [Param], w: usize, x: &[f32], eps: f64, dy: &[f32]) -> Vec<f32> {
    let mut dw = std::mem::take(&mut p[w].grad);
    let mut tmp = vec![0.0; p[w].value.len()];
    let dx = norm::rms_norm_backward(
        x,
        &p[w].value,
        eps,
        dy,
        if dw.is_empty() { &mut tmp } else { &mut dw },
    );
    p[w].grad = dw;
    dx
}

// ---------------------------------------------------------------------------------------------
// CLIP vision tower (HF `CLIPVisionModel`)
// ---------------------------------------------------------------------------------------------

/// HF `CLIPEncoderLayer`.
struct EncoderLayer {
    layer_norm1: Ln,
    q_proj: Lin,
    k_proj: Lin,
    v_proj: Lin,
    out_proj: Lin,
    layer_norm2: Ln,
    fc1: Lin,
    fc2: Lin,
}

/// What one encoder layer's backward needs (rows of every image, concatenated).
struct EncoderCache {
    x: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<Vec<f32>>,
    o: Vec<f32>,
    x_mid: Vec<f32>,
    xn2: Vec<f32>,
    pre_act: Vec<f32>,
    act: Vec<f32>,
}

/// Bidirectional attention over one image's `t` rows.
fn vision_attn_shape(c: &LlavaConfig, t: usize) -> AttnShape {
    let vc = &c.vision;
    AttnShape {
        t,
        s: t,
        heads: vc.num_attention_heads,
        kv_heads: vc.num_attention_heads,
        head_dim: vc.hidden_size / vc.num_attention_heads,
        causal: false,
    }
}

impl EncoderLayer {
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
        let norms = [self.layer_norm1, self.layer_norm2];
        lins.into_iter()
            .flat_map(|l| std::iter::once(l.w).chain(l.b))
            .chain(norms.into_iter().flat_map(|n| [n.w, n.b]))
    }

    /// `x`: the rows of a batch of images, `t` tokens each, concatenated; attention stays
    /// within an image.
    fn forward(
        &self,
        p: &[Param],
        c: &LlavaConfig,
        t: usize,
        x: &mut [f32],
    ) -> Result<EncoderCache> {
        let vc = &c.vision;
        let w = t * vc.hidden_size;
        let x_in = x.to_vec();
        let xn1 = self.layer_norm1.forward(p, x, vc.layer_norm_eps)?;
        let q = self.q_proj.forward(p, &xn1);
        let k = self.k_proj.forward(p, &xn1);
        let v = self.v_proj.forward(p, &xn1);
        let mut o = vec![0.0f32; q.len()];
        let mut probs = Vec::with_capacity(q.len() / w.max(1));
        for (i, oi) in o.chunks_mut(w).enumerate() {
            let r = i * w..(i + 1) * w;
            let (out, pr) =
                attention_with_probs(&q[r.clone()], &k[r.clone()], &v[r], vision_attn_shape(c, t))?;
            oi.copy_from_slice(&out);
            probs.push(pr);
        }
        ops::add(x, &self.out_proj.forward(p, &o));
        let x_mid = x.to_vec();
        let xn2 = self.layer_norm2.forward(p, x, vc.layer_norm_eps)?;
        let pre_act = self.fc1.forward(p, &xn2);
        let mut a = pre_act.clone();
        match vc.hidden_act.as_str() {
            "gelu" => act::gelu(&mut a),
            _ => act::quick_gelu(&mut a),
        }
        ops::add(x, &self.fc2.forward(p, &a));
        Ok(EncoderCache {
            x: x_in,
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
        })
    }

    /// `dx` is the gradient of the layer's output on entry and of its input on return.
    fn backward(
        &self,
        p: &mut [Param],
        c: &LlavaConfig,
        t: usize,
        cache: &EncoderCache,
        dx: &mut [f32],
    ) -> Result<()> {
        let vc = &c.vision;
        let w = t * vc.hidden_size;
        let eps = vc.layer_norm_eps;
        let da = self.fc2.backward(p, &cache.act, dx)?;
        let dpre = match vc.hidden_act.as_str() {
            "gelu" => act::gelu_backward(&cache.pre_act, &da),
            _ => act::quick_gelu_backward(&cache.pre_act, &da),
        };
        let dxn2 = self.fc1.backward(p, &cache.xn2, &dpre)?;
        ops::add(dx, &self.layer_norm2.backward(p, &cache.x_mid, eps, &dxn2));
        let d_o = self.out_proj.backward(p, &cache.o, dx)?;
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; d_o.len()],
            vec![0.0; d_o.len()],
            vec![0.0; d_o.len()],
        );
        for (i, pr) in cache.probs.iter().enumerate() {
            let r = i * w..(i + 1) * w;
            let (a, b, d) = attention_backward(
                &cache.q[r.clone()],
                &cache.k[r.clone()],
                &cache.v[r.clone()],
                Some(pr),
                None,
                &d_o[r.clone()],
                vision_attn_shape(c, t),
            )?;
            dq[r.clone()].copy_from_slice(&a);
            dk[r.clone()].copy_from_slice(&b);
            dv[r].copy_from_slice(&d);
        }
        let mut dxn1 = self.q_proj.backward(p, &cache.xn1, &dq)?;
        ops::add(&mut dxn1, &self.k_proj.backward(p, &cache.xn1, &dk)?);
        ops::add(&mut dxn1, &self.v_proj.backward(p, &cache.xn1, &dv)?);
        ops::add(dx, &self.layer_norm1.backward(p, &cache.x, eps, &dxn1));
        Ok(())
    }
}

/// The vision tower's embeddings, `pre_layrnorm` and encoder layers.
struct VisionTower {
    patch_embedding: Lin,
    class_embedding: usize,
    position_embedding: usize,
    pre_layrnorm: Ln,
    layers: Vec<EncoderLayer>,
}

/// The vision activations of a batch of images (rows concatenated image by image).
struct VisionCache {
    patches: Vec<f32>,
    pre_ln_in: Vec<f32>,
    layers: Vec<EncoderCache>,
}

impl VisionTower {
    /// HF's hidden-states list for a batch of images (entry 0 after `pre_layrnorm`, entry i
    /// after layer i), each entry the images' `grid² + 1` rows concatenated.
    fn forward(
        &self,
        p: &[Param],
        c: &LlavaConfig,
        pixels: &[&[f32]],
    ) -> Result<(Vec<Vec<f32>>, VisionCache)> {
        let h = c.vision.hidden_size;
        let t = c.vision.grid() * c.vision.grid() + 1;
        let mut patches = Vec::new();
        for px in pixels {
            patches.extend(crate::model::clip::unfold_patches(&c.vision, px)?);
        }
        let pe = self.patch_embedding.forward(p, &patches);
        let mut x = Vec::with_capacity(pixels.len() * t * h);
        for pe_i in pe.chunks(h * (t - 1)) {
            x.extend_from_slice(&p[self.class_embedding].value);
            x.extend_from_slice(pe_i);
        }
        for xi in x.chunks_mut(t * h) {
            ops::add(xi, &p[self.position_embedding].value);
        }
        let mut x_cur = self.pre_layrnorm.forward(p, &x, c.vision.layer_norm_eps)?;
        let mut states = vec![x_cur.clone()];
        let mut caches = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            caches.push(layer.forward(p, c, t, &mut x_cur)?);
            states.push(x_cur.clone());
        }
        Ok((
            states,
            VisionCache {
                patches,
                pre_ln_in: x,
                layers: caches,
            },
        ))
    }

    /// `dstates[i]`: gradient reaching hidden state `i` directly (from the feature selection).
    /// Stops below the lowest layer with a trainable parameter when the embeddings and
    /// `pre_layrnorm` are frozen (nothing below would use the gradient).
    fn backward(
        &self,
        p: &mut [Param],
        c: &LlavaConfig,
        cache: &VisionCache,
        dstates: &[Vec<f32>],
    ) -> Result<()> {
        let n = self.layers.len();
        let h = c.vision.hidden_size;
        let t = c.vision.grid() * c.vision.grid() + 1;
        let embeddings = [
            Some(self.patch_embedding.w),
            self.patch_embedding.b,
            Some(self.class_embedding),
            Some(self.position_embedding),
            Some(self.pre_layrnorm.w),
            Some(self.pre_layrnorm.b),
        ];
        let embeddings_frozen = embeddings.into_iter().flatten().all(|i| frozen(p, i));
        let lowest = if embeddings_frozen {
            (0..n)
                .find(|&i| self.layers[i].params().any(|j| !frozen(p, j)))
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
            .backward(p, &cache.pre_ln_in, c.vision.layer_norm_eps, &dx);
        for dxi in dx.chunks(t * h) {
            if !frozen(p, self.position_embedding) {
                ops::add(&mut p[self.position_embedding].grad, dxi);
            }
            if !frozen(p, self.class_embedding) {
                ops::add(&mut p[self.class_embedding].grad, &dxi[..h]);
            }
        }
        if !frozen(p, self.patch_embedding.w) {
            let dpe: Vec<f32> = dx
                .chunks(t * h)
                .flat_map(|d| d[h..].iter().copied())
                .collect();
            self.patch_embedding.backward(p, &cache.patches, &dpe)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LLaMA decoder (HF `LlamaDecoderLayer`)
// ---------------------------------------------------------------------------------------------

/// HF `LlamaDecoderLayer`: RMSNorm, attention (q/k/v/o, RoPE, GQA, causal), RMSNorm, SiLU MLP.
struct DecoderLayer {
    input_layernorm: usize,
    q_proj: Lin,
    k_proj: Lin,
    v_proj: Lin,
    o_proj: Lin,
    post_attention_layernorm: usize,
    gate_proj: Lin,
    up_proj: Lin,
    down_proj: Lin,
}

/// What one decoder layer's backward needs (rows of every sequence, concatenated).
struct DecoderCache {
    /// RoPE positions of each sequence's rows entering the layer, and the batch row (before any
    /// pruning) each of those rows is.
    pos: Vec<Vec<usize>>,
    origin: Vec<usize>,
    x: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<Vec<f32>>,
    o: Vec<f32>,
    x_mid: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// Causal GQA attention over one sequence of `t` rows.
fn attn_shape(c: &LlavaConfig, t: usize) -> AttnShape {
    let tc = &c.text;
    AttnShape {
        t,
        s: t,
        heads: tc.num_attention_heads,
        kv_heads: tc.num_key_value_heads,
        head_dim: tc.head_dim,
        causal: true,
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        p: &[Param],
        c: &LlavaConfig,
        inv_freq: &[f32],
        positions: &[Vec<usize>],
        x: &mut [f32],
    ) -> Result<DecoderCache> {
        let tc = &c.text;
        let (nh, nkv, hd) = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim);
        let x_in = x.to_vec();
        let xn1 = rms_forward(p, self.input_layernorm, x, tc.rms_norm_eps)?;
        let mut q = self.q_proj.forward(p, &xn1);
        let mut k = self.k_proj.forward(p, &xn1);
        let v = self.v_proj.forward(p, &xn1);
        let mut o = vec![0.0f32; q.len()];
        let mut probs = Vec::with_capacity(positions.len());
        let mut r0 = 0;
        for pos in positions {
            let t = pos.len();
            let qs = &mut q[r0 * nh * hd..(r0 + t) * nh * hd];
            let ks = &mut k[r0 * nkv * hd..(r0 + t) * nkv * hd];
            rope::rope(qs, nh, hd, pos, inv_freq);
            rope::rope(ks, nkv, hd, pos, inv_freq);
            let vs = &v[r0 * nkv * hd..(r0 + t) * nkv * hd];
            let (out, pr) = attention_with_probs(qs, ks, vs, attn_shape(c, t))?;
            o[r0 * nh * hd..(r0 + t) * nh * hd].copy_from_slice(&out);
            probs.push(pr);
            r0 += t;
        }
        ops::add(x, &self.o_proj.forward(p, &o));
        let x_mid = x.to_vec();
        let xn2 = rms_forward(p, self.post_attention_layernorm, x, tc.rms_norm_eps)?;
        let gate = self.gate_proj.forward(p, &xn2);
        let up = self.up_proj.forward(p, &xn2);
        let mut a = gate.clone();
        act::silu_mul(&mut a, &up);
        ops::add(x, &self.down_proj.forward(p, &a));
        Ok(DecoderCache {
            pos: positions.to_vec(),
            origin: Vec::new(),
            x: x_in,
            xn1,
            q,
            k,
            v,
            probs,
            o,
            x_mid,
            xn2,
            gate,
            up,
            act: a,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &mut [Param],
        c: &LlavaConfig,
        inv_freq: &[f32],
        cache: &DecoderCache,
        dprobs: &[Vec<f32>],
        dx: &mut [f32],
    ) -> Result<()> {
        let tc = &c.text;
        let (nh, nkv, hd, eps) = (
            tc.num_attention_heads,
            tc.num_key_value_heads,
            tc.head_dim,
            tc.rms_norm_eps,
        );
        let da = self.down_proj.backward(p, &cache.act, dx)?;
        let (dgate, dup) = act::silu_mul_backward(&cache.gate, &cache.up, &da);
        let mut dxn2 = self.gate_proj.backward(p, &cache.xn2, &dgate)?;
        ops::add(&mut dxn2, &self.up_proj.backward(p, &cache.xn2, &dup)?);
        ops::add(
            dx,
            &rms_backward(p, self.post_attention_layernorm, &cache.x_mid, eps, &dxn2),
        );
        let d_o = self.o_proj.backward(p, &cache.o, dx)?;
        let mut dq = vec![0.0f32; cache.q.len()];
        let mut dk = vec![0.0f32; cache.k.len()];
        let mut dv = vec![0.0f32; cache.v.len()];
        let mut r0 = 0;
        for (i, (pos, probs)) in cache.pos.iter().zip(&cache.probs).enumerate() {
            let t = pos.len();
            let dp = dprobs.get(i).filter(|d| !d.is_empty());
            let (qr, kr) = (
                r0 * nh * hd..(r0 + t) * nh * hd,
                r0 * nkv * hd..(r0 + t) * nkv * hd,
            );
            let (mut gq, mut gk, gv) = attention_backward(
                &cache.q[qr.clone()],
                &cache.k[kr.clone()],
                &cache.v[kr.clone()],
                Some(probs),
                dp.map(Vec::as_slice),
                &d_o[qr.clone()],
                attn_shape(c, t),
            )?;
            rope::rope_backward(&mut gq, nh, hd, pos, inv_freq);
            rope::rope_backward(&mut gk, nkv, hd, pos, inv_freq);
            dq[qr].copy_from_slice(&gq);
            dk[kr.clone()].copy_from_slice(&gk);
            dv[kr].copy_from_slice(&gv);
            r0 += t;
        }
        let mut dxn1 = self.q_proj.backward(p, &cache.xn1, &dq)?;
        ops::add(&mut dxn1, &self.k_proj.backward(p, &cache.xn1, &dk)?);
        ops::add(&mut dxn1, &self.v_proj.backward(p, &cache.xn1, &dv)?);
        ops::add(
            dx,
            &rms_backward(p, self.input_layernorm, &cache.x, eps, &dxn1),
        );
        Ok(())
    }
}

/// [`GroundingLoss`] of a batch from its decoder layers' probabilities (`probs(l)[i]`: layer `l`'s
/// `[heads, t, t]` of sequence `i`): `L_ground` (`None` when no row is grounded) and, for each
/// layer a row is supervised at, `weight · ∂L_ground/∂P` per sequence (empty where it has no row
/// at that layer). With `m = (1/H) Σ_h Σ_{j∈R} P_h[t, j]` of one of `n` rows,
/// `∂L/∂P_h[t, j] = −1 / (n · H · m)` for `j ∈ R`, zero elsewhere.
fn grounding_loss<'a>(
    batch: &[TrainSeq],
    probs: impl Fn(usize) -> &'a [Vec<f32>],
    heads: usize,
    image_token: u32,
    g: &GroundingLoss,
) -> Result<(Option<f32>, LayerDprobs)> {
    let n: usize = batch.iter().map(|s| s.grounding.len()).sum();
    if n == 0 {
        return Ok((None, LayerDprobs::new()));
    }
    let mut loss = 0.0f64;
    let mut dprobs = LayerDprobs::new();
    for (i, s) in batch.iter().enumerate() {
        let t = s.input_ids.len();
        let slots: Vec<usize> = (0..t).filter(|&j| s.input_ids[j] == image_token).collect();
        for r in &s.grounding {
            let bad = |msg: String| {
                Error::arg(
                    "grounding",
                    format!("sequence {i}, row {}: {msg}", r.position),
                )
            };
            if r.position >= t {
                return Err(bad(format!("the sequence has {t} rows")));
            }
            if r.patches.is_empty() || r.patches.windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad("patches must be non-empty and increasing".into()));
            }
            let cols: Vec<usize> = r
                .patches
                .iter()
                .map(|&j| match slots.get(j) {
                    Some(&c) if c < r.position => Ok(c),
                    Some(_) => Err(bad(format!("image token {j} does not precede the row"))),
                    None => Err(bad(format!(
                        "patch {j} is out of range for {} image tokens",
                        slots.len()
                    ))),
                })
                .collect::<Result<_>>()?;
            let share = r.heads.range(heads).ok_or_else(|| {
                bad(format!(
                    "head share {} of {} does not exist among {heads} heads",
                    r.heads.index, r.heads.count
                ))
            })?;
            let nh = share.len();
            let layer = g.layer_of(r.row);
            let pr = &probs(layer)[i];
            let mass = share
                .clone()
                .map(|h| {
                    let row = &pr[(h * t + r.position) * t..][..t];
                    cols.iter().map(|&c| row[c] as f64).sum::<f64>()
                })
                .sum::<f64>()
                / nh as f64;
            let mass = mass.max(f64::MIN_POSITIVE);
            loss -= mass.ln();
            let coef = (-g.weight / (n as f64 * nh as f64 * mass)) as f32;
            let dp = &mut dprobs
                .entry(layer)
                .or_insert_with(|| vec![Vec::new(); batch.len()])[i];
            if dp.is_empty() {
                *dp = vec![0.0f32; heads * t * t];
            }
            for h in share {
                let row = &mut dp[(h * t + r.position) * t..][..t];
                for &c in &cols {
                    row[c] += coef;
                }
            }
        }
    }
    Ok((Some((loss / n as f64) as f32), dprobs))
}

/// The grounding loss's gradient on attention probabilities: for each supervised decoder layer,
/// one `[heads, t, t]` per sequence (empty for sequences without a row at that layer).
type LayerDprobs = BTreeMap<usize, Vec<Vec<f32>>>;

/// The pruning of one forward: which stage prunes at which layer, each sequence's prompt
/// segments and the kept image tokens so far.
struct Pruner<'a> {
    plan: &'a PrunePlan,
    counts: Vec<usize>,
    /// Segment of each current row of each sequence that is part of its first prompt.
    prompts: Vec<Vec<Segment>>,
    /// Original image-token index of each current image row of each sequence.
    images: Vec<Vec<usize>>,
    /// `[sequence][stage]` kept image tokens (original indices).
    kept: Vec<Vec<Vec<usize>>>,
}

impl<'a> Pruner<'a> {
    fn new(plan: &'a PrunePlan, batch: &[TrainSeq], layers: usize, ntok: usize) -> Result<Self> {
        let counts = plan.kept_counts(layers, ntok)?;
        for (i, s) in batch.iter().enumerate() {
            let images = s.prompt.iter().filter(|&&g| g == Segment::Image).count();
            if images != ntok || s.prompt.len() > s.input_ids.len() {
                return Err(Error::Prompt(format!(
                    "sequence {i}: a pruned forward needs the first prompt's segments with its \
                     {ntok} image tokens (got {} segments, {images} image)",
                    s.prompt.len()
                )));
            }
        }
        Ok(Pruner {
            plan,
            counts,
            prompts: batch.iter().map(|s| s.prompt.clone()).collect(),
            images: batch.iter().map(|_| (0..ntok).collect()).collect(),
            kept: vec![Vec::new(); batch.len()],
        })
    }

    /// The number of image tokens to keep when a stage prunes before layer `layer`.
    fn prunes_at(&self, layer: usize) -> Option<usize> {
        let i = self.plan.stages.iter().position(|s| s.layer == layer)?;
        Some(self.counts[i])
    }

    /// Ranks every sequence's image tokens from the probabilities `probs[i]` (`[heads, t, t]`)
    /// of the layer before the stage, keeps `keep`, updates `pos`, and returns the surviving
    /// rows of the batch (indices into the current rows, end to end).
    fn prune(
        &mut self,
        keep: usize,
        probs: &[Vec<f32>],
        heads: usize,
        pos: &mut [Vec<usize>],
    ) -> Result<Vec<usize>> {
        let mut rows = Vec::new();
        let mut r0 = 0;
        for (i, pr) in probs.iter().enumerate() {
            let t = pos[i].len();
            let prompt = &self.prompts[i];
            let q_rows = self.plan.query.candidates(prompt);
            let image_cols: Vec<usize> = (0..prompt.len())
                .filter(|&j| prompt[j] == Segment::Image)
                .collect();
            let mut sel = Vec::with_capacity(heads * q_rows.len() * image_cols.len());
            for h in 0..heads {
                for &q in &q_rows {
                    sel.extend(image_cols.iter().map(|&j| pr[(h * t + q) * t + j]));
                }
            }
            let att = score::SelectedAttention {
                heads,
                rows: q_rows.clone(),
                image_cols: image_cols.clone(),
                probs: sel,
                positions: t,
            };
            let w = self.plan.query.weights(prompt, &q_rows, &att.image_mass());
            let ranking = self.plan.rank(&att, w, keep);
            let dropped: std::collections::HashSet<usize> = (0..image_cols.len())
                .filter(|k| ranking.kept.binary_search(k).is_err())
                .map(|k| image_cols[k])
                .collect();
            let survivors: Vec<usize> = (0..t).filter(|j| !dropped.contains(j)).collect();
            self.kept[i].push(ranking.kept.iter().map(|&k| self.images[i][k]).collect());
            self.images[i] = ranking.kept.iter().map(|&k| self.images[i][k]).collect();
            self.prompts[i] = survivors
                .iter()
                .filter(|&&j| j < prompt.len())
                .map(|&j| prompt[j])
                .collect();
            pos[i] = if self.plan.renumber {
                (0..survivors.len()).collect()
            } else {
                survivors.iter().map(|&j| pos[i][j]).collect()
            };
            rows.extend(survivors.iter().map(|&j| r0 + j));
            r0 += t;
        }
        Ok(rows)
    }
}

/// Rows of the LM head evaluated together: a loss never sees logits for more than this many
/// rows × the vocabulary at once (a 7B model's 2k-token batch would otherwise hold 2k × 32k
/// floats per model, teacher and student).
pub const HEAD_CHUNK: usize = 256;

/// A loss on the LM head's logits. The forward evaluates the head only on the rows some loss
/// reads, [`HEAD_CHUNK`] rows at a time, hands each chunk's logits to every loss and folds the
/// gradients they add into the head's and the final norm's gradients right away, so neither the
/// logits nor their gradient are kept for the backward. Rows are indices into the batch's
/// sequences laid end to end (sequence `i`'s row `t` is `offset_i + t`, see [`row_offsets`]);
/// row `r` predicts the token at `r + 1` of its sequence.
pub trait HeadLoss {
    /// Whether the loss reads row `row`.
    fn reads(&self, row: usize) -> bool;
    /// Adds the loss of the rows it reads among `rows` (increasing) to its running total and
    /// `∂(weight · loss)/∂logits` into `dlogits`; `logits` and `dlogits` are `[rows, vocab]`.
    fn chunk(&mut self, rows: &[usize], logits: &[f32], dlogits: &mut [f32]) -> Result<()>;
}

/// Where each sequence's rows start when a batch's sequences are laid end to end.
pub fn row_offsets(batch: &[TrainSeq]) -> Vec<usize> {
    batch
        .iter()
        .scan(0, |acc, s| {
            let o = *acc;
            *acc += s.input_ids.len();
            Some(o)
        })
        .collect()
}

/// LLaVA's loss as a [`HeadLoss`]: cross-entropy of every answer token given the rows before it
/// (row `t` predicts `labels[t + 1]` where that is not [`IGNORE_INDEX`]), the mean over the batch's
/// answer tokens, as `F.cross_entropy` on HF's shifted logits and labels. `weight` scales its
/// gradient (0 keeps the value for the log and trains nothing).
pub struct AnswerCe {
    /// Target of each row of the batch ([`IGNORE_INDEX`] where it predicts no answer token).
    targets: Vec<i64>,
    counted: usize,
    weight: f32,
    sum: f64,
}

impl AnswerCe {
    /// The loss of `batch`'s answer tokens.
    pub fn new(batch: &[TrainSeq], weight: f32) -> Self {
        let targets: Vec<i64> = batch
            .iter()
            .flat_map(|s| {
                (0..s.input_ids.len()).map(|t| s.labels.get(t + 1).copied().unwrap_or(IGNORE_INDEX))
            })
            .collect();
        let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        AnswerCe {
            targets,
            counted,
            weight,
            sum: 0.0,
        }
    }

    /// [`AnswerCe::new`] without the sequences `skip` marks (their rows count for nothing).
    pub fn new_masked(batch: &[TrainSeq], weight: f32, skip: &[bool]) -> Self {
        let mut ce = Self::new(batch, weight);
        let mut r0 = 0;
        for (s, &k) in batch.iter().zip(skip) {
            let n = s.input_ids.len();
            if k {
                ce.targets[r0..r0 + n].fill(IGNORE_INDEX);
            }
            r0 += n;
        }
        ce.counted = ce.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        ce
    }

    /// The mean cross-entropy over the rows seen so far (0 without answer tokens).
    pub fn loss(&self) -> f32 {
        if self.counted == 0 {
            0.0
        } else {
            (self.sum / self.counted as f64) as f32
        }
    }
}

impl HeadLoss for AnswerCe {
    fn reads(&self, row: usize) -> bool {
        self.targets.get(row).is_some_and(|&t| t != IGNORE_INDEX)
    }

    fn chunk(&mut self, rows: &[usize], logits: &[f32], dlogits: &mut [f32]) -> Result<()> {
        let vocab = logits.len() / rows.len().max(1);
        let targets: Vec<i64> = rows.iter().map(|&r| self.targets[r]).collect();
        let here = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        if here == 0 {
            return Ok(());
        }
        let (mean, g) = cross_entropy(logits, vocab, &targets, IGNORE_INDEX)?;
        self.sum += mean as f64 * here as f64;
        let scale = self.weight * here as f32 / self.counted as f32;
        dlogits
            .iter_mut()
            .zip(&g)
            .for_each(|(d, g)| *d += scale * g);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LLaVA
// ---------------------------------------------------------------------------------------------

/// Everything the backward of the last [`TrainModel::forward`] needs.
struct Cache {
    ids: Vec<u32>,
    lens: Vec<usize>,
    /// Row of each merged image feature (`[images·image_tokens]`, image by image).
    image_rows: Vec<usize>,
    vision: VisionCache,
    /// Projector input `[images·image_tokens, vision_hidden·layers]`, `linear_1` output, GELU output.
    feats: Vec<f32>,
    h1: Vec<f32>,
    g: Vec<f32>,
    decoder: Vec<DecoderCache>,
    /// With a prune plan: after which decoder layer rows were dropped, and the rows (of that
    /// layer's output) that went on.
    pruned_after: BTreeMap<usize, Vec<usize>>,
    final_in: Vec<f32>,
    /// The batch row (before any pruning) of each row of `final_in`.
    final_origin: Vec<usize>,
    /// Gradient of the head losses on `final_out` (zero on rows no head loss reads) and on the
    /// LM head's weight (`None` when it is frozen), computed chunk by chunk in the forward.
    dfinal: Vec<f32>,
    dhead: Option<Vec<f32>>,
    /// The grounding loss's gradient on its layers' probabilities.
    dprobs: LayerDprobs,
    /// [`TrainModel::add_hidden_grad`]'s gradients on decoder layers' outputs.
    dhidden: BTreeMap<usize, Vec<f32>>,
    /// [`TrainModel::add_image_features_grad`]'s gradient on the projected image features.
    dimage: Option<Vec<f32>>,
}

/// What [`TrainModel::trace`] keeps of a forward pass.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The final norm's output, `[rows, hidden]`, the batch's rows end to end.
    pub final_out: Vec<f32>,
    /// Outputs of the decoder layers asked for, by layer.
    pub hidden: BTreeMap<usize, Vec<f32>>,
    /// Attention probabilities of the query rows asked for, by layer, then sequence:
    /// `[heads, rows, t]`.
    pub attention: BTreeMap<usize, Vec<Vec<f32>>>,
    /// The projected image features ([`TrainModel::image_features`]), when asked for.
    pub image_features: Vec<f32>,
}

/// What [`TrainModel::trace`] keeps.
#[derive(Debug, Clone, Default)]
pub struct TraceRequest {
    /// Decoder layers whose outputs to keep.
    pub hidden: Vec<usize>,
    /// Decoder layers whose attention probabilities to keep, for the rows `query_rows`.
    pub attention: Vec<usize>,
    /// Query rows of each sequence (increasing).
    pub query_rows: Vec<Vec<usize>>,
    /// Keep the projected image features.
    pub image_features: bool,
}

/// LLaVA with trainable f32 parameters.
pub struct TrainModel {
    pub config: LlavaConfig,
    /// Every parameter, in HF's `named_parameters()` order within each block.
    pub params: Vec<Param>,
    /// Shape of each parameter (same order as `params`).
    shapes: Vec<Vec<usize>>,
    vision: VisionTower,
    linear_1: Lin,
    linear_2: Lin,
    embed_tokens: usize,
    layers: Vec<DecoderLayer>,
    norm: usize,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<usize>,
    /// `vision_feature_layer` as indices into the hidden-states list.
    feature_layers: Vec<usize>,
    inv_freq: Vec<f32>,
    cache: Option<Cache>,
    /// Activations of the last [`TrainModel::vision_forward`] and its image count.
    vision_cache: Option<(VisionCache, usize)>,
    grounding: Option<GroundingLoss>,
    /// Pruning during the forward ([`TrainModel::set_prune`]).
    prune: Option<PrunePlan>,
    /// Image tokens each sequence kept at each stage of the last pruned forward.
    last_kept: Vec<Vec<Vec<usize>>>,
    /// `L_ground` of the last forward (`None` without a grounding loss or grounded rows).
    last_grounding: Option<f32>,
}

impl TrainModel {
    /// Loads a LLaVA checkpoint directory (`config.json` + safetensors, any key layout and dtype
    /// [`Weights`] reads), converting every weight to f32.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = match ModelConfig::from_file(&dir.join("config.json"))? {
            ModelConfig::Llava(c) => c,
            ModelConfig::Llama(_) => {
                return Err(Error::arg(
                    "model",
                    format!("{} is a LLaMA checkpoint, not LLaVA", dir.display()),
                ));
            }
        };
        let mut w = Weights::from_dir(dir)?;
        let has_head = w.contains("lm_head.weight");
        let mut get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            w.take(name, shape)?.into_f32_vec()
        };
        let tied = config.text.tie_word_embeddings || !has_head;
        Self::build(config, tied, &mut get)
    }

    /// A freshly initialised model: weights `N(0, std)`-like (uniform with that standard
    /// deviation, from a seeded generator), norm weights 1, biases 0, CLS and positions like weights.
    pub fn init(config: &LlavaConfig, std: f32, seed: u64) -> Result<Self> {
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut get = |name: &str, shape: &[usize]| Ok(init_values(name, shape, std, &mut state));
        Self::build(config.clone(), config.text.tie_word_embeddings, &mut get)
    }

    fn build(config: LlavaConfig, tied: bool, get: &mut ValueSource<'_>) -> Result<Self> {
        let c = &config;
        let (vc, tc) = (&c.vision, &c.text);
        let n_states = vc.num_hidden_layers as i64 + 1;
        let feature_layers = c
            .vision_feature_layers
            .iter()
            .map(|&l| {
                let r = if l < 0 { n_states + l } else { l };
                if (0..n_states).contains(&r) {
                    Ok(r as usize)
                } else {
                    Err(Error::arg(
                        "vision_feature_layer",
                        format!("{l} is outside the {n_states} hidden states"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let deepest = feature_layers.iter().copied().max().unwrap_or(0);
        let mut b = Builder {
            params: Vec::new(),
            shapes: Vec::new(),
            get,
        };
        let (h, p, ch) = (vc.hidden_size, vc.patch_size, vc.num_channels);
        let class_embedding = b.add("vision.embeddings.class_embedding", &[h])?;
        let patch_w = b.add("vision.embeddings.patch_embedding.weight", &[h, ch, p, p])?;
        let position_embedding = b.add(
            "vision.embeddings.position_embedding.weight",
            &[vc.grid() * vc.grid() + 1, h],
        )?;
        let pre_layrnorm = b.ln("vision.pre_layrnorm", h)?;
        let mut vlayers = Vec::with_capacity(deepest);
        for i in 0..deepest {
            let n = format!("vision.encoder.layers.{i}");
            vlayers.push(EncoderLayer {
                q_proj: b.lin(&format!("{n}.self_attn.q_proj"), h, h, true)?,
                k_proj: b.lin(&format!("{n}.self_attn.k_proj"), h, h, true)?,
                v_proj: b.lin(&format!("{n}.self_attn.v_proj"), h, h, true)?,
                out_proj: b.lin(&format!("{n}.self_attn.out_proj"), h, h, true)?,
                layer_norm1: b.ln(&format!("{n}.layer_norm1"), h)?,
                fc1: b.lin(&format!("{n}.mlp.fc1"), vc.intermediate_size, h, true)?,
                fc2: b.lin(&format!("{n}.mlp.fc2"), h, vc.intermediate_size, true)?,
                layer_norm2: b.ln(&format!("{n}.layer_norm2"), h)?,
            });
        }
        let th = tc.hidden_size;
        let pb = c.projector_bias;
        let linear_1 = b.lin("projector.linear_1", th, h * feature_layers.len(), pb)?;
        let linear_2 = b.lin("projector.linear_2", th, th, pb)?;
        let embed_tokens = b.add("lm.embed_tokens.weight", &[tc.vocab_size, th])?;
        let (hd, qd, kvd) = (
            tc.head_dim,
            tc.num_attention_heads * tc.head_dim,
            tc.num_key_value_heads * tc.head_dim,
        );
        let (ab, mb, inter) = (tc.attention_bias, tc.mlp_bias, tc.intermediate_size);
        let mut layers = Vec::with_capacity(tc.num_hidden_layers);
        for i in 0..tc.num_hidden_layers {
            let n = format!("lm.layers.{i}");
            layers.push(DecoderLayer {
                q_proj: b.lin(&format!("{n}.self_attn.q_proj"), qd, th, ab)?,
                k_proj: b.lin(&format!("{n}.self_attn.k_proj"), kvd, th, ab)?,
                v_proj: b.lin(&format!("{n}.self_attn.v_proj"), kvd, th, ab)?,
                o_proj: b.lin(&format!("{n}.self_attn.o_proj"), th, qd, ab)?,
                gate_proj: b.lin(&format!("{n}.mlp.gate_proj"), inter, th, mb)?,
                up_proj: b.lin(&format!("{n}.mlp.up_proj"), inter, th, mb)?,
                down_proj: b.lin(&format!("{n}.mlp.down_proj"), th, inter, mb)?,
                input_layernorm: b.add(&format!("{n}.input_layernorm.weight"), &[th])?,
                post_attention_layernorm: b
                    .add(&format!("{n}.post_attention_layernorm.weight"), &[th])?,
            });
        }
        let norm = b.add("lm.norm.weight", &[th])?;
        let lm_head = if tied {
            None
        } else {
            Some(b.add("lm_head.weight", &[tc.vocab_size, th])?)
        };
        Ok(TrainModel {
            inv_freq: rope::inv_freq(hd, tc.rope_theta),
            config,
            params: b.params,
            shapes: b.shapes,
            vision: VisionTower {
                patch_embedding: Lin {
                    w: patch_w,
                    b: None,
                    out: h,
                    inp: ch * p * p,
                },
                class_embedding,
                position_embedding,
                pre_layrnorm,
                layers: vlayers,
            },
            linear_1,
            linear_2,
            embed_tokens,
            layers,
            norm,
            lm_head,
            feature_layers,
            cache: None,
            vision_cache: None,
            grounding: None,
            last_grounding: None,
            prune: None,
            last_kept: Vec::new(),
        })
    }

    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The shape of parameter `i` (index into `params`).
    pub fn param_shape(&self, i: usize) -> &[usize] {
        &self.shapes[i]
    }

    /// Whether the LM head is the embedding matrix.
    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// Adds (or with `None` removes) the [`GroundingLoss`] to what [`TrainModel::backward`]
    /// differentiates. Errors on a layer the model lacks or a weight that is not positive.
    pub fn set_grounding(&mut self, g: Option<GroundingLoss>) -> Result<()> {
        if let Some(g) = g {
            let layers = self.layers.len();
            for (key, l) in [("layer", Some(g.layer)), ("answer_layer", g.answer_layer)] {
                if let Some(l) = l.filter(|&l| l >= layers) {
                    return Err(Error::arg(
                        format!("grounding.{key}"),
                        format!("is {l} but the language model has {layers} layers"),
                    ));
                }
            }
            if !(g.weight.is_finite() && g.weight > 0.0) {
                return Err(Error::arg(
                    "grounding.weight",
                    format!("must be a positive number, got {}", g.weight),
                ));
            }
        }
        self.grounding = g;
        Ok(())
    }

    /// `L_ground` (unweighted) of the last [`TrainModel::forward`]: `None` without a grounding
    /// loss or when no sequence of the batch had a grounded row.
    pub fn grounding_loss(&self) -> Option<f32> {
        self.last_grounding
    }

    /// Runs the batch and returns the mean cross-entropy over its counted (answer) tokens, as
    /// torch's `F.cross_entropy` on the concatenation of the shifted logits/labels of every
    /// sequence with `ignore_index = -100`; keeps the activations for [`TrainModel::backward`].
    /// With a [`GroundingLoss`] set, the objective differentiated is this plus `weight ·`
    /// [`TrainModel::grounding_loss`].
    pub fn forward(&mut self, batch: &[TrainSeq]) -> Result<f32> {
        let mut ce = AnswerCe::new(batch, 1.0);
        self.forward_with(batch, &mut [&mut ce])?;
        Ok(ce.loss())
    }

    /// Runs the batch with `losses` on the LM head (each keeps its own value; see [`HeadLoss`])
    /// and keeps the activations for [`TrainModel::backward`], which differentiates the sum of
    /// the losses' weighted values, the [`GroundingLoss`] if set, and whatever
    /// [`TrainModel::add_hidden_grad`] adds in between.
    pub fn forward_with(
        &mut self,
        batch: &[TrainSeq],
        losses: &mut [&mut dyn HeadLoss],
    ) -> Result<()> {
        self.cache = None;
        self.vision_cache = None;
        self.last_grounding = None;
        let c = &self.config;
        let p = &self.params;
        let (th, vocab) = (c.text.hidden_size, c.text.vocab_size);
        let ntok = c.image_tokens();
        // Vision tower (all images at once; text-only sequences have none) and feature selection.
        let pixels: Vec<&[f32]> = batch
            .iter()
            .map(|s| s.pixel_values.as_slice())
            .filter(|px| !px.is_empty())
            .collect();
        let (feats, vision) = self.features_forward(&pixels)?;
        // Projector.
        let h1 = self.linear_1.forward(p, &feats);
        let mut g = h1.clone();
        act::gelu(&mut g);
        let img = self.linear_2.forward(p, &g);
        // Token embeddings with the image features merged in.
        let mut ids = Vec::new();
        let mut lens = Vec::with_capacity(batch.len());
        let mut image_rows = Vec::with_capacity(batch.len() * ntok);
        for (i, s) in batch.iter().enumerate() {
            if s.labels.len() != s.input_ids.len() {
                return Err(Error::arg(
                    "labels",
                    format!(
                        "sequence {i} has {} labels for {} tokens",
                        s.labels.len(),
                        s.input_ids.len()
                    ),
                ));
            }
            let slots: Vec<usize> = (0..s.input_ids.len())
                .filter(|&t| s.input_ids[t] == c.image_token_id)
                .map(|t| ids.len() + t)
                .collect();
            let want = if s.pixel_values.is_empty() { 0 } else { ntok };
            if slots.len() != want {
                return Err(Error::Prompt(format!(
                    "sequence {i} has {} image tokens (id {}) but its {} gives {want} features",
                    slots.len(),
                    c.image_token_id,
                    if want == 0 {
                        "lack of an image"
                    } else {
                        "image"
                    }
                )));
            }
            image_rows.extend(slots);
            ids.extend_from_slice(&s.input_ids);
            lens.push(s.input_ids.len());
        }
        let table = Tensor::from_f32(&[vocab, th], p[self.embed_tokens].value.clone())?;
        // The image token may lie outside the vocabulary; its rows are overwritten anyway.
        let safe_ids: Vec<u32> = ids
            .iter()
            .map(|&t| if t == c.image_token_id { 0 } else { t })
            .collect();
        let mut x = embed::embed(&table, &safe_ids)?;
        for (k, &r) in image_rows.iter().enumerate() {
            x[r * th..(r + 1) * th].copy_from_slice(&img[k * th..(k + 1) * th]);
        }
        // Decoder layers, pruning image tokens where the plan says.
        let mut pos: Vec<Vec<usize>> = lens.iter().map(|&t| (0..t).collect()).collect();
        let mut origin: Vec<usize> = (0..ids.len()).collect();
        let mut decoder = Vec::with_capacity(self.layers.len());
        let mut pruner = match &self.prune {
            Some(plan) => Some(Pruner::new(plan, batch, self.layers.len(), ntok)?),
            None => None,
        };
        let mut pruned_after = BTreeMap::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut dc = layer.forward(p, c, &self.inv_freq, &pos, &mut x)?;
            dc.origin = origin.clone();
            if let Some(pr) = pruner.as_mut()
                && let Some(keep) = pr.prunes_at(l + 1)
            {
                let rows = pr.prune(keep, &dc.probs, c.text.num_attention_heads, &mut pos)?;
                x = rows
                    .iter()
                    .flat_map(|&r| &x[r * th..(r + 1) * th])
                    .copied()
                    .collect();
                origin = rows.iter().map(|&r| origin[r]).collect();
                pruned_after.insert(l, rows);
            }
            decoder.push(dc);
        }
        self.last_kept = pruner.map(|p| p.kept).unwrap_or_default();
        let final_out = rms_forward(p, self.norm, &x, c.text.rms_norm_eps)?;
        // The LM head and its losses, chunk by chunk of the rows they read.
        let head = self.lm_head.unwrap_or(self.embed_tokens);
        let lin = Lin {
            w: head,
            b: None,
            out: vocab,
            inp: th,
        };
        // Current rows read by some loss; the losses name rows as the batch had them.
        let read: Vec<usize> = (0..origin.len())
            .filter(|&r| losses.iter().any(|l| l.reads(origin[r])))
            .collect();
        let mut dfinal = vec![0.0f32; final_out.len()];
        let mut dhead = vec![0.0f32; if read.is_empty() { 0 } else { vocab * th }];
        for rows in read.chunks(HEAD_CHUNK) {
            let xr: Vec<f32> = rows
                .iter()
                .flat_map(|&r| &final_out[r * th..(r + 1) * th])
                .copied()
                .collect();
            let logits = lin.forward(p, &xr);
            let mut dlogits = vec![0.0f32; logits.len()];
            let named: Vec<usize> = rows.iter().map(|&r| origin[r]).collect();
            for l in losses.iter_mut() {
                l.chunk(&named, &logits, &mut dlogits)?;
            }
            let dxr = linear_backward(&xr, &p[head].value, th, &dlogits, &mut dhead, None)?;
            for (k, &r) in rows.iter().enumerate() {
                dfinal[r * th..(r + 1) * th].copy_from_slice(&dxr[k * th..(k + 1) * th]);
            }
        }
        let dhead = (!frozen(p, head) && !dhead.is_empty()).then_some(dhead);
        let dprobs = match self.grounding {
            Some(g) => {
                if let Some(first) = self.prune.as_ref().and_then(|p| p.stages.first())
                    && [Some(g.layer), g.answer_layer]
                        .iter()
                        .flatten()
                        .any(|&l| l >= first.layer)
                {
                    return Err(Error::arg(
                        "grounding",
                        format!(
                            "supervises a layer at or after the first pruning stage (layer {}): \
                             its rows are no longer the batch's",
                            first.layer
                        ),
                    ));
                }
                let heads = c.text.num_attention_heads;
                let probs = |l: usize| decoder[l].probs.as_slice();
                let (l, dp) = grounding_loss(batch, probs, heads, c.image_token_id, &g)?;
                self.last_grounding = l;
                dp
            }
            None => LayerDprobs::new(),
        };
        self.cache = Some(Cache {
            ids,
            lens,
            image_rows,
            vision,
            feats,
            h1,
            g,
            decoder,
            pruned_after,
            final_in: x,
            final_origin: origin,
            dfinal,
            dhead,
            dprobs,
            dhidden: BTreeMap::new(),
            dimage: None,
        });
        Ok(())
    }

    /// A forward pass that keeps nothing for a backward, for a distillation teacher: the final
    /// norm's output of every row (`[rows, hidden]`, what [`TrainModel::head_logits`] reads),
    /// the outputs of the decoder layers `req.hidden` (as [`TrainModel::hidden_state`]) and, at
    /// the layers `req.attention`, the attention probabilities of the query rows
    /// `req.query_rows[i]` of each sequence `i` only (`[heads, rows, t]`).
    pub fn trace(&mut self, batch: &[TrainSeq], req: &TraceRequest) -> Result<Trace> {
        self.forward_with(batch, &mut [])?;
        let mut hidden = BTreeMap::new();
        for &l in &req.hidden {
            hidden.insert(l, self.hidden_state(l)?.to_vec());
        }
        let mut attention = BTreeMap::new();
        let heads = self.config.text.num_attention_heads;
        for &l in &req.attention {
            let mut per_seq = Vec::with_capacity(batch.len());
            for (i, s) in batch.iter().enumerate() {
                let rows = req.query_rows.get(i).map_or(&[][..], Vec::as_slice);
                let t = s.input_ids.len();
                let pr = self.attention_probs(l, i)?;
                let mut out = Vec::with_capacity(heads * rows.len() * t);
                for h in 0..heads {
                    for &r in rows {
                        out.extend_from_slice(&pr[(h * t + r) * t..(h * t + r + 1) * t]);
                    }
                }
                per_seq.push(out);
            }
            attention.insert(l, per_seq);
        }
        let image_features = if req.image_features {
            self.image_features()?
        } else {
            Vec::new()
        };
        let last = self.hidden_state(self.layers.len() - 1)?;
        let final_out = rms_forward(&self.params, self.norm, last, self.config.text.rms_norm_eps)?;
        self.cache = None;
        Ok(Trace {
            final_out,
            hidden,
            attention,
            image_features,
        })
    }

    /// The attention probabilities `[heads, t, t]` (query row, then key) of decoder layer
    /// `layer` for sequence `seq` of the last forward.
    pub fn attention_probs(&self, layer: usize, seq: usize) -> Result<&[f32]> {
        let c = self.cache.as_ref().ok_or_else(|| {
            Error::arg("attention_probs", "no forward pass whose attention to read")
        })?;
        let lc = c.decoder.get(layer).ok_or_else(|| {
            Error::arg(
                "layer",
                format!(
                    "is {layer} but the model has {} decoder layers",
                    c.decoder.len()
                ),
            )
        })?;
        lc.probs.get(seq).map(Vec::as_slice).ok_or_else(|| {
            Error::arg(
                "sequence",
                format!("is {seq} but the batch has {}", lc.probs.len()),
            )
        })
    }

    /// Adds `grad` (the layout of [`TrainModel::attention_probs`]) to the gradient the next
    /// [`TrainModel::backward`] sends into those probabilities: the way an objective on
    /// attention maps (distillation's attention alignment) joins the backward.
    pub fn add_probs_grad(&mut self, layer: usize, seq: usize, grad: &[f32]) -> Result<()> {
        let want = self.attention_probs(layer, seq)?.len();
        if grad.len() != want {
            return Err(Error::Shape {
                name: format!("gradient of layer {layer}'s attention, sequence {seq}"),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        let c = self.cache.as_mut().expect("checked by attention_probs");
        let seqs = c.lens.len();
        let d = &mut c
            .dprobs
            .entry(layer)
            .or_insert_with(|| vec![Vec::new(); seqs])[seq];
        if d.is_empty() {
            *d = grad.to_vec();
        } else {
            ops::add(d, grad);
        }
        Ok(())
    }

    /// The LM head's logits `[rows, vocab]` of final-norm outputs `x` (`[rows, hidden]`).
    pub fn head_logits(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.config.text;
        Lin {
            w: self.lm_head.unwrap_or(self.embed_tokens),
            b: None,
            out: c.vocab_size,
            inp: c.hidden_size,
        }
        .forward(&self.params, x)
    }

    /// Freezes every parameter (drops their gradient buffers): a teacher.
    pub fn freeze(&mut self) {
        for p in &mut self.params {
            p.grad = Vec::new();
        }
    }

    /// Keeps only the last `n` encoder layers of the vision tower trainable (partial tuning of
    /// the tower, as TinyLLaVA's `tune_vision_tower_from_layer`): the patch, class and position
    /// embeddings, `pre_layrnorm` and the layers below move to group [`VISION_FROZEN_GROUP`] and
    /// lose their gradient buffers, and the vision backward stops at the lowest trainable layer.
    /// The layers counted are those the model holds (up to the deepest selected feature layer).
    /// Errors when `n` is 0 or more than that.
    pub fn train_last_vision_layers(&mut self, n: usize) -> Result<()> {
        let layers = self.vision.layers.len();
        if n == 0 || n > layers {
            return Err(Error::arg(
                "vision_trainable_layers",
                format!(
                    "is {n} but the vision tower has {layers} encoder layers in use (1 to \
                     {layers}; freeze it whole with frozen = [\"vision\"])"
                ),
            ));
        }
        let keep: Vec<usize> = self.vision.layers[layers - n..]
            .iter()
            .flat_map(|l| l.params())
            .collect();
        for (i, p) in self.params.iter_mut().enumerate() {
            if p.group.starts_with("vision.") && !keep.contains(&i) {
                p.group = VISION_FROZEN_GROUP.into();
                p.grad = Vec::new();
            }
        }
        Ok(())
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The output of decoder layer `layer` (the residual stream after it, before the final
    /// norm) in the last forward, `[rows, hidden]` with the batch's rows end to end (with a
    /// prune plan, the rows that go on to the next layer: see [`TrainModel::hidden_rows`]).
    pub fn hidden_state(&self, layer: usize) -> Result<&[f32]> {
        let c = self
            .cache
            .as_ref()
            .ok_or_else(|| Error::arg("hidden_state", "no forward pass whose states to read"))?;
        match layer.cmp(&(c.decoder.len().saturating_sub(1))) {
            std::cmp::Ordering::Less => Ok(&c.decoder[layer + 1].x),
            std::cmp::Ordering::Equal => Ok(&c.final_in),
            std::cmp::Ordering::Greater => Err(Error::arg(
                "layer",
                format!(
                    "is {layer} but the model has {} decoder layers",
                    c.decoder.len()
                ),
            )),
        }
    }

    /// The batch row (before any pruning) of each row of [`TrainModel::hidden_state`]`(layer)`.
    pub fn hidden_rows(&self, layer: usize) -> Result<&[usize]> {
        self.hidden_state(layer)?;
        let c = self.cache.as_ref().expect("checked by hidden_state");
        Ok(match c.decoder.get(layer + 1) {
            Some(d) => &d.origin,
            None => &c.final_origin,
        })
    }

    /// Prunes image tokens in every following forward as `plan` says (`None`: no pruning), as
    /// the engine does at inference: after layer `K - 1`, the image tokens are ranked by the
    /// attention of the query rows the plan's query strategy picks from each sequence's first
    /// prompt ([`TrainSeq::prompt`]), weighted by its head strategy, and only the kept ones go on
    /// (RoPE positions kept, or renumbered with `plan.renumber`). Rows that read nothing after
    /// layer `K - 1` get no gradient from the layers above; the choice itself is not
    /// differentiated. Errors when a stage lies outside the model.
    pub fn set_prune(&mut self, plan: Option<PrunePlan>) -> Result<()> {
        if let Some(p) = &plan {
            p.kept_counts(self.layers.len(), self.config.image_tokens())?;
        }
        self.prune = plan;
        Ok(())
    }

    /// The image tokens (indices among the sequence's image tokens, ascending) each sequence
    /// kept at each stage of the last forward with a prune plan: `[sequence][stage]`.
    pub fn pruned_kept(&self) -> &[Vec<Vec<usize>>] {
        &self.last_kept
    }

    /// Adds `grad` (same layout as [`TrainModel::hidden_state`]) to the gradient the next
    /// [`TrainModel::backward`] sends into the output of decoder layer `layer`: the way an
    /// objective on hidden states (distillation's alignment losses) joins the backward.
    pub fn add_hidden_grad(&mut self, layer: usize, grad: &[f32]) -> Result<()> {
        let want = self.hidden_state(layer)?.len();
        if grad.len() != want {
            return Err(Error::Shape {
                name: format!("gradient of layer {layer}'s output"),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        let c = self.cache.as_mut().expect("checked by hidden_state");
        match c.dhidden.get_mut(&layer) {
            Some(d) => ops::add(d, grad),
            None => {
                c.dhidden.insert(layer, grad.to_vec());
            }
        }
        Ok(())
    }

    /// The projected image features of the last forward: the projector's output, which the LM
    /// reads as the image tokens' embeddings, `[images·image_tokens, hidden]`, image by image.
    pub fn image_features(&self) -> Result<Vec<f32>> {
        let c = self.cache.as_ref().ok_or_else(|| {
            Error::arg("image_features", "no forward pass whose features to read")
        })?;
        let th = self.config.text.hidden_size;
        let x0 = c
            .decoder
            .first()
            .map(|d| &d.x)
            .ok_or_else(|| Error::arg("image_features", "the model has no decoder layers"))?;
        Ok(c.image_rows
            .iter()
            .flat_map(|&r| &x0[r * th..(r + 1) * th])
            .copied()
            .collect())
    }

    /// Adds `grad` (the layout of [`TrainModel::image_features`]) to the gradient the next
    /// [`TrainModel::backward`] sends into the projected image features: how an objective on the
    /// features (distillation's vision alignment) reaches the projector and the vision tower.
    pub fn add_image_features_grad(&mut self, grad: &[f32]) -> Result<()> {
        let c = self.cache.as_mut().ok_or_else(|| {
            Error::arg(
                "add_image_features_grad",
                "no forward pass to differentiate",
            )
        })?;
        let want = c.image_rows.len() * self.config.text.hidden_size;
        if grad.len() != want {
            return Err(Error::Shape {
                name: "gradient of the image features".into(),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        match c.dimage.as_mut() {
            Some(d) => ops::add(d, grad),
            None => c.dimage = Some(grad.to_vec()),
        }
        Ok(())
    }

    /// Accumulates the gradient of the last forward's loss into every non-frozen parameter's
    /// `grad` (call [`super::optim::zero_grads`] between steps). Consumes the cache.
    pub fn backward(&mut self) -> Result<()> {
        let cache = self
            .cache
            .take()
            .ok_or_else(|| Error::arg("backward", "no forward pass to differentiate"))?;
        let c = &self.config;
        let p = &mut self.params;
        let th = c.text.hidden_size;
        let head = self.lm_head.unwrap_or(self.embed_tokens);
        if let Some(dh) = &cache.dhead {
            ops::add(&mut p[head].grad, dh);
        }
        let mut dx = rms_backward(
            p,
            self.norm,
            &cache.final_in,
            c.text.rms_norm_eps,
            &cache.dfinal,
        );
        for (i, (layer, lc)) in self.layers.iter().zip(&cache.decoder).enumerate().rev() {
            if let Some(d) = cache.dhidden.get(&i) {
                ops::add(&mut dx, d);
            }
            // Rows dropped after this layer get no gradient from above.
            if let Some(rows) = cache.pruned_after.get(&i) {
                let mut full = vec![0.0f32; lc.x.len()];
                for (k, &r) in rows.iter().enumerate() {
                    full[r * th..(r + 1) * th].copy_from_slice(&dx[k * th..(k + 1) * th]);
                }
                dx = full;
            }
            let dprobs = cache.dprobs.get(&i).map_or(&[][..], Vec::as_slice);
            layer.backward(p, c, &self.inv_freq, lc, dprobs, &mut dx)?;
        }
        // Split the embedding gradient: image rows go to the projector, the rest to the table.
        let mut dimg = vec![0.0f32; cache.image_rows.len() * th];
        for (k, &r) in cache.image_rows.iter().enumerate() {
            dimg[k * th..(k + 1) * th].copy_from_slice(&dx[r * th..(r + 1) * th]);
            dx[r * th..(r + 1) * th].fill(0.0);
        }
        if let Some(d) = &cache.dimage {
            ops::add(&mut dimg, d);
        }
        if !frozen(p, self.embed_tokens) {
            let mut dtable = std::mem::take(&mut p[self.embed_tokens].grad);
            let ids: Vec<u32> = cache
                .ids
                .iter()
                .map(|&t| if t == c.image_token_id { 0 } else { t })
                .collect();
            let r = embed::embed_backward(&ids, &dx, th, &mut dtable);
            p[self.embed_tokens].grad = dtable;
            r?;
        }
        let upstream_frozen = p
            .iter()
            .filter(|q| q.group.starts_with("vision") || q.group.starts_with("projector"))
            .all(|q| q.grad.is_empty());
        if upstream_frozen {
            return Ok(());
        }
        // Projector.
        let dg = self.linear_2.backward(p, &cache.g, &dimg)?;
        let dh1 = act::gelu_backward(&cache.h1, &dg);
        let dfeats = self.linear_1.backward(p, &cache.feats, &dh1)?;
        let images = cache.image_rows.len() / self.config.image_tokens().max(1);
        self.features_backward(&cache.vision, images, &dfeats)
    }

    /// The vision tower's selected features of a batch of images (the projector's input):
    /// `[images * image_tokens, vision_hidden * feature_layers]`, the images' rows one after
    /// another. For objectives on the vision tower alone (see [`super::vision_pretrain`]);
    /// [`TrainModel::vision_backward`] differentiates the last call.
    pub fn vision_forward(&mut self, pixels: &[&[f32]]) -> Result<Vec<f32>> {
        self.cache = None;
        let (feats, vision) = self.features_forward(pixels)?;
        self.vision_cache = Some((vision, pixels.len()));
        Ok(feats)
    }

    /// Accumulates into the vision parameters' `grad` the gradient reaching the features of the
    /// last [`TrainModel::vision_forward`] (`dfeats`, same layout). Consumes its activations.
    pub fn vision_backward(&mut self, dfeats: &[f32]) -> Result<()> {
        let (cache, images) = self
            .vision_cache
            .take()
            .ok_or_else(|| Error::arg("vision_backward", "no vision forward to differentiate"))?;
        let want = images * self.config.image_tokens() * self.feature_width();
        if dfeats.len() != want {
            return Err(Error::Shape {
                name: "vision feature gradient".into(),
                expected: vec![want],
                got: vec![dfeats.len()],
            });
        }
        self.features_backward(&cache, images, dfeats)
    }

    /// Width of one image token's selected features (`vision_hidden * feature_layers`).
    pub fn feature_width(&self) -> usize {
        self.config.vision.hidden_size * self.feature_layers.len()
    }

    /// Vision tower and feature selection (LLaVA's `vision_feature_layer` and
    /// `vision_feature_select_strategy`).
    fn features_forward(&self, pixels: &[&[f32]]) -> Result<(Vec<f32>, VisionCache)> {
        let c = &self.config;
        let vh = c.vision.hidden_size;
        let ntok = c.image_tokens();
        let skip = usize::from(c.select_strategy == SelectStrategy::Default);
        let vt = c.vision.grid() * c.vision.grid() + 1;
        let (states, vision) = self.vision.forward(&self.params, c, pixels)?;
        let mut feats = Vec::with_capacity(pixels.len() * ntok * self.feature_width());
        for i in 0..pixels.len() {
            for t in skip..skip + ntok {
                let r = i * vt + t;
                for &l in &self.feature_layers {
                    feats.extend_from_slice(&states[l][r * vh..(r + 1) * vh]);
                }
            }
        }
        Ok((feats, vision))
    }

    /// Backward of [`TrainModel::features_forward`]; a no-op when the vision tower is frozen.
    fn features_backward(
        &mut self,
        cache: &VisionCache,
        images: usize,
        dfeats: &[f32],
    ) -> Result<()> {
        let p = &mut self.params;
        let c = &self.config;
        let vision_frozen = p
            .iter()
            .filter(|q| q.group.starts_with("vision"))
            .all(|q| q.grad.is_empty());
        if vision_frozen {
            return Ok(());
        }
        let vh = c.vision.hidden_size;
        let ntok = c.image_tokens();
        let tokens = c.vision.grid() * c.vision.grid() + 1;
        let skip = usize::from(c.select_strategy == SelectStrategy::Default);
        let nl = self.feature_layers.len();
        let mut dstates = vec![vec![0.0f32; images * tokens * vh]; self.vision.layers.len() + 1];
        for i in 0..images {
            for t in 0..ntok {
                let row = &dfeats[(i * ntok + t) * vh * nl..(i * ntok + t + 1) * vh * nl];
                let r = i * tokens + t + skip;
                for (j, &l) in self.feature_layers.iter().enumerate() {
                    ops::add(
                        &mut dstates[l][r * vh..(r + 1) * vh],
                        &row[j * vh..(j + 1) * vh],
                    );
                }
            }
        }
        self.vision.backward(p, c, cache, &dstates)
    }
}
