//! The LLaMA language model (HF `LlamaForCausalLM`): embeddings, N decoder layers of
//! RMSNorm -> grouped-query self-attention with RoPE -> residual -> RMSNorm -> SiLU-gated MLP ->
//! residual, a final RMSNorm and the LM head (tied to the embeddings when the checkpoint has none).
//!
//! Rows of several sequences travel through the linear layers together (one GEMM per projection
//! for the whole batch, a ragged batch: each sequence has its own row count and positions);
//! attention runs per sequence against that sequence's KV cache. Inference runs on the backend
//! the weights were loaded on; the training forward keeps what the backward (CPU, f32) needs.

use super::config::TextConfig;
use super::nn::{Linear, Param, ParamBuilder, RmsNorm, host};
use crate::error::{Error, Result};
use crate::ops::attention::{AttnShape, attention_backward, attention_with_probs};
use crate::ops::{self, act, rope};
use crate::tensor::Tensor;

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

/// One decoder layer (HF `LlamaDecoderLayer`): RMSNorm, attention (q/k/v/o, RoPE, GQA,
/// causal), RMSNorm, SiLU-gated MLP.
pub struct DecoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// What one decoder layer's backward needs (the rows of every sequence, end to end).
pub struct DecoderCache {
    /// RoPE positions of each sequence's rows.
    pub positions: Vec<Vec<usize>>,
    /// The layer's input.
    pub x: Tensor,
    xn1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities `[heads, t, t]` of each sequence.
    pub probs: Vec<Vec<f32>>,
    o: Tensor,
    x_mid: Tensor,
    xn2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// The language model.
pub struct Llama {
    pub config: TextConfig,
    embed_tokens: usize,
    layers: Vec<DecoderLayer>,
    /// The final RMSNorm.
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<usize>,
    inv_freq: Vec<f32>,
}

impl DecoderLayer {
    fn load(c: &TextConfig, b: &mut ParamBuilder, n: &str) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let (ab, mb) = (c.attention_bias, c.mlp_bias);
        Ok(DecoderLayer {
            q_proj: b.linear(&format!("{n}.self_attn.q_proj"), qd, h, ab)?,
            k_proj: b.linear(&format!("{n}.self_attn.k_proj"), kvd, h, ab)?,
            v_proj: b.linear(&format!("{n}.self_attn.v_proj"), kvd, h, ab)?,
            o_proj: b.linear(&format!("{n}.self_attn.o_proj"), h, qd, ab)?,
            gate_proj: b.linear(&format!("{n}.mlp.gate_proj"), i, h, mb)?,
            up_proj: b.linear(&format!("{n}.mlp.up_proj"), i, h, mb)?,
            down_proj: b.linear(&format!("{n}.mlp.down_proj"), h, i, mb)?,
            input_layernorm: b.rms_norm(&format!("{n}.input_layernorm"), h)?,
            post_attention_layernorm: b.rms_norm(&format!("{n}.post_attention_layernorm"), h)?,
        })
    }

    /// The attention's input norm and its queries, keys and values, RoPE applied (row `r` at
    /// `positions[r]`).
    fn qkv(
        &self,
        p: &[Param],
        c: &TextConfig,
        x: &Tensor,
        positions: &[usize],
        inv_freq: &[f32],
    ) -> Result<[Tensor; 4]> {
        let xn = self.input_layernorm.forward(p, x, c.rms_norm_eps)?;
        let mut q = self.q_proj.forward(p, &xn)?;
        let mut k = self.k_proj.forward(p, &xn)?;
        let v = self.v_proj.forward(p, &xn)?;
        q.rope(c.num_attention_heads, positions, inv_freq)?;
        k.rope(c.num_key_value_heads, positions, inv_freq)?;
        Ok([xn, q, k, v])
    }

    /// The rest of the layer after attention's output `o`: o_proj, residual, RMSNorm, MLP,
    /// residual, in place on `x`; with `keep`, returns `[x_mid, xn2, gate, up, act]`.
    fn finish(
        &self,
        p: &[Param],
        c: &TextConfig,
        x: &mut Tensor,
        o: &Tensor,
        keep: bool,
    ) -> Result<Option<[Tensor; 5]>> {
        x.add(&self.o_proj.forward(p, o)?)?;
        let x_mid = keep.then(|| x.clone());
        let xn2 = self
            .post_attention_layernorm
            .forward(p, x, c.rms_norm_eps)?;
        let mut g = self.gate_proj.forward(p, &xn2)?;
        let gate = keep.then(|| g.clone());
        let up = self.up_proj.forward(p, &xn2)?;
        g.silu_mul(&up)?;
        x.add(&self.down_proj.forward(p, &g)?)?;
        Ok(match (x_mid, gate) {
            (Some(x_mid), Some(gate)) => Some([x_mid, xn2, gate, up, g]),
            _ => None,
        })
    }

    /// `dx` is the gradient of the layer's output on entry and of its input on return;
    /// `dprobs[i]`, when non-empty, a loss's own gradient on sequence `i`'s probabilities.
    fn backward(
        &self,
        p: &mut [Param],
        c: &TextConfig,
        inv_freq: &[f32],
        cache: &DecoderCache,
        dprobs: &[Vec<f32>],
        dx: &mut [f32],
    ) -> Result<()> {
        let (nh, nkv, hd, eps) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rms_norm_eps,
        );
        let da = self.down_proj.backward(p, host(&cache.act)?, dx)?;
        let (dgate, dup) = act::silu_mul_backward(host(&cache.gate)?, host(&cache.up)?, &da)?;
        let xn2 = host(&cache.xn2)?;
        let mut dxn2 = self.gate_proj.backward(p, xn2, &dgate)?;
        ops::add(&mut dxn2, &self.up_proj.backward(p, xn2, &dup)?);
        let d_mid = self
            .post_attention_layernorm
            .backward(p, host(&cache.x_mid)?, eps, &dxn2)?;
        ops::add(dx, &d_mid);
        let d_o = self.o_proj.backward(p, host(&cache.o)?, dx)?;
        let (q, k, v) = (host(&cache.q)?, host(&cache.k)?, host(&cache.v)?);
        let mut dq = vec![0.0f32; q.len()];
        let mut dk = vec![0.0f32; k.len()];
        let mut dv = vec![0.0f32; v.len()];
        let mut r0 = 0;
        for (i, (pos, probs)) in cache.positions.iter().zip(&cache.probs).enumerate() {
            let t = pos.len();
            let dp = dprobs.get(i).filter(|d| !d.is_empty());
            let (qr, kr) = (
                r0 * nh * hd..(r0 + t) * nh * hd,
                r0 * nkv * hd..(r0 + t) * nkv * hd,
            );
            let (mut gq, mut gk, gv) = attention_backward(
                &q[qr.clone()],
                &k[kr.clone()],
                &v[kr.clone()],
                Some(probs),
                dp.map(Vec::as_slice),
                &d_o[qr.clone()],
                causal(c, t, t),
            )?;
            rope::rope_backward(&mut gq, nh, hd, pos, inv_freq);
            rope::rope_backward(&mut gk, nkv, hd, pos, inv_freq);
            dq[qr].copy_from_slice(&gq);
            dk[kr.clone()].copy_from_slice(&gk);
            dv[kr].copy_from_slice(&gv);
            r0 += t;
        }
        let xn1 = host(&cache.xn1)?;
        let mut dxn1 = self.q_proj.backward(p, xn1, &dq)?;
        ops::add(&mut dxn1, &self.k_proj.backward(p, xn1, &dk)?);
        ops::add(&mut dxn1, &self.v_proj.backward(p, xn1, &dv)?);
        let d_in = self
            .input_layernorm
            .backward(p, host(&cache.x)?, eps, &dxn1)?;
        ops::add(dx, &d_in);
        Ok(())
    }
}

/// Causal GQA attention of `t` query rows over `s` keys.
fn causal(c: &TextConfig, t: usize, s: usize) -> AttnShape {
    AttnShape {
        t,
        s,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        causal: true,
    }
}

impl Llama {
    /// Loads `lm.*` and, unless the config ties it (or the checkpoint lacks it), `lm_head.weight`.
    pub fn load(config: &TextConfig, b: &mut ParamBuilder) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let embed_tokens = b.add("lm.embed_tokens.weight", &[c.vocab_size, h])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(c, b, &format!("lm.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = b.rms_norm("lm.norm", h)?;
        let lm_head = match c.tie_word_embeddings {
            true => None,
            false => b.add_opt("lm_head.weight", &[c.vocab_size, h])?,
        };
        Ok(Llama {
            inv_freq: rope::inv_freq(c.head_dim, c.rope_theta),
            config: c.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Whether the LM head shares the embedding matrix.
    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// Index of the embedding table's parameter.
    pub fn embed_tokens(&self) -> usize {
        self.embed_tokens
    }

    /// Index of the LM head's weight (the embedding table when tied).
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.embed_tokens)
    }

    /// The RoPE inverse frequencies.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Embeddings of `ids`, `[ids.len(), hidden]`.
    pub fn embed(&self, p: &[Param], ids: &[u32]) -> Result<Tensor> {
        let table = &p[self.embed_tokens].value;
        table.backend().embed(table, ids)
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
        p: &[Param],
        l: usize,
        x: &mut Tensor,
        seqs: &[SeqRows],
        caches: &mut [&mut KvCache],
        lse: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let positions = self.check_rows(x, seqs.iter().map(|s| &s.positions))?;
        if seqs.len() != caches.len() {
            return Err(Error::arg(
                "caches",
                format!("{} caches for {} sequences", caches.len(), seqs.len()),
            ));
        }
        let layer = &self.layers[l];
        let [_, q, k, v] = layer.qkv(p, c, x, &positions, &self.inv_freq)?;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut lses = Vec::with_capacity(seqs.len());
        let mut r0 = 0;
        for (seq, cache) in seqs.iter().zip(caches.iter_mut()) {
            let t = seq.positions.len();
            let lc = &mut cache.layers[l];
            lc.k.append_rows(&*k.rows_cow(r0, t)?)?;
            lc.v.append_rows(&*v.rows_cow(r0, t)?)?;
            let shape = causal(c, t, lc.k.rows());
            let (o, rows_lse) = q.rows_cow(r0, t)?.attention(&lc.k, &lc.v, shape, lse)?;
            outs.push(o);
            lses.push(rows_lse);
            r0 += t;
        }
        let o = match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat_rows(&outs.iter().collect::<Vec<_>>())?,
        };
        layer.finish(p, c, x, &o, false)?;
        Ok(lses)
    }

    /// The training forward of decoder layer `l` (host f32): every sequence's rows attend to
    /// themselves (no cache), in place on `x`; returns what [`Llama::layer_backward`] needs.
    pub fn layer_forward_train(
        &self,
        p: &[Param],
        l: usize,
        x: &mut Tensor,
        positions: &[Vec<usize>],
    ) -> Result<DecoderCache> {
        let c = &self.config;
        let all = self.check_rows(x, positions.iter())?;
        let layer = &self.layers[l];
        let x_in = x.clone();
        let [xn1, q, k, v] = layer.qkv(p, c, x, &all, &self.inv_freq)?;
        let (qs, ks, vs) = (host(&q)?, host(&k)?, host(&v)?);
        let (qw, kw) = (q.cols(), k.cols());
        let mut o = Vec::with_capacity(qs.len());
        let mut probs = Vec::with_capacity(positions.len());
        let mut r0 = 0;
        for pos in positions {
            let t = pos.len();
            let (out, pr) = attention_with_probs(
                &qs[r0 * qw..(r0 + t) * qw],
                &ks[r0 * kw..(r0 + t) * kw],
                &vs[r0 * kw..(r0 + t) * kw],
                causal(c, t, t),
            )?;
            o.extend(out);
            probs.push(pr);
            r0 += t;
        }
        let o = Tensor::from_f32(q.shape(), o)?;
        let [x_mid, xn2, gate, up, act] = layer
            .finish(p, c, x, &o, true)?
            .ok_or_else(|| Error::arg("forward", "no activations kept".to_string()))?;
        Ok(DecoderCache {
            positions: positions.to_vec(),
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
            act,
        })
    }

    /// Backward of [`Llama::layer_forward_train`] of layer `l`: `dx` is the gradient of the
    /// layer's output on entry and of its input on return; `dprobs` as in the layer's backward.
    pub fn layer_backward(
        &self,
        p: &mut [Param],
        l: usize,
        cache: &DecoderCache,
        dprobs: &[Vec<f32>],
        dx: &mut [f32],
    ) -> Result<()> {
        self.layers[l].backward(p, &self.config, &self.inv_freq, cache, dprobs, dx)
    }

    /// The positions of every row, checked against `x`'s rows.
    fn check_rows<'a>(
        &self,
        x: &Tensor,
        seqs: impl Iterator<Item = &'a Vec<usize>>,
    ) -> Result<Vec<usize>> {
        let positions: Vec<usize> = seqs.flat_map(|s| s.iter().copied()).collect();
        if positions.len() != x.rows() || x.cols() != self.config.hidden_size {
            return Err(Error::Shape {
                name: "decoder input rows".into(),
                expected: vec![positions.len(), self.config.hidden_size],
                got: x.shape().to_vec(),
            });
        }
        Ok(positions)
    }

    /// Queries of layer `l` for a few rows of its input `x: [rows, hidden]` at RoPE `positions`,
    /// `[rows, heads · head_dim]` with RoPE applied (what the attention of those rows used).
    pub fn query_rows(
        &self,
        p: &[Param],
        l: usize,
        x: &Tensor,
        positions: &[usize],
    ) -> Result<Tensor> {
        let q_proj = &self.layers[l].q_proj;
        self.projected_rows(p, l, q_proj, self.config.num_attention_heads, x, positions)
    }

    /// Keys of layer `l` for the rows of its input `x: [rows, hidden]` at RoPE `positions`,
    /// `[rows, kv_heads · head_dim]` with RoPE applied (what its attention would read).
    pub fn key_rows(
        &self,
        p: &[Param],
        l: usize,
        x: &Tensor,
        positions: &[usize],
    ) -> Result<Tensor> {
        let k_proj = &self.layers[l].k_proj;
        self.projected_rows(p, l, k_proj, self.config.num_key_value_heads, x, positions)
    }

    /// Layer `l`'s input norm of `x`, through `proj`, RoPE applied over `heads` heads.
    fn projected_rows(
        &self,
        p: &[Param],
        l: usize,
        proj: &Linear,
        heads: usize,
        x: &Tensor,
        positions: &[usize],
    ) -> Result<Tensor> {
        let c = &self.config;
        let xn = self.layers[l]
            .input_layernorm
            .forward(p, x, c.rms_norm_eps)?;
        let mut y = proj.forward(p, &xn)?;
        y.rope(heads, positions, &self.inv_freq)?;
        Ok(y)
    }

    /// Final RMSNorm then LM head on `x: [rows, hidden]` -> `[rows, vocab]`.
    pub fn logits(&self, p: &[Param], x: &Tensor) -> Result<Tensor> {
        self.final_norm(p, x)?.linear(&p[self.head()].value, None)
    }

    /// Final RMSNorm only (HF's last hidden state).
    pub fn final_norm(&self, p: &[Param], x: &Tensor) -> Result<Tensor> {
        self.norm.forward(p, x, self.config.rms_norm_eps)
    }
}
