//! The distillation trainer, written by hand in the spirit of llm.c: parameters are plain `f32`
//! buffers owned by the model code, gradients are buffers of the same length, and every update
//! rule is spelled out here rather than hidden behind an autograd framework.
//!
//! - [`optim`]: AdamW (bit-for-bit the formula of `torch.optim.AdamW`), parameter groups with
//!   per-group learning rate, weight decay and freezing (LLaVA's two stages), warm-up + cosine
//!   schedule, global-norm gradient clipping, gradient accumulation and resumable optimizer state.
//! - [`data`]: LLaVA conversation json -> token ids with answer-only labels (LLaVA-1.5's
//!   `preprocess_v1` masking) and pixel values; a seeded, resumable loader.
//! - [`tokenizer_train`]: trains a LLaMA-style byte-fallback BPE `tokenizer.json` for new models.
//! - [`model`]: LLaVA with f32 parameters, training forward with caches and the full backward.
//! - [`new_model`]: the shape of a model trained from scratch, and its creation (tokenizer, config, init).
//! - [`checkpoint`]: writes a model as a transformers 5.x-loadable checkpoint directory.
//! - [`student`]: distillation students made from a teacher checkpoint (truncated or fresh
//!   language model, picked vision layers, reused or fresh projector): `distill init-student`.
//! - [`vision_pretrain`]: pretrains a from-scratch vision tower on ShapesVQA's per-patch labels.
//! - [`distill`]: knowledge distillation from a frozen teacher (logit losses, hidden-state
//!   alignment through dropped projectors), the `[distill]` table of a training config.
//! - [`logits`]: the `[distill.logits]` settings and the rows a distillation loss reads, shared by
//!   [`distill`] and [`teacher_cache`].
//! - [`run`]: the training loop behind `distill train`: TOML config, losses, resumable checkpoints.
//! - [`lock`]: the lock a run holds on its output folder (one run per folder).
//! - [`regenerate`]: `distill regenerate`, the teacher re-answers a training set (LLaVADI).
//! - [`teacher_cache`]: `distill cache-teacher`, the teacher's top-k logit-KD targets, written once.
//!
//! [`progress_bar`] is the step counter of the long-running commands (training, caching).

pub mod checkpoint;
pub mod data;
pub mod distill;
pub mod lock;
pub mod logits;
pub mod model;
pub mod new_model;
pub mod optim;
pub mod regenerate;
pub mod run;
pub mod student;
pub mod teacher_cache;
pub mod tokenizer_train;
pub mod vision_pretrain;

/// The LLaVA config of the checkpoint in `dir`, for the trainer: a LLaMA checkpoint, or a
/// LLaVA-NeXT one (any-resolution tiles: the trainer's image path, its data, caches and
/// student init assume one tile of `image_tokens` per image) is an [`Error::Arg`] on `what`.
pub(crate) fn llava_config(
    dir: &std::path::Path,
    what: &str,
) -> crate::error::Result<crate::model::config::LlavaConfig> {
    use crate::model::config::ModelConfig;
    match ModelConfig::from_file(&dir.join("config.json"))? {
        ModelConfig::Llava(c) => {
            check_trainable(&c).map_err(|msg| {
                crate::error::Error::arg(what, format!("{}: {msg}", dir.display()))
            })?;
            Ok(c)
        }
        ModelConfig::Llama(_) => Err(crate::error::Error::arg(
            what,
            format!("{} is a LLaMA checkpoint, not LLaVA", dir.display()),
        )),
    }
}

/// Why the trainer cannot take a model of config `c`, if it cannot.
pub(crate) fn check_trainable(
    c: &crate::model::config::LlavaConfig,
) -> std::result::Result<(), String> {
    match c.is_anyres() {
        true => Err(
            "LLaVA-NeXT (any-resolution tiles) is not supported by the trainer and \
                     distill, whose image path takes one tile per image; it runs for inference \
                     and pruning only"
                .into(),
        ),
        false => Ok(()),
    }
}

/// A counter of `len` `unit`s (steps, answers) on stderr, hidden unless `show`: elapsed time,
/// bar, count, message, eta.
pub fn progress_bar(len: u64, show: bool, unit: &str) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let template = format!(
        "{{prefix}} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} (eta {{eta}})"
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
