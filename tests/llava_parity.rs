//! Our LLaVA engine against HF transformers on the tiny random checkpoints of
//! `tests/reference/gen_llava.py`: token ids, logits of every prompt position (max-abs 1e-4, f32),
//! and 24 greedy tokens with the KV cache.

mod common;

use common::*;
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::{Engine, ImageInput, Model, Request};
use std::sync::Arc;

const LOGITS_TOL: f32 = 1e-4;

fn check(name: &str) {
    let dir = reference_dir();
    let r = load_ref(&dir.join(format!("{name}_ref.safetensors")));
    let model = Arc::new(Model::load(dir.join(name)).unwrap());
    // Weights are read in place from the file mapping, not copied (issue 29).
    let copied: Vec<&str> = (model.params.iter())
        .filter(|p| !p.value.is_mapped())
        .map(|p| p.name.as_str())
        .collect();
    assert!(copied.is_empty(), "{name}: copied at load: {copied:?}");
    let engine = Engine::new(model.clone());
    let pixels = r["pixel_values"].f.clone();
    let prompts = [
        ("", "What color is the big square?", None),
        (
            "_2",
            "How many circles are there?",
            Some(LLAVA_SYSTEM.to_string()),
        ),
    ];
    for (suffix, question, system) in prompts {
        let mut req = Request::new(question, Some(ImageInput::Pixels(pixels.clone())));
        req.options = PromptOptions {
            system,
            ..Default::default()
        };
        let out = engine.prompt_logits(&req).unwrap();
        let (prompt, logits) = (out.prompt, out.logits);
        assert_eq!(
            prompt.ids,
            ids_u32(&r[&format!("input_ids{suffix}")]),
            "{name}{suffix}: ids"
        );
        let want = &r[&format!("logits{suffix}")];
        let err = max_abs_diff(&logits, &want.f);
        println!(
            "{name}{suffix}: logits max-abs diff {err:.2e} over {:?}",
            want.shape
        );
        assert!(err < LOGITS_TOL, "{name}{suffix}: logits differ by {err}");

        req.max_new_tokens = 24;
        req.stop_on_eos = false;
        let g = engine.generate(&[req]).unwrap().remove(0);
        assert_eq!(
            g.tokens,
            ids_u32(&r[&format!("greedy_ids{suffix}")]),
            "{name}{suffix}: greedy"
        );
    }
}

#[test]
fn llava_gqa_old_layout_sharded_untied_matches_hf() {
    check("llava_gqa");
}

#[test]
fn llava_tied_new_layout_bf16_matches_hf() {
    check("llava_tied");
}

/// The whole path from an image file: our preprocessing + model against HF's logits.
#[test]
fn from_image_file_matches_hf() {
    let dir = reference_dir();
    for name in ["llava_gqa", "llava_tied"] {
        let r = load_ref(&dir.join(format!("{name}_ref.safetensors")));
        let engine = Engine::new(Arc::new(Model::load(dir.join(name)).unwrap()));
        let img = ImageInput::Path(dir.join("images/tiny_scene.png"));
        let logits = engine
            .prompt_logits(&Request::new("What color is the big square?", Some(img)))
            .unwrap()
            .logits;
        let err = max_abs_diff(&logits, &r["logits"].f);
        assert!(err < LOGITS_TOL, "{name}: {err}");
    }
}

/// transformers 5.23's `save_pretrained` writes yet another mix of prefixes
/// (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`): the same weights
/// under those names give the same logits.
#[test]
fn transformers_5_saved_key_layout_loads_the_same() {
    use safetensors::tensor::TensorView;
    let dir = reference_dir();
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir.join("llava_tied")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let st_path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let n = n
                .replace("model.language_model.", "language_model.model.")
                .replace("model.vision_tower.", "vision_tower.")
                .replace("model.multi_modal_projector.", "multi_modal_projector.");
            (n, v)
        })
        .collect();
    std::fs::write(&st_path, safetensors::serialize(renamed, None).unwrap()).unwrap();
    let m = Model::load(tmp.path()).unwrap();
    assert_eq!(
        m.layout,
        vec![
            "language_model.model.",
            "vision_tower.",
            "multi_modal_projector."
        ]
    );
    let r = load_ref(&dir.join("llava_tied_ref.safetensors"));
    let req = Request::new(
        "What color is the big square?",
        Some(ImageInput::Pixels(r["pixel_values"].f.clone())),
    );
    let logits = Engine::new(Arc::new(m)).prompt_logits(&req).unwrap().logits;
    assert!(max_abs_diff(&logits, &r["logits"].f) < LOGITS_TOL);
}
