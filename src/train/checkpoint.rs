//! Checkpoint writing: a [`TrainModel`] as a directory that transformers 5.x
//! (`LlavaForConditionalGeneration.from_pretrained`) and our own [`crate::Model::load`] read.
//!
//! `model.safetensors` holds every tensor in f32 under the transformers 5.x keys
//! (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
//! `lm_head.weight` only when the head is untied). The trainer holds only the vision layers up to
//! the deepest selected feature layer; the tensors it does not hold (deeper vision layers,
//! `post_layernorm`) are copied from the source checkpoint so the file is complete (no missing
//! keys in transformers). config.json, tokenizer and processor files are copied from the source
//! directory. Every file is written atomically (temporary file + rename). A model with a
//! non-finite value in any tensor is refused before anything is written.

use super::model::{TrainModel, hf_name};
use crate::error::{Error, Result};
use crate::io::{OutTensor, write_atomic, write_safetensors};
use crate::model::weights::Weights;
use std::collections::HashSet;
use std::path::Path;

/// Files copied from the source directory when present.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    crate::bench::shapes::MODEL_SHAPES_CONFIG,
];

/// Checks that `dir` exists (creating it) and accepts a new file, before anything is written.
fn ensure_writable(dir: &Path) -> Result<()> {
    let unwritable = |e: std::io::Error| {
        Error::arg(
            "checkpoint output directory",
            format!("{} is not writable: {e}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(format!(".fineprune-write-probe{}", std::process::id()));
    std::fs::File::create(&probe).map_err(unwritable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Errors naming the first tensor of `tensors` (name, values) that holds a NaN or an infinity.
fn check_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    out_dir: &Path,
) -> Result<()> {
    for (name, values) in tensors {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::arg(
                "checkpoint",
                format!(
                    "tensor `{name}` holds {v} at index {i}: no checkpoint is written from \
                     non-finite weights ({} left as it was)",
                    out_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Writes `model` as a checkpoint in `out_dir` (created if needed): `model.safetensors` plus
/// config, tokenizer and processor files copied from `src_dir` (the checkpoint the model was
/// loaded from or whose config it was built with). `config.json` must be in `src_dir`. Errors,
/// writing nothing, when a tensor to write holds a NaN or an infinity, naming the first.
pub fn save_checkpoint(model: &TrainModel, src_dir: &Path, out_dir: &Path) -> Result<()> {
    let values = model
        .params
        .iter()
        .map(|p| Ok((p.name.as_str(), p.f32s()?)))
        .collect::<Result<Vec<_>>>()?;
    check_finite(values.iter().copied(), out_dir)?;
    let config = src_dir.join("config.json");
    if !config.exists() {
        return Err(Error::MissingFile {
            what: "config.json of the source checkpoint",
            path: config,
        });
    }
    ensure_writable(out_dir)?;

    // Read everything before writing anything, so src_dir == out_dir works too.
    let mut copies = Vec::new();
    for name in COPIED_FILES {
        let p = src_dir.join(name);
        if p.exists() {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            copies.push((*name, bytes));
        }
    }

    // Tensors the trainer does not hold, from the source weights (when it has any).
    let held: HashSet<&str> = model.params.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let has_weights = src_dir.join("model.safetensors").exists()
        || src_dir.join("model.safetensors.index.json").exists();
    if has_weights {
        let mut w = Weights::from_dir(src_dir)?;
        for (canonical, shape, _) in w.summary() {
            let (_, hf) = hf_name(&canonical);
            if held.contains(hf.as_str()) || (model.tied() && canonical.starts_with("lm_head.")) {
                continue;
            }
            let v = w.take(&canonical, &shape)?.into_f32_vec()?;
            extra.push((hf, shape, v));
        }
    }
    check_finite(
        extra.iter().map(|(n, _, v)| (n.as_str(), v.as_slice())),
        out_dir,
    )?;

    // Distillation's alignment projectors (group `align.*`) are not part of the model.
    let mut tensors: Vec<OutTensor> = model
        .params
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.group.starts_with("align."))
        .map(|(i, p)| {
            Ok(OutTensor::F32(
                &p.name,
                model.param_shape(i).to_vec(),
                p.f32s()?,
            ))
        })
        .collect::<Result<_>>()?;
    tensors.extend(
        extra
            .iter()
            .map(|(n, s, v)| OutTensor::F32(n, s.clone(), v)),
    );
    write_safetensors(&out_dir.join("model.safetensors"), &tensors)?;
    // A stale index from an earlier sharded save would shadow the new single file.
    let stale = out_dir.join("model.safetensors.index.json");
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    for (name, bytes) in copies {
        write_atomic(&out_dir.join(name), &bytes)?;
    }
    Ok(())
}
