//! Checkpoint writing: both tiny fixtures go through `TrainModel` and `save_checkpoint`, the
//! saved directory is loaded by our inference engine, and its logits must match the fixture's HF
//! reference logits (tests/reference/{fixture}_ref.safetensors, max-abs 1e-4 as in
//! tests/llava_parity.rs). tests/reference/check_checkpoint.py checks the same directory with
//! transformers 5.23 (no missing/unexpected keys, same logits); its result is in
//! tests/reference/README.md.

mod common;

use common::*;
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::train::checkpoint::save_checkpoint;
use fineprune::train::model::TrainModel;
use fineprune::{Engine, ImageInput, Model, Request};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const LOGITS_TOL: f32 = 1e-4;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fineprune-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn check_logits(name: &str, dir: &Path) {
    let r = load_ref(&reference_dir().join(format!("{name}_ref.safetensors")));
    let engine = Engine::new(Arc::new(Model::load(dir).unwrap()));
    let pixels = r["pixel_values"].f.clone();
    for (suffix, question, system) in [
        ("", "What color is the big square?", None),
        (
            "_2",
            "How many circles are there?",
            Some(LLAVA_SYSTEM.to_string()),
        ),
    ] {
        let mut req = Request::new(question, Some(ImageInput::Pixels(pixels.clone())));
        req.options = PromptOptions {
            system,
            ..Default::default()
        };
        let out = engine.prompt_logits(&req).unwrap();
        assert_eq!(
            out.prompt.ids,
            ids_u32(&r[&format!("input_ids{suffix}")]),
            "{name}{suffix}: ids"
        );
        let err = max_abs_diff(&out.logits, &r[&format!("logits{suffix}")].f);
        println!("{name}{suffix}: saved checkpoint logits max-abs diff {err:.2e}");
        assert!(err < LOGITS_TOL, "{name}{suffix}: logits differ by {err}");
    }
}

fn roundtrip(name: &str, tied: bool) {
    let src = reference_dir().join(name);
    let m = TrainModel::from_dir(&src).unwrap();
    assert_eq!(m.tied(), tied);
    let out = tmp(name);
    save_checkpoint(&m, &src, &out).unwrap();

    // f32, transformers 5.x keys, lm_head only when untied, no temporary files left.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.iter().all(|n| {
        n.starts_with("model.vision_tower.")
            || n.starts_with("model.multi_modal_projector.")
            || n.starts_with("model.language_model.")
            || *n == "lm_head.weight"
    }));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("model.vision_tower.vision_model."))
    );
    assert_eq!(names.contains(&"lm_head.weight"), !tied);
    assert!(
        st.tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F32)
    );
    for p in &m.params {
        let t = st.tensor(&p.name).unwrap();
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(v.as_slice(), p.f32s().unwrap(), "{}", p.name);
    }
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
    for e in std::fs::read_dir(&out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!n.starts_with('.'), "leftover temporary file {n}");
    }

    check_logits(name, &out);
    // The reloaded checkpoint trains from the same values.
    let again = TrainModel::from_dir(&out).unwrap();
    assert_eq!(again.params, m.params);
    if std::env::var_os("FINEPRUNE_KEEP_CKPT").is_none() {
        std::fs::remove_dir_all(&out).unwrap();
    } else {
        println!("{name}: kept {}", out.display());
    }
}

#[test]
fn gqa_untied_sharded_old_layout_saves_and_reloads() {
    roundtrip("llava_gqa", false);
}

#[test]
fn tied_bf16_new_layout_saves_and_reloads() {
    roundtrip("llava_tied", true);
}

#[test]
fn unwritable_output_dir_is_a_clear_error_before_writing() {
    let src = reference_dir().join("llava_tied");
    let m = TrainModel::from_dir(&src).unwrap();
    // A path below a regular file can never be created, whatever the user's permissions.
    let base = tmp("unwritable");
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("ckpt");
    let err = save_checkpoint(&m, &src, &out).unwrap_err().to_string();
    assert!(err.contains(&out.display().to_string()), "{err}");
    assert!(err.contains("not writable"), "{err}");
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), 1);

    // Missing source config is named too, and nothing is created.
    let out2 = base.join("never");
    let err = save_checkpoint(&m, &base, &out2).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(!out2.exists());
    std::fs::remove_dir_all(&base).unwrap();
}

/// A model with a non-finite weight is never saved: the error names the tensor and nothing is
/// written.
#[test]
fn non_finite_weights_are_never_saved() {
    let src = reference_dir().join("llava_tied");
    for bad in [f32::NAN, f32::INFINITY] {
        let mut m = TrainModel::from_dir(&src).unwrap();
        let i = m.params.len() / 2;
        m.params[i].f32s_mut().unwrap()[3] = bad;
        let name = m.params[i].name.clone();
        let out = tmp("nan");
        let err = save_checkpoint(&m, &src, &out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{name}`")) && err.contains(&format!("{bad} at index 3")),
            "{err}"
        );
        assert!(!out.exists(), "{} was created", out.display());
    }
}
