//! Model definitions and everything needed to load them: config, weights, tokenizer, template, image.

pub mod anyres;
pub mod chat;
pub mod clip;
pub mod config;
pub mod flops;
pub mod gguf;
pub mod image;
mod jpeg;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod quantize;
pub mod template;
pub mod tokenizer;
pub mod weights;

use crate::error::{Error, Result};
use crate::tensor::{DType, Device};
use config::ModelConfig;
use image::ImageProcessorConfig;
use llama::Llama;
use llava::VisionEncoder;
use nn::{Param, ParamBuilder};
use std::path::{Path, PathBuf};
use tokenizer::Tokenizer;

/// How [`Model::load_with`] loads a model: onto which device, in which dtype, quantized or not.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// Weight dtype (`None`: as stored on the CPU; see [`Model::load_on`]).
    pub dtype: Option<DType>,
    /// Quantize the linear weights on load (CPU only).
    pub quantize: Option<quantize::Quantize>,
}

impl Default for LoadOptions {
    /// The CPU, weights as stored, nothing quantized.
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: None,
            quantize: None,
        }
    }
}

/// A loaded model: a LLaMA language model, with a vision encoder for LLaVA checkpoints.
pub struct Model {
    pub config: ModelConfig,
    /// Every weight, on the model's device; the blocks of `lm` and `vision` index into it.
    pub params: Vec<Param>,
    pub lm: Llama,
    /// Vision tower + projector (LLaVA only).
    pub vision: Option<VisionEncoder>,
    pub tokenizer: Tokenizer,
    /// Image preprocessing (LLaVA only; CLIP defaults when the checkpoint has no processor config).
    pub image_processor: Option<ImageProcessorConfig>,
    /// The system prompt its chat template puts before `USER:` ([`template::system_of_model`]):
    /// LLaVA-1.5's for models trained by `distill`, None for llava-hf checkpoints and GGUF files.
    /// The CLIs use it unless told otherwise; library callers pass it in
    /// [`template::PromptOptions::system`].
    pub system: Option<String>,
    /// Its chat template ([`chat::ChatTemplate`]: the directory's, or a GGUF's
    /// `tokenizer.chat_template`), which renders [`crate::Request::chat`] messages.
    pub chat_template: Option<chat::ChatTemplate>,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The checkpoint's key prefixes (its detected key layout).
    pub layout: Vec<&'static str>,
    /// Every tensor as stored: canonical name, shape, dtype.
    pub tensors: Vec<(String, Vec<usize>, String)>,
}

impl Model {
    /// The system prompt to ask this model with: LLaVA-1.5's ([`template::LLAVA_SYSTEM`]) when
    /// `llava` (the CLIs' `--llava-system`), else the model's own [`Model::system`].
    pub fn system_prompt(&self, llava: bool) -> Option<String> {
        if llava {
            Some(template::LLAVA_SYSTEM.to_string())
        } else {
            self.system.clone()
        }
    }

    /// Loads an HF model directory (`config.json`, safetensors weights, `tokenizer.json`, and the
    /// image processor config) or a LLaMA-architecture `.gguf` file onto the CPU, weights in
    /// their stored dtype.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(path, &Device::Cpu, None)
    }

    /// [`Model::load`] onto `device`, weights converted to `dtype` when given. The CPU computes
    /// in f32 with weights in any dtype (`None`: as stored); a GPU computes in one dtype
    /// throughout, `dtype` or else the embedding table's stored dtype (bf16 for most released
    /// checkpoints, so a LLaVA-1.5-7B needs about 14 GB of GPU memory). Weights go to the device
    /// one tensor at a time.
    pub fn load_on(path: impl AsRef<Path>, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let opts = LoadOptions {
            device: device.clone(),
            dtype,
            quantize: None,
        };
        Self::load_with(path, &opts)
    }

    /// [`Model::load_on`] with every option: `opts.quantize` turns the linear weights into
    /// GGUF blocks as they are read ([`quantize::Quantize`]; CPU only), each tensor quantized
    /// before the next is read, so the f32 or bf16 checkpoint is never held whole.
    pub fn load_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let (path, device, dtype) = (path.as_ref(), &opts.device, opts.dtype);
        if let Some(q) = opts.quantize {
            if !device.is_cpu() {
                return Err(Error::arg(
                    "quantize",
                    format!("quantized weights run on the CPU, not on {device}"),
                ));
            }
            // Fails for a type the quantizers do not write.
            quantize::parse_type(&q.ty.name())?;
        }
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "model (an HF directory or a .gguf file)",
                path: path.to_path_buf(),
            });
        }
        if path.is_file() {
            return Self::load_gguf(path, opts);
        }
        let config = ModelConfig::from_file(&path.join("config.json"))?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let image_processor = match &config {
            ModelConfig::Llava(c) => Some(ImageProcessorConfig::from_model_dir(
                path,
                c.vision.image_size,
            )?),
            ModelConfig::Llama(_) => None,
        };
        let mut w = weights::Weights::from_dir(path)?;
        place(&mut w, device, dtype);
        let tied = config.text().tie_word_embeddings || !w.contains("lm_head.weight");
        w.quantize(opts.quantize, tied);
        let layout = w.layout();
        let tensors = w.summary();
        let mut b = ParamBuilder::new(&mut w, false);
        let vision = match &config {
            ModelConfig::Llava(c) => Some(VisionEncoder::load(c, &mut b)?),
            ModelConfig::Llama(_) => None,
        };
        let lm = Llama::load(config.text(), &mut b)?;
        let chat_template = chat::ChatTemplate::from_model_dir(path)?
            .map(|t| t.with_text_content(vision.is_none()));
        Ok(Model {
            config,
            params: b.finish(),
            lm,
            vision,
            tokenizer,
            image_processor,
            system: template::system_of_model(path)?,
            chat_template,
            source: path.to_path_buf(),
            layout,
            tensors,
        })
    }

    /// Loads a LLaMA GGUF file: weights dequantised to f32 (f16/bf16 kept), tokenizer from its
    /// metadata (`tokenizer.json` beside the file, if present, takes precedence).
    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let g = gguf::load_llama(path)?;
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.exists() {
            Tokenizer::from_file(&beside)?
        } else {
            let inner = g.tokenizer.ok_or_else(|| Error::MissingFile {
                what: "tokenizer (the GGUF has no tokenizer metadata and no tokenizer.json is beside it)",
                path: beside.clone(),
            })?;
            Tokenizer::from_inner(inner, path)
        };
        let mut w = weights::Weights::from_tensors(g.tensors, &path.display().to_string());
        place(&mut w, &opts.device, opts.dtype);
        let tied = g.config.tie_word_embeddings || !w.contains("lm_head.weight");
        w.quantize(opts.quantize, tied);
        // Report the types as stored in the file (e.g. `Q4_1`), not the dequantised f32.
        let stored: std::collections::HashMap<String, String> = gguf::GgufFile::open(path)?
            .tensor_infos()
            .iter()
            .filter_map(|t| gguf::hf_name(&t.name).map(|n| (n, t.ggml_type.name())))
            .collect();
        let mut layout = vec!["token_embd.", "blk.N.", "output_norm."];
        if stored.contains_key("lm_head.weight") {
            layout.push("output.");
        }
        let tensors = w
            .summary()
            .into_iter()
            .map(|(name, shape, dtype)| {
                let raw = match name.strip_prefix("lm.") {
                    Some(rest) => format!("model.{rest}"),
                    None => name.clone(),
                };
                let dtype = stored.get(&raw).cloned().unwrap_or(dtype);
                (name, shape, dtype)
            })
            .collect();
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        let special = [
            ("bos_token", token(g.config.bos_token_id)),
            ("eos_token", token(g.config.eos_token_ids.first().copied())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)));
        let chat_template = match gguf::GgufFile::open(path)?.chat_template()? {
            Some(src) => Some(
                chat::ChatTemplate::new(&src)?
                    .with_special_tokens(special)
                    .with_text_content(true),
            ),
            None => None,
        };
        let config = ModelConfig::Llama(g.config);
        let mut b = ParamBuilder::new(&mut w, false);
        let lm = Llama::load(config.text(), &mut b)?;
        Ok(Model {
            config,
            params: b.finish(),
            lm,
            vision: None,
            tokenizer,
            image_processor: None,
            system: None,
            chat_template,
            source: path.to_path_buf(),
            layout,
            tensors,
        })
    }

    /// The device the model computes on.
    pub fn device(&self) -> Device {
        self.params
            .first()
            .map_or(Device::Cpu, |p| p.value.device())
    }

    /// Total parameter count of the stored tensors.
    pub fn num_parameters(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }
}

/// Points `w` at `device`: in `dtype`, or on a GPU (one compute dtype for every kernel) in the
/// embedding table's stored dtype.
fn place(w: &mut weights::Weights, device: &Device, dtype: Option<DType>) {
    let dtype = match dtype {
        Some(d) => Some(d),
        None if device.is_cpu() => None,
        // A GPU computes in one float dtype: quantized weights go up dequantised to bf16.
        None => w
            .dtype_of("lm.embed_tokens.weight")
            .map(|d| if d.is_quant() { DType::BF16 } else { d }),
    };
    w.place(device.clone(), dtype);
}
