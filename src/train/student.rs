//! Distillation students made from a teacher checkpoint (`distill init-student`).
//!
//! The students of LLaVADI (Xu et al., 2024) and of our own experiment log: the teacher's
//! language model truncated to some of its decoder layers (its first N layers worked best; every
//! other layer was worse; its last N layers failed), the teacher's projector reused or
//! re-initialised, the teacher's vision tower shared as is or cut to some of its encoder layers
//! (a smaller ViT student), or a fresh, smaller language model with the teacher's tokenizer.
//!
//! [`init_student`] writes the student as a complete checkpoint folder, like
//! [`super::checkpoint::save_checkpoint`]: `model.safetensors` in f32 under the transformers 5.x
//! keys (every tensor a `LlavaForConditionalGeneration` of the student's config holds, so
//! transformers reports no missing or unexpected keys), `config.json` with the new layer counts
//! and sizes, the teacher's tokenizer, processor, chat template and ShapesVQA settings, and
//! `student.json`, the [`StudentRecord`] of where every student layer came from.
//!
//! Kept layers are renumbered `0..n` in the teacher's order: student layer `i` is teacher layer
//! `layers[i]`. Everything freshly initialised (a fresh language model, a re-initialised
//! projector) has the values [`TrainModel::init`] gives the student's config with the spec's
//! `init_std` and `seed`.
//!
//! `vision_feature_layer` is kept as the teacher's config writes it and counts in the student's
//! tower: negative values from its last layer (`-1` is the student's last layer's output),
//! non-negative ones from its embeddings. A pick under which a value selects no hidden state, or
//! the patch embeddings where the teacher selected a layer's output, or the same state as another
//! value, is refused.

use super::checkpoint::COPIED_FILES;
use super::model::{TrainModel, hf_name};
use super::new_model::{MAX_DIM, MAX_PARAMETERS};
use crate::error::{Error, Result};
use crate::io::{OutTensor, write_atomic, write_safetensors};
use crate::model::config::{LlavaConfig, ModelConfig};
use crate::model::weights::Weights;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What a [`LayerPick`] string may be, for error messages.
const PICK_FORMS: &str = "first:N, last:N, every-other, or increasing 0-based layer indices \
                          separated by commas (e.g. 0,2,3)";

/// Which of the teacher's layers a student keeps, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerPick {
    /// Layers `0..N` (`first:N`).
    First(usize),
    /// The last `N` layers (`last:N`).
    Last(usize),
    /// Layers 0, 2, 4, ... (`every-other`).
    EveryOther,
    /// These layers, 0-based, increasing (`0,2,3`).
    List(Vec<usize>),
}

impl FromStr for LayerPick {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = |msg: String| Error::arg("layer pick", msg);
        let count = |form: &str, n: &str| {
            n.trim().parse::<usize>().map_err(|_| {
                bad(format!(
                    "`{s}`: {form}:N needs a whole number of layers after the colon; \
                     accepted: {PICK_FORMS}"
                ))
            })
        };
        if let Some(n) = s.strip_prefix("first:") {
            return Ok(LayerPick::First(count("first", n)?));
        }
        if let Some(n) = s.strip_prefix("last:") {
            return Ok(LayerPick::Last(count("last", n)?));
        }
        if s == "every-other" {
            return Ok(LayerPick::EveryOther);
        }
        let list: std::result::Result<Vec<usize>, _> =
            s.split(',').map(|x| x.trim().parse::<usize>()).collect();
        match list {
            Ok(l) if !s.is_empty() => Ok(LayerPick::List(l)),
            _ => Err(bad(format!(
                "`{s}` is not a layer pick; accepted: {PICK_FORMS}"
            ))),
        }
    }
}

impl fmt::Display for LayerPick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerPick::First(n) => write!(f, "first:{n}"),
            LayerPick::Last(n) => write!(f, "last:{n}"),
            LayerPick::EveryOther => f.write_str("every-other"),
            LayerPick::List(l) => {
                let s: Vec<String> = l.iter().map(usize::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

impl Serialize for LayerPick {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LayerPick {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl LayerPick {
    /// The teacher layers kept, increasing, for a teacher with `teacher_layers` layers. Refuses
    /// a pick that keeps nothing, names a layer the teacher lacks, repeats a layer or is not
    /// increasing.
    pub fn layers(&self, teacher_layers: usize) -> Result<Vec<usize>> {
        let bad = |msg: String| Err(Error::arg("layer pick", msg));
        let t = teacher_layers;
        match *self {
            LayerPick::First(0) | LayerPick::Last(0) => {
                bad(format!("`{self}` keeps no layers; keep at least 1"))
            }
            LayerPick::First(n) | LayerPick::Last(n) if n > t => bad(format!(
                "`{self}` asks for {n} layers but the teacher has {t}"
            )),
            LayerPick::First(n) => Ok((0..n).collect()),
            LayerPick::Last(n) => Ok((t - n..t).collect()),
            LayerPick::EveryOther if t == 0 => bad("the teacher has no layers".into()),
            LayerPick::EveryOther => Ok((0..t).step_by(2).collect()),
            LayerPick::List(ref l) => {
                if l.is_empty() {
                    return bad("the list keeps no layers; keep at least 1".into());
                }
                for (k, &i) in l.iter().enumerate() {
                    if i >= t {
                        return bad(format!(
                            "`{self}`: layer {i} is out of range for a teacher with {t} layers \
                             (0..={})",
                            t.saturating_sub(1)
                        ));
                    }
                    if l[..k].contains(&i) {
                        return bad(format!("`{self}`: layer {i} repeats; keep each layer once"));
                    }
                    if k > 0 && i < l[k - 1] {
                        return bad(format!(
                            "`{self}`: layers must be increasing ({} comes before {i}); the \
                             student keeps the teacher's order",
                            l[k - 1]
                        ));
                    }
                }
                Ok(l.clone())
            }
        }
    }
}

/// A fresh, smaller language model (random init), in place of the teacher's layers. Vocabulary,
/// tokenizer, image token, RoPE, norms, context length and embedding tying are the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshLm {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
}

impl FreshLm {
    /// Checks the shape; errors name the field and its `distill init-student` flag.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |f: &str, flag: &str, m: String| Err(Error::arg(format!("fresh.{f} ({flag})"), m));
        for (f, flag, v) in [
            ("hidden_size", "--fresh-hidden", self.hidden_size),
            (
                "intermediate_size",
                "--fresh-intermediate",
                self.intermediate_size,
            ),
            (
                "num_hidden_layers",
                "--fresh-layers",
                self.num_hidden_layers,
            ),
            (
                "num_attention_heads",
                "--fresh-heads",
                self.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                "--fresh-kv-heads",
                self.num_key_value_heads,
            ),
        ] {
            if v == 0 {
                return bad(f, flag, "must be at least 1".into());
            }
            if v > MAX_DIM {
                return bad(f, flag, format!("{v} is more than {MAX_DIM}"));
            }
        }
        // Decoder layers' weights (attention, MLP, norms), counted before anything is allocated.
        let (h, i, l) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.num_hidden_layers as u128,
        );
        let kv_width = h / self.num_attention_heads as u128 * self.num_key_value_heads as u128;
        let params = l * (2 * h * h + 2 * h * kv_width + 3 * h * i + 2 * h);
        if params > MAX_PARAMETERS {
            return bad(
                "num_hidden_layers",
                "--fresh-layers",
                format!(
                    "{} layers of hidden size {} and intermediate size {} hold {params} parameters, \
                     more than {MAX_PARAMETERS}",
                    self.num_hidden_layers, self.hidden_size, self.intermediate_size
                ),
            );
        }
        let (h, heads, kv) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
        );
        if !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(2) {
            return bad(
                "num_attention_heads",
                "--fresh-heads",
                format!("{heads} must divide hidden_size {h} into an even head size (RoPE)"),
            );
        }
        if !heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                "--fresh-kv-heads",
                format!("{kv} does not divide num_attention_heads {heads}"),
            );
        }
        Ok(())
    }
}

fn default_std() -> f32 {
    0.02
}

/// How the student is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// The teacher's decoder layers kept (copied); `None`: all of them.
    #[serde(default)]
    pub lm_layers: Option<LayerPick>,
    /// The teacher's CLIP encoder layers kept; `None`: the teacher's tower as is.
    #[serde(default)]
    pub vision_layers: Option<LayerPick>,
    /// A fresh language model instead of the teacher's layers (excludes `lm_layers`).
    #[serde(default)]
    pub fresh: Option<FreshLm>,
    /// Re-initialise the projector instead of reusing the teacher's (required when a fresh
    /// language model's hidden size differs from the teacher's).
    #[serde(default)]
    pub fresh_projector: bool,
    /// Seed of everything freshly initialised.
    #[serde(default)]
    pub seed: u64,
    /// Standard deviation of freshly initialised weights ([`TrainModel::init`]).
    #[serde(default = "default_std")]
    pub init_std: f32,
}

impl Default for StudentSpec {
    /// The teacher itself: every layer, its projector.
    fn default() -> Self {
        StudentSpec {
            lm_layers: None,
            vision_layers: None,
            fresh: None,
            fresh_projector: false,
            seed: 0,
            init_std: default_std(),
        }
    }
}

/// What [`init_student`] made (also written to the student's `student.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentRecord {
    /// The teacher checkpoint folder (absolute when it could be resolved).
    pub teacher: PathBuf,
    pub spec: StudentSpec,
    /// Student decoder layer `i` is teacher layer `lm_layers[i]`; `None` for a fresh language
    /// model.
    pub lm_layers: Option<Vec<usize>>,
    /// Student encoder layer `i` is teacher encoder layer `vision_layers[i]`.
    pub vision_layers: Vec<usize>,
    /// Whether the projector is the teacher's (else freshly initialised).
    pub projector_from_teacher: bool,
    /// `vision_feature_layer` of both (the same values; they count in each one's own tower).
    pub vision_feature_layer: Vec<i64>,
    pub teacher_lm_layers: usize,
    pub teacher_vision_layers: usize,
    /// Parameters of every tensor of a complete checkpoint (vision tower, projector, language
    /// model, untied head).
    pub teacher_params: usize,
    pub student_params: usize,
}

/// Every tensor of a complete LLaVA checkpoint of config `c`: canonical name and shape (the
/// whole CLIP tower with `post_layernorm`, projector, LLaMA, `lm_head` when `head`).
fn checkpoint_tensors(c: &LlavaConfig, head: bool) -> Vec<(String, Vec<usize>)> {
    let (vc, tc) = (&c.vision, &c.text);
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| t.push((n, s.to_vec()));
    let (h, p, ch, vi) = (
        vc.hidden_size,
        vc.patch_size,
        vc.num_channels,
        vc.intermediate_size,
    );
    add("vision.embeddings.class_embedding".into(), &[h]);
    add(
        "vision.embeddings.patch_embedding.weight".into(),
        &[h, ch, p, p],
    );
    add(
        "vision.embeddings.position_embedding.weight".into(),
        &[vc.grid() * vc.grid() + 1, h],
    );
    for n in ["weight", "bias"] {
        add(format!("vision.pre_layrnorm.{n}"), &[h]);
    }
    for l in 0..vc.num_hidden_layers {
        let pre = format!("vision.encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{pre}.self_attn.{n}.weight"), &[h, h]);
            add(format!("{pre}.self_attn.{n}.bias"), &[h]);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            add(format!("{pre}.{n}.weight"), &[h]);
            add(format!("{pre}.{n}.bias"), &[h]);
        }
        add(format!("{pre}.mlp.fc1.weight"), &[vi, h]);
        add(format!("{pre}.mlp.fc1.bias"), &[vi]);
        add(format!("{pre}.mlp.fc2.weight"), &[h, vi]);
        add(format!("{pre}.mlp.fc2.bias"), &[h]);
    }
    for n in ["weight", "bias"] {
        add(format!("vision.post_layernorm.{n}"), &[h]);
    }
    let th = tc.hidden_size;
    let feats = h * c.vision_feature_layers.len();
    add("projector.linear_1.weight".into(), &[th, feats]);
    if c.projector_bias {
        add("projector.linear_1.bias".into(), &[th]);
    }
    add("projector.linear_2.weight".into(), &[th, th]);
    if c.projector_bias {
        add("projector.linear_2.bias".into(), &[th]);
    }
    add("lm.embed_tokens.weight".into(), &[tc.vocab_size, th]);
    let (qd, kvd, inter) = (
        tc.num_attention_heads * tc.head_dim,
        tc.num_key_value_heads * tc.head_dim,
        tc.intermediate_size,
    );
    for l in 0..tc.num_hidden_layers {
        let pre = format!("lm.layers.{l}");
        let mut lin = |n: &str, out: usize, inp: usize, bias: bool| {
            add(format!("{pre}.{n}.weight"), &[out, inp]);
            if bias {
                add(format!("{pre}.{n}.bias"), &[out]);
            }
        };
        lin("self_attn.q_proj", qd, th, tc.attention_bias);
        lin("self_attn.k_proj", kvd, th, tc.attention_bias);
        lin("self_attn.v_proj", kvd, th, tc.attention_bias);
        lin("self_attn.o_proj", th, qd, tc.attention_bias);
        lin("mlp.gate_proj", inter, th, tc.mlp_bias);
        lin("mlp.up_proj", inter, th, tc.mlp_bias);
        lin("mlp.down_proj", th, inter, tc.mlp_bias);
        add(format!("{pre}.input_layernorm.weight"), &[th]);
        add(format!("{pre}.post_attention_layernorm.weight"), &[th]);
    }
    add("lm.norm.weight".into(), &[th]);
    if head {
        add("lm_head.weight".into(), &[tc.vocab_size, th]);
    }
    t
}

/// The teacher tensor a student tensor comes from: layer `i` of a picked stack is the teacher's
/// `pick[i]`.
fn teacher_name(student: &str, lm: &[usize], vision: &[usize]) -> String {
    for (prefix, pick) in [("lm.layers.", lm), ("vision.encoder.layers.", vision)] {
        if let Some(rest) = student.strip_prefix(prefix)
            && let Some((i, tail)) = rest.split_once('.')
            && let Ok(i) = i.parse::<usize>()
        {
            return format!("{prefix}{}.{tail}", pick[i]);
        }
    }
    student.to_string()
}

/// Checks that the teacher's `vision_feature_layer` still selects distinct encoder outputs of a
/// student tower of `student` layers (the teacher's has `teacher`).
fn check_feature_layers(features: &[i64], teacher: usize, student: usize) -> Result<()> {
    let (t, s) = (teacher as i64 + 1, student as i64 + 1);
    let bad = |msg: String| {
        Err(Error::arg(
            "vision_feature_layer",
            format!("{msg} (the config's value {features:?} is kept; pick other --vision-layers)"),
        ))
    };
    let mut seen: Vec<(i64, i64)> = Vec::new();
    for &l in features {
        let r = if l < 0 { s + l } else { l };
        let rt = if l < 0 { t + l } else { l };
        if !(0..s).contains(&r) {
            return bad(format!(
                "{l} selects no hidden state of a {student}-layer student vision tower, which \
                 has {s} (0 = embeddings, k = output of encoder layer k)"
            ));
        }
        if r == 0 && rt != 0 {
            return bad(format!(
                "{l} would select the patch embeddings (hidden state 0) of a {student}-layer \
                 student vision tower instead of an encoder layer's output as in the teacher"
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, x)| *x == r) {
            return bad(format!(
                "{other} and {l} would both select hidden state {r} of a {student}-layer \
                 student vision tower"
            ));
        }
        seen.push((l, r));
    }
    Ok(())
}

/// Refuses an output folder that is the teacher's or already holds weights.
fn check_out(teacher: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::arg(
                "--out",
                format!("{} exists and is not a folder", out.display()),
            ));
        }
        let same = match (out.canonicalize(), teacher.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::arg(
                "--out",
                format!(
                    "{} is the teacher folder; write the student to a new folder",
                    out.display()
                ),
            ));
        }
    }
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        if out.join(f).exists() {
            return Err(Error::arg(
                "--out",
                format!(
                    "{} already holds a checkpoint ({f}); init-student never overwrites one, \
                     choose a new folder or remove it",
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}

/// `config.json` of the student: the teacher's with the new layer counts (and sizes).
fn student_config(
    raw: &Value,
    lm_layers: usize,
    vision_layers: usize,
    fresh: Option<&FreshLm>,
) -> Value {
    fn sub<'a>(v: &'a mut Value, key: &str) -> &'a mut serde_json::Map<String, Value> {
        let obj = v
            .as_object_mut()
            .expect("config.json was parsed as an object");
        let e = obj.entry(key).or_insert_with(|| json!({}));
        if !e.is_object() {
            *e = json!({});
        }
        e.as_object_mut().expect("just made an object")
    }
    let mut v = raw.clone();
    let text = sub(&mut v, "text_config");
    text.insert("num_hidden_layers".into(), json!(lm_layers));
    if let Some(f) = fresh {
        text.insert("hidden_size".into(), json!(f.hidden_size));
        text.insert("intermediate_size".into(), json!(f.intermediate_size));
        text.insert("num_attention_heads".into(), json!(f.num_attention_heads));
        text.insert("num_key_value_heads".into(), json!(f.num_key_value_heads));
        text.insert(
            "head_dim".into(),
            json!(f.hidden_size / f.num_attention_heads),
        );
        text.remove("_name_or_path");
    }
    sub(&mut v, "vision_config").insert("num_hidden_layers".into(), json!(vision_layers));
    v
}

fn numel(t: &[(String, Vec<usize>)]) -> usize {
    t.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// Renames the `layer pick` of a [`LayerPick::layers`] error to the spec field and its flag.
fn named(e: Error, field: &str) -> Error {
    match e {
        Error::Arg { msg, .. } => Error::arg(field, msg),
        e => e,
    }
}

/// Writes the student checkpoint made from `teacher` as `spec` says into `out` (created; it must
/// not be the teacher's folder nor hold a `model.safetensors` already) and returns its record.
/// Everything is checked and every tensor read before the first file is written; each file is
/// written atomically, `model.safetensors` last.
pub fn init_student(teacher: &Path, spec: &StudentSpec, out: &Path) -> Result<StudentRecord> {
    let cfg_path = teacher.join("config.json");
    let tcfg = super::llava_config(teacher, "--teacher")?;
    let raw_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let raw: Value = serde_json::from_str(&raw_text).map_err(|e| Error::Config {
        path: cfg_path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    check_out(teacher, out)?;

    // The spec.
    if spec.fresh.is_some() && spec.lm_layers.is_some() {
        return Err(Error::arg(
            "lm_layers (--layers)",
            "cannot be combined with a fresh language model (--fresh-*): a fresh model has no \
             teacher layers to keep",
        ));
    }
    if !(spec.init_std.is_finite() && spec.init_std > 0.0) {
        return Err(Error::arg(
            "init_std (--init-std)",
            format!("{} must be > 0", spec.init_std),
        ));
    }
    let (t_lm, t_vis) = (tcfg.text.num_hidden_layers, tcfg.vision.num_hidden_layers);
    let lm_layers = match (&spec.fresh, &spec.lm_layers) {
        (Some(_), _) => None,
        (None, Some(p)) => Some(
            p.layers(t_lm)
                .map_err(|e| named(e, "lm_layers (--layers)"))?,
        ),
        (None, None) => Some((0..t_lm).collect::<Vec<_>>()),
    };
    let vision_layers = match &spec.vision_layers {
        Some(p) => p
            .layers(t_vis)
            .map_err(|e| named(e, "vision_layers (--vision-layers)"))?,
        None => (0..t_vis).collect(),
    };
    check_feature_layers(&tcfg.vision_feature_layers, t_vis, vision_layers.len())?;
    if let Some(f) = &spec.fresh {
        f.validate()?;
        if f.hidden_size != tcfg.text.hidden_size && !spec.fresh_projector {
            return Err(Error::arg(
                "fresh_projector (--fresh-projector)",
                format!(
                    "is required: the fresh language model's hidden size {} differs from the \
                     teacher's {}, so the teacher's projector (which outputs {}-wide features) \
                     cannot be reused",
                    f.hidden_size, tcfg.text.hidden_size, tcfg.text.hidden_size
                ),
            ));
        }
    }

    // The student's config, read back through our parser (what every loader will see).
    let s_lm = lm_layers
        .as_ref()
        .map_or_else(|| spec.fresh.map_or(0, |f| f.num_hidden_layers), Vec::len);
    let config_json = student_config(&raw, s_lm, vision_layers.len(), spec.fresh.as_ref());
    let config_text = serde_json::to_string_pretty(&config_json).expect("json values serialize");
    let scfg = match ModelConfig::from_json(&config_text, &out.join("config.json"))? {
        ModelConfig::Llava(c) => c,
        ModelConfig::Llama(_) => {
            return Err(Error::Config {
                path: cfg_path,
                msg: "the student's config no longer reads as LLaVA".into(),
            });
        }
    };

    // The teacher's weights, and the fresh values.
    let mut w = Weights::from_dir(teacher)?;
    let teacher_head = !tcfg.text.tie_word_embeddings && w.contains("lm_head.weight");
    let student_head = !scfg.text.tie_word_embeddings && (spec.fresh.is_some() || teacher_head);
    let mut fresh: HashMap<String, Vec<f32>> = HashMap::new();
    if spec.fresh.is_some() || spec.fresh_projector {
        // The projector is initialised before the language model, so a student keeping the
        // teacher's layers gets TrainModel::init's projector without allocating a random LM.
        let mut init_cfg = scfg.clone();
        if spec.fresh.is_none() {
            init_cfg.text.num_hidden_layers = 0;
        }
        let m = TrainModel::init(&init_cfg, spec.init_std, spec.seed)?;
        for p in m.params {
            let keep = p.name.starts_with("model.multi_modal_projector.")
                || (spec.fresh.is_some()
                    && (p.name.starts_with("model.language_model.") || p.name == "lm_head.weight"));
            if keep {
                fresh.insert(p.name, p.value.into_f32_vec()?);
            }
        }
    }
    let lm_pick = lm_layers.clone().unwrap_or_default();
    let shapes = checkpoint_tensors(&scfg, student_head);
    let mut values: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let is_fresh = (spec.fresh_projector && name.starts_with("projector."))
            || (spec.fresh.is_some() && (name.starts_with("lm.") || name.starts_with("lm_head.")));
        let hf = hf_name(name).1;
        let v = if is_fresh {
            fresh.remove(&hf).ok_or_else(|| {
                Error::arg(
                    "fresh initialisation",
                    format!("TrainModel::init made no `{hf}`"),
                )
            })?
        } else {
            let src = teacher_name(name, &lm_pick, &vision_layers);
            w.take(&src, shape)?.into_f32_vec()?
        };
        values.push((hf, shape.clone(), v));
    }
    drop(w);

    // Files copied from the teacher.
    let mut copies = Vec::new();
    for name in COPIED_FILES.iter().filter(|n| **n != "config.json") {
        let p = teacher.join(name);
        if p.exists() {
            copies.push((*name, std::fs::read(&p).map_err(|e| Error::io(&p, e))?));
        }
    }

    let record = StudentRecord {
        teacher: teacher
            .canonicalize()
            .unwrap_or_else(|_| teacher.to_path_buf()),
        spec: spec.clone(),
        lm_layers,
        vision_layers,
        projector_from_teacher: !spec.fresh_projector,
        vision_feature_layer: tcfg.vision_feature_layers.clone(),
        teacher_lm_layers: t_lm,
        teacher_vision_layers: t_vis,
        teacher_params: numel(&checkpoint_tensors(&tcfg, teacher_head)),
        student_params: numel(&shapes),
    };

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (name, bytes) in copies {
        write_atomic(&out.join(name), &bytes)?;
    }
    write_atomic(&out.join("config.json"), config_text.as_bytes())?;
    let rec = serde_json::to_string_pretty(&record).expect("student record serializes");
    write_atomic(&out.join("student.json"), rec.as_bytes())?;
    let tensors: Vec<OutTensor> = values
        .iter()
        .map(|(n, s, v)| OutTensor::F32(n, s.clone(), v))
        .collect();
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_parse_and_resolve() {
        let p = |s: &str| s.parse::<LayerPick>().unwrap();
        assert_eq!(p("first:2").layers(4).unwrap(), vec![0, 1]);
        assert_eq!(p("last:2").layers(4).unwrap(), vec![2, 3]);
        assert_eq!(p("every-other").layers(5).unwrap(), vec![0, 2, 4]);
        assert_eq!(p(" 0, 2,3").layers(4).unwrap(), vec![0, 2, 3]);
        for s in ["first:2", "last:3", "every-other", "0,2,3"] {
            assert_eq!(p(s).to_string(), s);
        }
        for (s, want) in [
            ("abc", "every-other"),
            ("first:x", "first:N"),
            ("", "not a layer pick"),
            ("1,,2", "not a layer pick"),
        ] {
            let e = s.parse::<LayerPick>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        for (s, want) in [
            ("first:0", "keeps no layers"),
            ("last:0", "keeps no layers"),
            ("first:9", "9 layers but the teacher has 4"),
            ("4", "layer 4 is out of range for a teacher with 4 layers"),
            ("1,1", "repeats"),
            ("2,1", "increasing"),
        ] {
            let e = p(s).layers(4).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn feature_layers_in_the_student() {
        // -1 in a 2-layer student: its last layer.
        check_feature_layers(&[-1], 4, 2).unwrap();
        check_feature_layers(&[-2], 4, 1).unwrap_err();
        check_feature_layers(&[3], 4, 3).unwrap();
        let e = check_feature_layers(&[3], 4, 2).unwrap_err().to_string();
        assert!(
            e.contains("vision_feature_layer") && e.contains("no hidden state"),
            "{e}"
        );
        let e = check_feature_layers(&[-3, -1], 3, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch embeddings"), "{e}");
        let e = check_feature_layers(&[2, -1], 4, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("selects no hidden state") || e.contains("both"),
            "{e}"
        );
        let e = check_feature_layers(&[1, -1], 4, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both select hidden state 1"), "{e}");
        check_feature_layers(&[0], 4, 1).unwrap();
    }

    #[test]
    fn fresh_shapes_are_validated() {
        let ok = FreshLm {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
        };
        ok.validate().unwrap();
        for (f, want) in [
            (
                FreshLm {
                    hidden_size: 0,
                    ..ok
                },
                "--fresh-hidden",
            ),
            (
                FreshLm {
                    num_attention_heads: 3,
                    ..ok
                },
                "--fresh-heads",
            ),
            (
                FreshLm {
                    num_attention_heads: 64,
                    ..ok
                },
                "even head size",
            ),
            (
                FreshLm {
                    num_key_value_heads: 3,
                    num_attention_heads: 4,
                    ..ok
                },
                "--fresh-kv-heads",
            ),
        ] {
            let e = f.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{f:?}: {e}");
        }
    }
}
