//! The LLaMA language model (HF `LlamaForCausalLM`): embeddings, N decoder layers of
//! RMSNorm -> grouped-query self-attention with RoPE -> residual -> RMSNorm -> SiLU-gated MLP ->
//! residual, a final RMSNorm and the LM head (tied to the embeddings when the checkpoint has none).
//!
//! Rows of several sequences travel through the linear layers together (one GEMM per projection
//! for the whole batch); attention runs per sequence against that sequence's KV cache.

use super::config::TextConfig;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::attention::{AttnShape, attention};
use crate::ops::matmul::{Linear, linear};

use crate::ops::{self, act, embed, norm, rope};
use crate::tensor::Tensor;

/// Keys and values of one layer for one sequence, `[len, kv_heads, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The KV cache of one sequence: one [`LayerCache`] per decoder layer.
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
    pub fn len(&self, l: usize, kv_width: usize) -> usize {
        self.layers[l].k.len() / kv_width
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
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
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        embed::embed(&self.embed_tokens, ids)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Width of one cached key row, `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Runs decoder layer `l` on `x: [rows, hidden]`, the rows of `seqs` concatenated in order;
    /// appends each sequence's keys/values to its cache.
    pub fn layer_forward(
        &self,
        l: usize,
        x: &mut [f32],
        seqs: &[SeqRows],
        caches: &mut [&mut KvCache],
    ) -> Result<()> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let layer = &self.layers[l];
        let a = &layer.self_attn;
        let xn = norm::rms_norm(x, &layer.input_layernorm, c.rms_norm_eps);
        let mut q = a.q_proj.forward(&xn)?;
        let mut k = a.k_proj.forward(&xn)?;
        let v = a.v_proj.forward(&xn)?;
        let mut o = vec![0.0f32; q.len()];
        let mut r0 = 0;
        for (seq, cache) in seqs.iter().zip(caches.iter_mut()) {
            let t = seq.positions.len();
            let (qs, ks) = (
                &mut q[r0 * nh * hd..(r0 + t) * nh * hd],
                &mut k[r0 * nkv * hd..(r0 + t) * nkv * hd],
            );
            rope::apply_rope(qs, nh, hd, &seq.positions, &self.inv_freq);
            rope::apply_rope(ks, nkv, hd, &seq.positions, &self.inv_freq);
            let lc = &mut cache.layers[l];
            lc.k.extend_from_slice(ks);
            lc.v.extend_from_slice(&v[r0 * nkv * hd..(r0 + t) * nkv * hd]);
            let s = lc.k.len() / (nkv * hd);
            let out = attention(
                qs,
                &lc.k,
                &lc.v,
                AttnShape {
                    t,
                    s,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    causal: true,
                },
            );
            o[r0 * nh * hd..(r0 + t) * nh * hd].copy_from_slice(&out);
            r0 += t;
        }
        if r0 * h != x.len() {
            return Err(Error::Shape {
                name: "decoder input rows".into(),
                expected: vec![r0, h],
                got: vec![x.len() / h, h],
            });
        }
        ops::add(x, &a.o_proj.forward(&o)?);
        let xn = norm::rms_norm(x, &layer.post_attention_layernorm, c.rms_norm_eps);
        let mut g = layer.mlp.gate_proj.forward(&xn)?;
        act::silu_mul(&mut g, &layer.mlp.up_proj.forward(&xn)?);
        ops::add(x, &layer.mlp.down_proj.forward(&g)?);
        Ok(())
    }

    /// Queries of layer `l` for a few rows of its input `x: [rows, hidden]` at RoPE `positions`,
    /// `[rows, heads, head_dim]` with RoPE applied (what the attention of those rows used).
    pub fn query_rows(&self, l: usize, x: &[f32], positions: &[usize]) -> Result<Vec<f32>> {
        let c = &self.config;
        let layer = &self.layers[l];
        let xn = norm::rms_norm(x, &layer.input_layernorm, c.rms_norm_eps);
        let mut q = layer.self_attn.q_proj.forward(&xn)?;
        rope::apply_rope(
            &mut q,
            c.num_attention_heads,
            c.head_dim,
            positions,
            &self.inv_freq,
        );
        Ok(q)
    }

    /// Final RMSNorm then LM head on `x: [rows, hidden]` -> `[rows, vocab]`.
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let xn = norm::rms_norm(x, &self.norm, self.config.rms_norm_eps);
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        linear(&xn, w, None)
    }

    /// Final RMSNorm only (HF's last hidden state).
    pub fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        norm::rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }
}
