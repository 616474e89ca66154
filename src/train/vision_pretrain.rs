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
//! With `patch_weight` λ > 0 the same head also reads every patch on its own, labelled with the
//! shape covering most of it ([`patch_labels`], "none" for background): `L += λ Σ_task (1/P)
//! Σ_p CE(W·f_p + b, y_p)`. The pooled loss asks only that a shape's patches name it together;
//! the question's attention has to find "the circle" patch by patch. With `position_weight` μ > 0
//! a second linear head reads every patch's row and column (`grid` classes each) off its
//! features, `L += μ (CE_row + CE_col)`, so they also say where the patch lies ("Is the circle to
//! the left of the star?"). Background patches satisfy that loss from the tower's position
//! embeddings alone, while a shape's patches are free to trade where they are for what they show;
//! with `shape_position_weight` ν > 0 the same position head also reads each shape's pooled
//! features and names the cell of its centre ([`ShapeTarget::cell`]), `L += ν (CE_row +
//! CE_col)`: what an answer pooling "the circle"'s patches by attention has to compare.
//!
//! Only the vision tower (and the head, dropped at export) trains; the projector and language
//! model are written back unchanged. Scenes come from the ShapesVQA generator (train split,
//! seeded) and are rendered at the model's resolution and preprocessed as its processor says;
//! test-split scenes measure per-shape accuracy before and after.

use super::checkpoint::save_checkpoint;
use super::data::Loader;
use super::model::{TrainModel, init_values};
use super::optim::{AdamW, GroupConfig, Schedule, decay_group, zero_grads};
use crate::bench::shapes::{self, Color, Scene, Shape, ShapePatches, ShapesConfig, Size, Split};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::image::ImageProcessorConfig;
use crate::model::nn::{Linear, Param};
use crate::ops::loss::cross_entropy;
use crate::tensor::Tensor;
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

/// Most training scenes of a pretraining run (`scenes`): each is generated and held before the
/// first step.
pub const MAX_SCENES: usize = 1_000_000;
/// Most held-out scenes (`eval_scenes`): they are rendered and held as pixels for the whole run
/// (2.7 GB at 336 pixels).
pub const MAX_EVAL_SCENES: usize = 2_000;

/// Settings of a pretraining run (also the `[pretrain_vision]` table of a training config, where
/// `shapes` comes from the settings beside the data). `scenes` is at most [`MAX_SCENES`],
/// `eval_scenes` at most [`MAX_EVAL_SCENES`], `batch_size` at most `scenes`.
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
    /// Weight of the per-patch loss ([`patch_labels`]) beside the pooled one (0: pooled only).
    pub patch_weight: f64,
    /// Weight of the per-patch position loss: a second linear head reads each patch's row and
    /// column off its features, so they say where in the image the patch is (0: none).
    pub position_weight: f64,
    /// Weight of the pooled position loss: the position head also reads each shape's pooled
    /// features and names the row and column of its centre (0: none).
    pub shape_position_weight: f64,
    /// Factor the tower's position embeddings are multiplied by before training (1: as loaded).
    /// A from-scratch tower's patch embeddings come out ~40× the norm of its position
    /// embeddings, so after `pre_layrnorm` a shape's patches keep almost none of their place
    /// (linear read-out R² 0.05 for their column on the fourth-round model, against 0.80 on
    /// uniform background), and no position loss recovers it at a usable rate.
    pub position_scale: f64,
    /// Train the head alone, the tower frozen: a linear probe of what the tower's features
    /// already say (the written checkpoint is the input one).
    pub probe: bool,
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
            patch_weight: 0.0,
            position_weight: 0.0,
            shape_position_weight: 0.0,
            position_scale: 1.0,
            probe: false,
            shapes: ShapesConfig::default(),
        }
    }
}

impl PretrainConfig {
    /// The run's [`LossWeights`].
    pub fn loss_weights(&self) -> LossWeights {
        LossWeights {
            patch: self.patch_weight as f32,
            position: self.position_weight as f32,
            shape_position: self.shape_position_weight as f32,
        }
    }

    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.scenes == 0 {
            return Err(Error::arg(
                "pretrain-vision",
                "steps, batch size and scenes must be at least 1",
            ));
        }
        for (name, n, max) in [
            ("scenes", self.scenes, MAX_SCENES),
            ("eval_scenes", self.eval_scenes, MAX_EVAL_SCENES),
            ("batch_size", self.batch_size, self.scenes),
        ] {
            if n > max {
                return Err(Error::arg(
                    name,
                    format!("{n} is more than {max} (see PretrainConfig)"),
                ));
            }
        }
        for (name, w) in [
            ("patch_weight", self.patch_weight),
            ("position_weight", self.position_weight),
            ("shape_position_weight", self.shape_position_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::arg(
                    name,
                    format!("must be finite and >= 0, got {w}"),
                ));
            }
        }
        for (name, v) in [("lr", self.lr), ("position_scale", self.position_scale)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::arg(name, format!("must be finite and > 0, got {v}")));
            }
        }
        if self.probe && self.position_scale != 1.0 {
            return Err(Error::arg(
                "position_scale",
                "a probe writes the tower back unchanged, so it cannot rescale its positions",
            ));
        }
        self.shapes.validate()
    }
}

/// Per-task accuracy over held-out shapes, and of the per-patch labels over patches a shape
/// covers (see [`patch_labels`]; the head predicting from each patch's own features).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ShapeAccuracy {
    pub shape: f64,
    pub color: f64,
    pub size: f64,
    /// Shapes scored.
    pub shapes: usize,
    pub patch_shape: f64,
    pub patch_color: f64,
    /// Patches scored (those labelled with a shape).
    pub patches: usize,
    /// Share of all patches whose row and column the position head reads right (mostly
    /// background patches, which keep their position embedding's).
    pub patch_position: f64,
    /// Share of shapes whose centre cell ([`ShapeTarget::cell`]) the position head reads right
    /// off their pooled features.
    pub shape_position: f64,
}

/// One labelled shape of an image: class indices per task ([`CLASSES`] order) and its patches
/// with pooling weights (patch indices within the image).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeTarget {
    pub classes: [i64; 3],
    pub patches: Vec<(usize, f32)>,
}

impl ShapeTarget {
    /// Row and column, on a `grid`-wide patch grid, of the shape's centre of mass: `round(Σ_p
    /// w_p · row_p)` and `round(Σ_p w_p · col_p)` over its patches `p` with pooling weights `w_p`.
    pub fn cell(&self, grid: usize) -> [i64; 2] {
        let (mut r, mut c, mut total) = (0.0f64, 0.0f64, 0.0f64);
        for &(p, w) in &self.patches {
            r += w as f64 * (p / grid) as f64;
            c += w as f64 * (p % grid) as f64;
            total += w as f64;
        }
        let at = |x: f64| (x / total.max(f64::MIN_POSITIVE)).round() as i64;
        [at(r), at(c)]
    }
}

/// The labels of one image: its shapes, pooled over their patches, and every patch's own classes
/// ([`CLASSES`] order, row-major over the patch grid; empty for none).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageTargets {
    pub shapes: Vec<ShapeTarget>,
    pub patches: Vec<[i64; 3]>,
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

/// Share of a patch's area a shape must cover for the patch to take its classes in
/// [`patch_labels`].
pub const PATCH_COVER: f32 = 0.25;

/// The "none" class of every task (the last one).
const NONE: [i64; 3] = [
    CLASSES[0] as i64 - 1,
    CLASSES[1] as i64 - 1,
    CLASSES[2] as i64 - 1,
];

/// Class indices of a shape, [`CLASSES`] order.
fn classes(o: &ShapePatches) -> [i64; 3] {
    let idx = |i: Option<usize>| i.unwrap_or(0) as i64;
    [
        idx(Shape::ALL.iter().position(|&x| x == o.shape)),
        idx(Color::ALL.iter().position(|&x| x == o.color)),
        idx(Size::ALL.iter().position(|&x| x == o.size)),
    ]
}

/// Every patch's own classes over the `(image_size / patch_size)²` grid: those of the shape
/// covering the largest share of the patch when that share is at least [`PATCH_COVER`], else
/// "none". Trained on them, each patch's features say which shape it is part of, which is what a
/// question's attention has to match ("What color is the circle?"); the pooled loss alone only
/// asks that a shape's patches say it together.
pub fn patch_labels(shapes: &[ShapePatches], image_size: u32, patch_size: u32) -> Vec<[i64; 3]> {
    let g = (image_size / patch_size.max(1)) as usize;
    let area = (patch_size * patch_size) as f32;
    let mut best = vec![(PATCH_COVER, NONE); g * g];
    for o in shapes {
        for &(p, w) in &o.patches {
            let cover = w * o.pixels as f32 / area;
            if p < best.len() && cover >= best[p].0 {
                best[p] = (cover, classes(o));
            }
        }
    }
    best.into_iter().map(|(_, c)| c).collect()
}

/// The labels of one scene: its shapes and its patches.
pub fn targets(scene: &Scene, image_size: u32, patch_size: u32) -> ImageTargets {
    let shapes = scene.shape_patches(image_size, patch_size);
    ImageTargets {
        patches: patch_labels(&shapes, image_size, patch_size),
        shapes: shapes
            .iter()
            .map(|o| ShapeTarget {
                classes: classes(o),
                patches: o.patches.clone(),
            })
            .collect(),
    }
}

/// The linear heads, initialised `N(0, 0.02)`-like from `seed`: the class head `W` `[Σ CLASSES,
/// width]`, `b` (`head.*`), then the position head `[2 · grid, width]` (`position.*`) that reads
/// each patch's row and column off its own features.
pub fn new_head(width: usize, grid: usize, seed: u64) -> Result<Vec<Param>> {
    let mut state = seed ^ 0x5eed_7a11_c0ff_ee00;
    let mut linear = |name: &str, out: usize| -> Result<[Param; 2]> {
        let w = format!("{name}.weight");
        let b = format!("{name}.bias");
        let values = init_values(&w, &[out, width], 0.02, &mut state);
        Ok([
            Param::from_f32(&w, decay_group(name, &w), &[out, width], values)?,
            Param::from_f32(&b, decay_group(name, &b), &[out], vec![0.0; out])?,
        ])
    };
    let mut head = Vec::from(linear("head", CLASSES.iter().sum())?);
    head.extend(linear("position", 2 * grid)?);
    Ok(head)
}

/// The linear layer `head[0..2]` (weight, bias).
const HEAD: Linear = Linear { w: 0, b: Some(1) };

/// Logits `[rows, out]` of the linear layer `head[0..2]` over features `[rows, width]`.
fn head_logits(head: &[Param], feats: &[f32], width: usize) -> Result<Vec<f32>> {
    let x = Tensor::from_f32(&[feats.len() / width.max(1), width], feats.to_vec())?;
    HEAD.forward(head, &x)?.into_f32_vec()
}

/// The loss of the linear layer `head[0..2]` over features `[rows, width]`: its outputs split
/// into tasks of `classes[t]` classes, `labels[t]` one per row, each task's mean cross-entropy
/// summed and scaled by `weight`; with `backward`, accumulates the layer's gradient and returns
/// the features' (else an empty vector).
fn head_loss(
    head: &mut [Param],
    feats: &[f32],
    width: usize,
    classes: &[usize],
    labels: &[Vec<i64>],
    weight: f32,
    backward: bool,
) -> Result<(f32, Vec<f32>)> {
    let out = head[1].value.len();
    let z = head_logits(head, feats, width)?;
    let mut dz = vec![0.0f32; z.len()];
    let mut loss = 0.0;
    let mut off = 0;
    for (&k, yt) in classes.iter().zip(labels) {
        let zt: Vec<f32> = z
            .chunks(out)
            .flat_map(|r| r[off..off + k].to_vec())
            .collect();
        let (l, g) = cross_entropy(&zt, k, yt, -100)?;
        loss += weight * l;
        for (dr, gr) in dz.chunks_mut(out).zip(g.chunks(k)) {
            dr.iter_mut()
                .skip(off)
                .zip(gr)
                .for_each(|(d, &x)| *d = weight * x);
        }
        off += k;
    }
    if !backward {
        return Ok((loss, Vec::new()));
    }
    Ok((loss, HEAD.backward(head, feats, &dz)?))
}

/// Per-task label vectors of rows of class triples.
fn by_task(rows: &[[i64; 3]]) -> Vec<Vec<i64>> {
    (0..3)
        .map(|t| rows.iter().map(|c| c[t]).collect())
        .collect()
}

/// Pooled features `[shapes, width]` of every image's shapes, in order.
fn pool(feats: &[f32], width: usize, tokens: usize, targets: &[ImageTargets]) -> Vec<f32> {
    let mut pooled = Vec::new();
    for (i, img) in targets.iter().enumerate() {
        for t in &img.shapes {
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

/// Weights of the losses beside the pooled shapes' (see [`PretrainConfig`]'s fields of the same
/// names).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossWeights {
    pub patch: f32,
    pub position: f32,
    pub shape_position: f32,
}

/// Runs the batch (`targets[i]`: the labels of image `i`) and returns its loss: the pooled
/// shapes', plus `w.patch` times the patches' classes (images with per-patch labels only), plus
/// `w.position` times every patch's row and column (the position head, `head[2..]`), plus
/// `w.shape_position` times every shape's centre cell read by the same head off its pooled
/// features; with `backward`, accumulates its gradient into the heads' and (unless the tower
/// holds no gradient buffers) the vision tower's `grad`.
pub fn shape_loss(
    model: &mut TrainModel,
    head: &mut [Param],
    pixels: &[&[f32]],
    targets: &[ImageTargets],
    w: LossWeights,
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
        .flat_map(|t| &t.shapes)
        .flat_map(|t| &t.patches)
        .find(|(p, _)| *p >= tokens)
    {
        return Err(Error::arg(
            "shape targets",
            format!("patch {p} is outside the {tokens} image tokens"),
        ));
    }
    if let Some(t) = targets
        .iter()
        .find(|t| !t.patches.is_empty() && t.patches.len() != tokens)
    {
        return Err(Error::Shape {
            name: "patch labels".into(),
            expected: vec![tokens],
            got: vec![t.patches.len()],
        });
    }
    let feats = model.vision_forward(pixels)?;
    let width = model.feature_width();
    let pooled = pool(&feats, width, tokens, targets);
    let labels: Vec<[i64; 3]> = targets
        .iter()
        .flat_map(|t| t.shapes.iter().map(|s| s.classes))
        .collect();
    let (mut loss, mut dpooled) = head_loss(
        &mut head[..2],
        &pooled,
        width,
        &CLASSES,
        &by_task(&labels),
        1.0,
        backward,
    )?;
    let grid = model.config.vision.grid();
    if w.shape_position > 0.0 && !pooled.is_empty() {
        let cells: Vec<[i64; 2]> = targets
            .iter()
            .flat_map(|t| t.shapes.iter().map(|s| s.cell(grid)))
            .collect();
        let (l, d) = head_loss(
            &mut head[2..],
            &pooled,
            width,
            &[grid, grid],
            &[
                cells.iter().map(|c| c[0]).collect(),
                cells.iter().map(|c| c[1]).collect(),
            ],
            w.shape_position,
            backward,
        )?;
        loss += l;
        crate::ops::add(&mut dpooled, &d);
    }
    let mut dfeats = vec![0.0f32; if backward { feats.len() } else { 0 }];
    let labelled: Vec<usize> = (0..targets.len())
        .filter(|&i| !targets[i].patches.is_empty())
        .collect();
    if w.patch > 0.0 && !labelled.is_empty() {
        let rows: Vec<f32> = labelled
            .iter()
            .flat_map(|&i| &feats[i * tokens * width..(i + 1) * tokens * width])
            .copied()
            .collect();
        let labels: Vec<[i64; 3]> = labelled
            .iter()
            .flat_map(|&i| targets[i].patches.iter().copied())
            .collect();
        let (l, drows) = head_loss(
            &mut head[..2],
            &rows,
            width,
            &CLASSES,
            &by_task(&labels),
            w.patch,
            backward,
        )?;
        loss += l;
        for (&i, d) in labelled.iter().zip(drows.chunks(tokens * width)) {
            crate::ops::add(&mut dfeats[i * tokens * width..(i + 1) * tokens * width], d);
        }
    }
    if w.position > 0.0 {
        let rows: Vec<i64> = (0..pixels.len() * tokens)
            .map(|r| ((r % tokens) / grid) as i64)
            .collect();
        let cols: Vec<i64> = (0..pixels.len() * tokens)
            .map(|r| ((r % tokens) % grid) as i64)
            .collect();
        let (l, d) = head_loss(
            &mut head[2..],
            &feats,
            width,
            &[grid, grid],
            &[rows, cols],
            w.position,
            backward,
        )?;
        loss += l;
        crate::ops::add(&mut dfeats, &d);
    }
    // A frozen tower (a probe) holds no gradient buffers: the heads' gradient is all there is.
    let tower = model
        .params
        .iter()
        .any(|p| p.group.starts_with("vision") && !p.grad.is_empty());
    if backward && tower {
        let mut rows = dpooled.chunks(width);
        for (i, img) in targets.iter().enumerate() {
            for (t, d) in img.shapes.iter().zip(&mut rows) {
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

/// Index of the largest of `z`.
fn argmax(z: &[f32]) -> i64 {
    (0..z.len())
        .max_by(|&a, &b| z[a].total_cmp(&z[b]))
        .unwrap_or(0) as i64
}

/// Held-out per-task accuracy over every shape, per-patch shape and colour accuracy over the
/// patches labelled with a shape, and the position head's over every patch and every shape.
fn accuracy(
    model: &mut TrainModel,
    head: &[Param],
    pixels: &[Vec<f32>],
    targets: &[ImageTargets],
) -> Result<ShapeAccuracy> {
    let out: usize = CLASSES.iter().sum();
    let width = model.feature_width();
    let tokens = model.config.image_tokens();
    let (mut right, mut n) = ([0usize; 3], 0usize);
    let (mut patch_right, mut patches) = ([0usize; 2], 0usize);
    let grid = model.config.vision.grid();
    let (mut placed, mut centred) = (0usize, 0usize);
    let read = |row: &[f32]| [argmax(&row[..grid]), argmax(&row[grid..])];
    for (px, tg) in pixels.chunks(16).zip(targets.chunks(16)) {
        let refs: Vec<&[f32]> = px.iter().map(|p| p.as_slice()).collect();
        let feats = model.vision_forward(&refs)?;
        let pooled = pool(&feats, width, tokens, tg);
        let shapes = || tg.iter().flat_map(|t| &t.shapes);
        let z = head_logits(&head[2..], &pooled, width)?;
        for (row, t) in z.chunks(2 * grid).zip(shapes()) {
            centred += usize::from(read(row) == t.cell(grid));
        }
        let z = head_logits(head, &pooled, width)?;
        for (row, t) in z.chunks(out).zip(shapes()) {
            n += 1;
            let mut off = 0;
            for (task, &k) in CLASSES.iter().enumerate() {
                right[task] += usize::from(argmax(&row[off..off + k]) == t.classes[task]);
                off += k;
            }
        }
        let z = head_logits(head, &feats, width)?;
        let labels = tg.iter().flat_map(|t| &t.patches);
        for (row, c) in z.chunks(out).zip(labels).filter(|(_, c)| c[0] != NONE[0]) {
            patches += 1;
            patch_right[0] += usize::from(argmax(&row[..CLASSES[0]]) == c[0]);
            let colors = &row[CLASSES[0]..CLASSES[0] + CLASSES[1]];
            patch_right[1] += usize::from(argmax(colors) == c[1]);
        }
        let z = head_logits(&head[2..], &feats, width)?;
        for (r, row) in z.chunks(2 * grid).enumerate() {
            let p = r % tokens;
            placed += usize::from(read(row) == [(p / grid) as i64, (p % grid) as i64]);
        }
    }
    let frac = |r: usize, n: usize| if n == 0 { 0.0 } else { r as f64 / n as f64 };
    Ok(ShapeAccuracy {
        shape: frac(right[0], n),
        color: frac(right[1], n),
        size: frac(right[2], n),
        shapes: n,
        patch_shape: frac(patch_right[0], patches),
        patch_color: frac(patch_right[1], patches),
        patches,
        patch_position: frac(placed, pixels.len() * tokens),
        shape_position: frac(centred, n),
    })
}

/// Pixel values and labelled shapes of a list of scenes.
type Rendered = (Vec<Vec<f32>>, Vec<ImageTargets>);

/// Pixel values and labelled shapes of scenes, rendered and preprocessed in parallel.
fn render(
    scenes: &[&Scene],
    proc: &ImageProcessorConfig,
    image_size: u32,
    patch_size: u32,
) -> Result<Rendered> {
    let done: Vec<Result<(Vec<f32>, ImageTargets)>> = scenes
        .par_iter()
        .map(|s| {
            let px = proc.preprocess(&s.render(image_size))?.into_f32_vec()?;
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
    if cfg.position_scale != 1.0 {
        let name = "model.vision_tower.embeddings.position_embedding.weight";
        let p = model.params.iter_mut().find(|p| p.name == name);
        let p =
            p.ok_or_else(|| Error::arg("model", format!("{} has no {name}", model_dir.display())))?;
        p.f32s_mut()?
            .iter_mut()
            .for_each(|x| *x *= cfg.position_scale as f32);
    }
    let vc = model.config.vision.clone();
    let (image_size, patch_size) = (vc.image_size as u32, vc.patch_size as u32);
    if model.config.image_tokens() != vc.grid() * vc.grid() {
        return Err(Error::arg(
            "model",
            "pretrain-vision needs one image token per patch (select strategy `default`)",
        ));
    }
    let proc = ImageProcessorConfig::from_model_dir(model_dir, vc.image_size)?;
    // The output folder is created (and held) only once the inputs are known good.
    let _lock = super::lock::RunLock::acquire(out)?;
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

    // Only the vision tower trains (nothing, for a probe): the other parameters hold no
    // gradient buffer.
    for p in model.params.iter_mut() {
        if cfg.probe || !p.group.starts_with("vision") {
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
        groups(
            &["vision", "projector", "lm"],
            if cfg.probe {
                &["vision", "projector", "lm"]
            } else {
                &["projector", "lm"]
            },
        ),
    )?
    .with_schedule(schedule);
    let mut head = new_head(model.feature_width(), vc.grid(), cfg.seed)?;
    let mut head_opt =
        AdamW::new(cfg.lr, groups(&["head", "position"], &[]))?.with_schedule(schedule);

    let before = accuracy(&mut model, &head, &eval_px, &eval_labels)?;
    let mut loader = Loader::new(train.len(), cfg.batch_size, cfg.seed)?;
    let mut losses = Vec::new();
    for step in 0..cfg.steps {
        let (_, idx) = loader.next_batch();
        let scenes: Vec<&Scene> = idx.iter().map(|&i| &train[i]).collect();
        let (px, targets) = render(&scenes, &proc, image_size, patch_size)?;
        let refs: Vec<&[f32]> = px.iter().map(|p| p.as_slice()).collect();
        let loss = shape_loss(
            &mut model,
            &mut head,
            &refs,
            &targets,
            cfg.loss_weights(),
            true,
        )?;
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
