//! Random LLaVA-1.5-7B-shaped language models for the benchmarks.
#![allow(dead_code)]

use fineprune::model::config::TextConfig;
use fineprune::model::llama::Llama;
use fineprune::model::nn::{Param, ParamBuilder};
use fineprune::model::weights::Weights;
use fineprune::tensor::{Storage, Tensor};
use std::collections::HashMap;

/// Vicuna-7B's shape (hidden 4096, 32 heads, MLP 11008) with `layers` layers and a small vocabulary.
pub fn config_7b(layers: usize) -> TextConfig {
    TextConfig {
        vocab_size: 1024,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: layers,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A LLaMA with random weights (f32 or bf16) of config `c`, and its parameters.
pub fn random_llama(c: &TextConfig, bf16: bool) -> (Vec<Param>, Llama) {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    let map: HashMap<String, Tensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let scale = if shape.len() == 1 { 1.0 } else { 0.02 };
            let mut v = random(shape.iter().product(), k as u64, scale);
            if shape.len() == 1 {
                v.iter_mut().for_each(|x| *x = 1.0 + 0.1 * *x);
            }
            let storage = if bf16 {
                Storage::BF16(v.into_iter().map(half::bf16::from_f32).collect())
            } else {
                Storage::F32(v.into())
            };
            (name, Tensor::new(&shape, storage).unwrap())
        })
        .collect();
    let mut w = Weights::from_tensors(map, "random 7B-shaped model");
    let mut b = ParamBuilder::new(&mut w, false);
    let lm = Llama::load(c, &mut b).unwrap();
    (b.finish(), lm)
}
