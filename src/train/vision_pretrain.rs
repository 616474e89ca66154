//! Vision pretraining on ShapesVQA's patch labels: for a LLaVA trained from scratch, the stand-in
//! of the CLIP pretraining a real LLaVA starts from (`distill pretrain-vision`).
//!
//! Trained through the language model alone, a from-scratch vision tower learns colour within a
//! few hundred steps but no shape in thousands: the answer token's gradient reaches the patches
//! only through attention, one token per question. Here every shape of every image is a labelled
//! example: its patches' selected features (the projector's input) are pooled with the share of
//! its pixels each patch holds ([`Scene::shape_patches`]), as the language model's attention
//! pools them, and a linear head predicts shape (7), colour (8) and size class (3) from the pool:
//!
//! ```text
//! f_o = Σ_p w_op · f_p,   z = W·f_o + b,   L = Σ_task (1/O) Σ_o (logsumexp(z_task) − z_task[y_o])
//! ```
//!
//! Only the vision tower (and the head, dropped at export) trains; the projector and language
//! model are written back unchanged. Scenes come from the ShapesVQA generator (train split,
//! seeded) and are rendered at the model's resolution and preprocessed as its processor says;
//! test-split scenes measure per-shape accuracy before and after.

use super::checkpoint::save_checkpoint;
use super::data::Loader;
use super::model::{TrainModel, init_values};
use super::optim::{AdamW, GroupConfig, Param, Schedule, decay_group, zero_grads};
use crate::bench::shapes::{self, Color, Scene, Shape, ShapesConfig, Size, Split};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::image::ImageProcessorConfig;
use crate::ops::loss::cross_entropy;
use crate::ops::matmul::{linear_backward, matmul_nt};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Classes per task (the last one of each is "none"): shape, colour, size.
pub const CLASSES: [usize; 3] = [
    Shape::ALL.len() + 1,
    Color::ALL.len() + 1,
    Size::ALL.len() + 1,
];
/// The summary file a finished run writes last (settings and accuracy before and after).
pub const SUMMARY_FILE: &str = "vision_pretrain.json";

/// Task names, in [`CLASSES`] order.
pub const TASKS: [&str; 3] = ["shape", "color", "size"];

/// Settings of a pretraining run (also the `[pretrain_vision]` table of a training config, where
/// `shapes` comes from the settings beside the data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW, linear warm-up then cosine to 0).
    pub lr: f64,
    pub warmup: u64,
    /// Decoupled weight decay of weight matrices (none on norms and biases).
    pub weight_decay: f64,
    /// Seed of the training scenes, the data order and the head's initialisation.
    pub seed: u64,
    /// Distinct training scenes (visited in seeded epochs).
    pub scenes: usize,
    /// Held-out test-split scenes for the accuracy report.
    pub eval_scenes: usize,
    /// ShapesVQA settings of the scenes.
    #[serde(skip)]
    pub shapes: ShapesConfig,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: 1000,
            batch_size: 16,
            lr: 1e-3,
            warmup: 50,
            weight_decay: 0.05,
            seed: 0,
            scenes: 20000,
            eval_scenes: 200,
            shapes: ShapesConfig::default(),
        }
    }
}

impl PretrainConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.scenes == 0 {
            return Err(Error::arg(
                "pretrain-vision",
                "steps, batch size and scenes must be at least 1",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::arg(
                "lr",
                format!("must be finite and > 0, got {}", self.lr),
            ));
        }
        self.shapes.validate()
    }
}

/// Per-task accuracy over held-out shapes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ShapeAccuracy {
    pub shape: f64,
    pub color: f64,
    pub size: f64,
    /// Shapes scored.
    pub shapes: usize,
}

/// One labelled shape of an image: class indices per task ([`CLASSES`] order) and its patches
/// with pooling weights (patch indices within the image).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeTarget {
    pub classes: [i64; 3],
    pub patches: Vec<(usize, f32)>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    /// Held-out accuracy of the freshly initialised head on the input tower (a linear probe
    /// would do better; this is the starting point of the run).
    pub before: ShapeAccuracy,
    /// Held-out accuracy after training.
    pub after: ShapeAccuracy,
    /// Loss of every step.
    pub losses: Vec<f32>,
}

/// The labelled shapes of one scene.
pub fn targets(scene: &Scene, image_size: u32, patch_size: u32) -> Vec<ShapeTarget> {
    let idx = |i: Option<usize>| i.unwrap_or(0) as i64;
    scene
        .shape_patches(image_size, patch_size)
        .into_iter()
        .map(|o| ShapeTarget {
            classes: [
                idx(Shape::ALL.iter().position(|&x| x == o.shape)),
                idx(Color::ALL.iter().position(|&x| x == o.color)),
                idx(Size::ALL.iter().position(|&x| x == o.size)),
            ],
            patches: o.patches,
        })
        .collect()
}

/// The linear head: `W` `[Σ CLASSES, width]` and `b`, initialised `N(0, 0.02)`-like from `seed`.
pub fn new_head(width: usize, seed: u64) -> Vec<Param> {
    let out: usize = CLASSES.iter().sum();
    let mut state = seed ^ 0x5eed_7a11_c0ff_ee00;
    let w = init_values("head.weight", &[out, width], 0.02, &mut state);
    vec![
        Param::new("head.weight", decay_group("head", "head.weight"), w),
        Param::new(
            "head.bias",
            decay_group("head", "head.bias"),
            vec![0.0; out],
        ),
    ]
}

/// Logits `[rows, Σ CLASSES]` of the head over features `[rows, width]`.
fn head_logits(head: &[Param], feats: &[f32], width: usize) -> Vec<f32> {
    let out: usize = CLASSES.iter().sum();
    let rows = feats.len() / width;
    let mut z = vec![0.0f32; rows * out];
    matmul_nt(
        rows,
        out,
        width,
        feats,
        width,
        &head[0].value,
        width,
        &mut z,
        true,
    );
    for r in z.chunks_mut(out) {
        crate::ops::add(r, &head[1].value);
    }
    z
}

/// Pooled features `[shapes, width]` of every image's shapes, in order.
fn pool(feats: &[f32], width: usize, tokens: usize, targets: &[Vec<ShapeTarget>]) -> Vec<f32> {
    let mut pooled = Vec::new();
    for (i, shapes) in targets.iter().enumerate() {
        for t in shapes {
            let mut f = vec![0.0f32; width];
            for &(p, w) in &t.patches {
                let row = &feats[(i * tokens + p) * width..(i * tokens + p + 1) * width];
                f.iter_mut().zip(row).for_each(|(a, &x)| *a += w * x);
            }
            pooled.extend(f);
        }
    }
    pooled
}

/// Runs the batch (`targets[i]`: the shapes of image `i`) and returns its loss; with
/// `backward`, accumulates its gradient into the head's and the vision tower's `grad`.
pub fn shape_loss(
    model: &mut TrainModel,
    head: &mut [Param],
    pixels: &[&[f32]],
    targets: &[Vec<ShapeTarget>],
    backward: bool,
) -> Result<f32> {
    let tokens = model.config.image_tokens();
    if targets.len() != pixels.len() {
        return Err(Error::Shape {
            name: "shape targets".into(),
            expected: vec![pixels.len()],
            got: vec![targets.len()],
        });
    }
    if let Some(&(p, _)) = targets
        .iter()
        .flatten()
        .flat_map(|t| &t.patches)
        .find(|(p, _)| *p >= tokens)
    {
        return Err(Error::arg(
            "shape targets",
            format!("patch {p} is outside the {tokens} image tokens"),
        ));
    }
    let feats = model.vision_forward(pixels)?;
    let width = model.feature_width();
    let pooled = pool(&feats, width, tokens, targets);
    let out: usize = CLASSES.iter().sum();
    let z = head_logits(head, &pooled, width);
    let mut dz = vec![0.0f32; z.len()];
    let mut loss = 0.0;
    let mut off = 0;
    for (t, &k) in CLASSES.iter().enumerate() {
        let zt: Vec<f32> = z
            .chunks(out)
            .flat_map(|r| r[off..off + k].to_vec())
            .collect();
        let yt: Vec<i64> = targets.iter().flatten().map(|s| s.classes[t]).collect();
        let (l, g) = cross_entropy(&zt, k, &yt, -100)?;
        loss += l;
        for (dr, gr) in dz.chunks_mut(out).zip(g.chunks(k)) {
            dr[off..off + k].copy_from_slice(gr);
        }
        off += k;
    }
    if backward {
        let (mut dw, mut db) = (
            std::mem::take(&mut head[0].grad),
            std::mem::take(&mut head[1].grad),
        );
        let dpooled = linear_backward(&pooled, &head[0].value, width, &dz, &mut dw, Some(&mut db));
        head[0].grad = dw;
        head[1].grad = db;
        let dpooled = dpooled?;
        let mut dfeats = vec![0.0f32; feats.len()];
        let mut rows = dpooled.chunks(width);
        for (i, shapes) in targets.iter().enumerate() {
            for (t, d) in shapes.iter().zip(&mut rows) {
                for &(p, w) in &t.patches {
                    let row = &mut dfeats[(i * tokens + p) * width..(i * tokens + p + 1) * width];
                    row.iter_mut().zip(d).for_each(|(a, &g)| *a += w * g);
                }
            }
        }
        model.vision_backward(&dfeats)?;
    }
    Ok(loss)
}

/// Held-out per-task accuracy over every shape.
fn accuracy(
    model: &mut TrainModel,
    head: &[Param],
    pixels: &[Vec<f32>],
    targets: &[Vec<ShapeTarget>],
) -> Result<ShapeAccuracy> {
    let out: usize = CLASSES.iter().sum();
    let width = model.feature_width();
    let tokens = model.config.image_tokens();
    let (mut right, mut n) = ([0usize; 3], 0usize);
    for (px, tg) in pixels.chunks(16).zip(targets.chunks(16)) {
        let refs: Vec<&[f32]> = px.iter().map(|p| p.as_slice()).collect();
        let feats = model.vision_forward(&refs)?;
        let z = head_logits(head, &pool(&feats, width, tokens, tg), width);
        for (row, t) in z.chunks(out).zip(tg.iter().flatten()) {
            n += 1;
            let mut off = 0;
            for (task, &k) in CLASSES.iter().enumerate() {
                let zt = &row[off..off + k];
                let best = (0..k).max_by(|&a, &b| zt[a].total_cmp(&zt[b])).unwrap_or(0);
                right[task] += usize::from(best as i64 == t.classes[task]);
                off += k;
            }
        }
    }
    let frac = |r: usize| if n == 0 { 0.0 } else { r as f64 / n as f64 };
    Ok(ShapeAccuracy {
        shape: frac(right[0]),
        color: frac(right[1]),
        size: frac(right[2]),
        shapes: n,
    })
}

/// Pixel values and labelled shapes of a list of scenes.
type Rendered = (Vec<Vec<f32>>, Vec<Vec<ShapeTarget>>);

/// Pixel values and labelled shapes of scenes, rendered and preprocessed in parallel.
fn render(
    scenes: &[&Scene],
    proc: &ImageProcessorConfig,
    image_size: u32,
    patch_size: u32,
) -> Result<Rendered> {
    let done: Vec<Result<(Vec<f32>, Vec<ShapeTarget>)>> = scenes
        .par_iter()
        .map(|s| {
            let px = proc.preprocess(&s.render(image_size))?.into_f32_vec();
            Ok((px, targets(s, image_size, patch_size)))
        })
        .collect();
    done.into_iter()
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}

/// Pretrains the vision tower of the LLaVA checkpoint `model_dir` and writes the model to `out`
/// (a checkpoint like `distill train`'s, projector and language model unchanged) with
/// `losses.csv` and `vision_pretrain.json` (the summary). `on_step(step, loss)` runs after each
/// step (a progress bar).
pub fn pretrain_vision(
    model_dir: &Path,
    out: &Path,
    cfg: &PretrainConfig,
    on_step: &dyn Fn(u64, f32),
) -> Result<PretrainSummary> {
    cfg.validate()?;
    let mut model = TrainModel::from_dir(model_dir)?;
    let vc = model.config.vision.clone();
    let (image_size, patch_size) = (vc.image_size as u32, vc.patch_size as u32);
    if model.config.image_tokens() != vc.grid() * vc.grid() {
        return Err(Error::arg(
            "model",
            "pretrain-vision needs one image token per patch (select strategy `default`)",
        ));
    }
    let pp = model_dir.join("preprocessor_config.json");
    let proc = if pp.is_file() {
        ImageProcessorConfig::from_preprocessor_config(&pp)?
    } else {
        ImageProcessorConfig::default()
    };
    let train: Vec<Scene> = shapes::generate(Split::Train, cfg.scenes, cfg.seed, &cfg.shapes)?
        .into_iter()
        .map(|s| s.scene)
        .collect();
    let held_out: Vec<Scene> =
        shapes::generate(Split::Test, cfg.eval_scenes, cfg.seed, &cfg.shapes)?
            .into_iter()
            .map(|s| s.scene)
            .collect();
    let (eval_px, eval_labels) = render(
        &held_out.iter().collect::<Vec<_>>(),
        &proc,
        image_size,
        patch_size,
    )?;

    // Only the vision tower trains: the other parameters hold no gradient buffer.
    for p in model.params.iter_mut() {
        if !p.group.starts_with("vision") {
            p.grad = Vec::new();
        }
    }
    let groups = |prefixes: &[&str], frozen: &[&str]| -> Vec<GroupConfig> {
        prefixes
            .iter()
            .flat_map(|g| {
                [
                    (format!("{g}.decay"), cfg.weight_decay),
                    (format!("{g}.no_decay"), 0.0),
                ]
            })
            .map(|(name, wd)| {
                if frozen.iter().any(|f| name.starts_with(f)) {
                    GroupConfig::frozen(name)
                } else {
                    GroupConfig::new(name, wd)
                }
            })
            .collect()
    };
    let schedule = Schedule::new(cfg.warmup, cfg.steps, 0.0)?;
    let mut opt = AdamW::new(
        cfg.lr,
        groups(&["vision", "projector", "lm"], &["projector", "lm"]),
    )?
    .with_schedule(schedule);
    let mut head = new_head(model.feature_width(), cfg.seed);
    let mut head_opt = AdamW::new(cfg.lr, groups(&["head"], &[]))?.with_schedule(schedule);

    let before = accuracy(&mut model, &head, &eval_px, &eval_labels)?;
    let mut loader = Loader::new(train.len(), cfg.batch_size, cfg.seed)?;
    let mut losses = Vec::with_capacity(cfg.steps as usize);
    for step in 0..cfg.steps {
        let (_, idx) = loader.next_batch();
        let scenes: Vec<&Scene> = idx.iter().map(|&i| &train[i]).collect();
        let (px, targets) = render(&scenes, &proc, image_size, patch_size)?;
        let refs: Vec<&[f32]> = px.iter().map(|p| p.as_slice()).collect();
        let loss = shape_loss(&mut model, &mut head, &refs, &targets, true)?;
        if !loss.is_finite() {
            return Err(Error::arg(
                "pretrain-vision",
                format!("loss is {loss} at step {step}"),
            ));
        }
        opt.step(&mut model.params)?;
        head_opt.step(&mut head)?;
        zero_grads(&mut model.params);
        zero_grads(&mut head);
        losses.push(loss);
        on_step(step + 1, loss);
    }
    let after = accuracy(&mut model, &head, &eval_px, &eval_labels)?;

    save_checkpoint(&model, model_dir, out)?;
    let mut csv = String::from("step,loss\n");
    for (i, l) in losses.iter().enumerate() {
        csv.push_str(&format!("{},{l}\n", i + 1));
    }
    write_atomic(&out.join("losses.csv"), csv.as_bytes())?;
    let summary = PretrainSummary {
        before,
        after,
        losses,
    };
    let mut json = serde_json::to_value(cfg).expect("settings serialize");
    json["before"] = serde_json::json!(before);
    json["after"] = serde_json::json!(after);
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| Error::arg("summary", e.to_string()))?;
    write_atomic(&out.join(SUMMARY_FILE), text.as_bytes())?;
    Ok(summary)
}
