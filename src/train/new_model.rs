//! A LLaVA model trained from scratch: the `[new_model]` table of a training config.
//!
//! [`create_model`] writes a complete llava-hf checkpoint folder before the first step:
//! `tokenizer.json` trained on the run's conversations ([`train_tokenizer`]), `config.json` with
//! the shape given here (CLIP vision tower, GELU projector, LLaMA language model),
//! `preprocessor_config.json` (CLIP preprocessing at `image_size`), `chat_template.json` (the
//! LLaVA-1.5 conversation format the trainer uses, system prompt included) and the freshly initialised
//! weights ([`TrainModel::init`]). Training then starts from that folder as from any checkpoint.

use super::checkpoint::save_checkpoint;
use super::model::{TrainModel, hf_name, init_values};
use super::tokenizer_train::{
    ADDED_SPECIALS, TokenizerTrainConfig, conversation_texts, train_tokenizer,
};
use crate::error::{Error, Result};
use crate::io::{OutTensor, write_atomic, write_safetensors};
use crate::model::config::{LlavaConfig, ModelConfig};
use crate::model::template::LLAVA_V1_CHAT_TEMPLATE;
use crate::model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

fn default_feature_layer() -> i64 {
    -1
}
fn default_std() -> f32 {
    0.02
}
fn default_max_pos() -> usize {
    1024
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// Largest value of any size of a `[new_model]` (widths, layer and head counts, vocabulary,
/// `max_position_embeddings`).
pub const MAX_DIM: usize = 1 << 20;
/// Largest `image_size` of a `[new_model]`, in pixels (CLIP ViT-L/14 takes 336).
pub const MAX_IMAGE_SIZE: usize = 2048;
/// Most parameters of a `[new_model]`: 2^30, 4 GiB of f32 weights (16 GiB with their gradients
/// and AdamW's moments), far beyond what this CPU trainer trains from scratch.
pub const MAX_PARAMETERS: u128 = 1 << 30;

/// The shape of a new model (TOML `[new_model]`). Every size is at most [`MAX_DIM`],
/// `image_size` at most [`MAX_IMAGE_SIZE`] and the parameter count ([`NewModel::parameters`]) at
/// most [`MAX_PARAMETERS`], checked before anything is allocated.
///
/// ```toml
/// [new_model]
/// image_size = 96          # input side in pixels (the CLIP processor crops to it)
/// patch_size = 8           # (image_size / patch_size)² image tokens
/// vision_hidden_size = 128
/// vision_intermediate_size = 512
/// vision_layers = 4
/// vision_heads = 4
/// hidden_size = 192        # language model
/// intermediate_size = 512
/// layers = 4
/// heads = 6
/// kv_heads = 2
/// vocab_size = 512         # most tokens of the tokenizer trained on the run's data (specials
///                          # and bytes included; a small corpus may learn fewer)
/// # optional (defaults): vision_feature_layer = -1, init_std = 0.02, init_seed = 0,
/// # max_position_embeddings = 1024, rope_theta = 10000.0, tie_word_embeddings = false
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NewModel {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden_size: usize,
    pub vision_intermediate_size: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_std")]
    pub init_std: f32,
    #[serde(default)]
    pub init_seed: u64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl NewModel {
    /// Checks the shape; errors name the `new_model.*` field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::arg(format!("new_model.{f}"), m));
        for (f, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("vision_hidden_size", self.vision_hidden_size),
            ("vision_intermediate_size", self.vision_intermediate_size),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(f, "must be at least 1".into());
            }
            if v > MAX_DIM {
                return bad(f, format!("{v} is more than {MAX_DIM}"));
            }
        }
        if self.vocab_size > MAX_DIM {
            return bad(
                "vocab_size",
                format!("{} is more than {MAX_DIM}", self.vocab_size),
            );
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return bad(
                "image_size",
                format!("{} is more than {MAX_IMAGE_SIZE}", self.image_size),
            );
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        if !self.vision_hidden_size.is_multiple_of(self.vision_heads) {
            return bad(
                "vision_heads",
                format!(
                    "{} does not divide vision_hidden_size {}",
                    self.vision_heads, self.vision_hidden_size
                ),
            );
        }
        if !self.hidden_size.is_multiple_of(self.heads)
            || !(self.hidden_size / self.heads).is_multiple_of(2)
        {
            return bad(
                "heads",
                format!(
                    "{} must divide hidden_size {} into an even head size (RoPE)",
                    self.heads, self.hidden_size
                ),
            );
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "kv_heads",
                format!("{} does not divide heads {}", self.kv_heads, self.heads),
            );
        }
        let states = self.vision_layers as i64 + 1;
        let l = self.vision_feature_layer;
        if !(-states..states).contains(&l) {
            return bad(
                "vision_feature_layer",
                format!("{l} is outside the {states} vision hidden states"),
            );
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad("init_std", format!("{} must be > 0", self.init_std));
        }
        let tokens = (self.image_size / self.patch_size).pow(2);
        if tokens >= self.max_position_embeddings {
            return bad(
                "max_position_embeddings",
                format!(
                    "{} leaves no room for text after {tokens} image tokens",
                    self.max_position_embeddings
                ),
            );
        }
        let n = self.parameters();
        if n > MAX_PARAMETERS {
            return Err(Error::arg(
                "new_model",
                format!(
                    "the shape has {n} parameters, more than {MAX_PARAMETERS}: make the widths, \
                     layer counts or vocabulary smaller"
                ),
            ));
        }
        // The tokenizer checks vocab_size against its fixed tokens.
        Ok(())
    }

    /// Number of parameters of this shape at the full `vocab_size` (CLIP tower, projector,
    /// LLaMA, `lm_head` when untied), in u128 so no size up to [`MAX_DIM`] overflows it.
    pub fn parameters(&self) -> u128 {
        let [vh, vi, h, i, vocab] = [
            self.vision_hidden_size,
            self.vision_intermediate_size,
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
        ]
        .map(|x| x as u128);
        let grid = (self.image_size / self.patch_size.max(1)) as u128;
        let patch = self.patch_size as u128;
        let kv = h / self.heads.max(1) as u128 * self.kv_heads as u128;
        let vision_layer = 4 * vh * vh + 4 * vh + 2 * vh * vi + vi + vh + 4 * vh;
        let vision = 3 * patch * patch * vh
            + (grid * grid + 2) * vh
            + 4 * vh
            + self.vision_layers as u128 * vision_layer;
        let projector = vh * h + h + h * h + h;
        let lm_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        vision + projector + self.layers as u128 * lm_layer + h + heads * vocab * h
    }

    /// The llava-hf `config.json` of this shape, with the tokenizer's `<image>` and `<pad>` ids;
    /// `<pad>` is the tokenizer's last id, so the vocabulary is `pad + 1` (at most `vocab_size`).
    pub fn config_json(&self, image: u32, pad: u32) -> serde_json::Value {
        let vocab = pad as usize + 1;
        let tokens = (self.image_size / self.patch_size).pow(2);
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "ignore_index": -100,
            "image_token_index": image,
            "image_seq_length": tokens,
            "pad_token_id": pad,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "vocab_size": vocab,
            "text_config": {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": vocab,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "head_dim": self.hidden_size / self.heads,
                "hidden_act": "silu",
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": 1e-6,
                "rope_theta": self.rope_theta,
                "rope_scaling": null,
                "attention_bias": false,
                "mlp_bias": false,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": pad,
                "tie_word_embeddings": self.tie_word_embeddings,
                "torch_dtype": "float32",
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision_hidden_size,
                "intermediate_size": self.vision_intermediate_size,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "num_channels": 3,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": self.vision_hidden_size,
            },
        })
    }

    /// CLIP's `preprocessor_config.json` at `image_size` (resize the short side, centre-crop).
    pub fn preprocessor_json(&self) -> serde_json::Value {
        let s = self.image_size;
        json!({
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": true,
            "size": {"shortest_edge": s},
            "resample": 3,
            "do_center_crop": true,
            "crop_size": {"height": s, "width": s},
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": true,
        })
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("json values serialize");
    write_atomic(path, s.as_bytes())
}

/// Writes a new model of shape `shape` to `dir` (created): tokenizer trained on the texts of
/// every file of `data` (LLaVA conversation jsons: all the data the model will see), config,
/// processor config, chat template and initial weights.
pub fn create_model(shape: &NewModel, data: &[&Path], dir: &Path) -> Result<()> {
    shape.validate()?;
    let mut convs = Vec::new();
    for d in data {
        convs.extend(super::data::read_conversations(d)?);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok_cfg = TokenizerTrainConfig {
        vocab_size: shape.vocab_size,
        ..Default::default()
    };
    train_tokenizer(
        &conversation_texts(&convs),
        &tok_cfg,
        &dir.join("tokenizer.json"),
    )?;
    // A small corpus may learn fewer pieces than the budget: take the ids the tokenizer has.
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let id = |t: &str| {
        tok.token_to_id(t).ok_or_else(|| Error::Tokenizer {
            path: dir.join("tokenizer.json"),
            msg: format!("the trained tokenizer has no `{t}`"),
        })
    };
    let (image, pad) = (id(ADDED_SPECIALS[0])?, id(ADDED_SPECIALS[1])?);
    let config_path = dir.join("config.json");
    write_json(&config_path, &shape.config_json(image, pad))?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &shape.preprocessor_json(),
    )?;
    // The conversation format the trainer uses, for transformers' processor and our CLIs.
    write_json(
        &dir.join("chat_template.json"),
        &json!({ "chat_template": LLAVA_V1_CHAT_TEMPLATE }),
    )?;
    let config: LlavaConfig = match ModelConfig::from_file(&config_path)? {
        ModelConfig::Llava(c) => c,
        ModelConfig::Llama(_) => {
            return Err(Error::Config {
                path: config_path,
                msg: "expected a LLaVA config".into(),
            });
        }
    };
    // transformers' CLIP also holds `post_layernorm` and the layers past the deepest feature
    // layer, which LLaVA never runs and the trainer does not hold: they are written once here
    // (initialised by the same rule) and carried into every checkpoint by `save_checkpoint`.
    let unheld = unheld_vision_tensors(&config, shape.init_std, shape.init_seed);
    let out: Vec<OutTensor> = unheld
        .iter()
        .map(|(n, s, v)| OutTensor::F32(n, s.clone(), v))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &out)?;
    let model = TrainModel::init(&config, shape.init_std, shape.init_seed)?;
    save_checkpoint(&model, dir, dir)
}

/// `post_layernorm` and the encoder layers from the deepest `vision_feature_layer` on, as
/// (transformers name, shape, initial values).
fn unheld_vision_tensors(
    c: &LlavaConfig,
    std: f32,
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let v = &c.vision;
    let (h, i) = (v.hidden_size, v.intermediate_size);
    let states = v.num_hidden_layers as i64 + 1;
    let deepest = c
        .vision_feature_layers
        .iter()
        .map(|&l| if l < 0 { states + l } else { l })
        .max()
        .unwrap_or(0) as usize;
    let mut names: Vec<(String, Vec<usize>)> = Vec::new();
    for l in deepest..v.num_hidden_layers {
        let p = format!("vision.encoder.layers.{l}");
        for n in ["layer_norm1", "layer_norm2"] {
            names.push((format!("{p}.{n}.weight"), vec![h]));
            names.push((format!("{p}.{n}.bias"), vec![h]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            names.push((format!("{p}.self_attn.{n}.weight"), vec![h, h]));
            names.push((format!("{p}.self_attn.{n}.bias"), vec![h]));
        }
        names.push((format!("{p}.mlp.fc1.weight"), vec![i, h]));
        names.push((format!("{p}.mlp.fc1.bias"), vec![i]));
        names.push((format!("{p}.mlp.fc2.weight"), vec![h, i]));
        names.push((format!("{p}.mlp.fc2.bias"), vec![h]));
    }
    names.push(("vision.post_layernorm.weight".into(), vec![h]));
    names.push(("vision.post_layernorm.bias".into(), vec![h]));
    let mut state = seed ^ 0x005e_ed0f_c11b;
    names
        .into_iter()
        .map(|(n, s)| {
            let v = init_values(&n, &s, std, &mut state);
            (hf_name(&n).1, s, v)
        })
        .collect()
}
