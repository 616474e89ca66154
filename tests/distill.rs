//! The training loop and the `distill` CLI on the tiny llava_gqa fixture with ShapesVQA samples
//! exported at its image size (30): the loss falls, an interrupted + resumed run equals an
//! uninterrupted one bit for bit, bad configs fail before any step, checkpoints load in the engine.

mod common;

use common::reference_dir;
use fineprune::bench::shapes::{ShapesConfig, Split, export_llava_train, generate};
use fineprune::train::run::{TrainConfig, TrainOptions, train};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    reference_dir().join("llava_gqa")
}

/// Exports `n` ShapesVQA training samples into `dir` (train.json + images/).
fn export(dir: &Path, n: usize) {
    let samples = generate(Split::Train, n, 3, &ShapesConfig::default()).unwrap();
    export_llava_train(&samples, dir, 30).unwrap();
}

fn config(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixture(),
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
        max_grad_norm: Some(1.0),
        frozen: vec![],
        checkpoint_every: 3,
        max_len: 2048,
    }
}

fn quiet() -> TrainOptions {
    TrainOptions::default()
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
    check(with(&|c| c.grad_accum = 0), quiet(), "`grad_accum`");
    check(with(&|c| c.lr = -1.0), quiet(), "`lr`");
    check(with(&|c| c.lr = f64::NAN), quiet(), "`lr`");
    check(with(&|c| c.warmup = 11), quiet(), "`warmup`");
    check(with(&|c| c.min_lr_ratio = 1.5), quiet(), "`min_lr_ratio`");
    check(with(&|c| c.weight_decay = -0.1), quiet(), "`weight_decay`");
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
        with(&|c| c.model = data.path().to_path_buf()),
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
