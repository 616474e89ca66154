//! Model definitions and everything needed to load them: config, weights, tokenizer, template, image.

pub mod clip;
pub mod config;
pub mod gguf;
pub mod image;
mod jpeg;
pub mod llama;
pub mod llava;
pub mod template;
pub mod tokenizer;
pub mod weights;

use crate::error::{Error, Result};
use config::ModelConfig;
use llama::Llama;
use llava::VisionEncoder;
use std::path::{Path, PathBuf};
use tokenizer::Tokenizer;

/// A loaded model: a LLaMA language model, with a vision encoder for LLaVA checkpoints.
pub struct Model {
    pub config: ModelConfig,
    pub lm: Llama,
    /// Vision tower + projector (LLaVA only).
    pub vision: Option<VisionEncoder>,
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The checkpoint's key prefixes (its detected key layout).
    pub layout: Vec<&'static str>,
    /// Every tensor as stored: canonical name, shape, dtype.
    pub tensors: Vec<(String, Vec<usize>, String)>,
}

impl Model {
    /// Loads an HF model directory (`config.json`, safetensors weights, `tokenizer.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let dir = path.as_ref();
        if !dir.exists() {
            return Err(Error::MissingFile {
                what: "model directory",
                path: dir.to_path_buf(),
            });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let mut w = weights::Weights::from_dir(dir)?;
        let layout = w.layout();
        let tensors = w.summary();
        let vision = match &config {
            ModelConfig::Llava(c) => Some(VisionEncoder::load(c, &mut w)?),
            ModelConfig::Llama(_) => None,
        };
        let lm = Llama::load(config.text(), &mut w)?;
        Ok(Model {
            config,
            lm,
            vision,
            tokenizer,
            source: dir.to_path_buf(),
            layout,
            tensors,
        })
    }

    /// Total parameter count of the stored tensors.
    pub fn num_parameters(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }
}
