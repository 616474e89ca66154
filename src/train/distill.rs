//! Knowledge distillation: a `[distill]` table in a training config trains the model (the
//! student) against a frozen teacher as well as, or instead of, against the data's answers.
//!
//! ```toml
//! [distill]
//! teacher = "../models/shapes-llava"   # LLaVA checkpoint, same tokenizer and image tokens
//! ce_weight = 1.0                      # the answers' cross-entropy (0: distillation alone)
//!
//! [distill.logits]                     # logit distillation (see `crate::ops::kd`)
//! divergence = "forward_kl"            # forward_kl, reverse_kl, jsd, mse
//! beta = 0.5                           # jsd's mixture (0: forward KL, 1: reverse KL)
//! temperature = 0.7
//! weight = 5.0
//! tokens = "answer"                    # or "all": every row that predicts a text token
//! standardize = false                  # z-score both sides' logits first
//! # cache = "teacher.fptc"             # the teacher's top-k rows from `distill cache-teacher`
//!
//! [distill.hidden]                     # hidden-state alignment through a learnable projector
//! pairs = "last"                       # "last", "evenly:K", or [[student, teacher], ...]
//! loss = "mse"                         # or "cosine"
//! tokens = "all"                       # or "answer"
//! weight = 1.0
//! shared = false                       # one projector for every pair
//!
//! [distill.attention]                  # attention alignment between token groups
//! blocks = ["answer->image"]           # query group -> key group: image, text, answer
//! pairs = "last"                       # as for hidden
//! weight = 1.0
//!
//! [distill.prune]                      # pruning-aware: the student runs pruned, the teacher not
//! layers = [1]                         # FastV's K of each stage
//! keep = [0.25]                        # fraction (or count, >= 1) of image tokens kept
//! head = "sum"                         # head strategy (PRUNING.md)
//! query = "last_token"                 # query strategy
//! ```
//!
//! The objective is `ce_weight · CE + Σ weight_i · L_i`. Both models read the same rows: row `t`
//! of a sequence is the state after token `t`, which predicts token `t + 1` (HF's shifted
//! logits). "answer" rows are those predicting an answer token (the rows LLaVA's cross-entropy
//! counts), "all" rows every row whose next token is a text token of the sequence (not an image
//! placeholder, not past the end); hidden alignment's "all" is every row, image rows included.
//! Teacher logits exist only chunk by chunk ([`HEAD_CHUNK`](super::model::HEAD_CHUNK) rows), as the student's.
//!
//! Attention alignment compares attention probabilities of one token group's queries over
//! another group's keys (see [`AttentionConfig`]); only those query rows of the teacher's maps
//! are kept. A block that the causal mask makes identically zero (image queries over answer keys:
//! every answer follows the image) is refused rather than trained as a silent zero, the mistake
//! of the published code this replaces.
//!
//! The alignment projectors (`Linear(d_s, d_t)`, GELU, `Linear(d_t, d_t)`, torch's default
//! init) are parameters of groups `align.decay` / `align.no_decay`, trained with the student;
//! checkpoints keep them in `align.safetensors` for resuming and the exported model has none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{AnswerCe, HeadLoss, Trace, TraceRequest, TrainModel, TrainSeq};
use super::optim::{Param, decay_group};
use super::teacher_cache::{SparseRow, TeacherCache};
use crate::error::{Error, Result};
use crate::io::{OutTensor, read_f32_tensor, write_safetensors};
use crate::model::config::{LlavaConfig, ModelConfig};
use crate::ops::kd::{Divergence, LogitKd, mse_row};
use crate::ops::matmul::{linear_backward, matmul_nt};
use crate::ops::{self, act};
use crate::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};

/// File of a checkpoint folder holding the alignment projectors (not part of the model).
pub const ALIGN_FILE: &str = "align.safetensors";

fn one() -> f64 {
    1.0
}
fn default_temperature() -> f32 {
    1.0
}
fn default_beta() -> f64 {
    0.5
}

/// The `[distill]` table of a training config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher checkpoint (relative paths: to the config file's folder).
    pub teacher: PathBuf,
    /// Weight of the answers' cross-entropy; 0 trains on the teacher alone (it is still logged).
    #[serde(default = "one")]
    pub ce_weight: f64,
    #[serde(default)]
    pub logits: Option<LogitsConfig>,
    #[serde(default)]
    pub hidden: Option<HiddenConfig>,
    #[serde(default)]
    pub attention: Option<AttentionConfig>,
    #[serde(default)]
    pub prune: Option<PruneConfig>,
}

fn default_head() -> String {
    "sum".into()
}
fn default_query() -> String {
    "last_token".into()
}
fn default_head_keep() -> f64 {
    0.5
}

/// `[distill.prune]`: pruning-aware distillation. The student's forward prunes image tokens as
/// this plan says ([`TrainModel::set_prune`], exactly as the engine prunes at inference), the
/// teacher's does not, so the student learns to answer from the kept tokens what the teacher
/// answers from all of them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PruneConfig {
    /// `K` of each stage (the first layer without the dropped tokens), increasing.
    pub layers: Vec<usize>,
    /// Kept image tokens per stage: a fraction in (0, 1], or a count (> 1).
    pub keep: Vec<f64>,
    #[serde(default = "default_head")]
    pub head: String,
    #[serde(default = "default_query")]
    pub query: String,
    #[serde(default = "default_head_keep")]
    pub head_keep: f64,
    #[serde(default)]
    pub query_n: Option<usize>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub tau: Option<usize>,
    #[serde(default)]
    pub renumber: bool,
}

impl PruneConfig {
    /// The plan these settings describe (strategies looked up by name).
    pub fn plan(&self) -> Result<PrunePlan> {
        let bad = |m: String| Err(Error::arg("distill.prune", m));
        if self.layers.is_empty() || self.layers.len() != self.keep.len() {
            return bad(format!(
                "needs one `keep` per entry of `layers` (got {} layers, {} keeps)",
                self.layers.len(),
                self.keep.len()
            ));
        }
        let mut p = StrategyParams::default();
        p.query_n = self.query_n.unwrap_or(p.query_n);
        p.top_k = self.top_k.or(p.top_k);
        p.tau = self.tau.unwrap_or(p.tau);
        let mut stages = Vec::new();
        for (&layer, &k) in self.layers.iter().zip(&self.keep) {
            let keep = if k > 0.0 && k <= 1.0 {
                Keep::Fraction(k)
            } else if k > 1.0 && k.fract() == 0.0 {
                Keep::Count(k as usize)
            } else {
                return bad(format!(
                    "keep {k} must be a fraction in (0, 1] or a whole count"
                ));
            };
            stages.push(Stage { layer, keep });
        }
        if stages.windows(2).any(|w| w[0].layer >= w[1].layer) || stages[0].layer == 0 {
            return bad(format!(
                "layers {:?} must increase and start at 1 or later",
                self.layers
            ));
        }
        let mut plan = PrunePlan::new(stages);
        plan.head = head_strategy(&self.head, &p)?;
        plan.query = query_strategy(&self.query, &p)?;
        plan.head_keep = self.head_keep;
        plan.renumber = self.renumber;
        Ok(plan)
    }
}

/// Which rows a loss reads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Tokens {
    /// Rows predicting an answer token.
    Answer,
    /// Logits: rows predicting any text token; hidden states: every row.
    All,
}

/// The divergence's name in a config.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceName {
    ForwardKl,
    ReverseKl,
    Jsd,
    Mse,
}

/// `[distill.logits]`: logit distillation ([`crate::ops::kd`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogitsConfig {
    pub divergence: DivergenceName,
    /// JSD's `β` (only read for `jsd`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub weight: f64,
    pub tokens: Tokens,
    #[serde(default)]
    pub standardize: bool,
    /// The teacher's top-k distributions written by `distill cache-teacher` for this data and
    /// these settings ([`TeacherCache`]): read instead of running the teacher, whose forward is
    /// then skipped unless hidden or attention alignment needs it.
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

impl LogitsConfig {
    /// The loss these settings describe.
    pub fn kd(&self) -> LogitKd {
        LogitKd {
            divergence: match self.divergence {
                DivergenceName::ForwardKl => Divergence::ForwardKl,
                DivergenceName::ReverseKl => Divergence::ReverseKl,
                DivergenceName::Jsd => Divergence::Jsd { beta: self.beta },
                DivergenceName::Mse => Divergence::Mse,
            },
            temperature: self.temperature,
            standardize: self.standardize,
        }
    }
}

/// Which (student layer, teacher layer) pairs hidden alignment compares.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Pairs {
    /// `"last"` (the last layers; LLaVADI's finding: only this one helps) or `"evenly:K"`: `K`
    /// pairs, student layer `⌈(i+1)·L_s/K⌉ − 1` with teacher layer `⌈(i+1)·L_t/K⌉ − 1`.
    Named(String),
    /// Explicit `[[student, teacher], ...]` (0-based decoder layers).
    List(Vec<[usize; 2]>),
}

impl Pairs {
    /// The pairs for a student of `ls` and a teacher of `lt` decoder layers.
    pub fn resolve(&self, ls: usize, lt: usize) -> Result<Vec<(usize, usize)>> {
        let bad = |m: String| Err(Error::arg("distill.hidden.pairs", m));
        let pairs: Vec<(usize, usize)> = match self {
            Pairs::Named(n) if n == "last" => vec![(ls - 1, lt - 1)],
            Pairs::Named(n) => {
                let Some(k) = n
                    .strip_prefix("evenly:")
                    .and_then(|k| k.parse::<usize>().ok())
                else {
                    return bad(format!(
                        "`{n}` is not \"last\", \"evenly:K\" or a list of [student, teacher] layers"
                    ));
                };
                if k == 0 || k > ls.min(lt) {
                    return bad(format!(
                        "evenly:{k} needs 1..={} pairs (student {ls} layers, teacher {lt})",
                        ls.min(lt)
                    ));
                }
                (0..k)
                    .map(|i| ((i + 1) * ls).div_ceil(k) - 1)
                    .zip((0..k).map(|i| ((i + 1) * lt).div_ceil(k) - 1))
                    .collect()
            }
            Pairs::List(v) => v.iter().map(|p| (p[0], p[1])).collect(),
        };
        if pairs.is_empty() {
            return bad("names no pair".into());
        }
        for &(s, t) in &pairs {
            if s >= ls || t >= lt {
                return bad(format!(
                    "pair [{s}, {t}] is out of range: the student has {ls} layers, the teacher {lt}"
                ));
            }
        }
        if (1..pairs.len()).any(|i| pairs[..i].contains(&pairs[i])) {
            return bad("lists a pair twice".into());
        }
        Ok(pairs)
    }
}

/// How hidden states are compared.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HiddenLoss {
    /// `mean over rows and dims (P(h_s) − h_t)²`.
    Mse,
    /// `mean over rows (1 − cos(P(h_s), h_t))`.
    Cosine,
}

/// `[distill.hidden]`: hidden-state alignment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HiddenConfig {
    pub pairs: Pairs,
    pub loss: HiddenLoss,
    pub tokens: Tokens,
    #[serde(default = "one")]
    pub weight: f64,
    /// One projector for every pair instead of one each.
    #[serde(default)]
    pub shared: bool,
}

/// A token group of a sequence: image placeholders, answer tokens (labelled), and the rest
/// (system prompt, role tags, questions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Image,
    Text,
    Answer,
}

impl Group {
    /// The group of position `t` of `seq`.
    pub fn of(seq: &TrainSeq, t: usize, image_token: u32) -> Group {
        if seq.input_ids[t] == image_token {
            Group::Image
        } else if seq.labels.get(t).is_some_and(|&l| l >= 0) {
            Group::Answer
        } else {
            Group::Text
        }
    }

    fn parse(s: &str) -> Option<Group> {
        match s.trim() {
            "image" => Some(Group::Image),
            "text" => Some(Group::Text),
            "answer" => Some(Group::Answer),
            _ => None,
        }
    }
}

/// `[distill.attention]`: attention alignment. For each block `"q->k"` and layer pair, the
/// student's attention probabilities `P_s[h, i, j]` of the queries `i` of group `q` over the
/// keys `j ≤ i` of group `k` are pulled toward the teacher's,
/// `L = mean over (h, i, j) (P_s[h, i, j] − P̄_t[h, i, j])²`, averaged over blocks and pairs.
/// Heads are mapped when the counts differ: with `H_t = m·H_s`, student head `h` matches the mean
/// of teacher heads `h·m .. (h+1)·m`; with `H_s = m·H_t`, teacher head `⌊h/m⌋`; otherwise both
/// sides' head means are compared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// `"query->key"` group pairs, groups `image`, `text`, `answer`.
    pub blocks: Vec<String>,
    pub pairs: Pairs,
    #[serde(default = "one")]
    pub weight: f64,
}

impl AttentionConfig {
    /// The blocks as group pairs; refuses unknown groups and blocks the causal mask zeroes.
    pub fn blocks(&self) -> Result<Vec<(Group, Group)>> {
        let bad = |m: String| Err(Error::arg("distill.attention.blocks", m));
        if self.blocks.is_empty() {
            return bad("names no block (e.g. \"answer->image\")".into());
        }
        let mut out = Vec::new();
        for b in &self.blocks {
            let Some((q, k)) = b
                .split_once("->")
                .and_then(|(q, k)| Some((Group::parse(q)?, Group::parse(k)?)))
            else {
                return bad(format!(
                    "`{b}` is not `query->key` with groups image, text, answer"
                ));
            };
            if (q, k) == (Group::Image, Group::Answer) {
                return bad(format!(
                    "`{b}` is zero under the causal mask: every answer token follows the image, \
                     so no image query sees an answer key (the block would train nothing)"
                ));
            }
            if out.contains(&(q, k)) {
                return bad(format!("`{b}` is listed twice"));
            }
            out.push((q, k));
        }
        Ok(out)
    }
}

fn weight_ok(name: &str, w: f64) -> Result<()> {
    if w.is_finite() && w >= 0.0 {
        Ok(())
    } else {
        Err(Error::arg(
            name,
            format!("{w} must be a finite number >= 0"),
        ))
    }
}

fn llava_config(dir: &Path, what: &str) -> Result<LlavaConfig> {
    match ModelConfig::from_file(&dir.join("config.json"))? {
        ModelConfig::Llava(c) => Ok(c),
        ModelConfig::Llama(_) => Err(Error::arg(
            what,
            format!("{} is a LLaMA checkpoint, not LLaVA", dir.display()),
        )),
    }
}

impl DistillConfig {
    /// Resolves `teacher` against the config file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.teacher.is_relative() {
            self.teacher = base.join(&self.teacher);
        }
        if let Some(c) = self.logits.as_mut().and_then(|l| l.cache.as_mut())
            && c.is_relative()
        {
            *c = base.join(&*c);
        }
    }

    /// Checks the settings and that the teacher fits the student in `student_dir` (same
    /// tokenizer file, vocabulary, image token and image-token count; pairs in range), and that
    /// a teacher cache was made for the training json `data` and these settings, reading only
    /// configs, tokenizers and the cache's header.
    pub fn validate(&self, student_dir: &Path, data: &Path) -> Result<()> {
        weight_ok("distill.ce_weight", self.ce_weight)?;
        if let Some(l) = &self.logits {
            weight_ok("distill.logits.weight", l.weight)?;
            l.kd().validate()?;
        }
        if let Some(h) = &self.hidden {
            weight_ok("distill.hidden.weight", h.weight)?;
        }
        if let Some(a) = &self.attention {
            weight_ok("distill.attention.weight", a.weight)?;
            a.blocks()?;
        }
        if let Some(p) = &self.prune {
            p.plan()?;
        }
        let total = self.ce_weight
            + self.logits.as_ref().map_or(0.0, |l| l.weight)
            + self.hidden.as_ref().map_or(0.0, |h| h.weight)
            + self.attention.as_ref().map_or(0.0, |a| a.weight);
        if total == 0.0 {
            return Err(Error::arg(
                "distill",
                "every weight is 0 (ce_weight and the weights of logits, hidden, attention): \
                 nothing to train",
            ));
        }
        for (what, p) in [
            (
                "config.json of the teacher",
                self.teacher.join("config.json"),
            ),
            (
                "tokenizer.json of the teacher",
                self.teacher.join("tokenizer.json"),
            ),
        ] {
            if !p.is_file() {
                return Err(Error::MissingFile { what, path: p });
            }
        }
        let t = llava_config(&self.teacher, "distill.teacher")?;
        if let Some(l) = &self.logits
            && let Some(c) = &l.cache
        {
            TeacherCache::open(c)?.check(data, l, t.text.vocab_size)?;
        }
        if !student_dir.join("config.json").is_file() {
            // A stage's student is made by the stage before; checked when it starts.
            return Ok(());
        }
        let s = llava_config(student_dir, "model")?;
        let mismatch = |what: &str, a: String, b: String| {
            Err(Error::arg(
                "distill.teacher",
                format!(
                    "the teacher {} has {what} {b} but the student has {a}: logits and rows must \
                     correspond (make the student with `distill init-student`)",
                    self.teacher.display()
                ),
            ))
        };
        if s.text.vocab_size != t.text.vocab_size {
            return mismatch(
                "vocabulary",
                s.text.vocab_size.to_string(),
                t.text.vocab_size.to_string(),
            );
        }
        if s.image_token_id != t.image_token_id || s.image_tokens() != t.image_tokens() {
            return mismatch(
                "image token (id, count)",
                format!("({}, {})", s.image_token_id, s.image_tokens()),
                format!("({}, {})", t.image_token_id, t.image_tokens()),
            );
        }
        if s.vision.image_size != t.vision.image_size {
            return mismatch(
                "image size",
                s.vision.image_size.to_string(),
                t.vision.image_size.to_string(),
            );
        }
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| Error::io(&p, e));
        if read(student_dir.join("tokenizer.json"))? != read(self.teacher.join("tokenizer.json"))? {
            return Err(Error::arg(
                "distill.teacher",
                format!(
                    "{} and the student {} have different tokenizer.json files: the logits would \
                     not name the same tokens",
                    self.teacher.display(),
                    student_dir.display()
                ),
            ));
        }
        if let Some(h) = &self.hidden {
            h.pairs
                .resolve(s.text.num_hidden_layers, t.text.num_hidden_layers)?;
        }
        if let Some(a) = &self.attention {
            let pairs = a
                .pairs
                .resolve(s.text.num_hidden_layers, t.text.num_hidden_layers)
                .map_err(|e| rename_field(e, "distill.attention.pairs"))?;
            check_attention_before_pruning(&pairs, self.prune.as_ref())?;
        }
        if let Some(p) = &self.prune {
            p.plan()?
                .kept_counts(s.text.num_hidden_layers, s.image_tokens())
                .map_err(|e| rename_field(e, "distill.prune"))?;
        }
        Ok(())
    }
}

/// Attention alignment reads the student's maps as the batch has them: refuses a student layer
/// at or after the first pruning stage, whose rows are fewer.
fn check_attention_before_pruning(
    pairs: &[(usize, usize)],
    prune: Option<&PruneConfig>,
) -> Result<()> {
    let Some(first) = prune.and_then(|p| p.layers.first()) else {
        return Ok(());
    };
    match pairs.iter().find(|p| p.0 >= *first) {
        Some(p) => Err(Error::arg(
            "distill.attention.pairs",
            format!(
                "student layer {} is at or after the first pruning stage (layer {first}): its \
                 attention covers the kept tokens only; align layers before it",
                p.0
            ),
        )),
        None => Ok(()),
    }
}

/// The same error about another field (pairs are parsed for hidden and attention alike).
fn rename_field(e: Error, field: &str) -> Error {
    match e {
        Error::Arg { msg, .. } => Error::arg(field, msg),
        e => e,
    }
}

/// `Linear(inp, out)`, GELU, `Linear(out, out)`: parameter indices into the student's list.
#[derive(Debug, Clone, Copy)]
struct Projector {
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    inp: usize,
    out: usize,
}

/// What [`Projector::forward`] keeps for its backward.
struct ProjectorCache {
    x: Vec<f32>,
    h: Vec<f32>,
    g: Vec<f32>,
}

fn affine(p: &[Param], w: usize, b: usize, x: &[f32], inp: usize, out: usize) -> Vec<f32> {
    let m = x.len() / inp;
    let mut y = vec![0.0f32; m * out];
    matmul_nt(m, out, inp, x, inp, &p[w].value, inp, &mut y, true);
    for row in y.chunks_mut(out) {
        ops::add(row, &p[b].value);
    }
    y
}

fn affine_backward(
    p: &mut [Param],
    w: usize,
    b: usize,
    x: &[f32],
    inp: usize,
    dy: &[f32],
) -> Result<Vec<f32>> {
    let (mut dw, mut db) = (
        std::mem::take(&mut p[w].grad),
        std::mem::take(&mut p[b].grad),
    );
    let frozen = dw.is_empty();
    if frozen {
        dw = vec![0.0; p[w].value.len()];
        db = vec![0.0; p[b].value.len()];
    }
    let r = linear_backward(x, &p[w].value, inp, dy, &mut dw, Some(&mut db));
    if !frozen {
        p[w].grad = dw;
        p[b].grad = db;
    }
    r
}

impl Projector {
    fn forward(&self, p: &[Param], x: &[f32]) -> (Vec<f32>, ProjectorCache) {
        let h = affine(p, self.w1, self.b1, x, self.inp, self.out);
        let mut g = h.clone();
        act::gelu(&mut g);
        let y = affine(p, self.w2, self.b2, &g, self.out, self.out);
        let cache = ProjectorCache {
            x: x.to_vec(),
            h,
            g,
        };
        (y, cache)
    }

    /// Accumulates the weights' gradients; returns `dx`.
    fn backward(&self, p: &mut [Param], c: &ProjectorCache, dy: &[f32]) -> Result<Vec<f32>> {
        let dg = affine_backward(p, self.w2, self.b2, &c.g, self.out, dy)?;
        let dh = act::gelu_backward(&c.h, &dg);
        affine_backward(p, self.w1, self.b1, &c.x, self.inp, &dh)
    }
}

/// torch's `nn.Linear` default init: weight and bias uniform in `±1/√inp` (from an LCG).
fn linear_init(n: usize, inp: usize, state: &mut u64) -> Vec<f32> {
    let bound = 1.0 / (inp as f32).sqrt();
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (*state >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * bound
        })
        .collect()
}

/// Whether a loss with `tokens` reads row `t` of `seq` (the state after token `t`): for a
/// logit loss (`logits`), "answer" rows predict an answer token and "all" rows predict any text
/// token of the sequence; for hidden alignment, "all" is every row.
pub fn reads_row(seq: &TrainSeq, t: usize, tokens: Tokens, image_token: u32, logits: bool) -> bool {
    let n = seq.input_ids.len();
    match (tokens, logits) {
        (Tokens::Answer, _) => seq.labels.get(t + 1).is_some_and(|&l| l >= 0),
        (Tokens::All, true) => t + 1 < n && seq.input_ids[t + 1] != image_token,
        (Tokens::All, false) => t < n,
    }
}

/// [`reads_row`] over a batch's rows end to end.
fn row_mask(batch: &[TrainSeq], tokens: Tokens, image_token: u32, logits: bool) -> Vec<bool> {
    batch
        .iter()
        .flat_map(|s| {
            (0..s.input_ids.len()).map(move |t| reads_row(s, t, tokens, image_token, logits))
        })
        .collect()
}

/// Logit distillation as a [`HeadLoss`]: the teacher's logits of the same rows come from its
/// traced final states, a chunk at a time.
struct LogitLoss<'a> {
    kd: LogitKd,
    reads: Vec<bool>,
    counted: usize,
    weight: f32,
    sum: f64,
    teacher: TeacherRows<'a>,
}

/// Where a logit loss gets the teacher's rows.
enum TeacherRows<'a> {
    /// Logits from the teacher's traced final states.
    Online {
        model: &'a TrainModel,
        final_out: &'a [f32],
    },
    /// A [`TeacherCache`]'s top-k rows, by batch row (`None` where the loss reads nothing).
    Cached(Vec<Option<SparseRow>>),
}

impl HeadLoss for LogitLoss<'_> {
    fn reads(&self, row: usize) -> bool {
        self.reads.get(row).copied().unwrap_or(false)
    }

    fn chunk(&mut self, rows: &[usize], logits: &[f32], dlogits: &mut [f32]) -> Result<()> {
        let vocab = logits.len() / rows.len();
        let mine: Vec<(usize, usize)> = rows
            .iter()
            .enumerate()
            .filter(|&(_, &r)| self.reads[r])
            .map(|(k, &r)| (k, r))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let scale = self.weight / self.counted as f32;
        let online = match &self.teacher {
            TeacherRows::Online { model, final_out } => {
                let th = model.config.text.hidden_size;
                let x: Vec<f32> = mine
                    .iter()
                    .flat_map(|&(_, r)| &final_out[r * th..(r + 1) * th])
                    .copied()
                    .collect();
                Some(model.head_logits(&x))
            }
            TeacherRows::Cached(_) => None,
        };
        for (j, &(k, r)) in mine.iter().enumerate() {
            let z = &logits[k * vocab..(k + 1) * vocab];
            let dz = &mut dlogits[k * vocab..(k + 1) * vocab];
            self.sum += match (&online, &self.teacher) {
                (Some(tl), _) => {
                    let tz = &tl[j * vocab..(j + 1) * vocab];
                    match self.kd.divergence {
                        Divergence::Mse => mse_row(z, tz, self.kd.standardize, scale, dz),
                        _ => self.kd.row(z, &self.kd.teacher_log_probs(tz), scale, dz)?,
                    }
                }
                (None, TeacherRows::Cached(rows)) => {
                    let row = rows[r].as_ref().ok_or_else(|| {
                        Error::arg("distill.logits.cache", format!("holds no row for row {r}"))
                    })?;
                    self.kd.row(z, &row.dense(vocab), scale, dz)?
                }
                (None, TeacherRows::Online { .. }) => unreachable!("online rows computed above"),
            };
        }
        Ok(())
    }
}

/// The cached teacher rows of a batch, by batch row: sample `samples[i]`'s rows go to the rows
/// of sequence `i` the loss reads, in order. Errors when the cache was made from another
/// encoding of a sample (length or read rows differ) or no sample indices are given.
fn cached_rows(
    cache: &TeacherCache,
    l: &LogitsConfig,
    batch: &[TrainSeq],
    samples: Option<&[usize]>,
    image_token: u32,
) -> Result<Vec<Option<SparseRow>>> {
    let samples = samples.filter(|s| s.len() == batch.len()).ok_or_else(|| {
        Error::arg(
            "distill.logits.cache",
            "a cached teacher needs the batch's sample indices (Distiller::forward_samples)",
        )
    })?;
    let mut out = Vec::new();
    for (s, &i) in batch.iter().zip(samples) {
        let t = s.input_ids.len();
        let rows = cache.rows(i)?;
        let read: Vec<usize> = (0..t)
            .filter(|&r| reads_row(s, r, l.tokens, image_token, true))
            .collect();
        if cache.seq_len(i)? != t || rows.len() != read.len() {
            return Err(Error::arg(
                "distill.logits.cache",
                format!(
                    "sample {i} is {t} tokens with {} rows read, but the cache holds {} tokens and \
                     {} rows: it was made from another encoding (max_len, tokenizer or data)",
                    read.len(),
                    cache.seq_len(i)?,
                    rows.len()
                ),
            ));
        }
        let mut per = vec![None; t];
        for (r, row) in read.into_iter().zip(rows) {
            per[r] = Some(row);
        }
        out.extend(per);
    }
    Ok(out)
}

/// The losses of one distillation forward (unweighted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillLosses {
    /// The answers' cross-entropy (logged even when its weight is 0).
    pub ce: f32,
    /// Logit distillation's mean over the rows it reads.
    pub kd: Option<f32>,
    /// Hidden alignment's mean over its pairs.
    pub hidden: Option<f32>,
    /// Attention alignment's mean over its blocks and pairs.
    pub attention: Option<f32>,
}

/// A teacher and the alignment projectors: turns a training forward into a distillation one.
pub struct Distiller {
    cfg: DistillConfig,
    teacher: TrainModel,
    /// The teacher's cached top-k rows, when `[distill.logits]` names a cache.
    cache: Option<TeacherCache>,
    pairs: Vec<(usize, usize)>,
    /// One per pair (the same one repeated when shared).
    projectors: Vec<Projector>,
    /// Attention alignment's blocks and layer pairs.
    blocks: Vec<(Group, Group)>,
    attn_pairs: Vec<(usize, usize)>,
}

impl Distiller {
    /// Loads the teacher (frozen) and appends fresh alignment projectors to `student.params`
    /// (seeded by `seed`; [`Distiller::load_projectors`] replaces them when resuming).
    pub fn new(cfg: &DistillConfig, student: &mut TrainModel, seed: u64) -> Result<Self> {
        let mut teacher = TrainModel::from_dir(&cfg.teacher)?;
        teacher.freeze();
        let (ls, lt) = (student.num_layers(), teacher.num_layers());
        let pairs = match &cfg.hidden {
            Some(h) => h.pairs.resolve(ls, lt)?,
            None => Vec::new(),
        };
        let (ds, dt) = (
            student.config.text.hidden_size,
            teacher.config.text.hidden_size,
        );
        let mut state = seed ^ 0x05ee_da11_9e37_79b9;
        let count = match &cfg.hidden {
            Some(h) if h.shared => 1,
            _ => pairs.len(),
        };
        let mut made = Vec::new();
        for i in 0..count {
            let mut add = |name: &str, n: usize, inp: usize| {
                let full = format!("align.{i}.{name}");
                let group = decay_group("align", &full);
                student
                    .params
                    .push(Param::new(full, group, linear_init(n, inp, &mut state)));
                student.params.len() - 1
            };
            made.push(Projector {
                w1: add("linear_1.weight", dt * ds, ds),
                b1: add("linear_1.bias", dt, ds),
                w2: add("linear_2.weight", dt * dt, dt),
                b2: add("linear_2.bias", dt, dt),
                inp: ds,
                out: dt,
            });
        }
        let projectors = (0..pairs.len()).map(|i| made[i.min(count - 1)]).collect();
        let (blocks, attn_pairs) = match &cfg.attention {
            Some(a) => (
                a.blocks()?,
                a.pairs
                    .resolve(ls, lt)
                    .map_err(|e| rename_field(e, "distill.attention.pairs"))?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        check_attention_before_pruning(&attn_pairs, cfg.prune.as_ref())?;
        student.set_prune(cfg.prune.as_ref().map(PruneConfig::plan).transpose()?)?;
        let cache = match cfg.logits.as_ref().and_then(|l| l.cache.as_ref()) {
            Some(c) => Some(TeacherCache::open(c)?),
            None => None,
        };
        Ok(Distiller {
            cfg: cfg.clone(),
            teacher,
            cache,
            pairs,
            projectors,
            blocks,
            attn_pairs,
        })
    }

    /// The (student, teacher) layer pairs hidden alignment compares.
    pub fn pairs(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// Writes the projectors' parameters (from `params`, the student's list) to `path`.
    pub fn save_projectors(params: &[Param], path: &Path) -> Result<()> {
        let t: Vec<OutTensor> = params
            .iter()
            .filter(|p| p.group.starts_with("align."))
            .map(|p| OutTensor::F32(&p.name, vec![p.value.len()], &p.value))
            .collect();
        if t.is_empty() {
            return Ok(());
        }
        write_safetensors(path, &t)
    }

    /// Replaces the projectors' values in `params` with those saved in `path`.
    pub fn load_projectors(params: &mut [Param], path: &Path) -> Result<()> {
        for p in params.iter_mut().filter(|p| p.group.starts_with("align.")) {
            let (_, v) = read_f32_tensor(path, &p.name)?;
            if v.len() != p.value.len() {
                return Err(Error::Shape {
                    name: format!("{} in {}", p.name, path.display()),
                    expected: vec![p.value.len()],
                    got: vec![v.len()],
                });
            }
            p.value = v;
        }
        Ok(())
    }

    /// Runs the teacher and the student on `batch` and leaves the student ready for
    /// [`TrainModel::backward`], which then differentiates `ce_weight · CE + Σ weight · loss`
    /// (the projectors' gradients are already accumulated). With a teacher cache, use
    /// [`Distiller::forward_samples`].
    pub fn forward(
        &mut self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
    ) -> Result<DistillLosses> {
        self.forward_samples(student, batch, None)
    }

    /// [`Distiller::forward`] for a batch of the training data's samples `samples` (indices in
    /// the json), whose logit targets a teacher cache holds.
    pub fn forward_samples(
        &mut self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        samples: Option<&[usize]>,
    ) -> Result<DistillLosses> {
        let image_token = student.config.image_token_id;
        let query_rows: Vec<Vec<usize>> = batch
            .iter()
            .map(|s| {
                (0..s.input_ids.len())
                    .filter(|&t| {
                        self.blocks
                            .iter()
                            .any(|b| Group::of(s, t, image_token) == b.0)
                    })
                    .collect()
            })
            .collect();
        let req = TraceRequest {
            hidden: self.pairs.iter().map(|p| p.1).collect(),
            attention: self.attn_pairs.iter().map(|p| p.1).collect(),
            query_rows,
        };
        let cached = match (&self.cache, &self.cfg.logits) {
            (Some(cache), Some(l)) => Some(cached_rows(cache, l, batch, samples, image_token)?),
            _ => None,
        };
        // The teacher runs unless the cache gives everything the losses read.
        let online = cached.is_none() || self.cfg.hidden.is_some() || !self.blocks.is_empty();
        let trace = if online {
            self.teacher.trace(batch, &req)?
        } else {
            Trace::default()
        };
        let mut ce = AnswerCe::new(batch, self.cfg.ce_weight as f32);
        let mut kd = match &self.cfg.logits {
            Some(l) => {
                let reads = row_mask(batch, l.tokens, image_token, true);
                Some(LogitLoss {
                    kd: l.kd(),
                    counted: reads.iter().filter(|&&r| r).count(),
                    reads,
                    weight: l.weight as f32,
                    sum: 0.0,
                    teacher: match cached {
                        Some(rows) => TeacherRows::Cached(rows),
                        None => TeacherRows::Online {
                            model: &self.teacher,
                            final_out: &trace.final_out,
                        },
                    },
                })
            }
            None => None,
        };
        {
            let mut losses: Vec<&mut dyn HeadLoss> = vec![&mut ce];
            if let Some(k) = kd.as_mut().filter(|k| k.counted > 0) {
                losses.push(k);
            }
            student.forward_with(batch, &mut losses)?;
        }
        let kd = kd.map(|k| (k.sum / k.counted.max(1) as f64) as f32);
        let hidden = match &self.cfg.hidden {
            Some(h) => Some(self.align(student, batch, h, &trace.hidden)?),
            None => None,
        };
        let attention = match &self.cfg.attention {
            Some(a) => Some(self.align_attention(student, batch, a.weight, &req, &trace)?),
            None => None,
        };
        Ok(DistillLosses {
            ce: ce.loss(),
            kd,
            hidden,
            attention,
        })
    }

    /// Hidden alignment's loss (mean over pairs); adds its gradients into the student's
    /// backward and the projectors.
    fn align(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        h: &HiddenConfig,
        teacher_hidden: &BTreeMap<usize, Vec<f32>>,
    ) -> Result<f32> {
        let rows: Vec<usize> = row_mask(batch, h.tokens, student.config.image_token_id, false)
            .iter()
            .enumerate()
            .filter(|&(_, &r)| r)
            .map(|(i, _)| i)
            .collect();
        if rows.is_empty() {
            return Ok(0.0);
        }
        let (ds, dt) = (
            student.config.text.hidden_size,
            self.teacher.config.text.hidden_size,
        );
        let pair_scale = h.weight as f32 / self.pairs.len() as f32;
        let mut total = 0.0f64;
        for (&(ls, lt), proj) in self.pairs.iter().zip(&self.projectors) {
            // (student row, batch row) of the rows present in the student's layer (a pruned
            // student has dropped some image rows).
            let present: Vec<(usize, usize)> = student
                .hidden_rows(ls)?
                .iter()
                .enumerate()
                .filter(|&(_, r)| rows.binary_search(r).is_ok())
                .map(|(k, &r)| (k, r))
                .collect();
            let hs = student.hidden_state(ls)?;
            let states = hs.len();
            let x: Vec<f32> = present
                .iter()
                .flat_map(|&(k, _)| &hs[k * ds..(k + 1) * ds])
                .copied()
                .collect();
            let ht = &teacher_hidden[&lt];
            let target: Vec<f32> = present
                .iter()
                .flat_map(|&(_, r)| &ht[r * dt..(r + 1) * dt])
                .copied()
                .collect();
            let (y, cache) = proj.forward(&student.params, &x);
            let (loss, mut dy) = match h.loss {
                HiddenLoss::Mse => mse(&y, &target),
                HiddenLoss::Cosine => cosine(&y, &target, dt),
            };
            total += loss;
            dy.iter_mut().for_each(|d| *d *= pair_scale);
            let dx = proj.backward(&mut student.params, &cache, &dy)?;
            let mut full = vec![0.0f32; states];
            for (j, &(k, _)) in present.iter().enumerate() {
                full[k * ds..(k + 1) * ds].copy_from_slice(&dx[j * ds..(j + 1) * ds]);
            }
            student.add_hidden_grad(ls, &full)?;
        }
        Ok((total / self.pairs.len() as f64) as f32)
    }
}

impl Distiller {
    /// Attention alignment's loss (mean over blocks and pairs, see [`AttentionConfig`]); adds
    /// its gradient to the student's attention probabilities.
    fn align_attention(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        weight: f64,
        req: &TraceRequest,
        trace: &Trace,
    ) -> Result<f32> {
        let image_token = student.config.image_token_id;
        let hs = student.config.text.num_attention_heads;
        let ht = self.teacher.config.text.num_attention_heads;
        // Teacher heads averaged for student head h (or all heads on both sides: `None`).
        let map: Option<Vec<std::ops::Range<usize>>> = if ht.is_multiple_of(hs) {
            let m = ht / hs;
            Some((0..hs).map(|h| h * m..(h + 1) * m).collect())
        } else if hs.is_multiple_of(ht) {
            let m = hs / ht;
            Some((0..hs).map(|h| h / m..h / m + 1).collect())
        } else {
            None
        };
        let terms = (self.blocks.len() * self.attn_pairs.len()) as f64;
        let mut total = 0.0f64;
        for &(ls, lt) in &self.attn_pairs {
            let mut grads: Vec<Vec<f32>> = batch
                .iter()
                .map(|s| vec![0.0f32; hs * s.input_ids.len().pow(2)])
                .collect();
            for &(gq, gk) in &self.blocks {
                // Visible entries of the block, over the batch.
                let entries: usize = batch
                    .iter()
                    .map(|s| {
                        let t = s.input_ids.len();
                        (0..t)
                            .filter(|&i| Group::of(s, i, image_token) == gq)
                            .map(|i| {
                                (0..=i)
                                    .filter(|&j| Group::of(s, j, image_token) == gk)
                                    .count()
                            })
                            .sum::<usize>()
                    })
                    .sum();
                if entries == 0 {
                    continue;
                }
                let n = (entries * map.as_ref().map_or(1, |_| hs)) as f64;
                let scale = weight / terms;
                let mut sum = 0.0f64;
                for (si, s) in batch.iter().enumerate() {
                    let t = s.input_ids.len();
                    let ps = student.attention_probs(ls, si)?;
                    let pt = &trace.attention[&lt][si];
                    let rows = &req.query_rows[si];
                    let g = &mut grads[si];
                    for (ri, &i) in rows.iter().enumerate() {
                        if Group::of(s, i, image_token) != gq {
                            continue;
                        }
                        let teacher = |h: usize, j: usize| pt[(h * rows.len() + ri) * t + j] as f64;
                        for j in (0..=i).filter(|&j| Group::of(s, j, image_token) == gk) {
                            match &map {
                                Some(map) => {
                                    for (h, hr) in map.iter().enumerate() {
                                        let want = hr.clone().map(|g| teacher(g, j)).sum::<f64>()
                                            / hr.len() as f64;
                                        let d = ps[(h * t + i) * t + j] as f64 - want;
                                        sum += d * d;
                                        g[(h * t + i) * t + j] += (scale * 2.0 * d / n) as f32;
                                    }
                                }
                                None => {
                                    let mean_s = (0..hs)
                                        .map(|h| ps[(h * t + i) * t + j] as f64)
                                        .sum::<f64>()
                                        / hs as f64;
                                    let mean_t =
                                        (0..ht).map(|h| teacher(h, j)).sum::<f64>() / ht as f64;
                                    let d = mean_s - mean_t;
                                    sum += d * d;
                                    for h in 0..hs {
                                        g[(h * t + i) * t + j] +=
                                            (scale * 2.0 * d / (n * hs as f64)) as f32;
                                    }
                                }
                            }
                        }
                    }
                }
                total += sum / n;
            }
            for (si, g) in grads.iter().enumerate() {
                student.add_probs_grad(ls, si, g)?;
            }
        }
        Ok((total / terms) as f32)
    }
}

/// `mean((y − t)²)` and its gradient in `y`.
fn mse(y: &[f32], t: &[f32]) -> (f64, Vec<f32>) {
    let n = y.len() as f64;
    let loss = y
        .iter()
        .zip(t)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / n;
    let g = y
        .iter()
        .zip(t)
        .map(|(a, b)| (2.0 * (a - b) as f64 / n) as f32)
        .collect();
    (loss, g)
}

/// `mean over rows (1 − cos(y_r, t_r))` (rows of width `d`) and its gradient in `y`:
/// `−(1/n) (t/(|y||t|) − cos · y/|y|²)` per row. Norms are floored at 1e-8, as torch's
/// `F.cosine_similarity`.
fn cosine(y: &[f32], t: &[f32], d: usize) -> (f64, Vec<f32>) {
    let n = (y.len() / d) as f64;
    let mut loss = 0.0;
    let mut g = vec![0.0f32; y.len()];
    for ((yr, tr), gr) in y.chunks(d).zip(t.chunks(d)).zip(g.chunks_mut(d)) {
        let dot: f64 = yr.iter().zip(tr).map(|(a, b)| *a as f64 * *b as f64).sum();
        let ny = yr
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-8);
        let nt = tr
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-8);
        let cos = dot / (ny * nt);
        loss += 1.0 - cos;
        for ((g, a), b) in gr.iter_mut().zip(yr).zip(tr) {
            *g = (-(*b as f64 / (ny * nt) - cos * *a as f64 / (ny * ny)) / n) as f32;
        }
    }
    (loss / n, g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn alignment_losses_match_finite_differences() {
        let d = 5;
        let mut rng = Rng::new(3);
        let (y, t) = (rng.vec(4 * d), rng.vec(4 * d));
        let yd = f64s(&y);
        let td = f64s(&t);
        let mse64 = |y: &[f64]| {
            y.iter().zip(&td).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / y.len() as f64
        };
        let (l, g) = mse(&y, &t);
        assert!((l - mse64(&yd)).abs() < 1e-6 * l.abs());
        check("hidden mse", &g, &fd(mse64, &yd, 1e-6), 1e-5);
        let cos64 = |y: &[f64]| {
            let mut s = 0.0;
            for (a, b) in y.chunks(d).zip(td.chunks(d)) {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
                s += 1.0 - dot / (na * nb);
            }
            s / (y.len() / d) as f64
        };
        let (l, g) = cosine(&y, &t, d);
        assert!((l - cos64(&yd)).abs() < 1e-6 * l.abs().max(1.0));
        check("hidden cosine", &g, &fd(cos64, &yd, 1e-6), 1e-5);
    }

    #[test]
    fn pairs_resolve_and_refuse() {
        let named = |s: &str| Pairs::Named(s.into());
        assert_eq!(named("last").resolve(2, 4).unwrap(), vec![(1, 3)]);
        assert_eq!(
            named("evenly:2").resolve(2, 4).unwrap(),
            vec![(0, 1), (1, 3)]
        );
        assert_eq!(
            named("evenly:3").resolve(3, 6).unwrap(),
            vec![(0, 1), (1, 3), (2, 5)]
        );
        assert_eq!(
            Pairs::List(vec![[0, 2], [1, 3]]).resolve(2, 4).unwrap(),
            vec![(0, 2), (1, 3)]
        );
        for (p, msg) in [
            (named("first"), "is not \"last\""),
            (named("evenly:0"), "needs 1..=2"),
            (named("evenly:3"), "needs 1..=2"),
            (Pairs::List(vec![[2, 0]]), "out of range"),
            (Pairs::List(vec![[0, 4]]), "out of range"),
            (Pairs::List(vec![]), "names no pair"),
            (Pairs::List(vec![[0, 1], [0, 1]]), "twice"),
        ] {
            let e = p.resolve(2, 4).unwrap_err().to_string();
            assert!(e.contains(msg) && e.contains("distill.hidden.pairs"), "{e}");
        }
    }
}
