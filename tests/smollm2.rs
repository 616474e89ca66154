//! The real SmolLM2-135M-Instruct from its Q4_1 GGUF against HF transformers' dequantised model
//! (`tests/reference/gen_smollm2.py`): token ids, logits within 1e-3 max-abs, greedy continuations.
//! The 1e-3 tolerance (vs 1e-4 for the tiny fixtures) covers f32 accumulation-order differences
//! over 30 layers and a 49152-wide vocabulary with logits of magnitude ~20.
//!
//! That is the model loaded as f32 (`--dtype f32`: the blocks dequantised at load, HF's
//! numerics). Loaded as stored, the products read the Q4_1 blocks against activations quantized
//! to 8 bits (Q8_1), as llama.cpp computes: the greedy continuations stay the same, and the logits
//! move by the activation rounding, bounded here by `QUANT_TOL`.

mod common;

use common::*;
use fineprune::{Engine, Model, Request};
use std::sync::Arc;

const TOL: f32 = 1e-3;

/// Max-abs logits distance of the quantized path to HF's f32: 8-bit activations (relative error
/// up to 2^-8 per block) through 30 layers move logits of magnitude ~20 by a few tenths
/// (0.57 measured on prompt 1).
const QUANT_TOL: f32 = 1.5;

#[test]
fn smollm2_gguf_matches_hf_logits_and_greedy_text() {
    let Some(path) = smollm2_path() else { return };
    let dir = reference_dir();
    let r = load_ref(&dir.join("smollm2_ref.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2_ref.json")).unwrap())
            .unwrap();
    let f32_model = Model::load_on(&path, &fineprune::Device::Cpu, Some(fineprune::DType::F32));
    let f32_engine = Engine::new(Arc::new(f32_model.unwrap()));
    check(&f32_engine, None, &r, &meta);
    let quant = Engine::new(Arc::new(Model::load(&path).unwrap()));
    check(&quant, Some(&f32_engine), &r, &meta);
}

/// Ids, logits and greedy continuation of every reference prompt. The f32 model (`f32: None`)
/// matches HF within `TOL` and its greedy ids exactly. The quantized one matches HF's logits
/// within `QUANT_TOL`, and its greedy ids follow the f32 model's until a step where the f32 logits'
/// top two are closer than `2 QUANT_TOL` (a near-tie the 8-bit rounding may flip), if any.
fn check(
    engine: &Engine,
    f32: Option<&Engine>,
    r: &std::collections::HashMap<String, RefTensor>,
    meta: &serde_json::Value,
) {
    let quant = engine
        .model()
        .params
        .iter()
        .any(|p| p.value.dtype().is_quant());
    assert_eq!(quant, f32.is_some(), "weights quantized: {quant}");
    let tol = if quant { QUANT_TOL } else { TOL };
    let vocab = engine.model().lm.config.vocab_size;
    for p in meta["prompts"].as_array().unwrap() {
        let k = p["key"].as_u64().unwrap();
        let text = p["text"].as_str().unwrap();
        let mut req = Request::new(text, None);
        let out = engine.prompt_logits(&req).unwrap();
        let (prompt, logits) = (out.prompt, out.logits);
        assert_eq!(
            prompt.ids,
            ids_u32(&r[&format!("input_ids_{k}")]),
            "prompt {k}: ids"
        );
        let n = prompt.ids.len();
        let err = max_abs_diff(
            &logits[(n - 1) * vocab..],
            &r[&format!("logits_last_{k}")].f,
        );
        println!("prompt {k} (quantized: {quant}): last-position logits max-abs diff {err:.2e}");
        assert!(err < tol, "prompt {k}: {err}");
        if let Some(all) = r.get(&format!("logits_all_{k}")) {
            let err = max_abs_diff(&logits, &all.f);
            println!("prompt {k} (quantized: {quant}): all-position logits max-abs diff {err:.2e}");
            assert!(err < tol, "prompt {k}: {err}");
        }
        req.max_new_tokens = p["n_greedy"].as_u64().unwrap() as usize;
        let g = engine
            .generate(std::slice::from_ref(&req))
            .unwrap()
            .remove(0);
        let want = ids_u32(&r[&format!("greedy_ids_{k}")]);
        let Some(f32) = f32 else {
            assert_eq!(g.tokens, want, "prompt {k}: greedy ids");
            let text = engine.model().tokenizer.decode(&g.tokens, false).unwrap();
            assert_eq!(
                text,
                p["greedy_text"].as_str().unwrap(),
                "prompt {k}: greedy text"
            );
            continue;
        };
        req.return_logits = true;
        let exact = f32.generate(&[req]).unwrap().remove(0);
        assert_eq!(exact.tokens, want, "prompt {k}: f32 greedy ids");
        let same = common_prefix(&g.tokens, &exact.tokens);
        println!(
            "prompt {k}: quantized greedy ids equal f32's for {same} of {} steps",
            want.len()
        );
        if same < want.len() {
            let mut l = exact.step_logits[same].clone();
            l.sort_by(|a, b| b.total_cmp(a));
            let margin = l[0] - l[1];
            assert!(
                margin < 2.0 * QUANT_TOL,
                "prompt {k}: the quantized path changed step {same}, where the f32 top-2 margin is {margin}"
            );
        }
    }
}

/// Max-abs distance of the quantized path's last-position logits to llama.cpp's on the same GGUF
/// (`tests/reference/gen_smollm2_llamacpp.py`, f32 KV cache). Both round activations to 8 bits,
/// but not bit-identically (f32 summation order, and a prefill over 8 rows dequantises here), and
/// a flipped rounding step amplifies through 30 layers: the two quantized computations end up as
/// far from each other as each is from HF's f32 (llama.cpp to HF: 0.65, 0.76, 1.98 on the three
/// prompts; ours to llama.cpp: 0.58, 0.70, 1.98 measured). So this bounds that noise, and the
/// greedy check below is the sharp one.
const LLAMA_CPP_TOL: f32 = 2.5;

/// A greedy step may pick another token than llama.cpp only where llama.cpp's own top-2 logits
/// are closer than this (measured: the first differing steps sit at margins 0.03, 0.09, 0.19).
const LLAMA_CPP_TIE: f32 = 0.25;

#[test]
fn smollm2_quantized_path_computes_what_llama_cpp_computes() {
    let Some(path) = smollm2_path() else { return };
    let dir = reference_dir();
    let lc = load_ref(&dir.join("smollm2_llamacpp.safetensors"));
    let text = std::fs::read_to_string(dir.join("smollm2_llamacpp.json")).unwrap();
    let lc_meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let text = std::fs::read_to_string(dir.join("smollm2_ref.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let engine = Engine::new(Arc::new(Model::load(&path).unwrap()));
    let vocab = engine.model().lm.config.vocab_size;
    for (p, want) in meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lc_meta["prompts"].as_array().unwrap())
    {
        let k = p["key"].as_u64().unwrap();
        assert_eq!(want["key"].as_u64(), Some(k));
        let mut req = Request::new(p["text"].as_str().unwrap(), None);
        let out = engine.prompt_logits(&req).unwrap();
        let n = out.prompt.ids.len();
        let err = max_abs_diff(
            &out.logits[(n - 1) * vocab..],
            &lc[&format!("logits_last_{k}")].f,
        );
        println!("prompt {k}: last-position logits max-abs diff to llama.cpp {err:.3}");
        assert!(err < LLAMA_CPP_TOL, "prompt {k}: {err}");
        let want_ids: Vec<u32> = (want["greedy_ids"].as_array().unwrap().iter())
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        req.max_new_tokens = want_ids.len();
        let g = engine.generate(&[req]).unwrap().remove(0);
        let same = common_prefix(&g.tokens, &want_ids);
        println!(
            "prompt {k}: greedy ids equal llama.cpp's for {same} of {} steps",
            want_ids.len()
        );
        if same < want_ids.len() {
            let margin = want["top2_margins"][same].as_f64().unwrap() as f32;
            assert!(
                margin < LLAMA_CPP_TIE,
                "prompt {k}: greedy step {same} differs from llama.cpp's, whose top-2 margin there is {margin}"
            );
        }
    }
}

/// How many leading ids two greedy continuations share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
