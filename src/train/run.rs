//! The training loop: a [`TrainConfig`] (TOML) in, losses, plots and resumable checkpoints out.
//!
//! Output directory layout:
//! - `losses.csv`: `step,loss,grad_norm,lr,tokens,grounding`, one row per optimizer step (`step`
//!   counts from 1; `loss` is the mean of the micro-batch cross-entropies before the update;
//!   `grad_norm` before clipping, empty without clipping; `lr` the peak-group rate used;
//!   `grounding` the mean attention-grounding loss, empty without one; `kd`, `hidden` and
//!   `attention` the distillation losses of a `[distill]` run, empty otherwise, see
//!   [`super::distill`]).
//! - `loss.svg` / `loss.png`: the loss curve, rewritten at the end of each run; `terms.svg` /
//!   `terms.png`: the other terms of the objective (grounding, distillation losses), if any.
//! - `checkpoint-NNNNNN/`: a transformers-loadable checkpoint ([`save_checkpoint`]) plus
//!   `optimizer.safetensors` ([`AdamW::save`]) and `trainer_state.json` (step, loader position),
//!   and the `shapes_config.json` found beside the training json (ShapesVQA's settings), if any.
//!   Only the newest is kept.
//! - `latest.json`: names the newest complete checkpoint. It is written (atomically) after the
//!   checkpoint's files, so a run killed mid-save resumes from the previous one.
//!
//! - `train.lock`: held while a run writes the folder ([`RunLock`]): a second run on the same
//!   folder is refused, naming the first one's pid; a lock left by a dead run is taken over.
//!
//! Resuming restores parameters (exact f32), optimizer moments and step count, and the loader
//! position, so a resumed run computes the same losses and parameters, bit for bit, as one that
//! was never interrupted. `latest.json` may only name a `checkpoint-NNNNNN` folder directly inside
//! the output folder (no other path, no symbolic link).
//!
//! What may change on resume ([`RESUME_MAY_CHANGE`]): `steps` (to extend or shorten the run; the
//! schedule then spans the new length), `checkpoint_every`, and where things are (`output`,
//! `model`, `data`, `image_folder`, `distill.teacher`, `distill.logits.cache`: a moved folder),
//! as long as the data hold as many samples. Every other setting (learning rate, schedule,
//! optimizer, batch, freezing, losses, model shape, ...) is part of the run: a resume with any of
//! them changed is refused, listing each changed key with its old and new value. Checkpoints
//! written before this rule only record `seed`, `batch_size` and `grad_accum`, which are checked.
//!
//! A non-finite loss term or gradient stops the run with an error naming the step, the term (or
//! the tensor) and the micro-batch's sample ids, before the update; no checkpoint is ever written
//! from non-finite weights ([`save_checkpoint`] refuses them).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::checkpoint::save_checkpoint;
use super::data::{Dataset, Encoder, Loader, LoaderState};
use super::distill::{ALIGN_FILE, DistillConfig, Distiller};
use super::lock::RunLock;
use super::model::{GroundingLoss, TrainModel, TrainSeq, VISION_FROZEN_GROUP};
use super::new_model::{NewModel, create_model};
use super::optim::{AdamW, GroupConfig, Schedule, zero_grads};
use super::progress_bar;
use super::vision_pretrain::{self, PretrainConfig, pretrain_vision};
use crate::bench::report::{Series, line_plot};
use crate::bench::shapes::{MODEL_SHAPES_CONFIG, ShapesConfig};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::config::ModelConfig;
use crate::model::image::ImageProcessorConfig;
use crate::model::template::ImageSlot;
use crate::model::tokenizer::Tokenizer;

const GROUP_PREFIXES: [&str; 3] = ["vision", "projector", "lm"];

fn one() -> usize {
    1
}
fn default_max_len() -> usize {
    2048
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

/// A training run, read from TOML by [`TrainConfig::from_file`]. Relative paths are relative to
/// the TOML file's folder.
///
/// ```toml
/// model = "base-model"          # LLaVA checkpoint folder to start from (config.json, weights, tokenizer.json)
///                               # or, instead of `model`, a `[new_model]` table (see [`NewModel`]):
///                               # a model trained from scratch, created in `{output}/base` first
/// data = "data/train.json"      # LLaVA conversation json
/// image_folder = "data/images"  # folder the json's `image` fields are relative to
/// output = "runs/r1"            # losses, plots, checkpoints
/// steps = 1000                  # optimizer steps
/// lr = 2e-5                     # peak learning rate
/// # optional (defaults): seed = 0, batch_size = 1, grad_accum = 1, warmup = 0,
/// # min_lr_ratio = 0.0, weight_decay = 0.0, betas = [0.9, 0.999] (AdamW's; LLM pre-training
/// # often takes beta2 = 0.95), max_grad_norm = (none: no clipping),
/// # frozen = [] (any of "vision", "projector", "lm" or a full group like "lm.no_decay"),
/// # lr_scale = {} (peak-rate multiplier per group, named as for `frozen`: { vision = 2.0 }),
/// # vision_trainable_layers = (none: the whole tower as `frozen` says; N: only its last N layers),
/// # checkpoint_every = 0 (only at the end), max_len = 2048
///
/// # with [new_model], optionally: pretrain the vision tower first (see [`PretrainConfig`])
/// [pretrain_vision]
/// steps = 7000
/// scenes = 100000
/// ```
///
/// Stages (LLaVA's projector pre-training, then instruction tuning) replace the top-level `steps`
/// and `lr` with `[[stage]]` tables, run in order; see [`StageConfig`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Checkpoint to start from; exactly one of `model` and `new_model`.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Shape of a model trained from scratch.
    #[serde(default)]
    pub new_model: Option<NewModel>,
    /// With `[new_model]`: pretrain the new model's vision tower on ShapesVQA's shapes
    /// ([`pretrain_vision`]) into `{output}/vision` before the first step, which starts from
    /// there. The scenes follow the generator settings beside `data` (its `shapes_config.json`).
    #[serde(default)]
    pub pretrain_vision: Option<PretrainConfig>,
    pub data: PathBuf,
    pub image_folder: PathBuf,
    pub output: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// Optimizer steps (with `[[stage]]`s: in each stage instead).
    #[serde(default)]
    pub steps: u64,
    #[serde(default = "one")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate (with `[[stage]]`s: in each stage instead).
    #[serde(default)]
    pub lr: f64,
    #[serde(default)]
    pub warmup: u64,
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW's `beta1`, `beta2`.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub frozen: Vec<String>,
    /// Train only the vision tower's last N encoder layers (every stage): the embeddings and the
    /// layers below are frozen ([`TrainModel::train_last_vision_layers`]), as for a smaller ViT
    /// student (`distill init-student --vision-layers`) aligned by `[distill.vision]`. Not with
    /// `frozen` naming the vision tower.
    #[serde(default)]
    pub vision_trainable_layers: Option<usize>,
    /// Multiplier on the peak learning rate per group (`vision`, `projector`, `lm`, or a full
    /// group like `lm.no_decay`, which takes precedence); groups left out: 1.0.
    #[serde(default)]
    pub lr_scale: BTreeMap<String, f64>,
    #[serde(default)]
    pub checkpoint_every: u64,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Attention grounding ([`GroundingLoss`], every stage): `[grounding]` with `layer` (0-based
    /// decoder layer), `weight` and optionally `answer_layer` (the answer rows' layer, if not
    /// `layer`); the data name the patches of their phrases and answers (`distill shapes
    /// --ground-phrases`, `--ground-answers`). Off when absent.
    #[serde(default)]
    pub grounding: Option<GroundingLoss>,
    /// Knowledge distillation from a frozen teacher (every stage): `[distill]` with `teacher`,
    /// `ce_weight`, and `[distill.logits]` / `[distill.hidden]` tables, see
    /// [`super::distill`]. The student is `model` (made from the teacher by `distill
    /// init-student`, so tokenizer and image tokens agree).
    #[serde(default)]
    pub distill: Option<DistillConfig>,
    /// Stages run in order, each from the previous one's final checkpoint.
    #[serde(default)]
    pub stage: Vec<StageConfig>,
}

/// One stage of a multi-stage run (TOML `[[stage]]`). It trains `steps` steps at peak rate `lr`
/// with its own schedule and optimizer state, into `{output}/stage{i}-{name}`, starting from the
/// previous stage's final checkpoint (the first stage from `model` or `[new_model]`). Fields left
/// out take the top-level values.
///
/// ```toml
/// [[stage]]                      # LLaVA stage 1: align the projector
/// name = "pretrain"
/// steps = 500
/// lr = 1e-3
/// frozen = ["vision", "lm"]
///
/// [[stage]]                      # stage 2: instruction tuning
/// name = "finetune"
/// steps = 2000
/// lr = 2e-5
/// frozen = ["vision"]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Letters, digits, `-` and `_` (it names the stage's folder).
    pub name: String,
    pub steps: u64,
    pub lr: f64,
    #[serde(default)]
    pub frozen: Option<Vec<String>>,
    #[serde(default)]
    pub lr_scale: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub data: Option<PathBuf>,
    #[serde(default)]
    pub image_folder: Option<PathBuf>,
    /// Seed of the stage's data order (a stage that passes over data an earlier one used gets
    /// a fresh order).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub grad_accum: Option<usize>,
    #[serde(default)]
    pub warmup: Option<u64>,
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub betas: Option<[f64; 2]>,
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
}

impl TrainConfig {
    /// Parses a TOML file; relative paths are resolved against its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        if let Some(d) = cfg.distill.as_mut() {
            d.resolve_paths(base);
        }
        let stage_paths = cfg
            .stage
            .iter_mut()
            .flat_map(|s| s.data.as_mut().into_iter().chain(s.image_folder.as_mut()));
        for p in [&mut cfg.data, &mut cfg.image_folder, &mut cfg.output]
            .into_iter()
            .chain(cfg.model.as_mut())
            .chain(stage_paths)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// The single-stage runs this config describes: itself, or one per `[[stage]]` (see
    /// [`StageConfig`]), each with its own output folder and starting point.
    pub fn stages(&self) -> Result<Vec<TrainConfig>> {
        let mut out = self.stage_list()?;
        if self.pretrain_vision.is_some() {
            out[0].model = Some(self.vision_dir());
            out[0].new_model = None;
        }
        for c in &mut out {
            c.pretrain_vision = None;
        }
        Ok(out)
    }

    fn stage_list(&self) -> Result<Vec<TrainConfig>> {
        if self.stage.is_empty() {
            return Ok(vec![self.clone()]);
        }
        if self.steps != 0 || self.lr != 0.0 {
            return Err(Error::arg(
                "steps",
                "with [[stage]] tables, `steps` and `lr` go in each stage, not at the top level",
            ));
        }
        let mut out: Vec<TrainConfig> = Vec::with_capacity(self.stage.len());
        for (i, st) in self.stage.iter().enumerate() {
            let ok = !st.name.is_empty()
                && st
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(Error::arg(
                    "stage.name",
                    format!(
                        "stage {}: `{}` must be letters, digits, - or _",
                        i + 1,
                        st.name
                    ),
                ));
            }
            if self.stage[..i].iter().any(|s| s.name == st.name) {
                return Err(Error::arg(
                    "stage.name",
                    format!("`{}` names two stages", st.name),
                ));
            }
            let mut c = self.clone();
            c.stage = Vec::new();
            c.steps = st.steps;
            c.lr = st.lr;
            c.output = self.output.join(format!("stage{}-{}", i + 1, st.name));
            if let Some(prev) = out.last() {
                c.model = Some(prev.output.join(checkpoint_name(prev.steps)));
                c.new_model = None;
            }
            if let Some(v) = &st.frozen {
                c.frozen = v.clone();
            }
            if let Some(v) = &st.lr_scale {
                c.lr_scale = v.clone();
            }
            if let Some(v) = &st.data {
                c.data = v.clone();
            }
            if let Some(v) = &st.image_folder {
                c.image_folder = v.clone();
            }
            c.seed = st.seed.unwrap_or(c.seed);
            c.batch_size = st.batch_size.unwrap_or(c.batch_size);
            c.grad_accum = st.grad_accum.unwrap_or(c.grad_accum);
            c.warmup = st.warmup.unwrap_or(c.warmup);
            c.min_lr_ratio = st.min_lr_ratio.unwrap_or(c.min_lr_ratio);
            c.weight_decay = st.weight_decay.unwrap_or(c.weight_decay);
            c.betas = st.betas.unwrap_or(c.betas);
            c.max_grad_norm = st.max_grad_norm.or(c.max_grad_norm);
            c.checkpoint_every = st.checkpoint_every.unwrap_or(c.checkpoint_every);
            out.push(c);
        }
        Ok(out)
    }

    /// Checks numbers, input files and the output folder, touching no weights; every error names
    /// the offending field or file (and stage). [`train`] calls this before any compute. With
    /// stages, every stage is checked; a later stage's starting checkpoint need not exist yet.
    pub fn validate(&self) -> Result<()> {
        if let Some(pv) = &self.pretrain_vision {
            let Some(shape) = &self.new_model else {
                return Err(Error::arg(
                    "pretrain_vision",
                    "pretrains a new model's vision tower: it needs a `[new_model]` table",
                ));
            };
            shape.validate()?;
            if pv.probe {
                return Err(Error::arg(
                    "pretrain_vision.probe",
                    "a probe trains no tower; pretraining before the stages needs probe = false",
                ));
            }
            PretrainConfig {
                shapes: self.shapes_settings()?,
                ..pv.clone()
            }
            .validate()?;
        }
        if self.stage.is_empty() {
            return self.validate_stage(true);
        }
        // The first stage's model (a new one, or the pretrained tower's folder) does not exist
        // before the run.
        let first_ready = self.pretrain_vision.is_none();
        for (i, s) in self.stages()?.iter().enumerate() {
            s.validate_stage(i == 0 && first_ready)
                .map_err(|e| match e {
                    Error::Arg { name, msg } => Error::Arg {
                        name,
                        msg: format!("{msg} (stage {} `{}`)", i + 1, self.stage[i].name),
                    },
                    e => e,
                })?;
        }
        Ok(())
    }

    fn validate_stage(&self, model_ready: bool) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::arg(f, m));
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} must be a finite number > 0", self.lr));
        }
        if self.warmup > self.steps {
            return bad(
                "warmup",
                format!("{} is more than steps = {}", self.warmup, self.steps),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("{} must be in [0, 1]", self.min_lr_ratio),
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be a finite number >= 0", self.weight_decay),
            );
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad("betas", format!("{:?} must both be in [0, 1)", self.betas));
        }
        if let Some(n) = self.max_grad_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad(
                "max_grad_norm",
                format!("{n} must be a finite number > 0 (leave it out to disable clipping)"),
            );
        }
        if self.max_len == 0 {
            return bad("max_len", "must be at least 1".into());
        }
        let known = |f: &str| {
            GROUP_PREFIXES
                .iter()
                .any(|g| f == *g || f == format!("{g}.decay") || f == format!("{g}.no_decay"))
        };
        let unknown = |f: &str| {
            format!("unknown group `{f}` (use vision, projector, lm, or e.g. lm.no_decay)")
        };
        if let Some(f) = self.frozen.iter().find(|f| !known(f)) {
            return bad("frozen", unknown(f));
        }
        if let Some(n) = self.vision_trainable_layers {
            if n == 0 {
                return bad(
                    "vision_trainable_layers",
                    "must be at least 1 (freeze the tower with frozen = [\"vision\"])".into(),
                );
            }
            if let Some(f) = self.frozen.iter().find(|f| f.starts_with("vision")) {
                return bad(
                    "vision_trainable_layers",
                    format!("trains vision layers, but frozen names `{f}`"),
                );
            }
        }
        if self.distill.as_ref().is_some_and(|d| d.vision.is_some())
            && ["vision", "projector"]
                .iter()
                .all(|g| self.group_frozen(&format!("{g}.decay")))
        {
            return bad(
                "distill.vision",
                "aligns the student's image features, but its vision tower and projector are both \
                 frozen: nothing it could train"
                    .into(),
            );
        }
        for (g, &x) in &self.lr_scale {
            if !known(g) {
                return bad("lr_scale", unknown(g));
            }
            if !(x.is_finite() && x > 0.0) {
                return bad("lr_scale", format!("{g} = {x} must be a finite number > 0"));
            }
        }
        if GROUP_PREFIXES
            .iter()
            .all(|g| self.group_frozen(&format!("{g}.decay")))
            && GROUP_PREFIXES
                .iter()
                .all(|g| self.group_frozen(&format!("{g}.no_decay")))
        {
            return bad("frozen", "every group is frozen: nothing to train".into());
        }
        Schedule::new(self.warmup, self.steps, self.min_lr_ratio)?;

        // Inputs.
        match (&self.model, &self.new_model) {
            (Some(_), Some(_)) => {
                return bad(
                    "model",
                    "give either `model` (a checkpoint) or `[new_model]` (a shape), not both"
                        .into(),
                );
            }
            (None, None) => {
                return bad(
                    "model",
                    "missing: give `model` (a checkpoint folder) or a `[new_model]` table".into(),
                );
            }
            (None, Some(shape)) => shape.validate()?,
            (Some(model), None) if model_ready => check_model_dir(model)?,
            (Some(_), None) => {}
        }
        if !self.data.is_file() {
            return Err(Error::MissingFile {
                what: "training data json (`data`)",
                path: self.data.clone(),
            });
        }
        if !self.image_folder.is_dir() {
            return Err(Error::MissingFile {
                what: "image folder (`image_folder`)",
                path: self.image_folder.clone(),
            });
        }
        let ds = Dataset::open(&self.data, &self.image_folder)?;
        if ds.is_empty() {
            return bad(
                "data",
                format!("{} holds no conversations", self.data.display()),
            );
        }
        if self.batch_size > ds.len() {
            return bad(
                "batch_size",
                format!(
                    "{} is more than the {} samples of {}",
                    self.batch_size,
                    ds.len(),
                    self.data.display()
                ),
            );
        }
        // At most as many micro-batches per step as samples: a larger `grad_accum` (65535 from a
        // typo) would only repeat the same samples within one step for hours.
        if self.grad_accum > ds.len() {
            return bad(
                "grad_accum",
                format!(
                    "{} micro-batches per step is more than the {} samples of {}",
                    self.grad_accum,
                    ds.len(),
                    self.data.display()
                ),
            );
        }
        if let Some(d) = &self.distill {
            if self.new_model.is_some() {
                return bad(
                    "distill",
                    "distils into `model` (a student made by `distill init-student`), not a \
                     `[new_model]`, whose own tokenizer would not match the teacher's"
                        .into(),
                );
            }
            d.validate(&self.base_dir(), &self.data)?;
        }
        if let Some(g) = self.grounding {
            if !(g.weight.is_finite() && g.weight > 0.0) {
                return bad("grounding.weight", format!("{} must be > 0", g.weight));
            }
            let grounded = ds.conversations.iter().flat_map(|c| &c.turns);
            if grounded
                .clone()
                .all(|t| t.patches.is_empty() && t.refs.is_empty())
            {
                return bad(
                    "grounding",
                    format!(
                        "is set but no turn of {} names its `patches` or `refs` (export the data \
                         with `distill shapes --ground-phrases`)",
                        self.data.display()
                    ),
                );
            }
        }

        // Output.
        let unwritable = |e: std::io::Error| Error::Io {
            path: self.output.clone(),
            source: std::io::Error::new(
                e.kind(),
                format!("output folder (`output`) is not writable: {e}"),
            ),
        };
        std::fs::create_dir_all(&self.output).map_err(unwritable)?;
        let probe = self
            .output
            .join(format!(".fineprune-write-probe{}", std::process::id()));
        std::fs::File::create(&probe).map_err(unwritable)?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// The settings a resumed run must keep: every key (nested tables as dotted keys) but
    /// [`RESUME_MAY_CHANGE`], with their json values, and the number of samples in the data
    /// (`data.samples`).
    fn fixed_settings(&self, samples: usize) -> BTreeMap<String, serde_json::Value> {
        fn flatten(
            prefix: &str,
            v: serde_json::Value,
            out: &mut BTreeMap<String, serde_json::Value>,
        ) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                v => {
                    out.insert(prefix.to_string(), v);
                }
            }
        }
        let mut out = BTreeMap::new();
        let json = serde_json::to_value(self).expect("a training config serializes");
        flatten("", json, &mut out);
        out.retain(|k, _| {
            !RESUME_MAY_CHANGE
                .iter()
                .any(|m| k == m || k.starts_with(&format!("{m}.")))
        });
        out.insert("data.samples".into(), samples.into());
        out
    }

    /// Where `[pretrain_vision]` writes the new model with its pretrained tower.
    pub fn vision_dir(&self) -> PathBuf {
        self.output.join("vision")
    }

    /// The ShapesVQA settings beside `data` (`shapes_config.json`, written by `distill shapes`),
    /// else the generator's defaults.
    fn shapes_settings(&self) -> Result<ShapesConfig> {
        match self.data_shapes_config() {
            Some(p) => ShapesConfig::from_file(&p),
            None => Ok(ShapesConfig::default()),
        }
    }

    /// `shapes_config.json` beside `data`, if there is one.
    fn data_shapes_config(&self) -> Option<PathBuf> {
        let p = self.data.parent()?.join(MODEL_SHAPES_CONFIG);
        p.is_file().then_some(p)
    }

    /// The folder the run starts from: `model`, or `{output}/base` for a new model.
    pub fn base_dir(&self) -> PathBuf {
        match &self.model {
            Some(m) => m.clone(),
            None => self.output.join("base"),
        }
    }

    fn group_frozen(&self, group: &str) -> bool {
        self.frozen
            .iter()
            .any(|f| group == f || group.starts_with(&format!("{f}.")))
    }

    fn optimizer(&self) -> Result<AdamW> {
        let groups = GROUP_PREFIXES
            .iter()
            .chain(self.distill.is_some().then_some(&"align"))
            .flat_map(|g| {
                [
                    (format!("{g}.decay"), self.weight_decay),
                    (format!("{g}.no_decay"), 0.0),
                ]
            })
            .chain(
                self.vision_trainable_layers
                    .map(|_| (VISION_FROZEN_GROUP.to_string(), 0.0)),
            )
            .map(|(name, wd)| {
                if name == VISION_FROZEN_GROUP || self.group_frozen(&name) {
                    GroupConfig::frozen(name)
                } else {
                    let prefix = name.split('.').next().unwrap_or_default();
                    let scale = self.lr_scale.get(&name).or(self.lr_scale.get(prefix));
                    GroupConfig {
                        lr_scale: scale.copied().unwrap_or(1.0),
                        ..GroupConfig::new(name, wd)
                    }
                }
            })
            .collect();
        let mut opt = AdamW::new(self.lr, groups)?.with_schedule(Schedule::new(
            self.warmup,
            self.steps,
            self.min_lr_ratio,
        )?);
        opt.betas = (self.betas[0], self.betas[1]);
        Ok(opt)
    }
}

/// Checks that `model` is a LLaVA checkpoint folder without loading its weights.
fn check_model_dir(model: &Path) -> Result<()> {
    for (what, p) in [
        ("config.json of `model`", model.join("config.json")),
        ("tokenizer.json of `model`", model.join("tokenizer.json")),
    ] {
        if !p.is_file() {
            return Err(Error::MissingFile { what, path: p });
        }
    }
    if !(model.join("model.safetensors").is_file()
        || model.join("model.safetensors.index.json").is_file())
    {
        return Err(Error::MissingFile {
            what: "weights of `model` (model.safetensors or its index)",
            path: model.join("model.safetensors"),
        });
    }
    if let ModelConfig::Llama(_) = ModelConfig::from_file(&model.join("config.json"))? {
        return Err(Error::arg(
            "model",
            format!("{} is a LLaMA checkpoint, not LLaVA", model.display()),
        ));
    }
    Ok(())
}

/// How [`train`] runs.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the output folder (error if there is none).
    pub resume: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Stop (with a checkpoint) once this global step is reached, before `steps`; the schedule
    /// still spans `steps`, so resuming later continues the same run.
    pub stop_after: Option<u64>,
}

/// One optimizer step's record (a row of `losses.csv`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f32,
    pub grad_norm: Option<f32>,
    pub lr: f64,
    pub tokens: u64,
    /// Mean [`TrainModel::grounding_loss`] of the step's micro-batches that had one (unweighted;
    /// `loss` is the cross-entropy alone).
    pub grounding: Option<f32>,
    /// Mean logit-distillation loss (unweighted), with `[distill.logits]`.
    pub kd: Option<f32>,
    /// Mean hidden-alignment loss (unweighted), with `[distill.hidden]`.
    pub hidden: Option<f32>,
    /// Mean attention-alignment loss (unweighted), with `[distill.attention]`.
    pub attention: Option<f32>,
    /// Mean affinity and relational losses (unweighted), with their tables.
    pub affinity: Option<f32>,
    pub relational: Option<f32>,
    /// Mean vision feature-alignment loss (unweighted), with `[distill.vision]`.
    pub vision: Option<f32>,
}

impl StepRecord {
    /// How many terms [`StepRecord::terms`] lists.
    pub const TERMS: usize = 7;

    /// The objective's terms besides the cross-entropy, named as `losses.csv`'s columns.
    pub fn terms(&self) -> [(&'static str, Option<f32>); Self::TERMS] {
        [
            ("grounding", self.grounding),
            ("kd", self.kd),
            ("hidden", self.hidden),
            ("attention", self.attention),
            ("affinity", self.affinity),
            ("relational", self.relational),
            ("vision", self.vision),
        ]
    }
}

/// What a [`train`] call did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Global step the run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Global step reached.
    pub end_step: u64,
    /// Every step's record so far, earlier runs' included (`losses.csv`).
    pub history: Vec<StepRecord>,
    /// The newest checkpoint folder.
    pub checkpoint: PathBuf,
    /// Tokens processed by this call and its wall time.
    pub tokens: u64,
    pub seconds: f64,
}

/// The settings that may differ between a run and its resume (see the module doc); dotted keys
/// name nested tables' fields.
pub const RESUME_MAY_CHANGE: [&str; 8] = [
    "steps",
    "checkpoint_every",
    "output",
    "model",
    "data",
    "image_folder",
    "distill.teacher",
    "distill.logits.cache",
];

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    epoch: u64,
    position: usize,
    seed: u64,
    batch_size: usize,
    grad_accum: usize,
    /// [`TrainConfig::fixed_settings`] of the run; absent in checkpoints written before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settings: Option<BTreeMap<String, serde_json::Value>>,
}

/// Refuses to resume the run whose checkpoint `dir` holds `st` with settings `now` that changed
/// any it must keep, listing every changed key with its old and new value.
fn check_resumed_settings(
    st: &TrainerState,
    now: &BTreeMap<String, serde_json::Value>,
    dir: &Path,
) -> Result<()> {
    // Older checkpoints record three settings only.
    let old = || {
        BTreeMap::from([
            ("seed".to_string(), st.seed.into()),
            ("batch_size".to_string(), st.batch_size.into()),
            ("grad_accum".to_string(), st.grad_accum.into()),
        ])
    };
    let was = st.settings.clone().unwrap_or_else(old);
    let keys: std::collections::BTreeSet<&String> = if st.settings.is_some() {
        was.keys().chain(now.keys()).collect()
    } else {
        was.keys().collect()
    };
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    let changed: Vec<(&str, String)> = keys
        .into_iter()
        .filter(|k| was.get(*k) != now.get(*k))
        .map(|k| {
            let msg = format!("{k} {} -> {}", show(was.get(k)), show(now.get(k)));
            (k.as_str(), msg)
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::arg(
        changed
            .iter()
            .map(|(k, _)| *k)
            .collect::<Vec<_>>()
            .join(", "),
        format!(
            "changed since the run being resumed ({}) started: {}; only {} may change on resume",
            dir.display(),
            changed
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            RESUME_MAY_CHANGE.join(", ")
        ),
    ))
}

#[derive(Serialize, Deserialize)]
struct Latest {
    checkpoint: String,
    step: u64,
}

const LOSS_HEADER: &str =
    "step,loss,grad_norm,lr,tokens,grounding,kd,hidden,attention,affinity,relational,vision";

fn csv_row(r: &StepRecord) -> String {
    let opt = |x: Option<f32>| x.map(|g| g.to_string()).unwrap_or_default();
    let terms: Vec<String> = r.terms().iter().map(|(_, v)| opt(*v)).collect();
    format!(
        "{},{},{},{},{},{}\n",
        r.step,
        r.loss,
        opt(r.grad_norm),
        r.lr,
        r.tokens,
        terms.join(",")
    )
}

fn read_losses(path: &Path) -> Result<Vec<StepRecord>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let parse_err = |line: usize| Error::Config {
        path: path.to_path_buf(),
        msg: format!("line {line} is not `{LOSS_HEADER}`"),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.is_empty() {
            continue;
        }
        // Files written before the grounding column have five fields, before distillation's
        // six, before vision alignment's eleven.
        let f: Vec<&str> = line.split(',').collect();
        if ![5, 6, 11, 12].contains(&f.len()) {
            return Err(parse_err(i + 1));
        }
        let optional = |x: Option<&&str>| -> Result<Option<f32>> {
            match x {
                None | Some(&"") => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| parse_err(i + 1)),
            }
        };
        out.push(StepRecord {
            step: f[0].parse().map_err(|_| parse_err(i + 1))?,
            loss: f[1].parse().map_err(|_| parse_err(i + 1))?,
            grad_norm: optional(f.get(2))?,
            lr: f[3].parse().map_err(|_| parse_err(i + 1))?,
            tokens: f[4].parse().map_err(|_| parse_err(i + 1))?,
            grounding: optional(f.get(5))?,
            kd: optional(f.get(6))?,
            hidden: optional(f.get(7))?,
            attention: optional(f.get(8))?,
            affinity: optional(f.get(9))?,
            relational: optional(f.get(10))?,
            vision: optional(f.get(11))?,
        });
    }
    Ok(out)
}

/// The newest complete checkpoint of an output folder, if any. `latest.json` must name the
/// folder its step's checkpoint is written to (`checkpoint-NNNNNN`), directly inside `output` and
/// not a symbolic link: it can name nothing outside the output folder.
pub fn latest_checkpoint(output: &Path) -> Result<Option<(PathBuf, u64)>> {
    let p = output.join("latest.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let bad = |msg: String| Error::Config {
        path: p.clone(),
        msg,
    };
    let l: Latest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let want = checkpoint_name(l.step);
    if l.checkpoint != want {
        return Err(bad(format!(
            "`checkpoint` is {:?}; a run's checkpoint of step {} is the folder {want:?} inside {}",
            l.checkpoint,
            l.step,
            output.display()
        )));
    }
    let dir = output.join(&want);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(Some((dir, l.step))),
        Ok(_) => Err(bad(format!(
            "`checkpoint` {want:?} is not a folder inside {} (a symbolic link or a file)",
            output.display()
        ))),
        Err(e) => Err(bad(format!("`checkpoint` {}: {e}", dir.display()))),
    }
}

/// The folder of the checkpoint of `step`.
fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// Stops the run at a non-finite loss term `name`: `at` says where (step, micro-batch, samples).
fn finite_loss(name: &str, value: f32, at: &dyn Fn() -> String) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    Err(Error::arg(
        "training",
        format!(
            "the {name} loss is {value} ({}); stopped before the update, the newest checkpoint \
             is unchanged",
            at()
        ),
    ))
}

fn set_frozen_grads(cfg: &TrainConfig, m: &mut TrainModel) -> Result<()> {
    for p in &mut m.params {
        if cfg.group_frozen(&p.group) {
            p.grad = Vec::new();
        }
    }
    match cfg.vision_trainable_layers {
        Some(n) => m.train_last_vision_layers(n),
        None => Ok(()),
    }
}

fn save_all(
    cfg: &TrainConfig,
    m: &TrainModel,
    opt: &AdamW,
    loader: &Loader,
    step: u64,
    settings: &BTreeMap<String, serde_json::Value>,
) -> Result<PathBuf> {
    let name = checkpoint_name(step);
    let dir = cfg.output.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    save_checkpoint(m, &cfg.base_dir(), &dir)?;
    // The ShapesVQA settings of the data trained on (written by `distill shapes` beside the
    // json) replace the starting model's: evaluation then asks the distribution it learned.
    if let Some(src) = cfg.data_shapes_config() {
        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
        write_atomic(&dir.join(MODEL_SHAPES_CONFIG), &bytes)?;
    }
    opt.save(&dir.join("optimizer.safetensors"))?;
    Distiller::save_projectors(&m.params, &dir.join(ALIGN_FILE))?;
    let st = loader.state();
    let state = TrainerState {
        step,
        epoch: st.epoch,
        position: st.position,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        grad_accum: cfg.grad_accum,
        settings: Some(settings.clone()),
    };
    let json = serde_json::to_vec_pretty(&state).expect("trainer state serializes");
    write_atomic(&dir.join("trainer_state.json"), &json)?;
    let latest = serde_json::to_vec_pretty(&Latest {
        checkpoint: name.clone(),
        step,
    })
    .expect("latest serializes");
    write_atomic(&cfg.output.join("latest.json"), &latest)?;
    // Older checkpoints are superseded.
    let entries = std::fs::read_dir(&cfg.output).map_err(|e| Error::io(&cfg.output, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("checkpoint-") && n != name && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(dir)
}

/// Runs every stage of `cfg` in order (one for a config without `[[stage]]`s), each from the
/// previous one's final checkpoint; with `opts.resume`, finished stages are skipped and the
/// interrupted one continues. `opts.stop_after` counts steps across stages. Every stage is
/// validated before the first step. Returns one summary per stage run by this call.
pub fn train_stages(cfg: &TrainConfig, opts: &TrainOptions) -> Result<Vec<TrainSummary>> {
    cfg.validate()?;
    if let Some(0) = opts.stop_after {
        return Err(Error::arg("stop_after", "must be at least 1"));
    }
    let _lock = RunLock::acquire(&cfg.output)?;
    let stages = cfg.stages()?;
    if !opts.resume {
        for s in &stages {
            if latest_checkpoint(&s.output)?.is_some() {
                return Err(Error::arg(
                    "output",
                    format!(
                        "{} already holds a training run (latest.json); resume it or choose another folder",
                        s.output.display()
                    ),
                ));
            }
        }
    }
    // A new model's tokenizer learns the text of every stage.
    let mut texts: Vec<&Path> = vec![&cfg.data];
    for s in &stages {
        if !texts.contains(&s.data.as_path()) {
            texts.push(&s.data);
        }
    }
    pretrain_new_vision(cfg, &texts, opts)?;
    let mut out = Vec::new();
    let mut offset = 0u64;
    for s in &stages {
        let stop = opts.stop_after.map(|g| g.saturating_sub(offset));
        if stop == Some(0) {
            break;
        }
        let done = latest_checkpoint(&s.output)?;
        if matches!(done, Some((_, step)) if step >= s.steps) {
            offset += s.steps;
            continue;
        }
        let o = TrainOptions {
            resume: done.is_some(),
            progress: opts.progress,
            stop_after: stop.filter(|&l| l < s.steps),
        };
        out.push(run(s, &o, &texts)?);
        if o.stop_after.is_some() {
            break;
        }
        offset += s.steps;
    }
    Ok(out)
}

/// Runs (or, with `opts.resume`, continues) the training described by `cfg`, a config without
/// `[[stage]]`s (see [`train_stages`]). Everything is validated before any weight is loaded or
/// step taken.
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    if !cfg.stage.is_empty() {
        return Err(Error::arg(
            "stage",
            "a config with [[stage]] tables runs through train_stages",
        ));
    }
    cfg.validate()?;
    let _lock = RunLock::acquire(&cfg.output)?;
    pretrain_new_vision(cfg, &[&cfg.data], opts)?;
    run(&cfg.stages()?[0], opts, &[&cfg.data])
}

/// With `[pretrain_vision]`: creates the new model in `{output}/base` (its tokenizer trained on
/// `texts`) and pretrains its vision tower into [`TrainConfig::vision_dir`], where the first
/// stage starts. A finished pretraining is kept when resuming.
fn pretrain_new_vision(cfg: &TrainConfig, texts: &[&Path], opts: &TrainOptions) -> Result<()> {
    let (Some(pv), Some(shape)) = (&cfg.pretrain_vision, &cfg.new_model) else {
        return Ok(());
    };
    let out = cfg.vision_dir();
    if out.join(vision_pretrain::SUMMARY_FILE).is_file() {
        if opts.resume {
            return Ok(());
        }
        return Err(Error::arg(
            "output",
            format!(
                "{} already holds a pretrained vision tower; resume the run or choose another folder",
                out.display()
            ),
        ));
    }
    let base = cfg.output.join("base");
    create_model(shape, texts, &base)?;
    let pv = PretrainConfig {
        shapes: cfg.shapes_settings()?,
        ..pv.clone()
    };
    let bar = progress_bar(pv.steps, opts.progress, "steps");
    bar.set_prefix("vision pretraining");
    let s = pretrain_vision(&base, &out, &pv, &|step, loss| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4}"));
    })?;
    bar.finish_and_clear();
    if opts.progress {
        eprintln!(
            "vision pretraining: held-out shape {:.3} colour {:.3} size {:.3} ({} shapes), \
             per patch shape {:.3} colour {:.3} ({} patches)",
            s.after.shape,
            s.after.color,
            s.after.size,
            s.after.shapes,
            s.after.patch_shape,
            s.after.patch_color,
            s.after.patches
        );
    }
    Ok(())
}

/// [`train`] after validation, with the output folder locked: one single-stage run; a new
/// model's tokenizer is trained on the conversations of `texts`.
fn run(cfg: &TrainConfig, opts: &TrainOptions, texts: &[&Path]) -> Result<TrainSummary> {
    if let Some(s) = opts.stop_after
        && s == 0
    {
        return Err(Error::arg("stop_after", "must be at least 1"));
    }
    let latest = latest_checkpoint(&cfg.output)?;
    if !opts.resume && latest.is_some() {
        return Err(Error::arg(
            "output",
            format!(
                "{} already holds a training run (latest.json); resume it or choose another folder",
                cfg.output.display()
            ),
        ));
    }
    let resume_from = if opts.resume {
        Some(latest.ok_or_else(|| {
            Error::arg(
                "resume",
                format!(
                    "no checkpoint to resume from in {} (latest.json is missing)",
                    cfg.output.display()
                ),
            )
        })?)
    } else {
        None
    };

    let ds = Dataset::open(&cfg.data, &cfg.image_folder)?;
    let settings = cfg.fixed_settings(ds.len());
    let base = cfg.base_dir();
    if let (Some(shape), None) = (&cfg.new_model, &resume_from) {
        create_model(shape, texts, &base)?;
    }
    let tok_path = base.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;

    let distiller = |m: &mut TrainModel| -> Result<Option<Distiller>> {
        cfg.distill
            .as_ref()
            .map(|d| Distiller::new(d, m, cfg.seed))
            .transpose()
    };
    let (mut m, mut opt, mut loader, start, mut history, mut distill) = match &resume_from {
        None => {
            let mut m = TrainModel::from_dir(&base)?;
            let d = distiller(&mut m)?;
            let loader = Loader::new(ds.len(), cfg.batch_size, cfg.seed)?;
            (m, cfg.optimizer()?, loader, 0, Vec::new(), d)
        }
        Some((dir, step)) => {
            let sp = dir.join("trainer_state.json");
            let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
            let st: TrainerState = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: sp.clone(),
                msg: e.to_string(),
            })?;
            check_resumed_settings(&st, &settings, dir)?;
            if st.step != *step {
                return Err(Error::Config {
                    path: sp,
                    msg: format!("step {} disagrees with latest.json's {step}", st.step),
                });
            }
            if st.step >= cfg.steps {
                return Err(Error::arg(
                    "steps",
                    format!("the run is already at step {} of {}", st.step, cfg.steps),
                ));
            }
            let mut m = TrainModel::from_dir(dir)?;
            let d = distiller(&mut m)?;
            if d.is_some() {
                Distiller::load_projectors(&mut m.params, &dir.join(ALIGN_FILE))?;
            }
            set_frozen_grads(cfg, &mut m)?;
            let mut opt = cfg.optimizer()?;
            opt.load(&dir.join("optimizer.safetensors"), &m.params)?;
            let loader = Loader::resume(
                ds.len(),
                cfg.batch_size,
                cfg.seed,
                LoaderState {
                    epoch: st.epoch,
                    position: st.position,
                },
            )?;
            let mut hist = read_losses(&cfg.output.join("losses.csv"))?;
            hist.retain(|r| r.step <= st.step);
            (m, opt, loader, st.step, hist, d)
        }
    };
    set_frozen_grads(cfg, &mut m)?;
    m.set_grounding(cfg.grounding)?;

    let image_slot = {
        let id = m.config.image_token_id;
        let token = tokenizer.id_to_token(id).ok_or_else(|| Error::Tokenizer {
            path: tok_path.clone(),
            msg: format!("has no image token id {id}"),
        })?;
        ImageSlot {
            token,
            count: m.config.image_tokens(),
        }
    };
    let mut enc = Encoder::new(&tokenizer, image_slot, cfg.max_len);
    enc.image_processor = Some(ImageProcessorConfig::from_model_dir(
        &base,
        m.config.vision.image_size,
    )?);

    // losses.csv: rewritten with the kept history, then appended to step by step.
    let csv_path = cfg.output.join("losses.csv");
    let mut csv_text = format!("{LOSS_HEADER}\n");
    for r in &history {
        csv_text.push_str(&csv_row(r));
    }
    write_atomic(&csv_path, csv_text.as_bytes())?;
    let mut csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .map_err(|e| Error::io(&csv_path, e))?;

    let end = opts
        .stop_after
        .unwrap_or(cfg.steps)
        .min(cfg.steps)
        .max(start);
    let bar = progress_bar(end - start, opts.progress, "steps");

    let t0 = Instant::now();
    let mut run_tokens = 0u64;
    let mut sums: Vec<Vec<f32>> = Vec::new();
    let mut checkpoint = None;
    for step in start..end {
        let lr = opt.schedule.lr(cfg.lr, opt.steps_taken());
        let mut loss_sum = 0.0f64;
        let mut grounding = (0.0f64, 0usize);
        let mut kd = (0.0f64, 0usize);
        let (mut hidden, mut attention, mut affinity, mut relational) = (kd, kd, kd, kd);
        let mut vision = kd;
        let mut tokens = 0u64;
        for micro in 0..cfg.grad_accum {
            let (_, idx) = loader.next_batch();
            let seqs: Vec<TrainSeq> = ds
                .batch(&enc, &idx)?
                .into_iter()
                .map(|s| TrainSeq {
                    input_ids: s.input_ids,
                    labels: s.labels,
                    pixel_values: s.pixel_values,
                    grounding: s.grounding,
                    prompt: s.prompt,
                })
                .collect();
            tokens += seqs.iter().map(|s| s.input_ids.len() as u64).sum::<u64>();
            zero_grads(&mut m.params);
            // Where a non-finite value appeared: the step, the micro-batch and its samples.
            let at = || {
                let ids: Vec<&str> = idx
                    .iter()
                    .map(|&i| ds.conversations[i].id.as_str())
                    .collect();
                format!(
                    "step {}, micro-batch {} of {}, samples {ids:?}",
                    step + 1,
                    micro + 1,
                    cfg.grad_accum
                )
            };
            let loss = match distill.as_mut() {
                Some(d) => {
                    d.set_step(step);
                    let l = d.forward_samples(&mut m, &seqs, Some(&idx))?;
                    let parts = [
                        ("kd", &mut kd, l.kd),
                        ("hidden", &mut hidden, l.hidden),
                        ("attention", &mut attention, l.attention),
                        ("affinity", &mut affinity, l.affinity),
                        ("relational", &mut relational, l.relational),
                        ("vision", &mut vision, l.vision),
                    ];
                    for (name, acc, v) in parts {
                        if let Some(v) = v {
                            finite_loss(name, v, &at)?;
                            *acc = (acc.0 + v as f64, acc.1 + 1);
                        }
                    }
                    l.ce
                }
                None => m.forward(&seqs)?,
            };
            finite_loss("cross-entropy", loss, &at)?;
            if let Some(g) = m.grounding_loss() {
                finite_loss("grounding", g, &at)?;
                grounding = (grounding.0 + g as f64, grounding.1 + 1);
            }
            m.backward()?;
            if let Some(p) = m
                .params
                .iter()
                .find(|p| p.grad.iter().any(|g| !g.is_finite()))
            {
                return Err(Error::arg(
                    "training",
                    format!(
                        "the gradient of `{}` is not finite ({}); stopped before the update, \
                         the newest checkpoint is unchanged",
                        p.name,
                        at()
                    ),
                ));
            }
            loss_sum += loss as f64;
            if cfg.grad_accum > 1 {
                if micro == 0 {
                    sums = m.params.iter().map(|p| p.grad.clone()).collect();
                } else {
                    for (s, p) in sums.iter_mut().zip(&m.params) {
                        s.iter_mut().zip(&p.grad).for_each(|(a, g)| *a += g);
                    }
                }
            }
        }
        if cfg.grad_accum > 1 {
            let f = 1.0 / cfg.grad_accum as f32;
            for (s, p) in sums.iter_mut().zip(&mut m.params) {
                std::mem::swap(s, &mut p.grad);
                p.grad.iter_mut().for_each(|g| *g *= f);
            }
        }
        let loss = (loss_sum / cfg.grad_accum as f64) as f32;
        let grad_norm = match cfg.max_grad_norm {
            Some(n) => Some(opt.clip_grad_norm(&mut m.params, n as f32)?),
            None => None,
        };
        opt.step(&mut m.params)?;
        let rec = StepRecord {
            step: step + 1,
            loss,
            grad_norm,
            lr,
            tokens,
            grounding: (grounding.1 > 0).then(|| (grounding.0 / grounding.1 as f64) as f32),
            kd: (kd.1 > 0).then(|| (kd.0 / kd.1 as f64) as f32),
            hidden: (hidden.1 > 0).then(|| (hidden.0 / hidden.1 as f64) as f32),
            attention: (attention.1 > 0).then(|| (attention.0 / attention.1 as f64) as f32),
            affinity: (affinity.1 > 0).then(|| (affinity.0 / affinity.1 as f64) as f32),
            relational: (relational.1 > 0).then(|| (relational.0 / relational.1 as f64) as f32),
            vision: (vision.1 > 0).then(|| (vision.0 / vision.1 as f64) as f32),
        };
        csv.write_all(csv_row(&rec).as_bytes())
            .and_then(|_| csv.flush())
            .map_err(|e| Error::io(&csv_path, e))?;
        let ground = rec
            .terms()
            .iter()
            .filter_map(|(n, v)| v.map(|v| format!(" {n} {v:.3}")))
            .collect::<String>();
        history.push(rec);
        run_tokens += tokens;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {loss:.4}{} lr {lr:.2e} {:.0} tok/s",
            ground,
            run_tokens as f64 / secs
        ));
        bar.inc(1);
        let s = step + 1;
        if s == end || (cfg.checkpoint_every > 0 && s % cfg.checkpoint_every == 0) {
            checkpoint = Some(save_all(cfg, &m, &opt, &loader, s, &settings)?);
        }
    }
    bar.finish();
    let checkpoint = match checkpoint {
        Some(c) => c,
        None => save_all(cfg, &m, &opt, &loader, end, &settings)?,
    };
    if !history.is_empty() {
        let points = history
            .iter()
            .map(|r| (r.step as f64, r.loss as f64))
            .collect();
        line_plot(
            &cfg.output.join("loss"),
            "training loss",
            "step",
            "loss",
            &[Series {
                label: "train".into(),
                points,
            }],
        )?;
        // The other terms of the objective, each unweighted, when there are any.
        let series: Vec<Series> = (0..StepRecord::TERMS)
            .map(|k| Series {
                label: history[0].terms()[k].0.to_string(),
                points: history
                    .iter()
                    .filter_map(|r| r.terms()[k].1.map(|v| (r.step as f64, v as f64)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if !series.is_empty() {
            line_plot(
                &cfg.output.join("terms"),
                "objective terms (unweighted)",
                "step",
                "loss",
                &series,
            )?;
        }
    }
    Ok(TrainSummary {
        start_step: start,
        end_step: end,
        history,
        checkpoint,
        tokens: run_tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
