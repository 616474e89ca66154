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
