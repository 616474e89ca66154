//! `fineprune::train::student::init_student` (`distill init-student`): students made from the
//! tiny fixtures (tests/reference/llava_gqa: 3 decoder layers, 3 vision layers, feature layer -2,
//! sharded 4.x layout; llava_tied: feature layers [-3, -1]) and the bundled teacher
//! (models/shapes-llava: 4 decoder and 4 vision layers, feature layer -1). Every student is
//! checked tensor by tensor against the teacher layer it names and run through our engine.

mod common;

use common::*;
use fineprune::model::config::{LlavaConfig, ModelConfig};
use fineprune::model::weights::Weights;
use fineprune::train::model::TrainModel;
use fineprune::train::student::{FreshLm, LayerPick, StudentRecord, StudentSpec, init_student};
use fineprune::{Engine, ImageInput, Model, Request};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fineprune-student-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn gqa() -> PathBuf {
    reference_dir().join("llava_gqa")
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-llava")
}

fn pick(s: &str) -> Option<LayerPick> {
    Some(s.parse().unwrap())
}

fn llava_config(dir: &Path) -> LlavaConfig {
    match ModelConfig::from_file(&dir.join("config.json")).unwrap() {
        ModelConfig::Llava(c) => c,
        ModelConfig::Llama(_) => panic!("{}: not llava", dir.display()),
    }
}

/// Every tensor of a checkpoint, under canonical names, as f32.
fn tensors(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut w = Weights::from_dir(dir).unwrap();
    w.summary()
        .into_iter()
        .map(|(name, shape, _)| {
            let v = w.take(&name, &shape).unwrap().into_f32_vec().unwrap();
            (name, (shape, v))
        })
        .collect()
}

/// The layer index of a `{prefix}{i}.…` name.
fn layer_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
}

/// The student's tensors are the teacher's, layer `i` of each stack being the teacher's
/// `lm[i]` / `vision[i]`; `fresh` (prefixes) are not compared. Returns how many were compared.
fn assert_copied(
    teacher: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    student: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    lm: &[usize],
    vision: &[usize],
    fresh: &[&str],
) -> usize {
    let mut compared = 0;
    for (name, (shape, v)) in student {
        if fresh.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut src = name.clone();
        for (prefix, picked) in [("lm.layers.", lm), ("vision.encoder.layers.", vision)] {
            if let Some(i) = layer_of(name, prefix) {
                let tail = &name[prefix.len() + i.to_string().len()..];
                src = format!("{prefix}{}{tail}", picked[i]);
            }
        }
        let (ts, tv) = teacher
            .get(&src)
            .unwrap_or_else(|| panic!("{name}: teacher has no {src}"));
        assert_eq!(shape, ts, "{name} <- {src}: shape");
        assert!(v == tv, "{name} <- {src}: values differ");
        compared += 1;
    }
    compared
}

fn record(dir: &Path) -> StudentRecord {
    serde_json::from_slice(&std::fs::read(dir.join("student.json")).unwrap()).unwrap()
}

/// Logits of the two fixture prompts (the fixture's reference pixels).
fn fixture_logits(fixture: &str, dir: &Path) -> Vec<Vec<f32>> {
    let r = load_ref(&reference_dir().join(format!("{fixture}_ref.safetensors")));
    let engine = Engine::new(Arc::new(Model::load(dir).unwrap()));
    [
        "What color is the big square?",
        "How many circles are there?",
    ]
    .iter()
    .map(|q| {
        let req = Request::new(*q, Some(ImageInput::Pixels(r["pixel_values"].f.clone())));
        engine.prompt_logits(&req).unwrap().logits
    })
    .collect()
}

/// Logits of a question about the bundled model's example image.
fn bundled_logits(dir: &Path) -> Vec<f32> {
    let engine = Engine::new(Arc::new(Model::load(dir).unwrap()));
    let req = Request::new(
        "What color is the circle?",
        Some(ImageInput::Path(bundled().join("example.png"))),
    );
    engine.prompt_logits(&req).unwrap().logits
}

fn assert_finite(logits: &[f32], what: &str) {
    assert!(!logits.is_empty(), "{what}: no logits");
    assert!(
        logits.iter().all(|x| x.is_finite()),
        "{what}: non-finite logits"
    );
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn keeping_every_layer_reproduces_the_teachers_logits() {
    let out = tmp("gqa-all");
    let spec = StudentSpec {
        lm_layers: pick("first:3"),
        ..Default::default()
    };
    let r = init_student(&gqa(), &spec, &out).unwrap();
    assert_eq!(r.lm_layers, Some(vec![0, 1, 2]));
    assert_eq!(r.teacher_params, r.student_params);
    let teacher = fixture_logits("llava_gqa", &gqa());
    let student = fixture_logits("llava_gqa", &out);
    for (t, s) in teacher.iter().zip(&student) {
        let err = max_abs_diff(t, s);
        println!("first:3 student vs teacher: logits max-abs diff {err:.2e}");
        assert!(err <= 1e-6, "logits differ by {err}");
    }
    // Same files a checkpoint has, f32 under transformers 5.x keys, no temporary files.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(gqa().join(f)).unwrap(),
            "{f}"
        );
    }
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().all(|n| {
        (n.starts_with("model.vision_tower.") && !n.starts_with("model.vision_tower.vision_model."))
            || n.starts_with("model.multi_modal_projector.")
            || n.starts_with("model.language_model.")
            || *n == "lm_head.weight"
    }));
    assert!(
        st.tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F32)
    );
    assert!(listing(&out).iter().all(|n| !n.starts_with('.')));
    keep_or_remove(&out);
}

fn keep_or_remove(dir: &Path) {
    if std::env::var_os("FINEPRUNE_KEEP_STUDENT").is_none() {
        std::fs::remove_dir_all(dir).unwrap();
    } else {
        println!("kept {}", dir.display());
    }
}

#[test]
fn truncated_students_hold_the_named_teacher_layers() {
    let teacher = tensors(&gqa());
    let tcfg = llava_config(&gqa());
    for (p, want) in [
        ("first:2", vec![0, 1]),
        ("last:2", vec![1, 2]),
        ("every-other", vec![0, 2]),
        ("0,2", vec![0, 2]),
    ] {
        let out = tmp(&format!("gqa-{}", p.replace([':', ','], "_")));
        let spec = StudentSpec {
            lm_layers: pick(p),
            ..Default::default()
        };
        let r = init_student(&gqa(), &spec, &out).unwrap();
        assert_eq!(r.lm_layers.as_ref(), Some(&want), "{p}");
        assert_eq!(record(&out), r, "{p}: student.json");
        assert_eq!(r.vision_layers, vec![0, 1, 2]);
        assert!(r.projector_from_teacher);

        let cfg = llava_config(&out);
        assert_eq!(cfg.text.num_hidden_layers, want.len(), "{p}");
        let expect = LlavaConfig {
            text: fineprune::model::config::TextConfig {
                num_hidden_layers: want.len(),
                ..tcfg.text.clone()
            },
            ..tcfg.clone()
        };
        assert_eq!(cfg, expect, "{p}: only the layer count changes");

        let student = tensors(&out);
        let n = assert_copied(&teacher, &student, &want, &[0, 1, 2], &[]);
        let per_layer = teacher
            .keys()
            .filter(|k| layer_of(k, "lm.layers.") == Some(0))
            .count();
        assert_eq!(
            n,
            teacher.len() - per_layer,
            "{p}: one layer's tensors fewer"
        );
        assert!(r.student_params < r.teacher_params);

        for (i, l) in fixture_logits("llava_gqa", &out).iter().enumerate() {
            assert_finite(l, &format!("{p} prompt {i}"));
        }
        keep_or_remove(&out);
    }
}

#[test]
fn vision_pick_keeps_encoder_layers_and_checks_the_feature_layer() {
    // Bundled teacher, feature layer -1: the student's last (third) layer.
    let out = tmp("bundled-vit3");
    let spec = StudentSpec {
        vision_layers: pick("first:3"),
        lm_layers: pick("first:2"),
        ..Default::default()
    };
    let r = init_student(&bundled(), &spec, &out).unwrap();
    assert_eq!(r.vision_layers, vec![0, 1, 2]);
    assert_eq!(r.vision_feature_layer, vec![-1]);
    let cfg = llava_config(&out);
    assert_eq!(cfg.vision.num_hidden_layers, 3);
    assert_eq!(cfg.text.num_hidden_layers, 2);
    let n = assert_copied(
        &tensors(&bundled()),
        &tensors(&out),
        &[0, 1],
        &[0, 1, 2],
        &[],
    );
    assert!(n > 0);
    assert!(
        tensors(&out).contains_key("vision.post_layernorm.weight"),
        "post_layernorm kept for transformers"
    );
    assert_finite(&bundled_logits(&out), "vision first:3");
    keep_or_remove(&out);

    // A non-prefix pick: layers 1 and 3 of 4, feature layer -1 = teacher layer 3's output.
    let out = tmp("bundled-vit-13");
    let spec = StudentSpec {
        vision_layers: pick("1,3"),
        ..Default::default()
    };
    init_student(&bundled(), &spec, &out).unwrap();
    assert_copied(
        &tensors(&bundled()),
        &tensors(&out),
        &[0, 1, 2, 3],
        &[1, 3],
        &[],
    );
    assert_finite(&bundled_logits(&out), "vision 1,3");
    keep_or_remove(&out);

    // llava_tied selects [-3, -1] of 3 layers; with 2 layers -3 would be the patch embeddings.
    let tied = reference_dir().join("llava_tied");
    for p in ["first:2", "1,2"] {
        let out = tmp("tied-vit2");
        let spec = StudentSpec {
            vision_layers: pick(p),
            ..Default::default()
        };
        let e = init_student(&tied, &spec, &out).unwrap_err().to_string();
        assert!(e.contains("vision_feature_layer"), "{e}");
        assert!(e.contains("-3"), "{e}");
        assert!(!out.exists(), "nothing written");
    }
    // A positive feature layer past the student's tower: the bundled config with feature layer 4.
    let src = tmp("bundled-feature4");
    std::fs::create_dir_all(&src).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundled().join("config.json")).unwrap()).unwrap();
    cfg["vision_feature_layer"] = serde_json::json!(4);
    std::fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        bundled().join("model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    let out = tmp("feature4-student");
    let spec = StudentSpec {
        vision_layers: pick("first:3"),
        ..Default::default()
    };
    let e = init_student(&src, &spec, &out).unwrap_err().to_string();
    assert!(
        e.contains("vision_feature_layer") && e.contains("4 selects no hidden state"),
        "{e}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&src).unwrap();
}

fn fresh64() -> FreshLm {
    FreshLm {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
    }
}

#[test]
fn fresh_language_model_shares_the_vision_tower() {
    let out = tmp("bundled-fresh");
    let spec = StudentSpec {
        fresh: Some(fresh64()),
        fresh_projector: true,
        seed: 7,
        init_std: 0.02,
        ..Default::default()
    };
    let r = init_student(&bundled(), &spec, &out).unwrap();
    assert_eq!(r.lm_layers, None);
    assert!(!r.projector_from_teacher);
    assert!(r.student_params < r.teacher_params);

    let (tcfg, cfg) = (llava_config(&bundled()), llava_config(&out));
    let t = &cfg.text;
    assert_eq!(
        (
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.head_dim
        ),
        (64, 128, 2, 2, 1, 32)
    );
    assert_eq!(t.vocab_size, tcfg.text.vocab_size);
    assert_eq!(t.rope_theta, tcfg.text.rope_theta);
    assert_eq!(t.rms_norm_eps, tcfg.text.rms_norm_eps);
    assert_eq!(cfg.image_token_id, tcfg.image_token_id);
    assert_eq!(cfg.vision, tcfg.vision);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(bundled().join("tokenizer.json")).unwrap()
    );

    // Vision tower: the teacher's, every tensor; the rest: TrainModel::init's.
    let student = tensors(&out);
    let n = assert_copied(
        &tensors(&bundled()),
        &student,
        &[],
        &[0, 1, 2, 3],
        &["lm.", "lm_head.", "projector."],
    );
    assert_eq!(
        n,
        student.keys().filter(|k| k.starts_with("vision.")).count()
    );
    let init = TrainModel::init(&cfg, 0.02, 7).unwrap();
    let mut fresh = 0;
    for (i, p) in init.params.iter().enumerate() {
        if p.name.starts_with("model.vision_tower.") {
            continue;
        }
        let canonical = p
            .name
            .strip_prefix("model.language_model.")
            .map(|r| format!("lm.{r}"))
            .or_else(|| {
                p.name
                    .strip_prefix("model.multi_modal_projector.")
                    .map(|r| format!("projector.{r}"))
            })
            .unwrap_or_else(|| p.name.clone());
        let (shape, v) = &student[&canonical];
        assert_eq!(shape.as_slice(), init.param_shape(i), "{canonical}");
        assert!(
            v.as_slice() == p.f32s().unwrap(),
            "{canonical}: not TrainModel::init's value"
        );
        fresh += 1;
    }
    assert_eq!(fresh + n, student.len());
    assert_finite(&bundled_logits(&out), "fresh LM");
    keep_or_remove(&out);

    // The teacher's projector outputs 192-wide features: a 64-wide LM cannot take them.
    let out = tmp("bundled-fresh-noproj");
    let spec = StudentSpec {
        fresh: Some(fresh64()),
        fresh_projector: false,
        ..Default::default()
    };
    let e = init_student(&bundled(), &spec, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fresh_projector") && e.contains("hidden size 64") && e.contains("192"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn fresh_projector_on_a_truncated_student_is_train_model_init_s() {
    let out = tmp("gqa-freshproj");
    let spec = StudentSpec {
        lm_layers: pick("first:2"),
        fresh_projector: true,
        seed: 3,
        init_std: 0.05,
        ..Default::default()
    };
    init_student(&gqa(), &spec, &out).unwrap();
    let init = TrainModel::init(&llava_config(&out), 0.05, 3).unwrap();
    let student = tensors(&out);
    let teacher = tensors(&gqa());
    for p in init
        .params
        .iter()
        .filter(|p| p.name.starts_with("model.multi_modal_projector."))
    {
        let name = p.name.replace("model.multi_modal_projector.", "projector.");
        assert!(student[&name].1.as_slice() == p.f32s().unwrap(), "{name}");
        assert!(
            student[&name].1 != teacher[&name].1,
            "{name}: still the teacher's"
        );
    }
    assert_copied(&teacher, &student, &[0, 1], &[0, 1, 2], &["projector."]);
    assert_finite(&fixture_logits("llava_gqa", &out)[0], "fresh projector");
    keep_or_remove(&out);
}

#[test]
fn bad_requests_are_refused_before_writing() {
    let lm = |s: &str| StudentSpec {
        lm_layers: pick(s),
        ..Default::default()
    };
    let out = tmp("bad");
    for (spec, want) in [
        (
            lm("first:0"),
            vec!["lm_layers (--layers)", "first:0", "keeps no layers"],
        ),
        (
            lm("first:9"),
            vec!["--layers", "asks for 9 layers but the teacher has 4"],
        ),
        (lm("2,1"), vec!["--layers", "increasing"]),
        (lm("1,1"), vec!["--layers", "layer 1 repeats"]),
        (
            lm("7"),
            vec![
                "--layers",
                "layer 7 is out of range for a teacher with 4 layers",
            ],
        ),
        (
            StudentSpec {
                vision_layers: pick("last:5"),
                ..Default::default()
            },
            vec![
                "vision_layers (--vision-layers)",
                "5 layers but the teacher has 4",
            ],
        ),
        (
            StudentSpec {
                fresh: Some(fresh64()),
                lm_layers: pick("first:2"),
                fresh_projector: true,
                ..Default::default()
            },
            vec!["--layers", "fresh"],
        ),
        (
            StudentSpec {
                fresh: Some(FreshLm {
                    num_key_value_heads: 3,
                    num_attention_heads: 4,
                    ..fresh64()
                }),
                fresh_projector: true,
                ..Default::default()
            },
            vec![
                "--fresh-kv-heads",
                "3 does not divide num_attention_heads 4",
            ],
        ),
        (
            StudentSpec {
                fresh: Some(FreshLm {
                    num_attention_heads: 3,
                    ..fresh64()
                }),
                fresh_projector: true,
                ..Default::default()
            },
            vec!["--fresh-heads", "hidden_size 64"],
        ),
        (
            // 10^8 layers once aborted asking for 29.6 GB; 10^6 is within MAX_DIM but its
            // parameters are not
            StudentSpec {
                fresh: Some(FreshLm {
                    num_hidden_layers: 1_000_000,
                    ..fresh64()
                }),
                fresh_projector: true,
                ..Default::default()
            },
            vec!["--fresh-layers", "more than 1073741824"],
        ),
        (
            StudentSpec {
                fresh: Some(FreshLm {
                    hidden_size: 1 << 40,
                    ..fresh64()
                }),
                fresh_projector: true,
                ..Default::default()
            },
            vec!["--fresh-hidden", "more than 1048576"],
        ),
        (
            StudentSpec {
                init_std: 0.0,
                ..Default::default()
            },
            vec!["--init-std"],
        ),
    ] {
        let e = init_student(&bundled(), &spec, &out)
            .unwrap_err()
            .to_string();
        for w in want {
            assert!(e.contains(w), "{spec:?}: `{w}` not in: {e}");
        }
        assert!(!out.exists(), "{spec:?}: wrote something");
    }
    let e = "abc".parse::<LayerPick>().unwrap_err().to_string();
    assert!(
        e.contains("`abc` is not a layer pick")
            && e.contains("first:N")
            && e.contains("every-other"),
        "{e}"
    );

    // The teacher's own folder (also spelled differently), and a folder holding weights.
    let before = listing(&gqa());
    for dir in [
        gqa(),
        gqa().join("."),
        reference_dir().join("../reference/llava_gqa"),
    ] {
        let e = init_student(&gqa(), &lm("first:2"), &dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--out") && e.contains("is the teacher folder"),
            "{e}"
        );
    }
    assert_eq!(listing(&gqa()), before);

    let used = tmp("used");
    init_student(&gqa(), &lm("first:1"), &used).unwrap();
    let weights = std::fs::read(used.join("model.safetensors")).unwrap();
    let record_before = std::fs::read(used.join("student.json")).unwrap();
    let e = init_student(&gqa(), &lm("first:2"), &used)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--out") && e.contains("already holds a checkpoint (model.safetensors)"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(used.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(used.join("student.json")).unwrap(),
        record_before
    );
    std::fs::remove_dir_all(&used).unwrap();
}
