//! The training loop and the `distill` CLI on the tiny llava_gqa fixture with ShapesVQA samples
//! exported at its image size (30): the loss falls, an interrupted + resumed run equals an
//! uninterrupted one bit for bit, bad configs fail before any step, checkpoints load in the engine.

mod common;

use common::reference_dir;
use fineprune::bench::shapes::{
    Family, ShapesConfig, Split, TrainTurns, export_llava_train, generate,
};
use fineprune::model::template::LLAVA_SYSTEM;
use fineprune::train::distill::{
    AttentionConfig, DistillConfig, Gating, HiddenConfig, HiddenLoss, Pairs, VisionAlignConfig,
};
use fineprune::train::logits::{DivergenceName, LogitsConfig, Tokens};
use fineprune::train::model::GroundingLoss;
use fineprune::train::run::{StageConfig, TrainConfig, TrainOptions, train, train_stages};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    reference_dir().join("llava_gqa")
}

/// Exports `n` ShapesVQA training samples into `dir` (train.json + images/).
fn export(dir: &Path, n: usize) {
    let cfg = ShapesConfig {
        image_size: 30,
        ..ShapesConfig::default()
    };
    let samples = generate(Split::Train, n, 3, &cfg).unwrap();
    export_llava_train(&samples, dir, &cfg, &TrainTurns::default()).unwrap();
}

/// [`export`] with every phrase and answer about some objects naming their patches
/// (`--ground-phrases --ground-answers`) on the
/// fixture's 6-pixel patches, and the extra questions of every family.
fn export_grounded(dir: &Path, n: usize) {
    let cfg = ShapesConfig {
        image_size: 30,
        patch_size: 6,
        ..ShapesConfig::default()
    };
    let samples = generate(Split::Train, n, 3, &cfg).unwrap();
    let turns = TrainTurns {
        all_families: true,
        ground_phrases: true,
        ground_answers: Family::ALL.to_vec(),
        ..TrainTurns::default()
    };
    export_llava_train(&samples, dir, &cfg, &turns).unwrap();
}

fn config(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(fixture()),
        new_model: None,
        pretrain_vision: None,
        data: data.join("train.json"),
        image_folder: data.join("images"),
        output: out.to_path_buf(),
        seed: 7,
        steps: 10,
        batch_size: 2,
        grad_accum: 2,
        lr: 3e-3,
        warmup: 2,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        betas: [0.9, 0.999],
        max_grad_norm: Some(1.0),
        frozen: vec![],
        vision_trainable_layers: None,
        lr_scale: Default::default(),
        checkpoint_every: 3,
        max_len: 2048,
        grounding: None,
        distill: None,
        stage: vec![],
    }
}

/// A stage that overrides nothing but its name, length and rate.
fn plain_stage(name: &str, steps: u64, lr: f64) -> StageConfig {
    StageConfig {
        name: name.into(),
        steps,
        lr,
        frozen: None,
        lr_scale: None,
        data: None,
        image_folder: None,
        batch_size: None,
        grad_accum: None,
        warmup: None,
        min_lr_ratio: None,
        weight_decay: None,
        betas: None,
        max_grad_norm: None,
        checkpoint_every: None,
        seed: None,
    }
}

fn quiet() -> TrainOptions {
    TrainOptions::default()
}

/// Adam's first step moves every weight by about `lr` whatever its gradient, so the step of a
/// group whose rate is scaled by 2 is twice the unscaled one, and other groups' steps are unchanged.
#[test]
fn lr_scale_multiplies_a_groups_step() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let step = |scale: &[(&str, f64)]| {
        let out = tempfile::tempdir().unwrap();
        let mut cfg = config(data.path(), out.path());
        (cfg.steps, cfg.warmup, cfg.grad_accum, cfg.weight_decay) = (1, 0, 1, 0.0);
        cfg.max_grad_norm = None;
        cfg.lr = 1e-3;
        cfg.lr_scale = scale.iter().map(|(g, x)| (g.to_string(), *x)).collect();
        let s = train(&cfg, &quiet()).unwrap();
        fineprune::train::model::TrainModel::from_dir(&s.checkpoint).unwrap()
    };
    let init = fineprune::train::model::TrainModel::from_dir(&fixture()).unwrap();
    let base = step(&[]);
    let scaled = step(&[("projector", 2.0), ("lm.no_decay", 0.5)]);
    let mut compared = std::collections::BTreeMap::<u32, usize>::new();
    for ((p0, p1), p2) in init.params.iter().zip(&base.params).zip(&scaled.params) {
        let ratio = if p0.group.starts_with("projector") {
            2.0
        } else if p0.group == "lm.no_decay" {
            0.5
        } else {
            1.0
        };
        for ((a, b), c) in p0
            .f32s()
            .unwrap()
            .iter()
            .zip(p1.f32s().unwrap())
            .zip(p2.f32s().unwrap())
        {
            let (d1, d2) = (b - a, c - a);
            // |d| <= lr; a weight whose gradient is ~0 moves by less (Adam's eps), so compare
            // only clear steps; f32 rounding of the weights bounds the agreement.
            if d1.abs() > 5e-4 {
                *compared.entry((ratio * 2.0) as u32).or_default() += 1;
                assert!(
                    (d2 - ratio * d1).abs() < 1e-5,
                    "{}: step {d2} vs {ratio} x {d1}",
                    p0.name
                );
            }
        }
    }
    assert_eq!(compared.len(), 3, "every ratio checked: {compared:?}");
}

/// With `betas = [0, 0]` AdamW is sign descent: every step moves a weight by exactly `lr` (its
/// gradient's sign; not at all where the gradient is zero, as for the embedding row of a token
/// absent from the batch), so after two constant-rate steps a weight has moved by 0, `lr` or
/// `2 lr`. Torch's default betas average the two gradients instead, so this fails unless the
/// betas reach AdamW.
#[test]
fn betas_reach_the_optimizer() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    (cfg.steps, cfg.warmup, cfg.grad_accum, cfg.weight_decay) = (2, 0, 1, 0.0);
    (cfg.max_grad_norm, cfg.min_lr_ratio, cfg.lr) = (None, 1.0, 1e-3);
    cfg.betas = [0.0, 0.0];
    let s = train(&cfg, &quiet()).unwrap();
    let after = fineprune::train::model::TrainModel::from_dir(&s.checkpoint).unwrap();
    let init = fineprune::train::model::TrainModel::from_dir(&fixture()).unwrap();
    let (mut sign_steps, mut total) = (0usize, 0usize);
    // The LM head's rows for tokens the model gives ~0 probability get gradients near Adam's eps
    // and move by a fraction of `lr`, so it is left out.
    let params = init.params.iter().zip(&after.params);
    for (p0, p1) in params.filter(|(p, _)| p.name != "lm_head.weight") {
        for (a, b) in p0.f32s().unwrap().iter().zip(p1.f32s().unwrap()) {
            let d = (b - a).abs();
            total += 1;
            // f32 rounding of weights of magnitude ~1 bounds the agreement.
            if [0.0, 1e-3, 2e-3].iter().any(|m| (d - m).abs() < 1e-6) {
                sign_steps += 1;
            }
        }
    }
    // Other weights with a near-eps gradient in one step are rare (0.2% in this fixture).
    assert!(
        sign_steps as f64 > 0.99 * total as f64,
        "{sign_steps} of {total} weights moved by 0, lr or 2 lr"
    );
}

#[test]
fn loss_decreases_and_checkpoint_loads() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    cfg.frozen = vec!["vision".into()];
    cfg.grad_accum = 1;
    let s = train(&cfg, &quiet()).unwrap();
    let losses: Vec<f32> = s.history.iter().map(|r| r.loss).collect();
    println!("losses: {losses:?}");
    assert_eq!(losses.len(), 10);
    assert!(losses.iter().all(|l| l.is_finite()));
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[8] + losses[9]) / 2.0;
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");
    // Outputs.
    for f in ["losses.csv", "loss.svg", "loss.png", "latest.json"] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
    let csv = std::fs::read_to_string(out.path().join("losses.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11);
    assert_eq!(s.checkpoint, out.path().join("checkpoint-000010"));
    // Only the newest checkpoint is kept.
    let ckpts: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1);
    // The checkpoint is a model the engine loads, and frozen vision weights did not move.
    fineprune::Model::load(&s.checkpoint).unwrap();
    let a = fineprune::train::model::TrainModel::from_dir(&fixture()).unwrap();
    let b = fineprune::train::model::TrainModel::from_dir(&s.checkpoint).unwrap();
    for (p, q) in a.params.iter().zip(&b.params) {
        assert_eq!(p.name, q.name);
        if p.group.starts_with("vision") {
            assert_eq!(p.value, q.value, "{} moved while frozen", p.name);
        }
    }
    assert!(
        a.params
            .iter()
            .zip(&b.params)
            .any(|(p, q)| !p.group.starts_with("vision") && p.value != q.value)
    );
    // A second fresh run into the same folder is refused.
    let e = train(&cfg, &quiet()).unwrap_err().to_string();
    assert!(e.contains("already holds a training run"), "{e}");
}

/// The grounding loss (logged beside the cross-entropy; phrases at layer 1, answers at layer 2)
/// falls as the language model learns to look at the named patches, and the csv keeps it across a
/// resume.
#[test]
fn grounding_loss_falls_and_is_logged() {
    let data = tempfile::tempdir().unwrap();
    export_grounded(data.path(), 16);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    cfg.frozen = vec!["vision".into()];
    cfg.grad_accum = 1;
    cfg.batch_size = 4;
    cfg.steps = 12;
    cfg.grounding = Some(GroundingLoss {
        layer: 1,
        weight: 1.0,
        answer_layer: Some(2),
    });
    let s = train(
        &cfg,
        &TrainOptions {
            stop_after: Some(6),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(s.history.len(), 6);
    let s = train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    let g: Vec<f32> = s.history.iter().map(|r| r.grounding.unwrap()).collect();
    println!("grounding: {g:?}");
    assert_eq!(g.len(), 12);
    let (first, last) = ((g[0] + g[1]) / 2.0, (g[10] + g[11]) / 2.0);
    assert!(last < 0.7 * first, "grounding loss did not fall: {g:?}");
    let csv = std::fs::read_to_string(out.path().join("losses.csv")).unwrap();
    assert!(csv.starts_with(
        "step,loss,grad_norm,lr,tokens,grounding,kd,hidden,attention,affinity,relational,vision\n"
    ));
    assert_eq!(csv.lines().count(), 13);
    let grounding = |l: &str| l.split(',').nth(5).map(str::to_owned);
    assert!(
        csv.lines()
            .skip(1)
            .all(|l| grounding(l).is_some_and(|g| !g.is_empty())),
        "{csv}"
    );
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 5); // odd: batches cross epochs unevenly
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&config(data.path(), full_dir.path()), &quiet()).unwrap();

    let part_dir = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), part_dir.path());
    let first = train(
        &cfg,
        &TrainOptions {
            stop_after: Some(5),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!((first.start_step, first.end_step), (0, 5));
    // A crash after step 6 was logged but before its checkpoint: resume drops the stale row.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(part_dir.path().join("losses.csv"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"6,1.5,0.5,0.001,100\n").unwrap();
    drop(f);
    let second = train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!((second.start_step, second.end_step), (5, 10));

    let bits = |h: &[fineprune::train::run::StepRecord]| {
        h.iter()
            .map(|r| (r.step, r.loss.to_bits(), r.grad_norm.map(f32::to_bits)))
            .collect::<Vec<_>>()
    };
    println!(
        "losses: {:?}",
        full.history.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    assert_eq!(bits(&full.history), bits(&second.history));
    let csv = |d: &Path| std::fs::read_to_string(d.join("losses.csv")).unwrap();
    assert_eq!(csv(full_dir.path()), csv(part_dir.path()));
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        let a = std::fs::read(full.checkpoint.join(f)).unwrap();
        let b = std::fs::read(second.checkpoint.join(f)).unwrap();
        assert!(a == b, "{f} differs between the runs");
    }
    // Nothing left to resume.
    let e = train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already at step 10"), "{e}");
}

#[test]
fn bad_configs_fail_before_any_step() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let out = tempfile::tempdir().unwrap();
    let base = config(data.path(), &out.path().join("run"));
    let check = |cfg: TrainConfig, opts: TrainOptions, want: &str| {
        let e = train(&cfg, &opts).unwrap_err().to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
        assert!(
            !cfg.output.join("losses.csv").exists(),
            "{want}: a step ran"
        );
    };
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    check(with(&|c| c.steps = 0), quiet(), "`steps`");
    check(with(&|c| c.batch_size = 0), quiet(), "`batch_size`");
    check(
        with(&|c| c.batch_size = 100_000_000),
        quiet(),
        "`batch_size`: 100000000 is more than the 2 samples",
    );
    check(with(&|c| c.grad_accum = 0), quiet(), "`grad_accum`");
    check(
        with(&|c| c.grad_accum = 65535),
        quiet(),
        "`grad_accum`: 65535 micro-batches per step is more than the 2 samples",
    );
    check(with(&|c| c.lr = -1.0), quiet(), "`lr`");
    check(with(&|c| c.lr = f64::NAN), quiet(), "`lr`");
    check(with(&|c| c.warmup = 11), quiet(), "`warmup`");
    check(with(&|c| c.min_lr_ratio = 1.5), quiet(), "`min_lr_ratio`");
    check(with(&|c| c.weight_decay = -0.1), quiet(), "`weight_decay`");
    check(with(&|c| c.betas = [0.9, 1.0]), quiet(), "`betas`");
    check(
        with(&|c| c.max_grad_norm = Some(0.0)),
        quiet(),
        "`max_grad_norm`",
    );
    check(
        with(&|c| c.frozen = vec!["text".into()]),
        quiet(),
        "`frozen`",
    );
    check(
        with(&|c| c.frozen = vec!["vision".into(), "projector".into(), "lm".into()]),
        quiet(),
        "nothing to train",
    );
    check(
        with(&|c| c.lr_scale = [("text".to_string(), 2.0)].into()),
        quiet(),
        "`lr_scale`: unknown group `text`",
    );
    check(
        with(&|c| c.lr_scale = [("lm.decay".to_string(), 0.0)].into()),
        quiet(),
        "`lr_scale`: lm.decay = 0",
    );
    check(
        with(&|c| c.model = Some(data.path().to_path_buf())),
        quiet(),
        "config.json of `model`",
    );
    check(
        with(&|c| c.data = data.path().join("nope.json")),
        quiet(),
        "nope.json",
    );
    check(
        with(&|c| c.image_folder = data.path().join("noimages")),
        quiet(),
        "`image_folder`",
    );
    // A json whose image is missing names the sample.
    let bad_images = tempfile::tempdir().unwrap();
    check(
        with(&|c| c.image_folder = bad_images.path().to_path_buf()),
        quiet(),
        "missing image of sample 0",
    );
    // An output path under a regular file cannot be created.
    let file = out.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    check(
        with(&|c| c.output = file.join("run")),
        quiet(),
        "not writable",
    );
    check(
        base.clone(),
        TrainOptions {
            resume: true,
            ..quiet()
        },
        "no checkpoint to resume",
    );
    // Grounding: data without `patches`, a weight that is not positive, a layer the model lacks.
    let ground = |layer: usize, weight: f64| {
        Some(GroundingLoss {
            layer,
            weight,
            answer_layer: None,
        })
    };
    check(
        with(&|c| c.grounding = ground(1, 0.5)),
        quiet(),
        "`grounding`: is set but no turn",
    );
    let grounded = tempfile::tempdir().unwrap();
    export_grounded(grounded.path(), 2);
    let on_grounded = |c: &mut TrainConfig| {
        c.data = grounded.path().join("train.json");
        c.image_folder = grounded.path().join("images");
    };
    check(
        with(&|c| {
            on_grounded(c);
            c.grounding = ground(1, 0.0)
        }),
        quiet(),
        "`grounding.weight`",
    );
    check(
        with(&|c| {
            on_grounded(c);
            c.grounding = ground(3, 0.5)
        }),
        quiet(),
        "`grounding.layer`: is 3 but the language model has 3 layers",
    );
    check(
        with(&|c| {
            on_grounded(c);
            c.grounding = ground(1, 0.5).map(|g| GroundingLoss {
                answer_layer: Some(5),
                ..g
            })
        }),
        quiet(),
        "`grounding.answer_layer`: is 5 but the language model has 3 layers",
    );

    // TOML: unknown keys and wrong types name the key and the file.
    let toml_path = out.path().join("bad.toml");
    std::fs::write(&toml_path, "model = \"m\"\nsteps = 3\nlrr = 1.0\n").unwrap();
    let e = TrainConfig::from_file(&toml_path).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("lrr"), "{e}");
    std::fs::write(
        &toml_path,
        "model = \"m\"\ndata = \"d\"\nimage_folder = \"i\"\noutput = \"o\"\nsteps = \"ten\"\nlr = 1.0\n",
    )
    .unwrap();
    let e = TrainConfig::from_file(&toml_path).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
}

#[test]
fn cli_trains_from_toml() {
    let exe = env!("CARGO_BIN_EXE_distill");
    let help = Command::new(exe)
        .args(["train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--config") && help.contains("--resume"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    export(&dir.path().join("data"), 2);
    let toml = format!(
        "model = {:?}\ndata = \"data/train.json\"\nimage_folder = \"data/images\"\noutput = \"run\"\nsteps = 2\nlr = 1e-3\nfrozen = [\"vision\"]\n",
        fixture().to_str().unwrap()
    );
    std::fs::write(dir.path().join("run.toml"), toml).unwrap();
    let o = Command::new(exe)
        .args(["train", "--quiet", "--config"])
        .arg(dir.path().join("run.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        dir.path()
            .join("run/checkpoint-000002/model.safetensors")
            .is_file()
    );
    // Bad config: clear error, non-zero exit.
    std::fs::write(
        dir.path().join("bad.toml"),
        "model = \"x\"\ndata = \"d\"\nimage_folder = \"i\"\noutput = \"o\"\nsteps = 0\nlr = 1e-3\n",
    )
    .unwrap();
    let o = Command::new(exe)
        .args(["train", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`steps`"), "{err}");
}

/// `distill shapes` at 32 px in 8-pixel patches into `out`, with `args` added.
fn export_cli(out: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["shapes", "--image-size", "32", "--patch-size", "8"])
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// A tiny `[new_model]`: 32-pixel images in 8-pixel patches (16 image tokens).
const NEW_MODEL: &str = "[new_model]\nimage_size = 32\npatch_size = 8\nvision_hidden_size = 16\n\
vision_intermediate_size = 32\nvision_layers = 2\nvision_heads = 2\nhidden_size = 32\n\
intermediate_size = 64\nlayers = 2\nheads = 4\nkv_heads = 2\nvocab_size = 400\n";

#[test]
fn new_model_from_scratch_via_cli_then_eval() {
    let exe = env!("CARGO_BIN_EXE_distill");
    let dir = tempfile::tempdir().unwrap();
    // Export: train.json, images at 32 px, and the generator settings.
    let o = export_cli(
        &dir.path().join("data"),
        &["--train", "12", "--test", "3", "--seed", "5"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["train.json", "shapes_config.json", "test/questions.jsonl"] {
        assert!(dir.path().join("data").join(f).is_file(), "missing {f}");
    }
    let toml = format!(
        "data = \"data/train.json\"\nimage_folder = \"data/images\"\noutput = \"run\"\nsteps = 3\n\
         batch_size = 2\nlr = 1e-3\n{NEW_MODEL}"
    );
    std::fs::write(dir.path().join("run.toml"), toml).unwrap();
    let o = Command::new(exe)
        .args(["train", "--quiet", "--config"])
        .arg(dir.path().join("run.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The base model: trained tokenizer with <image>/<pad> at the ids the config names,
    // the shape asked for, CLIP preprocessing at 32 px; checkpoints add the data's ShapesVQA
    // settings.
    let base = dir.path().join("run/base");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    let tok =
        fineprune::model::tokenizer::Tokenizer::from_file(&base.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.token_to_id("<image>").map(u64::from),
        cfg["image_token_index"].as_u64()
    );
    assert_eq!(cfg["vision_config"]["image_size"], 32);
    assert_eq!(cfg["text_config"]["num_key_value_heads"], 2);
    assert!(cfg["vocab_size"].as_u64().unwrap() <= 400);
    let ckpt = dir.path().join("run/checkpoint-000003");
    assert!(base.join("preprocessor_config.json").is_file());
    for f in [
        "preprocessor_config.json",
        "shapes_config.json",
        "chat_template.json",
    ] {
        assert!(ckpt.join(f).is_file(), "missing {f}");
    }
    // transformers' full CLIP key set: post_layernorm too, which LLaVA never runs.
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for k in [
        "model.vision_tower.post_layernorm.weight",
        "model.vision_tower.encoder.layers.1.mlp.fc2.bias",
        "model.multi_modal_projector.linear_2.weight",
    ] {
        assert!(st.names().contains(&k), "{k} missing");
    }
    let m = fineprune::Model::load(&ckpt).unwrap();
    assert_eq!(m.vision.as_ref().unwrap().config.image_tokens(), 16);
    // Its chat template declares the system prompt it was trained with.
    assert_eq!(m.system.as_deref(), Some(LLAVA_SYSTEM));

    // Eval: per-family table, eval.json with every prediction.
    let o = Command::new(exe)
        .args(["eval", "--n", "12", "--max-new-tokens", "3", "--model"])
        .arg(&ckpt)
        .arg("--out")
        .arg(dir.path().join("eval"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    for f in ["color", "count", "read_text", "overall"] {
        assert!(table.contains(f), "{table}");
    }
    let ev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("eval/eval.json")).unwrap()).unwrap();
    assert_eq!(ev["predictions"].as_array().unwrap().len(), 12);
    assert_eq!(ev["scores"]["n"], 12);
    // Bad eval input: a clear error.
    let o = Command::new(exe)
        .args(["eval", "--n", "0", "--model"])
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--n"));
}

/// A new model's tokenizer learns the text of every stage, not only the top-level data's: a word
/// only the second stage's answers use takes fewer tokens than under the tokenizer a one-stage
/// run on the first stage's data trains (training is deterministic, so were the second stage's
/// text ignored the two tokenizers would be identical).
#[test]
fn a_new_models_tokenizer_learns_every_stages_text() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let mut recs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("train.json")).unwrap()).unwrap();
    for r in recs.as_array_mut().unwrap() {
        for t in r["conversations"].as_array_mut().unwrap() {
            if t["from"] == "gpt" {
                t["value"] = "quixotic quixotic quixotic".into();
            }
        }
    }
    let second = data.path().join("train2.json");
    std::fs::write(&second, serde_json::to_vec(&recs).unwrap()).unwrap();
    let shape: fineprune::train::new_model::NewModel =
        toml::from_str(NEW_MODEL.trim_start_matches("[new_model]\n")).unwrap();
    let stage = |name: &str, data: Option<PathBuf>| StageConfig {
        data,
        warmup: Some(0),
        ..plain_stage(name, 1, 1e-3)
    };
    let tokens_of_the_word = |stages: Vec<StageConfig>| {
        let out = tempfile::tempdir().unwrap();
        let mut c = config(data.path(), out.path());
        (c.model, c.new_model, c.stage) = (None, Some(shape.clone()), stages);
        (c.steps, c.lr) = (0, 0.0);
        train_stages(&c, &quiet()).unwrap();
        let tok = fineprune::model::tokenizer::Tokenizer::from_file(
            &out.path().join("stage1-first/base/tokenizer.json"),
        )
        .unwrap();
        tok.encode(" quixotic", false).unwrap().ids.len()
    };
    let one = tokens_of_the_word(vec![stage("first", None)]);
    let both = tokens_of_the_word(vec![stage("first", None), stage("second", Some(second))]);
    assert!(
        both < one,
        "\" quixotic\": {both} tokens with both stages' text, {one} without"
    );
}

#[test]
fn new_model_configs_are_checked_before_any_compute() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let out = tempfile::tempdir().unwrap();
    let shape: fineprune::train::new_model::NewModel =
        toml::from_str(NEW_MODEL.trim_start_matches("[new_model]\n")).unwrap();
    let mut base = config(data.path(), &out.path().join("run"));
    base.model = None;
    base.new_model = Some(shape.clone());
    let check = |cfg: TrainConfig, want: &str| {
        let e = train(&cfg, &quiet()).unwrap_err().to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
        assert!(
            !cfg.output.join("base").exists(),
            "{want}: a model was created"
        );
    };
    let mut both = base.clone();
    both.model = Some(fixture());
    check(both, "not both");
    let mut neither = base.clone();
    neither.new_model = None;
    check(neither, "`[new_model]`");
    let with = |f: &dyn Fn(&mut fineprune::train::new_model::NewModel)| {
        let mut c = base.clone();
        let mut s = shape.clone();
        f(&mut s);
        c.new_model = Some(s);
        c
    };
    check(with(&|s| s.patch_size = 7), "new_model.patch_size");
    check(with(&|s| s.heads = 3), "new_model.heads");
    check(with(&|s| s.kv_heads = 3), "new_model.kv_heads");
    check(with(&|s| s.vision_heads = 5), "new_model.vision_heads");
    check(with(&|s| s.layers = 0), "new_model.layers");
    check(
        with(&|s| s.vision_feature_layer = -4),
        "new_model.vision_feature_layer",
    );
    check(
        with(&|s| s.max_position_embeddings = 16),
        "new_model.max_position_embeddings",
    );
    // Sizes that would allocate until the machine gives out are refused by name.
    check(
        with(&|s| s.hidden_size = 1 << 40),
        "`new_model.hidden_size`: 1099511627776 is more than 1048576",
    );
    check(
        with(&|s| s.vocab_size = 1 << 40),
        "`new_model.vocab_size`: 1099511627776 is more than 1048576",
    );
    check(
        with(&|s| (s.image_size, s.patch_size) = (1 << 20, 1 << 10)),
        "`new_model.image_size`",
    );
    check(
        with(&|s| (s.hidden_size, s.intermediate_size, s.layers) = (1 << 16, 1 << 16, 64)),
        "`new_model`: the shape has",
    );
    check(
        with(&|s| s.max_position_embeddings = usize::MAX),
        "`new_model.max_position_embeddings`",
    );
    // The same for the vision pretraining's counts.
    use fineprune::train::vision_pretrain::PretrainConfig;
    for (bad, want) in [
        (
            PretrainConfig {
                scenes: 1_000_000_000,
                ..PretrainConfig::default()
            },
            "`scenes`: 1000000000 is more than",
        ),
        (
            PretrainConfig {
                eval_scenes: 1_000_000_000,
                ..PretrainConfig::default()
            },
            "`eval_scenes`",
        ),
        (
            PretrainConfig {
                batch_size: 100_000_000,
                ..PretrainConfig::default()
            },
            "`batch_size`: 100000000 is more than 20000",
        ),
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
    // Unknown keys in the table are refused by name.
    let e = toml::from_str::<fineprune::train::new_model::NewModel>(
        &NEW_MODEL
            .trim_start_matches("[new_model]\n")
            .replace("layers = 2\nheads", "layer = 2\nheads"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layer"), "{e}");
}

#[test]
fn stages_chain_and_resume_across_the_boundary() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let stage = |name: &str, steps: u64, lr: f64, frozen: &[&str]| StageConfig {
        frozen: Some(frozen.iter().map(|s| s.to_string()).collect()),
        warmup: Some(0),
        checkpoint_every: Some(2),
        ..plain_stage(name, steps, lr)
    };
    let staged = |out: &Path| {
        let mut c = config(data.path(), out);
        c.steps = 0;
        c.lr = 0.0;
        c.stage = vec![
            stage("pretrain", 3, 3e-3, &["vision", "lm"]),
            stage("finetune", 3, 1e-3, &["vision"]),
        ];
        c
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train_stages(&staged(full_dir.path()), &quiet()).unwrap();
    assert_eq!(full.len(), 2);
    let s1 = full_dir.path().join("stage1-pretrain/checkpoint-000003");
    let s2 = full_dir.path().join("stage2-finetune/checkpoint-000003");
    assert_eq!(
        (full[0].checkpoint.clone(), full[1].checkpoint.clone()),
        (s1.clone(), s2.clone())
    );
    // Stage 1 moved only the projector; stage 2 started from it and moved the LM too.
    let load = |d: &Path| fineprune::train::model::TrainModel::from_dir(d).unwrap();
    let (m0, m1, m2) = (load(&fixture()), load(&s1), load(&s2));
    for ((a, b), c) in m0.params.iter().zip(&m1.params).zip(&m2.params) {
        let g = &a.group;
        assert_eq!(
            a.value == b.value,
            !g.starts_with("projector"),
            "stage 1: {}",
            a.name
        );
        if g.starts_with("vision") {
            assert_eq!(b.value, c.value, "stage 2 moved frozen {}", a.name);
        }
    }
    assert!(
        m1.params
            .iter()
            .zip(&m2.params)
            .any(|(b, c)| b.group.starts_with("lm") && b.value != c.value)
    );

    // Interrupted inside stage 2 (global step 4), resumed: identical to uninterrupted.
    let part_dir = tempfile::tempdir().unwrap();
    let cfg = staged(part_dir.path());
    let first = train_stages(
        &cfg,
        &TrainOptions {
            stop_after: Some(4),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[1].end_step, 1);
    let e = train_stages(&cfg, &quiet()).unwrap_err().to_string();
    assert!(e.contains("already holds a training run"), "{e}");
    let rest = train_stages(
        &cfg,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].start_step, rest[0].end_step), (1, 3));
    let a = std::fs::read(s2.join("model.safetensors")).unwrap();
    let b = std::fs::read(
        part_dir
            .path()
            .join("stage2-finetune/checkpoint-000003/model.safetensors"),
    )
    .unwrap();
    assert!(a == b, "resumed stage 2 differs");
    // Everything finished: nothing left.
    assert!(
        train_stages(
            &cfg,
            &TrainOptions {
                resume: true,
                ..quiet()
            }
        )
        .unwrap()
        .is_empty()
    );

    // Stage errors name the stage; top-level steps with stages, bad and repeated names.
    let mut bad = staged(part_dir.path());
    bad.stage[1].lr = 0.0;
    let e = train_stages(&bad, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("`lr`") && e.contains("stage 2 `finetune`"),
        "{e}"
    );
    let mut bad = staged(part_dir.path());
    bad.steps = 5;
    assert!(
        train_stages(&bad, &quiet())
            .unwrap_err()
            .to_string()
            .contains("in each stage")
    );
    let mut bad = staged(part_dir.path());
    bad.stage[1].name = "pretrain".into();
    assert!(
        train_stages(&bad, &quiet())
            .unwrap_err()
            .to_string()
            .contains("names two stages")
    );
    bad.stage[1].name = "a/b".into();
    assert!(
        train_stages(&bad, &quiet())
            .unwrap_err()
            .to_string()
            .contains("letters, digits")
    );
}

#[test]
fn bundled_teacher_recipe_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shapes-teacher.toml");
    let cfg = TrainConfig::from_file(&p).unwrap();
    let shape = cfg.new_model.as_ref().unwrap();
    shape.validate().unwrap();
    assert!(cfg.model.is_none());
    let names: Vec<String> = cfg.stage.iter().map(|s| s.name.clone()).collect();
    assert_eq!(
        names,
        [
            "colour", "shape", "single", "pairs", "pairs2", "full", "full2"
        ]
    );
    let stages = cfg.stages().unwrap();
    assert_eq!(stages.len(), 7);
    // The second pass over the full data takes a fresh order.
    let seeds: Vec<u64> = stages.iter().map(|s| s.seed).collect();
    assert_eq!(seeds, [0, 0, 0, 0, 0, 0, 1]);
    // The tower is pretrained first, and the first stage starts from it.
    assert_eq!(cfg.pretrain_vision.as_ref().unwrap().steps, 7000);
    assert_eq!(stages[0].model.as_ref(), Some(&cfg.vision_dir()));
    // The shape the train bench measures.
    let bench: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/teacher_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(bench["vision_config"]["image_size"], shape.image_size);
    assert_eq!(bench["vision_config"]["patch_size"], shape.patch_size);
    assert_eq!(bench["text_config"]["hidden_size"], shape.hidden_size);
    assert_eq!(bench["text_config"]["num_hidden_layers"], shape.layers);
}

/// The second round's configs parse and chain: each starts from a retrained tower of the run
/// folder, the projector alone first, then the whole language model on the full data.
#[test]
fn second_round_recipe_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, tower, steps) in [
        ("shapes-teacher-adapt.toml", "vision1", 2250),
        ("shapes-teacher-2.toml", "vision2", 2800),
    ] {
        let cfg = TrainConfig::from_file(&root.join("configs").join(file)).unwrap();
        assert!(cfg.new_model.is_none(), "{file}");
        let model = cfg.model.as_ref().unwrap();
        assert!(
            model.ends_with(Path::new("runs/shapes-teacher-2").join(tower)),
            "{file}: {model:?}"
        );
        let names: Vec<&str> = cfg.stage.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["proj", "full"], "{file}");
        let stages = cfg.stages().unwrap();
        assert_eq!(stages.iter().map(|s| s.steps).sum::<u64>(), steps, "{file}");
        assert!(stages[0].frozen.iter().any(|g| g == "lm"), "{file}");
        assert!(!stages[1].frozen.iter().any(|g| g == "lm"), "{file}");
    }
}

/// The third and fourth rounds' configs chain (each from the checkpoint where the previous one
/// was stopped or ended) and ground a language model whose tower stays frozen: the third at layer
/// 1, the fourth's lookup answers at layer 2, then phrases at 1 and answers at 2.
#[test]
fn grounding_rounds_recipe_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ground = |layer, answer_layer| {
        Some(GroundingLoss {
            layer,
            weight: 0.5,
            answer_layer,
        })
    };
    for (file, from, data, steps, grounding) in [
        (
            "shapes-teacher-3a.toml",
            "runs/shapes-teacher-2/final/stage2-full/checkpoint-002700",
            "shapes-teacher-ground-answers",
            2400,
            ground(1, None),
        ),
        (
            "shapes-teacher-3b.toml",
            "runs/shapes-teacher-3/answers/checkpoint-001200",
            "shapes-teacher-ground-both",
            2400,
            ground(1, None),
        ),
        (
            "shapes-teacher-3.toml",
            "runs/shapes-teacher-3/both/checkpoint-000900",
            "shapes-teacher-ground-phrases",
            1800,
            ground(1, None),
        ),
        (
            "shapes-teacher-4a.toml",
            "runs/shapes-teacher-3/final/checkpoint-001800",
            "shapes-teacher-ground-lookups",
            900,
            ground(2, None),
        ),
        (
            "shapes-teacher-4.toml",
            "runs/shapes-teacher-4/lookups/checkpoint-000900",
            "shapes-teacher-ground-positions",
            1500,
            ground(1, Some(2)),
        ),
    ] {
        let cfg = TrainConfig::from_file(&root.join("configs").join(file)).unwrap();
        let model = cfg.model.as_ref().unwrap();
        assert!(model.ends_with(from), "{file}: {model:?}");
        assert!(
            cfg.data.ends_with(Path::new(data).join("train.json")),
            "{file}"
        );
        assert_eq!(cfg.steps, steps, "{file}");
        assert_eq!(cfg.frozen, ["vision"], "{file}");
        assert_eq!(cfg.grounding, grounding, "{file}");
    }
}

/// The fifth round's configs chain (5a from the retrained tower, stopped at 1050 steps; 5b from
/// its 900th full step; 5c from 5b's 600th; 5 from 5c's last stage) and say what each stage
/// trains: the tower frozen until 5c's second stage, then along at half the rate (the whole rate
/// in the second relative-position stage); the relative-position stages on their own data; the
/// answers grounded at layer 2, phrases at 1.
#[test]
fn fifth_round_recipe_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let cfg = |f: &str| TrainConfig::from_file(&root.join(f)).unwrap();
    let r = Path::new("runs/shapes-teacher-5");
    let ground = |weight| {
        Some(GroundingLoss {
            layer: 1,
            weight,
            answer_layer: Some(2),
        })
    };
    // (file, starts from, stages: (name, steps, frozen, vision lr scale, data folder), weight)
    type Stage<'a> = (&'a str, u64, &'a [&'a str], Option<f64>, &'a str);
    let runs: [(&str, PathBuf, Vec<Stage>, f64); 4] = [
        (
            "shapes-teacher-5a.toml",
            r.join("tower"),
            vec![
                (
                    "proj",
                    150,
                    &["vision", "lm"],
                    None,
                    "shapes-teacher-ground-positions",
                ),
                (
                    "full",
                    1800,
                    &["vision"],
                    None,
                    "shapes-teacher-ground-positions",
                ),
            ],
            0.5,
        ),
        (
            "shapes-teacher-5b.toml",
            r.join("fit/stage2-full/checkpoint-000900"),
            vec![("", 1200, &["vision"], None, "shapes-teacher-positions")],
            0.5,
        ),
        (
            "shapes-teacher-5c.toml",
            r.join("positions/checkpoint-000600"),
            vec![
                (
                    "frozen",
                    1200,
                    &["vision"],
                    None,
                    "shapes-teacher-positions",
                ),
                ("along", 600, &[], Some(0.5), "shapes-teacher-positions"),
                ("along2", 900, &[], Some(0.5), "shapes-teacher-positions"),
                ("along3", 900, &[], Some(0.5), "shapes-teacher-positions"),
            ],
            0.5,
        ),
        (
            "shapes-teacher-5.toml",
            r.join("along/stage4-along3/checkpoint-000900"),
            vec![
                ("relpos", 600, &[], Some(0.5), "shapes-teacher-relpos"),
                ("relpos2", 1200, &[], Some(1.0), "shapes-teacher-relpos"),
                ("mixed", 1500, &[], Some(0.5), "shapes-teacher-mixed"),
            ],
            1.0,
        ),
    ];
    for (file, from, want, weight) in runs {
        let c = cfg(file);
        let model = c.model.as_ref().unwrap();
        assert!(model.ends_with(&from), "{file}: {model:?}");
        assert_eq!(c.grounding, ground(weight), "{file}");
        assert_eq!(c.max_len, 640, "{file}");
        let stages = c.stages().unwrap();
        assert_eq!(stages.len(), want.len(), "{file}");
        for (s, (name, steps, frozen, vision, data)) in stages.iter().zip(want) {
            let folder = s.output.file_name().unwrap().to_string_lossy();
            assert!(folder.ends_with(name), "{file}: {:?}", s.output);
            assert_eq!(s.steps, steps, "{file} {name}");
            assert_eq!(s.frozen, frozen, "{file} {name}");
            assert_eq!(s.lr_scale.get("vision").copied(), vision, "{file} {name}");
            let json = Path::new(data).join("train.json");
            assert!(s.data.ends_with(&json), "{file} {name}: {:?}", s.data);
        }
    }
}

/// `[pretrain_vision]` pretrains a new model's tower into `{output}/vision` before the first
/// stage, which starts from it: with the tower frozen, the stage's checkpoint carries exactly the
/// pretrained tower (not the freshly initialised one of `{output}/base`). Resuming keeps the
/// pretraining; a fresh run into the same folder is refused, and so are the table without
/// `[new_model]` and a probe table, before any compute.
#[test]
fn pretrain_vision_table_runs_before_the_first_stage() {
    let exe = env!("CARGO_BIN_EXE_distill");
    let dir = tempfile::tempdir().unwrap();
    let o = export_cli(&dir.path().join("data"), &["--train", "6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let head = "data = \"data/train.json\"\nimage_folder = \"data/images\"\noutput = \"run\"\n\
                batch_size = 2\n";
    let tables = "[pretrain_vision]\nsteps = 3\nbatch_size = 2\nscenes = 8\neval_scenes = 2\n\
                  lr = 1e-2\n\n[[stage]]\nname = \"a\"\nsteps = 2\nlr = 1e-3\nfrozen = [\"vision\"]\n";
    std::fs::write(
        dir.path().join("run.toml"),
        format!("{head}{NEW_MODEL}\n{tables}"),
    )
    .unwrap();
    let train = |resume: bool| {
        let mut c = Command::new(exe);
        c.args(["train", "--quiet", "--config"])
            .arg(dir.path().join("run.toml"));
        if resume {
            c.arg("--resume");
        }
        c.output().unwrap()
    };
    let o = train(false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let run = dir.path().join("run");
    let summary = run.join("vision/vision_pretrain.json");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(
        (s["steps"].as_u64(), s["scenes"].as_u64()),
        (Some(3), Some(8))
    );
    let tensor = |ckpt: &str, key: &str| -> Vec<u8> {
        let bytes = std::fs::read(run.join(ckpt).join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(key).unwrap().data().to_vec()
    };
    let q = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight";
    let stage = "stage1-a/checkpoint-000002";
    assert_eq!(tensor(stage, q), tensor("vision", q));
    assert_ne!(tensor("vision", q), tensor("base", q));
    // The language model did train.
    let lm = "model.language_model.layers.0.mlp.down_proj.weight";
    assert_ne!(tensor(stage, lm), tensor("vision", lm));

    // Resuming a finished run keeps the pretraining; a fresh run is refused.
    let before = std::fs::metadata(&summary).unwrap().modified().unwrap();
    let o = train(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&summary).unwrap().modified().unwrap(),
        before
    );
    let o = train(false);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Without [new_model] there is no new tower to pretrain, and a probe trains none.
    let bad = [
        (
            format!("model = \"run/vision\"\n{head}{tables}"),
            "[new_model]",
        ),
        (
            format!("{head}{NEW_MODEL}\n{tables}")
                .replace("lr = 1e-2\n", "lr = 1e-2\nprobe = true\n"),
            "probe",
        ),
    ];
    for (text, needle) in bad {
        std::fs::write(
            dir.path().join("bad.toml"),
            text.replace("output = \"run\"", "output = \"run2\""),
        )
        .unwrap();
        let o = Command::new(exe)
            .args(["train", "--quiet", "--config"])
            .arg(dir.path().join("bad.toml"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("pretrain_vision") && err.contains(needle),
            "{err}"
        );
        assert!(!dir.path().join("run2").exists());
    }
}

/// The fixture with its weights moved by up to ±0.02 (a seeded pattern), saved in `dir`: a
/// student that shares the fixture's tokenizer and image tokens but not its outputs.
fn perturbed_fixture(dir: &Path) {
    let mut m = fineprune::train::model::TrainModel::from_dir(&fixture()).unwrap();
    let mut state = 99u64;
    for p in &mut m.params {
        for v in p.f32s_mut().unwrap() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            *v += 0.02 * ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
        }
    }
    fineprune::train::checkpoint::save_checkpoint(&m, &fixture(), dir).unwrap();
}

fn distill_table(teacher: &Path) -> DistillConfig {
    DistillConfig {
        logits: Some(LogitsConfig {
            divergence: DivergenceName::ForwardKl,
            beta: 0.5,
            temperature: 0.7,
            weight: 5.0,
            tokens: Tokens::Answer,
            standardize: false,
            cache: None,
        }),
        hidden: Some(HiddenConfig {
            pairs: Pairs::Named("last".into()),
            loss: HiddenLoss::Mse,
            tokens: Tokens::All,
            weight: 1.0,
            shared: false,
            gate: Gating::None,
            deep_first_steps: 0,
        }),
        ..DistillConfig::new(teacher.to_path_buf())
    }
}

#[test]
fn distillation_resumes_bit_for_bit_and_exports_no_projector() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 5);
    let student = tempfile::tempdir().unwrap();
    perturbed_fixture(student.path());
    let cfg = |out: &Path| TrainConfig {
        model: Some(student.path().to_path_buf()),
        distill: Some(distill_table(&fixture())),
        ..config(data.path(), out)
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&cfg(full_dir.path()), &quiet()).unwrap();
    let part_dir = tempfile::tempdir().unwrap();
    let stop = |n| TrainOptions {
        stop_after: Some(n),
        ..quiet()
    };
    train(&cfg(part_dir.path()), &stop(5)).unwrap();
    let resumed = TrainOptions {
        resume: true,
        ..quiet()
    };
    let second = train(&cfg(part_dir.path()), &resumed).unwrap();
    let csv = |d: &Path| std::fs::read_to_string(d.join("losses.csv")).unwrap();
    assert_eq!(csv(full_dir.path()), csv(part_dir.path()));
    let text = csv(full_dir.path());
    println!("{text}");
    assert!(text.starts_with(
        "step,loss,grad_norm,lr,tokens,grounding,kd,hidden,attention,affinity,relational,vision\n"
    ));
    for r in &full.history {
        assert!(r.kd.is_some_and(|k| k > 0.0) && r.hidden.is_some_and(|h| h > 0.0));
    }
    for f in ["loss.svg", "terms.svg", "terms.png"] {
        assert!(full_dir.path().join(f).is_file(), "{f}");
    }
    // Trained on the teacher alone, the student learns it back: the logit loss falls.
    let alone_dir = tempfile::tempdir().unwrap();
    let mut alone = cfg(alone_dir.path());
    let d = alone.distill.as_mut().unwrap();
    (d.ce_weight, d.hidden) = (0.0, None);
    alone.steps = 20;
    let h = train(&alone, &quiet()).unwrap().history;
    let mean = |r: &[fineprune::train::run::StepRecord]| {
        r.iter().map(|r| r.kd.unwrap()).sum::<f32>() / r.len() as f32
    };
    let (first, last) = (mean(&h[..5]), mean(&h[15..]));
    println!("teacher alone: kd {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "{first} -> {last}");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "align.safetensors",
    ] {
        let a = std::fs::read(full.checkpoint.join(f)).unwrap();
        let b = std::fs::read(second.checkpoint.join(f)).unwrap();
        assert!(a == b, "{f} differs between the runs");
    }
    // The exported model holds no projector and loads in the engine.
    let w = fineprune::model::weights::Weights::from_dir(&full.checkpoint).unwrap();
    let names: Vec<String> = w.summary().into_iter().map(|(n, _, _)| n).collect();
    assert!(names.iter().all(|n| !n.contains("align")), "{names:?}");
    let (_, a) = fineprune::io::read_f32_tensor(
        &full.checkpoint.join("align.safetensors"),
        "align.0.linear_1.weight",
    )
    .unwrap();
    assert_eq!(a.len(), 64 * 64);
    fineprune::Model::load(&full.checkpoint).unwrap();
}

/// Vision feature alignment with only the last vision layer trainable, through `train`: the
/// frozen part of the tower (embeddings, `pre_layrnorm`, layer 0) leaves the run bit for bit as
/// it came, the trainable layer and the projector move, the `vision` column is logged and the
/// alignment loss falls; a resumed run equals an uninterrupted one.
#[test]
fn partial_vision_training_with_feature_alignment() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 6);
    let student = tempfile::tempdir().unwrap();
    perturbed_fixture(student.path());
    let cfg = |out: &Path| TrainConfig {
        model: Some(student.path().to_path_buf()),
        vision_trainable_layers: Some(1),
        steps: 12,
        distill: Some(DistillConfig {
            hidden: None,
            vision: Some(VisionAlignConfig {
                loss: HiddenLoss::Mse,
                weight: 20.0,
            }),
            ..distill_table(&fixture())
        }),
        ..config(data.path(), out)
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(&cfg(full_dir.path()), &quiet()).unwrap();
    let v: Vec<f32> = full.history.iter().map(|r| r.vision.unwrap()).collect();
    println!("vision: {v:?}");
    assert!(v[10] + v[11] < 0.8 * (v[0] + v[1]), "{v:?}");
    let before = fineprune::train::model::TrainModel::from_dir(student.path()).unwrap();
    let after = fineprune::train::model::TrainModel::from_dir(&full.checkpoint).unwrap();
    let mut moved = Vec::new();
    for (a, b) in before.params.iter().zip(&after.params) {
        let frozen = a.name.starts_with("model.vision_tower.")
            && !a.name.starts_with("model.vision_tower.encoder.layers.1.");
        if frozen {
            assert!(a.value == b.value, "{} moved", a.name);
        } else if a.value != b.value {
            moved.push(a.name.clone());
        }
    }
    let layer1 = moved
        .iter()
        .filter(|n| n.starts_with("model.vision_tower.encoder.layers.1."))
        .count();
    assert_eq!(layer1, 16, "{moved:?}");
    assert!(moved.iter().any(|n| n.contains("multi_modal_projector")));
    let text = std::fs::read_to_string(full_dir.path().join("losses.csv")).unwrap();
    assert!(text.lines().skip(1).all(|l| !l.ends_with(',')), "{text}");
    // Interrupted after 5 steps and resumed: the same run.
    let part_dir = tempfile::tempdir().unwrap();
    let stop = TrainOptions {
        stop_after: Some(5),
        ..quiet()
    };
    train(&cfg(part_dir.path()), &stop).unwrap();
    let resumed = TrainOptions {
        resume: true,
        ..quiet()
    };
    let second = train(&cfg(part_dir.path()), &resumed).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(full.checkpoint.join(f)).unwrap();
        let b = std::fs::read(second.checkpoint.join(f)).unwrap();
        assert!(a == b, "{f} differs between the runs");
    }
}

#[test]
fn bad_distill_configs_fail_before_any_step() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let out = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        distill: Some(distill_table(&fixture())),
        ..config(data.path(), &out.path().join("run"))
    };
    // A teacher whose tokenizer differs from the student's (one merge less).
    let other = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors.index.json"] {
        std::fs::copy(fixture().join(f), other.path().join(f)).unwrap();
    }
    for e in std::fs::read_dir(fixture()).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("model-") {
            std::fs::copy(e.path(), other.path().join(&n)).unwrap();
        }
    }
    let tok = std::fs::read_to_string(fixture().join("tokenizer.json")).unwrap();
    std::fs::write(
        other.path().join("tokenizer.json"),
        tok.replacen("\"merges\": [", "\"merges\": [ ", 1)
            .replace("  ", " "),
    )
    .unwrap();
    let check_run = |f: &dyn Fn(&mut TrainConfig), want: &str| {
        let mut c = base.clone();
        f(&mut c);
        let e = train(&c, &quiet()).unwrap_err().to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
        assert!(!c.output.join("losses.csv").exists(), "{want}: a step ran");
    };
    let check = |f: &dyn Fn(&mut DistillConfig), want: &str| {
        check_run(&|c: &mut TrainConfig| f(c.distill.as_mut().unwrap()), want)
    };
    let vision = Some(VisionAlignConfig {
        loss: HiddenLoss::Mse,
        weight: 1.0,
    });
    check_run(
        &|c: &mut TrainConfig| {
            c.frozen = vec!["vision".into(), "projector".into()];
            c.distill.as_mut().unwrap().vision = vision.clone();
        },
        "`distill.vision`: aligns the student's image features, but its vision tower and \
         projector are both frozen",
    );
    check_run(
        &|c: &mut TrainConfig| c.vision_trainable_layers = Some(0),
        "`vision_trainable_layers`: must be at least 1",
    );
    check_run(
        &|c: &mut TrainConfig| {
            c.vision_trainable_layers = Some(1);
            c.frozen = vec!["vision.decay".into()];
        },
        "`vision_trainable_layers`: trains vision layers, but frozen names `vision.decay`",
    );
    check_run(
        &|c: &mut TrainConfig| c.vision_trainable_layers = Some(3),
        "`vision_trainable_layers`: is 3 but the vision tower has 2 encoder layers in use",
    );
    check(
        &|d: &mut DistillConfig| {
            d.vision = Some(VisionAlignConfig {
                loss: HiddenLoss::Cosine,
                weight: -2.0,
            })
        },
        "distill.vision.weight",
    );
    check(
        &|d: &mut DistillConfig| d.teacher = data.path().into(),
        "config.json of the teacher",
    );
    check(
        &|d: &mut DistillConfig| d.teacher = reference_dir().join("llava_tied"),
        "image token (id, count) (510, 26) but the student has (510, 25)",
    );
    check(
        &|d: &mut DistillConfig| d.teacher = other.path().into(),
        "different tokenizer.json",
    );
    check(
        &|d: &mut DistillConfig| d.ce_weight = -1.0,
        "`distill.ce_weight`",
    );
    check(
        &|d: &mut DistillConfig| d.logits.as_mut().unwrap().temperature = 0.0,
        "distill.logits.temperature",
    );
    check(
        &|d: &mut DistillConfig| {
            d.ce_weight = 0.0;
            d.logits.as_mut().unwrap().weight = 0.0;
            d.hidden = None;
        },
        "nothing to train",
    );
    check(
        &|d: &mut DistillConfig| d.hidden.as_mut().unwrap().pairs = Pairs::List(vec![[3, 0]]),
        "pair [3, 0] is out of range: the student has 3 layers, the teacher 3",
    );
    check(
        &|d: &mut DistillConfig| d.hidden.as_mut().unwrap().pairs = Pairs::Named("evenly:9".into()),
        "evenly:9 needs 1..=3",
    );
    let attention = |blocks: &[&str]| AttentionConfig {
        blocks: blocks.iter().map(|b| b.to_string()).collect(),
        pairs: Pairs::Named("last".into()),
        weight: 1.0,
    };
    // The published mistake: image queries over answer keys, all masked by causality.
    check(
        &|d: &mut DistillConfig| d.attention = Some(attention(&["answer->image", "image->answer"])),
        "`image->answer` is zero under the causal mask",
    );
    check(
        &|d: &mut DistillConfig| d.attention = Some(attention(&["answer->pixels"])),
        "`answer->pixels` is not `query->key`",
    );
    check(
        &|d: &mut DistillConfig| d.attention = Some(attention(&[])),
        "distill.attention.blocks",
    );
    check(
        &|d: &mut DistillConfig| {
            d.attention = Some(AttentionConfig {
                pairs: Pairs::List(vec![[0, 5]]),
                ..attention(&["answer->image"])
            })
        },
        "`distill.attention.pairs`: pair [0, 5] is out of range",
    );
}

/// A run whose logit targets come from a full-vocabulary teacher cache (`distill cache-teacher`)
/// matches the online teacher step by step (the teacher's rows differ only by f32 grouping), and
/// a cache made for other data is refused before any step.
#[test]
fn cached_teacher_matches_the_online_one() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 6);
    let student = tempfile::tempdir().unwrap();
    perturbed_fixture(student.path());
    let table = DistillConfig {
        hidden: None,
        ..distill_table(&fixture())
    };
    let logits = table.logits.clone().unwrap();
    let cache = data.path().join("teacher.fptc");
    fineprune::train::teacher_cache::write_cache(
        &fixture(),
        &data.path().join("train.json"),
        &data.path().join("images"),
        &logits,
        512,
        2048,
        &cache,
        false,
    )
    .unwrap();
    let cfg = |out: &Path, cache: Option<PathBuf>| {
        let mut d = table.clone();
        d.logits.as_mut().unwrap().cache = cache;
        TrainConfig {
            model: Some(student.path().to_path_buf()),
            distill: Some(d),
            steps: 6,
            ..config(data.path(), out)
        }
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let online = train(&cfg(a.path(), None), &quiet()).unwrap().history;
    let cached = train(&cfg(b.path(), Some(cache.clone())), &quiet())
        .unwrap()
        .history;
    for (o, c) in online.iter().zip(&cached) {
        let (ko, kc) = (o.kd.unwrap(), c.kd.unwrap());
        println!("step {}: kd online {ko:.6} cached {kc:.6}", o.step);
        assert!(
            (ko - kc).abs() <= 1e-4 * ko.abs(),
            "step {}: {ko} vs {kc}",
            o.step
        );
    }
    // The cache was made from another json: refused, naming the setting, before any step.
    let other = tempfile::tempdir().unwrap();
    export(other.path(), 3);
    let mut c = cfg(&other.path().join("run"), Some(cache));
    c.data = other.path().join("train.json");
    c.image_folder = other.path().join("images");
    let e = train(&c, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("distill.logits.cache") && e.contains("data"),
        "{e}"
    );
    assert!(!other.path().join("run/losses.csv").exists());
}

/// Rows of `losses.csv` in `out` after the header (none when the file is absent).
fn loss_rows(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("losses.csv"))
        .map(|t| t.lines().skip(1).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Two runs started on one output folder: the second is refused while the first holds it
/// (naming its pid), and the first keeps every row of `losses.csv` (before the lock, the second's
/// rewrite of the file lost the first one's rows).
#[test]
fn a_second_run_on_a_held_folder_is_refused_and_every_row_kept() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    (cfg.steps, cfg.grad_accum, cfg.checkpoint_every) = (60, 1, 0);
    let first = {
        let cfg = cfg.clone();
        std::thread::spawn(move || train(&cfg, &quiet()))
    };
    // Once the first run logged a step, it is mid-run and holds the folder.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while loss_rows(out.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run logged no step"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let e = train(&cfg, &quiet()).unwrap_err().to_string();
    let first = first.join().unwrap().unwrap();
    // Refused by the lock while the first run holds the folder; on a machine fast enough to
    // finish 59 steps before the second run reaches the lock, by the finished run's latest.json
    // instead (the held-lock refusal itself is also checked deterministically below, in
    // `a_dead_runs_lock_is_taken_over_and_its_temporary_files_removed`). Either way nothing of
    // the first run is lost.
    assert!(
        (e.contains("is in use by another training run")
            && e.contains(&format!("pid {}", std::process::id())))
            || e.contains("already holds a training run"),
        "{e}"
    );
    assert_eq!(first.history.len(), 60);
    let rows = loss_rows(out.path());
    let steps: Vec<&str> = rows.iter().map(|r| r.split(',').next().unwrap()).collect();
    let want: Vec<String> = (1..=60).map(|s| s.to_string()).collect();
    assert_eq!(steps, want, "losses.csv lost rows");
    assert!(
        !out.path().join("train.lock").exists(),
        "the lock outlived the run"
    );
}

/// A lock left by a dead run (no process holds it) is taken over and the temporary files that a
/// kill mid-write left are removed; a held lock refuses a run, and an error releases the lock.
#[test]
fn a_dead_runs_lock_is_taken_over_and_its_temporary_files_removed() {
    use fineprune::train::lock::{LOCK_FILE, RunLock};
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    (cfg.steps, cfg.grad_accum, cfg.checkpoint_every) = (4, 1, 0);
    let stop = |step| TrainOptions {
        stop_after: Some(step),
        ..quiet()
    };
    let resume = TrainOptions {
        resume: true,
        ..quiet()
    };
    train(&cfg, &stop(2)).unwrap();
    let o = out.path();
    // What a run killed mid-save leaves: its lock (a pid above Linux's pid_max) and temporaries.
    std::fs::write(o.join(LOCK_FILE), "pid=4194304\nhost=x\nstarted=0\n").unwrap();
    let temps = [
        o.join(".latest.json.tmp4194304"),
        o.join("checkpoint-000002/.model.safetensors.tmp77"),
        o.join(".losses.csv.tmp1"),
    ];
    let keep = [
        o.join("notes.tmp1"),
        o.join(".notes.tmpx"),
        o.join(".tmp12"),
    ];
    for p in temps.iter().chain(&keep) {
        std::fs::write(p, b"partial").unwrap();
    }
    // A live holder refuses the run, naming its pid, and leaves the folder as it was.
    let held = RunLock::acquire(o).unwrap();
    let e = train(&cfg, &resume).unwrap_err().to_string();
    assert!(
        e.contains("in use by another training run")
            && e.contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(temps.iter().all(|p| !p.exists()), "the holder cleans up");
    drop(held);
    assert!(!o.join(LOCK_FILE).exists());
    for p in &temps {
        std::fs::write(p, b"partial").unwrap();
    }
    std::fs::write(o.join(LOCK_FILE), "pid=4194304\n").unwrap();
    let s = train(&cfg, &resume).unwrap();
    assert_eq!((s.start_step, s.end_step), (2, 4));
    for p in &temps {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    for p in &keep {
        assert!(p.exists(), "{} removed", p.display());
    }
    assert!(!o.join(LOCK_FILE).exists());
    // An error after the lock was taken releases it too.
    let e = train(&cfg, &quiet()).unwrap_err().to_string();
    assert!(e.contains("already holds a training run"), "{e}");
    assert!(!o.join(LOCK_FILE).exists());
}

/// A checkpoint with a NaN weight resumed: the run stops at the first step with an error naming
/// the step, the loss and the samples, and writes nothing (latest.json, losses.csv and the
/// checkpoints stay as they were).
#[test]
fn resuming_from_nan_weights_stops_and_writes_nothing() {
    use fineprune::io::{OutTensor, write_safetensors};
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    (cfg.steps, cfg.checkpoint_every) = (6, 3);
    let first = train(
        &cfg,
        &TrainOptions {
            stop_after: Some(3),
            ..quiet()
        },
    )
    .unwrap();
    let weights = first.checkpoint.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let norm = tensors
        .iter_mut()
        .find(|t| t.0 == "model.language_model.norm.weight")
        .unwrap();
    norm.2[0] = f32::NAN;
    let views: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, s, v)| OutTensor::F32(n, s.clone(), v))
        .collect();
    write_safetensors(&weights, &views).unwrap();

    let snapshot = || {
        let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let mut dirs = vec![out.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    dirs.push(e.path());
                } else {
                    files.push((e.path(), std::fs::read(e.path()).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let before = snapshot();
    let e = train(
        &cfg,
        &TrainOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("loss is NaN") && e.contains("step 4, micro-batch 1 of 2, samples [\""),
        "{e}"
    );
    assert!(
        snapshot() == before,
        "the failed resume changed the output folder"
    );
}

/// `latest.json` names only a checkpoint folder inside the output folder: not `..`, not an
/// absolute path, not a symbolic link, even to a valid checkpoint.
#[test]
fn latest_json_cannot_lead_outside_the_output_folder() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let mut cfg = config(data.path(), &out);
    (cfg.steps, cfg.grad_accum, cfg.checkpoint_every) = (4, 1, 0);
    train(
        &cfg,
        &TrainOptions {
            stop_after: Some(2),
            ..quiet()
        },
    )
    .unwrap();
    let ckpt = out.join("checkpoint-000002");
    // A valid checkpoint outside the run.
    let stolen = root.path().join("stolen");
    std::fs::create_dir(&stolen).unwrap();
    for e in std::fs::read_dir(&ckpt).unwrap().flatten() {
        std::fs::copy(e.path(), stolen.join(e.file_name())).unwrap();
    }
    let latest = out.join("latest.json");
    let original = std::fs::read_to_string(&latest).unwrap();
    let resume = || {
        train(
            &cfg,
            &TrainOptions {
                resume: true,
                ..quiet()
            },
        )
    };
    for name in [
        "../stolen",
        stolen.to_str().unwrap(),
        "checkpoint-000002/..",
    ] {
        let j = serde_json::json!({"checkpoint": name, "step": 2});
        std::fs::write(&latest, j.to_string()).unwrap();
        let e = resume().unwrap_err().to_string();
        assert!(e.contains("latest.json") && e.contains(name), "{name}: {e}");
    }
    std::fs::write(&latest, &original).unwrap();
    // The checkpoint folder replaced by a link to the copy outside.
    let moved = root.path().join("moved");
    std::fs::rename(&ckpt, &moved).unwrap();
    std::os::unix::fs::symlink(&stolen, &ckpt).unwrap();
    let e = resume().unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    std::fs::remove_file(&ckpt).unwrap();
    std::fs::rename(&moved, &ckpt).unwrap();
    assert_eq!(resume().unwrap().end_step, 4);
}

/// On resume only `steps`, `checkpoint_every` and paths may change; any other change is refused
/// listing every changed key with its old and new value, and writes nothing.
#[test]
fn resume_refuses_changed_settings_but_may_extend_the_run() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 4);
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), out.path());
    (cfg.steps, cfg.grad_accum, cfg.checkpoint_every) = (6, 1, 0);
    train(
        &cfg,
        &TrainOptions {
            stop_after: Some(3),
            ..quiet()
        },
    )
    .unwrap();
    let resume = TrainOptions {
        resume: true,
        ..quiet()
    };
    let more = tempfile::tempdir().unwrap();
    export(more.path(), 5);
    let refused = |f: &dyn Fn(&mut TrainConfig), want: &[&str]| {
        let mut c = cfg.clone();
        f(&mut c);
        let e = train(&c, &resume).unwrap_err().to_string();
        for w in want {
            assert!(e.contains(w), "expected `{w}` in: {e}");
        }
        assert_eq!(loss_rows(out.path()).len(), 3);
    };
    refused(&|c| c.lr = 1e-3, &["`lr`", "lr 0.003 -> 0.001"]);
    refused(
        &|c| {
            c.lr = 1e-3;
            c.warmup = 3;
            c.frozen = vec!["vision".into()];
        },
        &[
            "`frozen, lr, warmup`",
            "warmup 2 -> 3",
            "frozen [] -> [\"vision\"]",
        ],
    );
    refused(&|c| c.batch_size = 1, &["batch_size 2 -> 1"]);
    refused(&|c| c.max_grad_norm = None, &["max_grad_norm 1.0 -> null"]);
    refused(
        &|c| c.lr_scale = [("projector".to_string(), 2.0)].into(),
        &["lr_scale.projector (unset) -> 2.0"],
    );
    refused(
        &|c| {
            c.data = more.path().join("train.json");
            c.image_folder = more.path().join("images");
        },
        &["data.samples 4 -> 5"],
    );
    // Extending the run and changing the checkpoint cadence is allowed.
    let mut longer = cfg.clone();
    (longer.steps, longer.checkpoint_every) = (8, 2);
    let s = train(&longer, &resume).unwrap();
    assert_eq!((s.start_step, s.end_step), (3, 8));
}

/// LLaVA data mixes text-only samples with image samples: both train, in one batch and alone.
#[test]
fn text_only_samples_train_beside_image_samples() {
    let data = tempfile::tempdir().unwrap();
    export(data.path(), 2);
    let json = data.path().join("train.json");
    let mut list: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for (i, (q, a)) in [
        ("What is two plus two?", "Four."),
        ("Name a colour.", "Red."),
    ]
    .iter()
    .enumerate()
    {
        list.push(
            serde_json::json!({"id": format!("text-{i}"), "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": a}]}),
        );
    }
    std::fs::write(&json, serde_json::to_string(&list).unwrap()).unwrap();
    // All four in one batch, then one at a time (text-only batches have no image at all).
    for (batch_size, steps) in [(4, 2), (1, 4)] {
        let out = tempfile::tempdir().unwrap();
        let mut cfg = config(data.path(), out.path());
        (cfg.batch_size, cfg.grad_accum, cfg.steps) = (batch_size, 1, steps);
        (cfg.warmup, cfg.checkpoint_every) = (0, 0);
        let s = train(&cfg, &quiet()).unwrap();
        assert_eq!(s.history.len(), steps as usize);
        assert!(s.history.iter().all(|r| r.loss.is_finite() && r.loss > 0.0));
        let a = fineprune::train::model::TrainModel::from_dir(&fixture()).unwrap();
        let b = fineprune::train::model::TrainModel::from_dir(&s.checkpoint).unwrap();
        let moved = |g: &str| {
            a.params
                .iter()
                .zip(&b.params)
                .any(|(p, q)| p.group.starts_with(g) && p.value != q.value)
        };
        assert!(moved("vision") && moved("lm"), "batch {batch_size}");
    }
}

/// A transformers-5 checkpoint keeps its image processor in `processor_config.json` (no
/// `preprocessor_config.json`): training reads it there, as `Model::load` does, instead of
/// falling back to CLIP's 336 px and failing on every image with a shape error.
#[test]
fn a_transformers_5_checkpoint_trains_with_its_own_image_processor() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    export(&data, 4);
    let tied = reference_dir().join("llava_tied");
    assert!(!tied.join("preprocessor_config.json").exists());
    let cfg = TrainConfig {
        model: Some(tied),
        steps: 2,
        grad_accum: 1,
        ..config(&data, &dir.path().join("run"))
    };
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!(s.end_step, 2);
    assert!(
        s.history.iter().all(|r| r.loss.is_finite()),
        "{:?}",
        s.history
    );
}
