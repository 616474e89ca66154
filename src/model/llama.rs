//! The LLaMA language model (HF `LlamaForCausalLM`): embeddings, N decoder layers of
//! RMSNorm -> grouped-query self-attention with RoPE -> residual -> RMSNorm -> SiLU-gated MLP ->
//! residual, a final RMSNorm and the LM head (tied to the embeddings when the checkpoint has none).
//!
//! Rows of several sequences travel through the linear layers together (one GEMM per projection
//! for the whole batch, a ragged batch: each sequence has its own row count and positions);
//! attention runs per sequence against that sequence's KV cache. Everything runs on the backend
//! the weights were loaded on.

use super::config::TextConfig;
use super::nn::Linear;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::attention::AttnShape;
use crate::ops::rope;
use crate::tensor::Tensor;
use std::borrow::Cow;

/// Keys and values of one layer for one sequence, `[len, kv_heads · head_dim]` each, on the
/// model's device.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl Default for LayerCache {
    fn default() -> Self {
        LayerCache {
            k: Tensor::zeros(&[0, 0]),
            v: Tensor::zeros(&[0, 0]),
        }
    }
}

/// The KV cache of one sequence: one [`LayerCache`] per decoder layer. It belongs to whoever
/// runs the sequence (the engine, a scheduler), not to the model.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Cached positions in layer `l`.
    pub fn len(&self, l: usize) -> usize {
        self.layers[l].k.rows()
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.k.nbytes() + l.v.nbytes())
            .sum()
    }
}

/// One sequence's slice of a batched forward: its row count and the RoPE position of each row.
#[derive(Debug, Clone)]
pub struct SeqRows {
    pub positions: Vec<usize>,
}

/// Self-attention block (HF `LlamaAttention`).
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

/// SiLU-gated feed-forward block (HF `LlamaMLP`).
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// One decoder layer (HF `LlamaDecoderLayer`).
pub struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// The language model.
pub struct Llama {
    pub config: TextConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
}

impl Llama {
    /// Loads `lm.*` and `lm_head.weight` from `w`.
    pub fn load(config: &TextConfig, w: &mut Weights) -> Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("lm.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                    self_attn: Attention {
                        q_proj: w.linear(
                            &format!("{p}.self_attn.q_proj"),
                            qd,
                            h,
                            c.attention_bias,
                        )?,
                        k_proj: w.linear(
                            &format!("{p}.self_attn.k_proj"),
                            kvd,
                            h,
                            c.attention_bias,
                        )?,
                        v_proj: w.linear(
                            &format!("{p}.self_attn.v_proj"),
                            kvd,
                            h,
                            c.attention_bias,
                        )?,
                        o_proj: w.linear(
                            &format!("{p}.self_attn.o_proj"),
                            h,
                            qd,
                            c.attention_bias,
                        )?,
                    },
                    post_attention_layernorm: w
                        .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    mlp: Mlp {
                        gate_proj: w.linear(
                            &format!("{p}.mlp.gate_proj"),
                            c.intermediate_size,
                            h,
                            c.mlp_bias,
                        )?,
                        up_proj: w.linear(
                            &format!("{p}.mlp.up_proj"),
                            c.intermediate_size,
                            h,
                            c.mlp_bias,
                        )?,
                        down_proj: w.linear(
                            &format!("{p}.mlp.down_proj"),
                            h,
                            c.intermediate_size,
                            c.mlp_bias,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = w.take("lm.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            w.take_opt("lm_head.weight", &[c.vocab_size, h])?
        };
        Ok(Llama {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: w.take("lm.norm.weight", &[h])?,
            lm_head,
            inv_freq: rope::inv_freq(hd, c.rope_theta),
        })
    }

    /// Whether the LM head shares the embedding matrix.
    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// Embeddings of `ids`, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed_tokens.backend().embed(&self.embed_tokens, ids)
    }

    /// The device the weights live on.
    pub fn device(&self) -> crate::tensor::Device {
        self.embed_tokens.device()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Width of one cached key row, `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Runs decoder layer `l` on `x: [rows, hidden]`, the rows of `seqs` concatenated in order;
    /// appends each sequence's keys/values to its cache. With `lse`, returns each sequence's
    /// attention log-sum-exp `[heads, rows]` where the backend produces it (what pruning on a
    /// GPU ranks from, see [`crate::backend::Backend::selected_probs`]).
    pub fn layer_forward(
        &self,
        l: usize,
        x: &mut Tensor,
        seqs: &[SeqRows],
        caches: &mut [&mut KvCache],
        lse: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let positions: Vec<usize> = seqs.iter().flat_map(|s| s.positions.clone()).collect();
        if positions.len() != x.rows() || seqs.len() != caches.len() {
            return Err(Error::Shape {
                name: format!(
                    "decoder input rows ({} sequences, {} caches)",
                    seqs.len(),
                    caches.len()
                ),
                expected: vec![positions.len(), c.hidden_size],
                got: x.shape().to_vec(),
            });
        }
        let layer = &self.layers[l];
        let a = &layer.self_attn;
        let xn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?;
        let mut q = a.q_proj.forward(&xn)?;
        let mut k = a.k_proj.forward(&xn)?;
        let v = a.v_proj.forward(&xn)?;
        q.rope(nh, &positions, &self.inv_freq)?;
        k.rope(nkv, &positions, &self.inv_freq)?;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut lses = Vec::with_capacity(seqs.len());
        let mut r0 = 0;
        for (seq, cache) in seqs.iter().zip(caches.iter_mut()) {
            let t = seq.positions.len();
            let whole = seqs.len() == 1;
            let lc = &mut cache.layers[l];
            lc.k.append_rows(&*seq_rows(&k, whole, r0, t)?)?;
            lc.v.append_rows(&*seq_rows(&v, whole, r0, t)?)?;
            let shape = AttnShape {
                t,
                s: lc.k.rows(),
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                causal: true,
            };
            let (o, rows_lse) = seq_rows(&q, whole, r0, t)?.attention(&lc.k, &lc.v, shape, lse)?;
            outs.push(o);
            lses.push(rows_lse);
            r0 += t;
        }
        let o = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat_rows(&outs.iter().collect::<Vec<_>>())?
        };
        x.add(&a.o_proj.forward(&o)?)?;
        let xn = x.rms_norm(&layer.post_attention_layernorm, c.rms_norm_eps)?;
        let mut g = layer.mlp.gate_proj.forward(&xn)?;
        g.silu_mul(&layer.mlp.up_proj.forward(&xn)?)?;
        x.add(&layer.mlp.down_proj.forward(&g)?)?;
        Ok(lses)
    }

    /// Queries of layer `l` for a few rows of its input `x: [rows, hidden]` at RoPE `positions`,
    /// `[rows, heads · head_dim]` with RoPE applied (what the attention of those rows used).
    pub fn query_rows(&self, l: usize, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[l];
        let xn = x.rms_norm(&layer.input_layernorm, c.rms_norm_eps)?;
        let mut q = layer.self_attn.q_proj.forward(&xn)?;
        q.rope(c.num_attention_heads, positions, &self.inv_freq)?;
        Ok(q)
    }

    /// Final RMSNorm then LM head on `x: [rows, hidden]` -> `[rows, vocab]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let xn = self.final_norm(x)?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        xn.linear(w, None)
    }

    /// Final RMSNorm only (HF's last hidden state).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(&self.norm, self.config.rms_norm_eps)
    }
}

/// Rows `r0..r0 + t` of a batched tensor: the tensor itself when the batch is one sequence.
fn seq_rows(x: &Tensor, whole: bool, r0: usize, t: usize) -> Result<Cow<'_, Tensor>> {
    Ok(if whole {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(x.narrow_rows(r0, t)?)
    })
}
