//! Model configuration from HF `config.json`, in both the transformers 4.x spellings (`rope_theta`,
//! `torch_dtype`, `image_token_index`) and the 5.x ones (`rope_parameters`, `dtype`, `image_token_id`).
//! Absent keys take HF's class defaults (`LlamaConfig`, `CLIPVisionConfig`, `LlavaConfig`), because
//! real llava-hf configs only list what differs from them.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The LLaMA language model (mirrors `LlamaConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The CLIP vision tower (mirrors `CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

/// Whether an f32 tensor of these dimensions has more bytes than an allocation can.
fn too_large(dims: &[usize]) -> bool {
    dims.iter()
        .try_fold(4usize, |b, &d| b.checked_mul(d))
        .is_none_or(|b| b > isize::MAX as usize)
}

impl TextConfig {
    /// Refuses values no model can have, before anything is sized from them: zero sizes or layer
    /// counts, a `head_dim` that is zero or odd, weight matrices whose element count overflows,
    /// and non-finite or negative `rms_norm_eps` / non-positive `rope_theta`. The error is
    /// `(field, message)`; the caller names the field the way its source spells it.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be at least 1, got 0".into()));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err((
                "head_dim",
                format!("must be even for RoPE, got {}", self.head_dim),
            ));
        }
        let h = self.hidden_size;
        let matrices = [
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            (
                "num_attention_heads",
                self.num_attention_heads.saturating_mul(self.head_dim),
            ),
        ];
        for (field, rows) in matrices {
            if too_large(&[rows, h]) {
                return Err((
                    field,
                    format!("{rows} x hidden_size {h} is larger than any weight that can exist"),
                ));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err((
                "rms_norm_eps",
                format!("must be a finite number >= 0, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err((
                "rope_theta",
                format!("must be a finite number > 0, got {}", self.rope_theta),
            ));
        }
        Ok(())
    }
}

impl VisionConfig {
    /// Refuses values no vision tower can have (see [`TextConfig::check`]): zero sizes, an image
    /// smaller than a patch or not a whole number of patches, a hidden size the heads do not
    /// divide, a non-finite or negative `layer_norm_eps`.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("patch_size", self.patch_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be at least 1, got 0".into()));
            }
        }
        if self.image_size < self.patch_size || !self.image_size.is_multiple_of(self.patch_size) {
            return Err((
                "image_size",
                format!(
                    "{} is not a positive multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err((
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        let h = self.hidden_size;
        let (s, p) = (self.image_size, self.patch_size);
        for (field, dims) in [
            ("intermediate_size", [self.intermediate_size, h, 1]),
            ("image_size", [s, s, h]),
            ("patch_size", [self.num_channels, p.saturating_mul(p), h]),
        ] {
            if too_large(&dims) {
                return Err((field, "is larger than any tensor that can exist".into()));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err((
                "layer_norm_eps",
                format!("must be a finite number >= 0, got {}", self.layer_norm_eps),
            ));
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// Which vision positions reach the projector (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the CLS token.
    Default,
    /// Keep every position, CLS included.
    Full,
}

/// LLaVA (mirrors `LlavaConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    /// Indices into HF's vision hidden-states list, which starts with the embeddings output.
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    pub projector_hidden_act: String,
    pub projector_bias: bool,
    /// LLaVA-NeXT (`model_type: llava_next`): the `(height, width)` canvases an image may be
    /// tiled into (`image_grid_pinpoints`, whole tiles of `vision.image_size`); `None` for
    /// LLaVA-1.5, whose images are one tile.
    pub image_grid_pinpoints: Option<Vec<(usize, usize)>>,
}

impl LlavaConfig {
    /// Whether images are tiled (LLaVA-NeXT's any resolution), so that the image-token count
    /// depends on each image's size ([`super::anyres::image_token_count`]).
    pub fn is_anyres(&self) -> bool {
        self.image_grid_pinpoints.is_some()
    }

    /// Image tokens one image expands to in the prompt (LLaVA-1.5), or one tile's features
    /// (LLaVA-NeXT, whose images take [`super::anyres::image_token_count`] tokens).
    pub fn image_tokens(&self) -> usize {
        let g = self.vision.grid();
        g * g + usize::from(self.select_strategy == SelectStrategy::Full)
    }
}

/// The architectures we run.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Llava(LlavaConfig),
    Llama(TextConfig),
}

impl ModelConfig {
    /// The language model's configuration.
    pub fn text(&self) -> &TextConfig {
        match self {
            ModelConfig::Llava(c) => &c.text,
            ModelConfig::Llama(c) => c,
        }
    }

    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "config.json",
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` only names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let obj = v.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            msg: "top level is not a JSON object".into(),
        })?;
        let r = Reader {
            path: path.to_path_buf(),
        };
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .or_else(|| {
                obj.get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
            })
            .unwrap_or("");
        match model_type {
            "llava" | "LlavaForConditionalGeneration" => {
                Ok(ModelConfig::Llava(r.llava(obj, false)?))
            }
            "llava_next" | "LlavaNextForConditionalGeneration" => {
                Ok(ModelConfig::Llava(r.llava(obj, true)?))
            }
            "llama" | "LlamaForCausalLM" => {
                Ok(ModelConfig::Llama(r.text(obj, None, Family::Llama)?))
            }
            "mistral" | "MistralForCausalLM" => {
                Ok(ModelConfig::Llama(r.text(obj, None, Family::Mistral)?))
            }
            "" => Err(Error::Config {
                path: path.to_path_buf(),
                msg: "no `model_type` or `architectures` key".into(),
            }),
            other => Err(Error::Unsupported {
                what: "architecture (supported: llava, llava_next, llama, mistral)",
                value: other.to_string(),
            }),
        }
    }
}

struct Reader {
    path: PathBuf,
}

/// The LLaMA-architecture families we read: the same decoder, different class defaults
/// (`LlamaConfig`, `MistralConfig`), and Mistral's sliding window.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    Llama,
    Mistral,
}

impl Family {
    /// The family of a `text_config.model_type` (absent: the outer model's default, LLaMA).
    fn of(model_type: Option<&str>) -> Result<Family> {
        match model_type {
            None | Some("llama") => Ok(Family::Llama),
            Some("mistral") => Ok(Family::Mistral),
            Some(t) => Err(Error::Unsupported {
                what: "LLaVA language model (llama, mistral)",
                value: t.to_string(),
            }),
        }
    }
}

impl Reader {
    fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg,
        }
    }

    fn usize(&self, o: &Map<String, Value>, key: &str, default: Option<usize>) -> Result<usize> {
        match o.get(key) {
            None | Some(Value::Null) => {
                default.ok_or_else(|| self.err(format!("missing key `{key}`")))
            }
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, got {v}"))
            }),
        }
    }

    fn f64(&self, o: &Map<String, Value>, key: &str, default: f64) -> Result<f64> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn bool(&self, o: &Map<String, Value>, key: &str, default: bool) -> Result<bool> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn string(&self, o: &Map<String, Value>, key: &str, default: &str) -> Result<String> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(format!("`{key}` must be a string, got {v}"))),
        }
    }

    fn ids(&self, o: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| self.err(format!("`{key}` holds a non-integer {x}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(format!("`{key}` must be an integer or a list, got {v}"))),
        }
    }

    /// `LlamaConfig` or `MistralConfig` (`family`); `outer` is the LLaVA top level, which may
    /// carry `tie_word_embeddings`. Mistral's `sliding_window` (4096 unless `null`) is refused
    /// when it is shorter than the context, as the engine attends to every earlier position.
    fn text(
        &self,
        o: &Map<String, Value>,
        outer: Option<&Map<String, Value>>,
        family: Family,
    ) -> Result<TextConfig> {
        let mistral = family == Family::Mistral;
        let hidden_size = self.usize(o, "hidden_size", Some(4096))?;
        let heads = self.usize(o, "num_attention_heads", Some(32))?;
        let kv = self.usize(
            o,
            "num_key_value_heads",
            Some(if mistral { 8 } else { heads }),
        )?;
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(self.err(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        let head_dim = self.usize(o, "head_dim", Some(hidden_size / heads))?;
        // 5.x: rope_parameters {rope_type, rope_theta}; 4.x: rope_theta + rope_scaling.
        let (rope_theta, rope_type) = match o.get("rope_parameters").and_then(Value::as_object) {
            Some(p) => (
                self.f64(p, "rope_theta", 10000.0)?,
                self.string(p, "rope_type", "default")?,
            ),
            None => {
                let t = match o.get("rope_scaling").and_then(Value::as_object) {
                    Some(s) => s
                        .get("rope_type")
                        .or_else(|| s.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or("default")
                        .to_string(),
                    None => "default".to_string(),
                };
                (self.f64(o, "rope_theta", 10000.0)?, t)
            }
        };
        if rope_type != "default" {
            return Err(Error::Unsupported {
                what: "rope scaling type (only `default`)",
                value: rope_type,
            });
        }
        let act = self.string(o, "hidden_act", "silu")?;
        if act != "silu" {
            return Err(Error::Unsupported {
                what: "LLaMA hidden_act (only `silu`)",
                value: act,
            });
        }
        let tie_inner = self.bool(o, "tie_word_embeddings", false)?;
        let tie = match outer {
            Some(out) if out.contains_key("tie_word_embeddings") => {
                self.bool(out, "tie_word_embeddings", false)? || tie_inner
            }
            _ => tie_inner,
        };
        let bos = self.ids(o, "bos_token_id")?;
        let c = TextConfig {
            vocab_size: self.usize(o, "vocab_size", Some(32000))?,
            hidden_size,
            intermediate_size: self.usize(
                o,
                "intermediate_size",
                Some(if mistral { 14336 } else { 11008 }),
            )?,
            num_hidden_layers: self.usize(o, "num_hidden_layers", Some(32))?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: self.f64(o, "rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: self.usize(
                o,
                "max_position_embeddings",
                Some(if mistral { 4096 * 32 } else { 2048 }),
            )?,
            tie_word_embeddings: tie,
            // Mistral has neither option: its projections have no bias.
            attention_bias: !mistral && self.bool(o, "attention_bias", false)?,
            mlp_bias: !mistral && self.bool(o, "mlp_bias", false)?,
            bos_token_id: bos.first().copied(),
            eos_token_ids: self.ids(o, "eos_token_id")?,
        };
        let prefix = if outer.is_some() { "text_config." } else { "" };
        if mistral {
            let window = match o.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => Some(self.usize(o, "sliding_window", None)?),
            };
            if let Some(w) = window.filter(|&w| w < c.max_position_embeddings) {
                return Err(self.err(format!(
                    "`{prefix}sliding_window` is {w}: sliding-window attention is not implemented \
                     (every position attends to all earlier ones), so a window shorter than the \
                     context (max_position_embeddings {}) would be ignored; only `null` or a \
                     window of the whole context is supported",
                    c.max_position_embeddings
                )));
            }
        }
        c.check().map_err(|(field, msg)| {
            let key = match field {
                "rope_theta" if o.contains_key("rope_parameters") => "rope_parameters.rope_theta",
                f => f,
            };
            let key = format!("{prefix}{key}");
            self.err(format!("`{key}` {msg}"))
        })?;
        Ok(c)
    }

    /// `CLIPVisionConfig`.
    fn vision(&self, o: &Map<String, Value>) -> Result<VisionConfig> {
        let c = VisionConfig {
            hidden_size: self.usize(o, "hidden_size", Some(768))?,
            intermediate_size: self.usize(o, "intermediate_size", Some(3072))?,
            num_hidden_layers: self.usize(o, "num_hidden_layers", Some(12))?,
            num_attention_heads: self.usize(o, "num_attention_heads", Some(12))?,
            num_channels: self.usize(o, "num_channels", Some(3))?,
            image_size: self.usize(o, "image_size", Some(224))?,
            patch_size: self.usize(o, "patch_size", Some(32))?,
            layer_norm_eps: self.f64(o, "layer_norm_eps", 1e-5)?,
            hidden_act: self.string(o, "hidden_act", "quick_gelu")?,
        };
        c.check()
            .map_err(|(field, msg)| self.err(format!("`vision_config.{field}` {msg}")))?;
        if !matches!(c.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Unsupported {
                what: "vision hidden_act (quick_gelu, gelu)",
                value: c.hidden_act,
            });
        }
        Ok(c)
    }

    /// `LlavaConfig`, or `LlavaNextConfig` with `next` (its `image_grid_pinpoints`).
    fn llava(&self, o: &Map<String, Value>, next: bool) -> Result<LlavaConfig> {
        let empty = Map::new();
        let sub = |key: &str| -> Result<&Map<String, Value>> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(&empty),
                Some(Value::Object(m)) => Ok(m),
                Some(v) => Err(self.err(format!("`{key}` must be an object, got {v}"))),
            }
        };
        let text_obj = sub("text_config")?;
        let family = Family::of(text_obj.get("model_type").and_then(Value::as_str))?;
        let text = self.text(text_obj, Some(o), family)?;
        // No `vision_config` at all: LlavaConfig's default tower (CLIP ViT-L/14 at 336 pixels).
        let clip_l: Map<String, Value> = match serde_json::json!({
            "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14, "image_size": 336,
            "num_hidden_layers": 24, "num_attention_heads": 16,
        }) {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        };
        let vision = match o.get("vision_config") {
            None | Some(Value::Null) => self.vision(&clip_l)?,
            _ => self.vision(sub("vision_config")?)?,
        };
        let layers = match o.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        self.err(format!("`vision_feature_layer` holds a non-integer {x}"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![v.as_i64().ok_or_else(|| {
                self.err(format!(
                    "`vision_feature_layer` must be an integer or a list, got {v}"
                ))
            })?],
        };
        let n = vision.num_hidden_layers as i64 + 1;
        if layers.is_empty() || layers.iter().any(|&l| l >= n || l < -n) {
            return Err(self.err(format!(
                "vision_feature_layer {layers:?} outside the {n} hidden states of a {}-layer vision tower",
                vision.num_hidden_layers
            )));
        }
        let select_strategy = match self
            .string(o, "vision_feature_select_strategy", "default")?
            .as_str()
        {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            s => {
                return Err(Error::Unsupported {
                    what: "vision_feature_select_strategy (default, full)",
                    value: s.to_string(),
                });
            }
        };
        let image_token_id = match o.get("image_token_id").filter(|v| !v.is_null()) {
            Some(_) => self.usize(o, "image_token_id", None)?,
            None => self.usize(o, "image_token_index", Some(32000))?,
        } as u32;
        let projector_hidden_act = self.string(o, "projector_hidden_act", "gelu")?;
        if projector_hidden_act != "gelu" {
            return Err(Error::Unsupported {
                what: "projector_hidden_act (only gelu)",
                value: projector_hidden_act,
            });
        }
        let image_grid_pinpoints = match next {
            true => Some(self.pinpoints(o, vision.image_size)?),
            false => None,
        };
        Ok(LlavaConfig {
            text,
            vision,
            image_token_id,
            vision_feature_layers: layers,
            select_strategy,
            projector_hidden_act,
            projector_bias: self.bool(o, "multimodal_projector_bias", true)?,
            image_grid_pinpoints,
        })
    }

    /// `image_grid_pinpoints`: `[[height, width], ...]`, each a grid of whole `tile`-pixel tiles
    /// (`LlavaNextConfig`'s default when absent).
    fn pinpoints(&self, o: &Map<String, Value>, tile: usize) -> Result<Vec<(usize, usize)>> {
        const DEFAULT: [(usize, usize); 5] =
            [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
        let list = match o.get("image_grid_pinpoints") {
            None | Some(Value::Null) => return Ok(DEFAULT.to_vec()),
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(self.err(format!(
                    "`image_grid_pinpoints` must be a list of [height, width] pairs, got {v}"
                )));
            }
        };
        let pins = list
            .iter()
            .map(|p| match p.as_array().map(|a| a.as_slice()) {
                Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                    (Some(h), Some(w)) => Ok((h as usize, w as usize)),
                    _ => Err(p),
                },
                _ => Err(p),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|p| {
                self.err(format!(
                    "`image_grid_pinpoints` holds {p}, not a [height, width] pair"
                ))
            })?;
        if pins.is_empty() {
            return Err(self.err("`image_grid_pinpoints` is empty".into()));
        }
        if let Some((h, w)) = pins
            .iter()
            .find(|&&(h, w)| h == 0 || w == 0 || h % tile != 0 || w % tile != 0)
        {
            return Err(self.err(format!(
                "`image_grid_pinpoints` entry [{h}, {w}] is not a grid of whole {tile}x{tile} \
                 tiles (vision_config.image_size)"
            )));
        }
        if let Some((h, w)) = pins.iter().find(|&&(h, w)| too_large(&[h, w, 3])) {
            return Err(self.err(format!(
                "`image_grid_pinpoints` entry [{h}, {w}] is larger than any image can be"
            )));
        }
        Ok(pins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(text, Path::new("config.json"))
    }

    /// llava-hf/llava-1.5-7b-hf's config (transformers 4.36): most values come from class defaults.
    const LLAVA_15_7B: &str = r#"{
      "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
      "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
      "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_15_7b_takes_hf_class_defaults() {
        let ModelConfig::Llava(c) = parse(LLAVA_15_7B).unwrap() else {
            panic!("not llava")
        };
        assert_eq!(c.image_tokens(), 576);
        assert_eq!(c.image_token_id, 32000);
        let t = &c.text;
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads
            ),
            (4096, 32, 32, 32)
        );
        assert_eq!(
            (t.intermediate_size, t.head_dim, t.vocab_size),
            (11008, 128, 32064)
        );
        assert_eq!(
            (t.rope_theta, t.rms_norm_eps, t.tie_word_embeddings),
            (10000.0, 1e-5, false)
        );
        assert_eq!(c.vision.hidden_act, "quick_gelu");
        assert_eq!(c.vision_feature_layers, vec![-2]);
        assert!(c.projector_bias);
    }

    #[test]
    fn transformers_5_spellings() {
        let text = r#"{"model_type": "llava", "image_token_id": 7, "vision_feature_layer": [-3, -1],
          "vision_feature_select_strategy": "full", "tie_word_embeddings": true,
          "text_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "dtype": "bfloat16", "eos_token_id": [2, 5]},
          "vision_config": {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 3,
            "image_size": 30, "patch_size": 6}}"#;
        let ModelConfig::Llava(c) = parse(text).unwrap() else {
            panic!("not llava")
        };
        assert_eq!(c.text.rope_theta, 500000.0);
        assert_eq!(c.text.eos_token_ids, vec![2, 5]);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.image_tokens(), 26);
        assert_eq!(c.image_token_id, 7);
    }

    /// llava-hf/llava-v1.6-mistral-7b-hf's config (abridged to what it sets).
    const LLAVA_NEXT_MISTRAL_7B: &str = r#"{
      "architectures": ["LlavaNextForConditionalGeneration"],
      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
      "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
        "torch_dtype": "bfloat16", "vocab_size": 32064},
      "torch_dtype": "float16", "use_image_newline_parameter": true,
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_next_mistral_7b_takes_mistral_class_defaults() {
        let ModelConfig::Llava(c) = parse(LLAVA_NEXT_MISTRAL_7B).unwrap() else {
            panic!("not llava")
        };
        assert!(c.is_anyres());
        assert_eq!(c.image_grid_pinpoints.as_ref().unwrap()[4], (336, 1008));
        let t = &c.text;
        assert_eq!((t.num_attention_heads, t.num_key_value_heads), (32, 8));
        assert_eq!(
            (t.hidden_size, t.head_dim, t.num_hidden_layers),
            (4096, 128, 32)
        );
        assert_eq!((t.rope_theta, t.max_position_embeddings), (1e6, 32768));
        assert_eq!(c.image_tokens(), 576);
        // Absent pinpoints take LlavaNextConfig's default; a plain Mistral LM parses too.
        let ModelConfig::Llava(d) = parse(r#"{"model_type": "llava_next"}"#).unwrap() else {
            panic!("not llava")
        };
        assert_eq!(d.image_grid_pinpoints.unwrap().len(), 5);
        let m = parse(r#"{"model_type": "mistral", "sliding_window": null}"#).unwrap();
        assert_eq!(m.text().intermediate_size, 14336);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            (
                r#"{"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#,
                "llama3",
            ),
            (
                r#"{"model_type": "llama", "hidden_size": "big"}"#,
                "hidden_size",
            ),
            (
                r#"{"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}"#,
                "num_key_value_heads 4",
            ),
            (r#"{"model_type": "qwen2"}"#, "qwen2"),
            (r#"{"hidden_size": 8}"#, "model_type"),
            (
                r#"{"model_type": "llava", "vision_feature_layer": 30}"#,
                "vision_feature_layer",
            ),
            (
                r#"{"model_type": "llava", "vision_feature_select_strategy": "cls"}"#,
                "cls",
            ),
            (
                r#"{"model_type": "llava", "text_config": {"model_type": "qwen2"}}"#,
                "qwen2",
            ),
            // MistralConfig's default window (4096) is shorter than its default context.
            (
                r#"{"model_type": "llava_next", "text_config": {"model_type": "mistral"}}"#,
                "text_config.sliding_window` is 4096",
            ),
            (
                r#"{"model_type": "mistral", "sliding_window": 512, "max_position_embeddings": 1024}"#,
                "sliding_window` is 512",
            ),
            (
                r#"{"model_type": "llava_next", "image_grid_pinpoints": [[336, 600]]}"#,
                "[336, 600] is not a grid of whole 336x336",
            ),
            (
                r#"{"model_type": "llava_next", "image_grid_pinpoints": [[336]]}"#,
                "holds [336]",
            ),
            (
                r#"{"model_type": "llava_next", "image_grid_pinpoints": []}"#,
                "is empty",
            ),
            (r#"[1, 2]"#, "not a JSON object"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
