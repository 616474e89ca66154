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
//! gate = "none"                        # or "adaptive": per-sample weights over the pairs
//! deep_first_steps = 0                 # coarse to fine: only the deepest pair for N steps
//!
//! [distill.affinity]                   # image-text cosine similarities (no projector)
//! pairs = "last"
//! text = "answer"                      # or "all": every non-image token
//! weight = 1.0
//!
//! [distill.relational]                 # sample-similarity Gram matrices (no projector)
//! pairs = "last"
//! tokens = "all"                       # rows pooled per sample
//! weight = 1.0
//!
//! [distill.vision]                     # a smaller ViT student's projected image features
//! loss = "mse"                         # or "cosine"; with vision_trainable_layers = N
//! weight = 1.0
//!
//! [distill.attention]                  # attention alignment between token groups
//! blocks = ["answer->image"]           # query group -> key group: image, text, answer
//! pairs = "last"                       # as for hidden
//! weight = 1.0
//!
//! [distill.on_policy]                  # the student's own answers, with probability lambda
//! lambda = 0.25
//! max_new_tokens = 16
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

use super::logits::{LogitsConfig, Tokens, one, reads_row};
use super::model::{AnswerCe, HeadLoss, Trace, TraceRequest, TrainModel, TrainSeq, row_offsets};
use super::optim::decay_group;
use super::teacher_cache::{SparseRow, TeacherCache};
use crate::error::{Error, Result};
use crate::io::{OutTensor, read_f32_tensor, write_safetensors};
use crate::model::llava::{Projector, ProjectorCache};
use crate::model::nn::{Linear, Param};
use crate::ops;
use crate::ops::kd::{Divergence, LogitKd, mse_row};
use crate::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};
use crate::tensor::Tensor;

/// File of a checkpoint folder holding the alignment projectors (not part of the model).
pub const ALIGN_FILE: &str = "align.safetensors";

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
    pub affinity: Option<AffinityConfig>,
    #[serde(default)]
    pub relational: Option<RelationalConfig>,
    #[serde(default)]
    pub vision: Option<VisionAlignConfig>,
    #[serde(default)]
    pub prune: Option<PruneConfig>,
    #[serde(default)]
    pub on_policy: Option<OnPolicyConfig>,
}

fn default_max_new() -> usize {
    16
}

/// `[distill.on_policy]`: on-policy distillation (GKD, Agarwal et al. 2024). Each sequence of a
/// batch is, with probability `lambda`, replaced by its first question answered greedily by
/// the student itself (its current weights, pruned as `[distill.prune]` says): the teacher's
/// losses then grade the student's own answer tokens, and the cross-entropy skips the sequence
/// (its labels are the student's). The draw is seeded by the run's seed, the step and the
/// sequence's place in the batch, so a resumed run draws the same. Decoding re-runs the
/// student's forward once per new token (no KV cache in the trainer): each on-policy sample
/// costs up to `max_new_tokens` forwards.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnPolicyConfig {
    pub lambda: f64,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
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
    /// How the pairs' losses are weighted per sample.
    #[serde(default)]
    pub gate: Gating,
    /// Coarse to fine (SEEDS.md section 4): for this many steps only the deepest pair (largest
    /// student layer) is aligned, then all of them.
    #[serde(default)]
    pub deep_first_steps: u64,
}

/// Weights of the hidden-alignment pairs, per sample.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// Every pair `1/P`.
    #[default]
    None,
    /// A learned gate (adaptive layer selection, SEEDS.md section 4): from the sample's mean
    /// teacher state `x` (final norm, not differentiated), `w = softmax(σ(W x + b) / τ)` over
    /// the pairs with a learnable temperature `τ = exp(θ)`; trained with the student on the
    /// same weighted loss. Its parameters (`align.gate.*`) are dropped at export like the
    /// projectors.
    Adaptive,
}

/// `[distill.affinity]`: affinity distillation. At each layer pair, the cosine similarities
/// `A[i, j] = cos(h_i, h_j)` of every image row `i` with every text row `j` of a sequence (the
/// answer rows, or every non-image row) are pulled toward the teacher's,
/// `L = mean over (i, j) (A_s − A_t)²` over the batch, averaged over pairs. Cosines compare
/// states of any width: no projector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AffinityConfig {
    pub pairs: Pairs,
    /// The text side: rows predicting answer tokens (`answer`) or every non-image row (`all`).
    pub text: Tokens,
    #[serde(default = "one")]
    pub weight: f64,
}

/// `[distill.relational]`: relational distillation. At each layer pair, each sample's states
/// over its rows are mean-pooled and normalised, `ê_b`, and the batch's Gram matrix
/// `G[a, b] = ê_a · ê_b` is pulled toward the teacher's, `L = mean over (a, b) (G_s − G_t)²`,
/// averaged over pairs. No projector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelationalConfig {
    pub pairs: Pairs,
    pub tokens: Tokens,
    #[serde(default = "one")]
    pub weight: f64,
}

/// `[distill.vision]`: vision feature alignment, for a student with its own (smaller) vision
/// tower (`distill init-student --vision-layers`). The student's projected image features (the
/// projector's output, which its LM reads as the image tokens) are pulled toward the teacher's
/// for the same image: `L = mean over rows and dims (P(f_s) − f_t)²`, or `mean over rows
/// (1 − cos(P(f_s), f_t))`, over every image row of the batch. `P` is the identity when the two
/// language models have the same width (a student LM cut from the teacher's reads the teacher's
/// feature space as it is) and a learnable projector (`align.vision.*`) otherwise. Which vision
/// layers train is the training config's `vision_trainable_layers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionAlignConfig {
    #[serde(default = "default_vision_loss")]
    pub loss: HiddenLoss,
    #[serde(default = "one")]
    pub weight: f64,
}

fn default_vision_loss() -> HiddenLoss {
    HiddenLoss::Mse
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

impl DistillConfig {
    /// Distillation from `teacher` with the answers' cross-entropy at weight 1 and no other
    /// loss yet: set the tables wanted, e.g.
    /// `DistillConfig { logits: Some(..), ..DistillConfig::new(teacher) }`.
    pub fn new(teacher: impl Into<PathBuf>) -> Self {
        DistillConfig {
            teacher: teacher.into(),
            ce_weight: 1.0,
            logits: None,
            hidden: None,
            attention: None,
            affinity: None,
            relational: None,
            vision: None,
            prune: None,
            on_policy: None,
        }
    }

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
        if let Some(o) = &self.on_policy {
            if !(0.0..=1.0).contains(&o.lambda) || o.max_new_tokens == 0 {
                return Err(Error::arg(
                    "distill.on_policy",
                    format!(
                        "lambda {} must be in [0, 1] and max_new_tokens {} at least 1",
                        o.lambda, o.max_new_tokens
                    ),
                ));
            }
            if self.logits.as_ref().is_some_and(|l| l.cache.is_some()) {
                return Err(Error::arg(
                    "distill.on_policy",
                    "a teacher cache holds the data's answers, not the student's: on-policy \
                     samples need the online teacher (drop `cache`)",
                ));
            }
        }
        if let Some(a) = &self.affinity {
            weight_ok("distill.affinity.weight", a.weight)?;
        }
        if let Some(r) = &self.relational {
            weight_ok("distill.relational.weight", r.weight)?;
        }
        if let Some(v) = &self.vision {
            weight_ok("distill.vision.weight", v.weight)?;
        }
        let total = self.ce_weight
            + self.logits.as_ref().map_or(0.0, |l| l.weight)
            + self.hidden.as_ref().map_or(0.0, |h| h.weight)
            + self.attention.as_ref().map_or(0.0, |a| a.weight)
            + self.affinity.as_ref().map_or(0.0, |a| a.weight)
            + self.relational.as_ref().map_or(0.0, |r| r.weight)
            + self.vision.as_ref().map_or(0.0, |v| v.weight);
        if total == 0.0 {
            return Err(Error::arg(
                "distill",
                "every weight is 0 (ce_weight and the weights of logits, hidden, attention, \
                 affinity, relational, vision): nothing to train",
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
        let t = super::llava_config(&self.teacher, "distill.teacher")?;
        if let Some(l) = &self.logits
            && let Some(c) = &l.cache
        {
            TeacherCache::open(c)?.check(data, l, t.text.vocab_size)?;
        }
        if !student_dir.join("config.json").is_file() {
            // A stage's student is made by the stage before; checked when it starts.
            return Ok(());
        }
        let s = super::llava_config(student_dir, "model")?;
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
        let (ls, lt) = (s.text.num_hidden_layers, t.text.num_hidden_layers);
        if let Some(a) = &self.affinity {
            a.pairs
                .resolve(ls, lt)
                .map_err(|e| rename_field(e, "distill.affinity.pairs"))?;
        }
        if let Some(r) = &self.relational {
            r.pairs
                .resolve(ls, lt)
                .map_err(|e| rename_field(e, "distill.relational.pairs"))?;
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

/// A fresh alignment projector (the model's [`Projector`]: `Linear(inp, out)`, GELU,
/// `Linear(out, out)`) appended to `params` as `{prefix}.linear_{1,2}.{weight,bias}` in the
/// `align` groups, initialised as torch's `nn.Linear`.
fn new_projector(
    params: &mut Vec<Param>,
    prefix: &str,
    inp: usize,
    out: usize,
    state: &mut u64,
) -> Result<Projector> {
    let mut add = |name: &str, shape: &[usize], fan_in: usize| -> Result<usize> {
        let full = format!("{prefix}.{name}");
        let group = decay_group("align", &full);
        let n = shape.iter().product();
        params.push(Param::from_f32(
            full,
            group,
            shape,
            linear_init(n, fan_in, state),
        )?);
        Ok(params.len() - 1)
    };
    Ok(Projector {
        linear_1: Linear {
            w: add("linear_1.weight", &[out, inp], inp)?,
            b: Some(add("linear_1.bias", &[out], inp)?),
        },
        linear_2: Linear {
            w: add("linear_2.weight", &[out, out], out)?,
            b: Some(add("linear_2.bias", &[out], out)?),
        },
    })
}

/// Runs an alignment projector on rows `x` of width `inp`, keeping what its backward needs.
fn project(
    proj: &Projector,
    params: &[Param],
    x: Vec<f32>,
    inp: usize,
) -> Result<(Vec<f32>, ProjectorCache)> {
    let x = Tensor::from_f32(&[x.len() / inp.max(1), inp], x)?;
    let (y, cache) = proj.forward(params, x, true)?;
    let cache = cache.ok_or_else(|| Error::arg("projector", "kept no activations".to_string()))?;
    Ok((y.into_f32_vec()?, cache))
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
                Some(model.head_logits(&x)?)
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

/// `seq`'s first question answered greedily by `student`: the prompt, then up to `max_new`
/// tokens (through the first end-of-sequence token), labelled as answer tokens.
fn student_answer(
    student: &mut TrainModel,
    seq: &TrainSeq,
    max_new: usize,
    eos: &[u32],
) -> Result<TrainSeq> {
    let p = seq.prompt.len();
    if p == 0 || p > seq.input_ids.len() {
        return Err(Error::arg(
            "distill.on_policy",
            "an on-policy sample needs its first prompt's segments (TrainSeq::prompt)",
        ));
    }
    let mut ids = seq.input_ids[..p].to_vec();
    for _ in 0..max_new {
        let s = TrainSeq {
            input_ids: ids.clone(),
            labels: vec![-100; ids.len()],
            pixel_values: seq.pixel_values.clone(),
            grounding: Vec::new(),
            prompt: seq.prompt.clone(),
        };
        let mut last = LastRow {
            row: ids.len() - 1,
            next: 0,
        };
        student.forward_with(std::slice::from_ref(&s), &mut [&mut last])?;
        ids.push(last.next);
        if eos.contains(&last.next) {
            break;
        }
    }
    let labels = (0..ids.len())
        .map(|t| if t < p { -100 } else { ids[t] as i64 })
        .collect();
    Ok(TrainSeq {
        input_ids: ids,
        labels,
        pixel_values: seq.pixel_values.clone(),
        grounding: Vec::new(),
        prompt: seq.prompt.clone(),
    })
}

/// The greedy next token of one row (a [`HeadLoss`] that trains nothing).
struct LastRow {
    row: usize,
    next: u32,
}

impl HeadLoss for LastRow {
    fn reads(&self, row: usize) -> bool {
        row == self.row
    }

    fn chunk(&mut self, rows: &[usize], logits: &[f32], _: &mut [f32]) -> Result<()> {
        let v = logits.len() / rows.len();
        if let Some(k) = rows.iter().position(|&r| r == self.row) {
            let z = &logits[k * v..(k + 1) * v];
            self.next = (0..v).fold(0, |b, i| if z[i] > z[b] { i } else { b }) as u32;
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
    /// Affinity distillation's mean over its pairs.
    pub affinity: Option<f32>,
    /// Relational distillation's mean over its pairs.
    pub relational: Option<f32>,
    /// Vision feature alignment's loss.
    pub vision: Option<f32>,
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
    /// The adaptive gate over the hidden pairs.
    gate: Option<GateParams>,
    /// Layer pairs of affinity and relational distillation.
    affinity_pairs: Vec<(usize, usize)>,
    relational_pairs: Vec<(usize, usize)>,
    /// Vision alignment's projector (`None`: the LM widths agree, features compared as they are).
    vision_projector: Option<Projector>,
    /// Optimizer steps taken before this forward (coarse-to-fine schedule, on-policy draws).
    step: u64,
    seed: u64,
}

/// The adaptive gate's parameters (indices into the student's list): `W [P, d_t]`, `b [P]`,
/// `θ [1]` with `τ = exp(θ)`.
#[derive(Debug, Clone, Copy)]
struct GateParams {
    w: usize,
    b: usize,
    theta: usize,
    inp: usize,
    pairs: usize,
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
        let made: Vec<Projector> = (0..count)
            .map(|i| {
                new_projector(
                    &mut student.params,
                    &format!("align.{i}"),
                    ds,
                    dt,
                    &mut state,
                )
            })
            .collect::<Result<_>>()?;
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
        let gate = match &cfg.hidden {
            Some(h) if h.gate == Gating::Adaptive => {
                let np = pairs.len();
                let mut add = |name: &str, v: Vec<f32>| -> Result<usize> {
                    let full = format!("align.gate.{name}");
                    // Weight decay would pull the temperature toward 1: it does not decay.
                    let group = match name {
                        "log_temperature" => "align.no_decay".to_string(),
                        _ => decay_group("align", &full),
                    };
                    let shape = [v.len()];
                    student
                        .params
                        .push(Param::from_f32(full, group, &shape, v)?);
                    Ok(student.params.len() - 1)
                };
                Some(GateParams {
                    w: add("weight", linear_init(np * dt, dt, &mut state))?,
                    b: add("bias", vec![0.0; np])?,
                    theta: add("log_temperature", vec![0.0])?,
                    inp: dt,
                    pairs: np,
                })
            }
            _ => None,
        };
        let resolve = |p: Option<&Pairs>, field: &str| -> Result<Vec<(usize, usize)>> {
            match p {
                Some(p) => p.resolve(ls, lt).map_err(|e| rename_field(e, field)),
                None => Ok(Vec::new()),
            }
        };
        let affinity_pairs = resolve(
            cfg.affinity.as_ref().map(|a| &a.pairs),
            "distill.affinity.pairs",
        )?;
        let relational_pairs = resolve(
            cfg.relational.as_ref().map(|r| &r.pairs),
            "distill.relational.pairs",
        )?;
        let cache = match cfg.logits.as_ref().and_then(|l| l.cache.as_ref()) {
            Some(c) => Some(TeacherCache::open(c)?),
            None => None,
        };
        let vision_projector = match &cfg.vision {
            Some(_) if ds != dt => Some(new_projector(
                &mut student.params,
                "align.vision",
                ds,
                dt,
                &mut state,
            )?),
            _ => None,
        };
        Ok(Distiller {
            cfg: cfg.clone(),
            teacher,
            cache,
            pairs,
            projectors,
            blocks,
            attn_pairs,
            gate,
            affinity_pairs,
            relational_pairs,
            vision_projector,
            step: 0,
            seed,
        })
    }

    /// With `[distill.on_policy]`: the batch with the drawn sequences replaced by the student's
    /// own answers (`None`: nothing drawn) and which were replaced.
    fn on_policy_batch(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
    ) -> Result<(Option<Vec<TrainSeq>>, Vec<bool>)> {
        let mut drawn = vec![false; batch.len()];
        let Some(o) = &self.cfg.on_policy else {
            return Ok((None, drawn));
        };
        for (i, d) in drawn.iter_mut().enumerate() {
            let mut h =
                self.seed ^ self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((i as u64) << 48);
            h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            h ^= h >> 31;
            *d = ((h >> 11) as f64 / (1u64 << 53) as f64) < o.lambda;
        }
        if !drawn.iter().any(|&d| d) {
            return Ok((None, drawn));
        }
        let eos = student.config.text.eos_token_ids.clone();
        let mut out = batch.to_vec();
        for (s, _) in out.iter_mut().zip(&drawn).filter(|(_, d)| **d) {
            *s = student_answer(student, s, o.max_new_tokens, &eos)?;
        }
        Ok((Some(out), drawn))
    }

    /// Tells the coarse-to-fine schedule how many optimizer steps were taken.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
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
            .map(|p| Ok(OutTensor::F32(&p.name, vec![p.value.len()], p.f32s()?)))
            .collect::<Result<_>>()?;
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
            p.value = Tensor::from_f32(p.value.shape(), v)?;
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
        let (owned, on_policy) = self.on_policy_batch(student, batch)?;
        let batch = owned.as_deref().unwrap_or(batch);
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
        let mut hidden_layers: Vec<usize> = self
            .pairs
            .iter()
            .chain(&self.affinity_pairs)
            .chain(&self.relational_pairs)
            .map(|p| p.1)
            .collect();
        hidden_layers.sort_unstable();
        hidden_layers.dedup();
        let req = TraceRequest {
            hidden: hidden_layers,
            attention: self.attn_pairs.iter().map(|p| p.1).collect(),
            query_rows,
            image_features: self.cfg.vision.is_some(),
        };
        let cached = match (&self.cache, &self.cfg.logits) {
            (Some(cache), Some(l)) => Some(cached_rows(cache, l, batch, samples, image_token)?),
            _ => None,
        };
        // The teacher runs unless the cache gives everything the losses read.
        let online = cached.is_none()
            || !req.hidden.is_empty()
            || !self.blocks.is_empty()
            || req.image_features;
        let trace = if online {
            self.teacher.trace(batch, &req)?
        } else {
            Trace::default()
        };
        let mut ce = AnswerCe::new_masked(batch, self.cfg.ce_weight as f32, &on_policy);
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
            Some(h) => Some(self.align(student, batch, h, &trace)?),
            None => None,
        };
        let affinity = match &self.cfg.affinity {
            Some(a) => Some(self.affinity(student, batch, a, &trace.hidden)?),
            None => None,
        };
        let relational = match &self.cfg.relational {
            Some(r) => Some(self.relational(student, batch, r, &trace.hidden)?),
            None => None,
        };
        let attention = match &self.cfg.attention {
            Some(a) => Some(self.align_attention(student, batch, a.weight, &req, &trace)?),
            None => None,
        };
        let vision = match &self.cfg.vision {
            Some(v) => Some(self.align_vision(student, v, &trace.image_features)?),
            None => None,
        };
        Ok(DistillLosses {
            ce: ce.loss(),
            kd,
            hidden,
            attention,
            affinity,
            relational,
            vision,
        })
    }

    /// Vision feature alignment's loss ([`VisionAlignConfig`]) against the teacher's projected
    /// features `target`; adds its gradient into the student's features and the projector.
    fn align_vision(
        &self,
        student: &mut TrainModel,
        v: &VisionAlignConfig,
        target: &[f32],
    ) -> Result<f32> {
        let x = student.image_features()?;
        let dt = self.teacher.config.text.hidden_size;
        let (y, cache) = match &self.vision_projector {
            Some(p) => {
                let (y, c) = project(p, &student.params, x, student.config.text.hidden_size)?;
                (y, Some(c))
            }
            None => (x, None),
        };
        if y.len() != target.len() {
            return Err(Error::Shape {
                name: "distill.vision: the teacher's image features".into(),
                expected: vec![y.len()],
                got: vec![target.len()],
            });
        }
        let (loss, mut dy) = match v.loss {
            HiddenLoss::Mse => mse(&y, target),
            HiddenLoss::Cosine => cosine(&y, target, dt),
        };
        dy.iter_mut().for_each(|d| *d *= v.weight as f32);
        let dx = match (&self.vision_projector, cache) {
            (Some(p), Some(c)) => p.backward(&mut student.params, &c, &dy)?,
            _ => dy,
        };
        student.add_image_features_grad(&dx)?;
        Ok(loss as f32)
    }

    /// Hidden alignment's loss, `mean_b Σ_p w_bp L_bp` over the samples `b` with rows to align
    /// (`L_bp`: the pair's loss on sample `b`'s rows; `w_bp`: `1/P`, the adaptive gate's weights,
    /// or the deepest pair alone during `deep_first_steps`); adds its gradients into the
    /// student's backward, the projectors and the gate.
    fn align(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        h: &HiddenConfig,
        trace: &Trace,
    ) -> Result<f32> {
        let image_token = student.config.image_token_id;
        let offsets = row_offsets(batch);
        let sample_of = |r: usize| offsets.partition_point(|&o| o <= r) - 1;
        let rows: Vec<usize> = row_mask(batch, h.tokens, image_token, false)
            .iter()
            .enumerate()
            .filter(|&(_, &r)| r)
            .map(|(i, _)| i)
            .collect();
        let (ds, dt) = (
            student.config.text.hidden_size,
            self.teacher.config.text.hidden_size,
        );
        let (nb, np) = (batch.len(), self.pairs.len());
        // Per pair: the present rows grouped by sample, the projector's output and cache.
        let mut per_pair = Vec::with_capacity(np);
        let mut losses = vec![vec![0.0f64; np]; nb];
        let mut has_rows = vec![false; nb];
        for (p, (&(ls, lt), proj)) in self.pairs.iter().zip(&self.projectors).enumerate() {
            let present: Vec<(usize, usize)> = student
                .hidden_rows(ls)?
                .iter()
                .enumerate()
                .filter(|&(_, r)| rows.binary_search(r).is_ok())
                .map(|(k, &r)| (k, r))
                .collect();
            let hs = student.hidden_state(ls)?;
            let x: Vec<f32> = present
                .iter()
                .flat_map(|&(k, _)| &hs[k * ds..(k + 1) * ds])
                .copied()
                .collect();
            let ht = &trace.hidden[&lt];
            let target: Vec<f32> = present
                .iter()
                .flat_map(|&(_, r)| &ht[r * dt..(r + 1) * dt])
                .copied()
                .collect();
            let (y, cache) = project(proj, &student.params, x, ds)?;
            // The loss and its gradient on each sample's slice of rows.
            let mut dy = vec![0.0f32; y.len()];
            let mut start = 0;
            while start < present.len() {
                let b = sample_of(present[start].1);
                let end = start + present[start..].partition_point(|&(_, r)| sample_of(r) == b);
                let sl = start * dt..end * dt;
                let (l, g) = match h.loss {
                    HiddenLoss::Mse => mse(&y[sl.clone()], &target[sl.clone()]),
                    HiddenLoss::Cosine => cosine(&y[sl.clone()], &target[sl.clone()], dt),
                };
                losses[b][p] = l;
                has_rows[b] = true;
                dy[sl].copy_from_slice(&g);
                start = end;
            }
            per_pair.push((present, cache, dy, ls));
        }
        let counted: Vec<usize> = (0..nb).filter(|&b| has_rows[b]).collect();
        if counted.is_empty() {
            return Ok(0.0);
        }
        let n = counted.len() as f64;
        // Weights over the pairs, per sample.
        let deepest = (0..np).max_by_key(|&p| self.pairs[p].0).unwrap_or(0);
        let coarse = self.step < h.deep_first_steps;
        let gate_in: Vec<Vec<f32>> = match (&self.gate, coarse) {
            (Some(_), false) => (0..nb)
                .map(|b| mean_rows(&trace.final_out, dt, offsets[b], batch[b].input_ids.len()))
                .collect(),
            _ => Vec::new(),
        };
        let weights: Vec<Vec<f64>> = (0..nb)
            .map(|b| match (&self.gate, coarse) {
                (_, true) => Ok((0..np).map(|p| f64::from(u8::from(p == deepest))).collect()),
                (Some(g), false) => g.weights(&student.params, &gate_in[b]),
                (None, false) => Ok(vec![1.0 / np as f64; np]),
            })
            .collect::<Result<_>>()?;
        let total: f64 = counted
            .iter()
            .map(|&b| (0..np).map(|p| weights[b][p] * losses[b][p]).sum::<f64>())
            .sum::<f64>()
            / n;
        // Gate backward: dL/dw_bp = weight · L_bp / n.
        if let (Some(g), false) = (&self.gate, coarse) {
            for &b in &counted {
                let dw: Vec<f64> = (0..np).map(|p| h.weight * losses[b][p] / n).collect();
                g.backward(&mut student.params, &gate_in[b], &dw)?;
            }
        }
        for (p, (present, cache, mut dy, ls)) in per_pair.into_iter().enumerate() {
            for (k, &(_, r)) in present.iter().enumerate() {
                let scale = (h.weight * weights[sample_of(r)][p] / n) as f32;
                dy[k * dt..(k + 1) * dt]
                    .iter_mut()
                    .for_each(|d| *d *= scale);
            }
            let proj = &self.projectors[p];
            let dx = proj.backward(&mut student.params, &cache, &dy)?;
            let mut full = vec![0.0f32; student.hidden_state(ls)?.len()];
            for (j, &(k, _)) in present.iter().enumerate() {
                full[k * ds..(k + 1) * ds].copy_from_slice(&dx[j * ds..(j + 1) * ds]);
            }
            student.add_hidden_grad(ls, &full)?;
        }
        Ok(total as f32)
    }
}

/// The mean of rows `start..start + n` of `x` (rows of width `d`).
fn mean_rows(x: &[f32], d: usize, start: usize, n: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; d];
    for r in start..start + n {
        ops::add(&mut m, &x[r * d..(r + 1) * d]);
    }
    m.iter_mut().for_each(|v| *v /= n as f32);
    m
}

impl GateParams {
    /// `softmax(σ(W x + b) / τ)` over the pairs.
    fn weights(&self, p: &[Param], x: &[f32]) -> Result<Vec<f64>> {
        let (s, tau) = self.sigmoids(p, x)?;
        let a: Vec<f64> = s.iter().map(|v| v / tau).collect();
        let m = a.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = a.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        Ok(e.iter().map(|v| v / sum).collect())
    }

    fn sigmoids(&self, p: &[Param], x: &[f32]) -> Result<(Vec<f64>, f64)> {
        let (w, b) = (p[self.w].f32s()?, p[self.b].f32s()?);
        let s = (0..self.pairs)
            .map(|k| {
                let row = &w[k * self.inp..(k + 1) * self.inp];
                let z = b[k] as f64
                    + row
                        .iter()
                        .zip(x)
                        .map(|(w, x)| *w as f64 * *x as f64)
                        .sum::<f64>();
                1.0 / (1.0 + (-z).exp())
            })
            .collect();
        Ok((s, (p[self.theta].f32s()?[0] as f64).exp()))
    }

    /// Accumulates the gate's gradients given `dw = ∂L/∂w` at input `x`.
    fn backward(&self, p: &mut [Param], x: &[f32], dw: &[f64]) -> Result<()> {
        if p[self.w].grad.is_empty() {
            return Ok(());
        }
        let (s, tau) = self.sigmoids(p, x)?;
        let w = self.weights(p, x)?;
        let dot: f64 = w.iter().zip(dw).map(|(a, b)| a * b).sum();
        let da: Vec<f64> = w.iter().zip(dw).map(|(w, d)| w * (d - dot)).collect();
        // a = s / τ, τ = exp(θ): ∂a/∂θ = −a.
        let dtheta: f64 = da.iter().zip(&s).map(|(d, s)| -d * s / tau).sum();
        p[self.theta].grad[0] += dtheta as f32;
        for k in 0..self.pairs {
            let dz = da[k] / tau * s[k] * (1.0 - s[k]);
            p[self.b].grad[k] += dz as f32;
            let g = &mut p[self.w].grad[k * self.inp..(k + 1) * self.inp];
            for (g, x) in g.iter_mut().zip(x) {
                *g += (dz * *x as f64) as f32;
            }
        }
        Ok(())
    }
}

impl Distiller {
    /// Affinity distillation's loss (mean over pairs, see [`AffinityConfig`]); adds its
    /// gradient into the student's backward.
    fn affinity(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        a: &AffinityConfig,
        teacher_hidden: &BTreeMap<usize, Vec<f32>>,
    ) -> Result<f32> {
        let image_token = student.config.image_token_id;
        let offsets = row_offsets(batch);
        let (ds, dt) = (
            student.config.text.hidden_size,
            self.teacher.config.text.hidden_size,
        );
        // Per sequence: its image rows and text rows (batch rows).
        let groups: Vec<(Vec<usize>, Vec<usize>)> = batch
            .iter()
            .zip(&offsets)
            .map(|(s, &o)| {
                let n = s.input_ids.len();
                let img = (0..n).filter(|&t| s.input_ids[t] == image_token);
                let txt = (0..n).filter(|&t| match a.text {
                    Tokens::Answer => reads_row(s, t, Tokens::Answer, image_token, false),
                    Tokens::All => s.input_ids[t] != image_token,
                });
                (img.map(|t| o + t).collect(), txt.map(|t| o + t).collect())
            })
            .collect();
        let np = self.affinity_pairs.len() as f64;
        let mut total = 0.0;
        for &(ls, lt) in &self.affinity_pairs {
            let rows = student.hidden_rows(ls)?.to_vec();
            let at = |r: usize| rows.binary_search(&r).ok();
            let hs = student.hidden_state(ls)?.to_vec();
            let ht = &teacher_hidden[&lt];
            let entries: usize = groups
                .iter()
                .map(|(i, t)| i.iter().filter(|&&r| at(r).is_some()).count() * t.len())
                .sum();
            if entries == 0 {
                continue;
            }
            let scale = a.weight / (np * entries as f64);
            let mut grad = vec![0.0f32; hs.len()];
            let mut sum = 0.0f64;
            for (img, txt) in &groups {
                for &i in img {
                    let Some(ki) = at(i) else { continue };
                    for &j in txt {
                        let Some(kj) = at(j) else { continue };
                        let (si, sj) = (&hs[ki * ds..(ki + 1) * ds], &hs[kj * ds..(kj + 1) * ds]);
                        let (cs, gi, gj) = cos_grad(si, sj);
                        let (ct, _, _) =
                            cos_grad(&ht[i * dt..(i + 1) * dt], &ht[j * dt..(j + 1) * dt]);
                        let d = cs - ct;
                        sum += d * d;
                        let c = (2.0 * d * scale) as f32;
                        for (g, v) in grad[ki * ds..(ki + 1) * ds].iter_mut().zip(&gi) {
                            *g += c * v;
                        }
                        for (g, v) in grad[kj * ds..(kj + 1) * ds].iter_mut().zip(&gj) {
                            *g += c * v;
                        }
                    }
                }
            }
            total += sum / entries as f64;
            student.add_hidden_grad(ls, &grad)?;
        }
        Ok((total / np) as f32)
    }

    /// Relational distillation's loss (mean over pairs, see [`RelationalConfig`]); adds its
    /// gradient into the student's backward.
    fn relational(
        &self,
        student: &mut TrainModel,
        batch: &[TrainSeq],
        r: &RelationalConfig,
        teacher_hidden: &BTreeMap<usize, Vec<f32>>,
    ) -> Result<f32> {
        let image_token = student.config.image_token_id;
        let offsets = row_offsets(batch);
        let (ds, dt) = (
            student.config.text.hidden_size,
            self.teacher.config.text.hidden_size,
        );
        let nb = batch.len();
        let picked: Vec<Vec<usize>> = batch
            .iter()
            .zip(&offsets)
            .map(|(s, &o)| {
                (0..s.input_ids.len())
                    .filter(|&t| reads_row(s, t, r.tokens, image_token, false))
                    .map(|t| o + t)
                    .collect()
            })
            .collect();
        let np = self.relational_pairs.len() as f64;
        let mut total = 0.0;
        for &(ls, lt) in &self.relational_pairs {
            let rows = student.hidden_rows(ls)?.to_vec();
            let hs = student.hidden_state(ls)?.to_vec();
            let ht = &teacher_hidden[&lt];
            // Pooled, normalised states: the student's over its present rows.
            let pool = |x: &[f32], d: usize, idx: &[usize]| {
                let mut m = vec![0.0f64; d];
                for &k in idx {
                    for (a, v) in m.iter_mut().zip(&x[k * d..(k + 1) * d]) {
                        *a += *v as f64;
                    }
                }
                m.iter_mut().for_each(|v| *v /= idx.len().max(1) as f64);
                m
            };
            let present: Vec<Vec<usize>> = picked
                .iter()
                .map(|p| {
                    p.iter()
                        .filter_map(|r| rows.binary_search(r).ok())
                        .collect()
                })
                .collect();
            let es: Vec<Vec<f64>> = present.iter().map(|k| pool(&hs, ds, k)).collect();
            let et: Vec<Vec<f64>> = picked.iter().map(|k| pool(ht, dt, k)).collect();
            let unit = |e: &[f64]| {
                let n = e.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-8);
                (e.iter().map(|v| v / n).collect::<Vec<f64>>(), n)
            };
            let us: Vec<(Vec<f64>, f64)> = es.iter().map(|e| unit(e)).collect();
            let ut: Vec<Vec<f64>> = et.iter().map(|e| unit(e).0).collect();
            let dotf = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
            let mut sum = 0.0;
            let mut du = vec![vec![0.0f64; ds]; nb];
            let scale = r.weight / (np * (nb * nb) as f64);
            for a in 0..nb {
                for b in 0..nb {
                    let d = dotf(&us[a].0, &us[b].0) - dotf(&ut[a], &ut[b]);
                    sum += d * d;
                    let c = 2.0 * d * scale;
                    for (x, v) in du[a].iter_mut().zip(&us[b].0) {
                        *x += c * v;
                    }
                    for (x, v) in du[b].iter_mut().zip(&us[a].0) {
                        *x += c * v;
                    }
                }
            }
            total += sum / (nb * nb) as f64;
            let mut grad = vec![0.0f32; hs.len()];
            for a in 0..nb {
                let (u, norm) = &us[a];
                let proj = dotf(u, &du[a]);
                let de: Vec<f64> = (0..ds).map(|k| (du[a][k] - u[k] * proj) / norm).collect();
                let n = present[a].len().max(1) as f64;
                for &k in &present[a] {
                    for (g, v) in grad[k * ds..(k + 1) * ds].iter_mut().zip(&de) {
                        *g += (v / n) as f32;
                    }
                }
            }
            student.add_hidden_grad(ls, &grad)?;
        }
        Ok((total / np) as f32)
    }
}

/// `cos(a, b)` and its gradients in `a` and `b` (norms floored at 1e-8).
fn cos_grad(a: &[f32], b: &[f32]) -> (f64, Vec<f32>, Vec<f32>) {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na = a
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-8);
    let nb = b
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-8);
    let c = dot / (na * nb);
    let ga = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*y as f64 / (na * nb) - c * *x as f64 / (na * na)) as f32)
        .collect();
    let gb = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 / (na * nb) - c * *y as f64 / (nb * nb)) as f32)
        .collect();
    (c, ga, gb)
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
        let (cos, gy, _) = cos_grad(yr, tr);
        loss += 1.0 - cos;
        for (g, v) in gr.iter_mut().zip(&gy) {
            *g = (-(*v as f64) / n) as f32;
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
