//! The real SmolLM2-135M-Instruct from its Q4_1 GGUF against HF transformers' dequantised model
//! (`tests/reference/gen_smollm2.py`): token ids, logits within 1e-3 max-abs, greedy continuations.
//! The 1e-3 tolerance (vs 1e-4 for the tiny fixtures) covers f32 accumulation-order differences
//! over 30 layers and a 49152-wide vocabulary with logits of magnitude ~20.

mod common;

use common::*;
use fineprune::{Engine, Model, Request};
use std::sync::Arc;

const TOL: f32 = 1e-3;

#[test]
fn smollm2_gguf_matches_hf_logits_and_greedy_text() {
    let Some(path) = smollm2_path() else { return };
    let dir = reference_dir();
    let r = load_ref(&dir.join("smollm2_ref.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2_ref.json")).unwrap())
            .unwrap();
    let engine = Engine::new(Arc::new(Model::load(&path).unwrap()));
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
        println!("prompt {k}: last-position logits max-abs diff {err:.2e}");
        assert!(err < TOL, "prompt {k}: {err}");
        if let Some(all) = r.get(&format!("logits_all_{k}")) {
            let err = max_abs_diff(&logits, &all.f);
            println!("prompt {k}: all-position logits max-abs diff {err:.2e}");
            assert!(err < TOL, "prompt {k}: {err}");
        }
        req.max_new_tokens = p["n_greedy"].as_u64().unwrap() as usize;
        let g = engine.generate(&[req]).unwrap().remove(0);
        assert_eq!(
            g.tokens,
            ids_u32(&r[&format!("greedy_ids_{k}")]),
            "prompt {k}: greedy ids"
        );
        let text = engine.model().tokenizer.decode(&g.tokens, false).unwrap();
        assert_eq!(
            text,
            p["greedy_text"].as_str().unwrap(),
            "prompt {k}: greedy text"
        );
    }
}
