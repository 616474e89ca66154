//! Bad input gets a clear error naming what was wrong, never a panic.

mod common;

use common::reference_dir;
use fineprune::model::template::PromptOptions;
use fineprune::{Engine, Error, ImageInput, Model, Request};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A copy of a fixture model in a temp dir, to damage.
fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(reference_dir().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

/// Rewrites a safetensors file through `edit(name, shape, bytes) -> Option<(shape, bytes)>`.
fn rewrite(path: &Path, edit: impl Fn(&str, &[usize], &[u8]) -> Option<(Vec<usize>, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| edit(&n, v.shape(), v.data()).map(|(s, b)| (n, v.dtype(), s, b)))
        .collect();
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_files_are_named() {
    for (file, what) in [
        ("config.json", "config.json"),
        ("tokenizer.json", "tokenizer"),
    ] {
        let (_t, dir) = copy_model("llava_tied");
        std::fs::remove_file(dir.join(file)).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(what) && e.contains(file), "{e}");
    }
    let (_t, dir) = copy_model("llava_tied");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    // A shard listed in the index but absent.
    let (_t, dir) = copy_model("llava_gqa");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model"), "{e}");
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let (_t, dir) = copy_model("llava_tied");
    let st = dir.join("model.safetensors");
    let victim = "model.language_model.layers.1.self_attn.k_proj.weight";
    rewrite(&st, |n, s, b| {
        (n != victim).then(|| (s.to_vec(), b.to_vec()))
    });
    let e = load_err(&dir);
    assert!(
        e.contains("lm.layers.1.self_attn.k_proj.weight") && e.contains(victim),
        "{e}"
    );

    let (_t, dir) = copy_model("llava_tied");
    let st = dir.join("model.safetensors");
    let victim = "model.multi_modal_projector.linear_2.weight";
    rewrite(&st, |n, s, b| {
        if n == victim {
            Some((vec![s[0] / 2, s[1] * 2], b.to_vec()))
        } else {
            Some((s.to_vec(), b.to_vec()))
        }
    });
    let e = load_err(&dir);
    assert!(
        e.contains("projector.linear_2.weight") && e.contains("[32, 128]"),
        "{e}"
    );
}

#[test]
fn truncated_or_corrupt_safetensors() {
    let (_t, dir) = copy_model("llava_tied");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&st, b"this is not a safetensors file at all").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&st, b"").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_dtype_and_architecture() {
    let (_t, dir) = copy_model("llava_gqa");
    // Store one needed tensor as I32 (same byte size as f32).
    let shard = dir.join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // A tensor the model needs (the shard also holds unused ones, e.g. the last vision layer).
    let victim = "language_model.model.embed_tokens.weight".to_string();
    assert!(st.names().contains(&victim.as_str()));
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = if n == victim {
                safetensors::Dtype::I32
            } else {
                v.dtype()
            };
            (n, d, v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&shard, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("I32") && e.contains(&victim), "{e}");

    let (_t, dir) = copy_model("llava_tied");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llava\"", "\"mistral3\""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("unsupported architecture") && e.contains("mistral3"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

fn engine() -> Engine {
    Engine::new(Arc::new(
        Model::load(reference_dir().join("llava_gqa")).unwrap(),
    ))
}

fn pixels() -> Option<ImageInput> {
    Some(ImageInput::Pixels(vec![0.0; 3 * 30 * 30]))
}

#[test]
fn bad_prompts() {
    let e = engine();
    let err = |r: Request| match e.prompt_logits(&r) {
        Ok(_) => panic!("prompt {:?} accepted", r.prompt),
        Err(e) => e.to_string(),
    };
    let msg = err(Request::new("<image> and <image>", pixels()));
    assert!(msg.contains("2 `<image>`"), "{msg}");
    let mut raw = Request::new("no placeholder here", pixels());
    raw.options = PromptOptions {
        raw: true,
        ..Default::default()
    };
    assert!(err(raw).contains("must contain `<image>`"));
    let msg = err(Request::new("<image>\nwhat is it?", None));
    assert!(msg.contains("no image was given"), "{msg}");
    let msg = err(Request::new("red ".repeat(300), pixels()));
    assert!(
        msg.contains("longer than the model's context of 256"),
        "{msg}"
    );
    let msg = err(Request::new(
        "what?",
        Some(ImageInput::Pixels(vec![0.0; 10])),
    ));
    assert!(msg.contains("pixel_values"), "{msg}");
}

#[test]
fn bad_sampling_parameters() {
    let e = engine();
    let mut r = Request::new("what?", pixels());
    r.sampling.top_p = 0.0;
    assert!(matches!(e.generate(&[r.clone()]), Err(Error::Arg { .. })));
    r.sampling.top_p = 1.0;
    r.sampling.temperature = -1.0;
    let msg = e.generate(&[r]).unwrap_err().to_string();
    assert!(msg.contains("temperature"), "{msg}");
}

/// Edits `config.json` of `dir` as JSON: `edit` gets the whole object.
fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Configs no model can have are refused at load, naming the key, instead of loading and then
/// panicking (`num_hidden_layers: 0` once passed `inspect` and panicked in `generate`) or
/// answering NaN (`rope_theta` 0 or negative, a negative `rms_norm_eps`).
#[test]
fn impossible_configs_are_refused_with_the_key_named() {
    use serde_json::json;
    let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        ("text_config", "num_hidden_layers", json!(0), "at least 1"),
        ("text_config", "hidden_size", json!(0), "at least 1"),
        ("text_config", "intermediate_size", json!(0), "at least 1"),
        ("text_config", "vocab_size", json!(0), "at least 1"),
        (
            "text_config",
            "max_position_embeddings",
            json!(0),
            "at least 1",
        ),
        ("text_config", "head_dim", json!(0), "at least 1"),
        ("text_config", "head_dim", json!(7), "even"),
        ("text_config", "rms_norm_eps", json!(-1e-5), ">= 0"),
        (
            "text_config",
            "vocab_size",
            json!(1u64 << 62),
            "larger than any weight",
        ),
        (
            "vision_config",
            "image_size",
            json!(0),
            "multiple of patch_size",
        ),
        ("vision_config", "patch_size", json!(0), "at least 1"),
        ("vision_config", "hidden_size", json!(0), "at least 1"),
        ("vision_config", "layer_norm_eps", json!(-0.5), ">= 0"),
        ("vision_config", "num_channels", json!(0), "at least 1"),
    ];
    for (section, key, value, needle) in cases {
        let (_t, dir) = copy_model("llava_tied");
        edit_config(&dir, |v| v[section][key] = value.clone());
        let e = load_err(&dir);
        assert!(
            e.contains(&format!("`{section}.{key}`")) && e.contains(needle),
            "{section}.{key} = {value}: {e}"
        );
    }
    // rope_theta in both spellings: transformers 5's rope_parameters and 4.x's rope_theta.
    for theta in [0.0, -500000.0] {
        let (_t, dir) = copy_model("llava_tied");
        edit_config(&dir, |v| {
            v["text_config"]["rope_parameters"]["rope_theta"] = theta.into()
        });
        let e = load_err(&dir);
        assert!(
            e.contains("`text_config.rope_parameters.rope_theta`") && e.contains("> 0"),
            "{e}"
        );
        let (_t, dir) = copy_model("llava_tied");
        edit_config(&dir, |v| {
            let t = v["text_config"].as_object_mut().unwrap();
            t.remove("rope_parameters");
            t.insert("rope_theta".into(), theta.into());
        });
        let e = load_err(&dir);
        assert!(
            e.contains("`text_config.rope_theta`") && e.contains("> 0"),
            "{e}"
        );
    }
}

/// A shard index may only name files inside the model folder.
#[test]
fn shard_index_cannot_name_files_outside_the_model() {
    for bad in ["../model-00001-of-00002.safetensors", "/etc/passwd", ""] {
        let (_t, dir) = copy_model("llava_gqa");
        let p = dir.join("model.safetensors.index.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let map = v["weight_map"].as_object_mut().unwrap();
        let first = map.keys().next().unwrap().clone();
        map.insert(first.clone(), bad.into());
        std::fs::write(&p, v.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("model.safetensors.index.json")
                && e.contains(&first)
                && e.contains("not a file inside the model folder"),
            "{bad}: {e}"
        );
    }
}

/// A NaN weight or NaN pixel values end in an error that says where the NaN first appeared,
/// not in an empty answer or NaN logits with success.
#[test]
fn non_finite_values_are_reported_where_they_appear() {
    // One NaN in the gate projection of decoder layer 1.
    let (_t, dir) = copy_model("llava_tied");
    rewrite(&dir.join("model.safetensors"), |name, shape, bytes| {
        let mut b = bytes.to_vec();
        if name.ends_with("layers.1.mlp.gate_proj.weight") {
            let nan = match b.len() / shape.iter().product::<usize>() {
                2 => half::bf16::NAN.to_le_bytes().to_vec(),
                _ => f32::NAN.to_le_bytes().to_vec(),
            };
            b[..nan.len()].copy_from_slice(&nan);
        }
        Some((shape.to_vec(), b))
    });
    let e = Engine::new(Arc::new(Model::load(&dir).unwrap()));
    let req = Request::new("what?", Some(ImageInput::Pixels(vec![0.1; 3 * 30 * 30])));
    for err in [
        e.generate(std::slice::from_ref(&req)).unwrap_err(),
        e.prompt_logits(&req).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            matches!(err, Error::NonFinite { .. })
                && msg.contains("decoder layer 1")
                && msg.contains("request 0, prompt position"),
            "{msg}"
        );
    }
    // NaN pixel values are refused before the vision tower runs.
    let e = engine();
    let mut px = vec![0.0; 3 * 30 * 30];
    px[2 * 900 + 5 * 30 + 7] = f32::NAN;
    let err = e
        .generate(&[Request::new("what?", Some(ImageInput::Pixels(px)))])
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::NonFinite { .. })
            && msg.contains("pixel_values (channel 2, row 5), column 7"),
        "{msg}"
    );
    // Finite but huge pixel values overflow inside the vision tower: reported there.
    let err = e
        .generate(&[Request::new(
            "what?",
            Some(ImageInput::Pixels(vec![3e38; 3 * 30 * 30])),
        )])
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::NonFinite { .. }) && msg.contains("vision"),
        "{msg}"
    );
}

/// An image processor that gives another size than the vision tower takes is refused at load,
/// naming its file and key, instead of failing with a shape error at the first image.
#[test]
fn image_processor_of_another_size_is_refused_at_load() {
    let (_t, dir) = copy_model("llava_tied");
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("preprocessor_config.json")
            && e.contains("`crop_size` gives 224x224")
            && e.contains("takes 30x30"),
        "{e}"
    );
}
