//! The LLaVA model as the trainer drives it (llm.c style): the blocks of [`crate::model`] (one
//! definition for the engine and the trainer, each with its forward and backward) over f32
//! [`Param`]s (value + gradient) owned here. [`TrainModel::forward`] runs a batch and keeps what
//! the backward needs, [`TrainModel::backward`] walks the same blocks in reverse and accumulates
//! into the gradients. The numerics are the inference model's (HF-exact): CLIP tower ->
//! selected hidden states -> projector (linear, exact GELU, linear) -> merged into the token
//! embeddings at `<image>` positions -> LLaMA layers -> final RMSNorm -> LM head -> cross-entropy
//! on answer tokens. Checked against PyTorch autograd in `tests/train_grads.rs`.
//!
//! Parameter names are transformers 5.x in-memory keys (`model.named_parameters()` of
//! `LlavaForConditionalGeneration`): `model.vision_tower.embeddings.patch_embedding.weight`,
//! `model.vision_tower.encoder.layers.{i}.self_attn.q_proj.weight`,
//! `model.multi_modal_projector.linear_1.weight`, `model.language_model.layers.{i}.mlp.up_proj.weight`,
//! `model.language_model.norm.weight`, `lm_head.weight` (absent when tied). Only the vision layers
//! up to the deepest selected feature layer exist (the rest never influence the loss), and
//! `post_layernorm` is not a parameter. Shapes are HF's, flattened row-major (the patch embedding
//! is `[hidden, channels, p, p]`, used as `[hidden, channels·p·p]`).
//!
//! Groups: `{vision,projector,lm}.{decay,no_decay}` from [`decay_group`] (biases and norms do not
//! decay). A group whose parameters have empty gradients (frozen, see [`Param::grad`]) gets no
//! weight gradient computed; when every vision and projector parameter is frozen the backward stops
//! at the merged embeddings, and within the vision tower it stops at the lowest encoder layer
//! with a trainable parameter ([`TrainModel::train_last_vision_layers`]).

use super::optim::decay_group;
use crate::error::{Error, Result};
use crate::model::clip::VisionCache;
use crate::model::config::LlavaConfig;
use crate::model::llama::{DecoderCache, Llama};
use crate::model::llava::{ProjectorCache, VisionEncoder};
use crate::model::nn::{Param, ParamBuilder, ParamSource, host};
use crate::model::template::Segment;
use crate::model::weights::Weights;
use crate::ops::loss::{IGNORE_INDEX, cross_entropy};
use crate::ops::matmul::linear_backward;
use crate::ops::{self, embed};
use crate::prune::PrunePlan;
use crate::prune::score::SelectedAttention;
use crate::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Group of the vision parameters [`TrainModel::train_last_vision_layers`] freezes.
pub const VISION_FROZEN_GROUP: &str = "vision.frozen";

/// One training sequence with its image.
#[derive(Debug, Clone)]
pub struct TrainSeq {
    /// Token ids, `<image>` already expanded to the vision tower's token count.
    pub input_ids: Vec<u32>,
    /// HF-style labels, one per position: the token id where it is an answer token to learn,
    /// [`IGNORE_INDEX`] elsewhere. Position `t` is trained to predict `labels[t + 1]`.
    pub labels: Vec<i64>,
    /// `[channels, size, size]`, preprocessed.
    pub pixel_values: Vec<f32>,
    /// Rows whose attention a [`GroundingLoss`] supervises (none: the sequence adds nothing to it).
    pub grounding: Vec<Grounding>,
    /// Segments of the first turn's prompt (its positions before the answer), as the engine
    /// labels an inference prompt; a pruned forward ([`TrainModel::set_prune`]) ranks the image
    /// tokens from them exactly as the engine would for that question. May be empty otherwise.
    pub prompt: Vec<Segment>,
}

/// A row of a sequence whose attention should fall on some of the sequence's image tokens: the
/// target of a [`GroundingLoss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grounding {
    /// Row of the sequence, after the image: the one predicting an answer's first token, or a
    /// referring phrase's last token.
    pub position: usize,
    /// The image tokens the answer is about, as indices among the sequence's image tokens
    /// (row-major patches), increasing, without repeats.
    pub patches: Vec<usize>,
    /// Which of the two the row is; [`GroundingLoss`] may supervise them at different layers.
    pub row: GroundedRow,
    /// The heads whose attention is supervised: all of them, or one share of them when an
    /// answer compares several objects and each share should look at one.
    pub heads: HeadShare,
}

/// Share `index` of `count` equal shares of a layer's attention heads: with `H` heads, heads
/// `index·H/count .. (index+1)·H/count`. An answer comparing objects ("Is the circle left of the
/// square?") grounds one share on each, so different heads bring each object's features to the
/// answer row and the layers above see both side by side instead of their average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShare {
    pub index: usize,
    pub count: usize,
}

impl HeadShare {
    /// Every head.
    pub const ALL: HeadShare = HeadShare { index: 0, count: 1 };

    /// The heads of this share among `heads`; `None` when there are fewer heads than shares or
    /// `index` is not below `count`.
    pub fn range(&self, heads: usize) -> Option<std::ops::Range<usize>> {
        (self.index < self.count && self.count <= heads)
            .then(|| self.index * heads / self.count..(self.index + 1) * heads / self.count)
    }
}

/// What a [`Grounding`] row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroundedRow {
    /// The last token of a phrase naming objects ("the red circle").
    Phrase,
    /// The row predicting an answer's first token.
    Answer,
}

/// Attention grounding, an auxiliary loss on where the language model looks: at decoder layer
/// `layer` (answer rows: `answer_layer`, when set), the head-averaged attention `P_h` of every
/// grounded row `t` (the row predicting an answer about some objects, the last token of a phrase
/// naming some) should fall on its relevant image tokens `R`,
///
/// `L_ground = −mean_rows ln( (1/|H_t|) Σ_{h∈H_t} Σ_{j∈R} P_h[t, j] )`,
///
/// where `H_t` is every head, or the row's [`HeadShare`] when an answer compares objects (one
/// share per object, each a row of its own here).
/// and training minimises `cross-entropy + weight · L_ground`. The two layers make a two-hop
/// lookup: a phrase's own token finds its object early, while the answer row, which knows what
/// the question names only after attending to the question, looks at a later layer. The mass is
/// averaged over heads inside the logarithm, so a few heads may carry it while the others attend
/// elsewhere. This is attention supervision as in VQA with human attention maps (Qiao et al.,
/// AAAI 2018) and grounding losses of visual-grounding models; it trains the very quantity FastV
/// ranks by at `K = layer + 1` (and `answer_layer + 1`), so pruning studies on such a model say
/// so.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingLoss {
    /// Decoder layer (0-based) whose attention probabilities are supervised.
    pub layer: usize,
    /// Weight of `L_ground` next to the cross-entropy (positive).
    pub weight: f64,
    /// Decoder layer (0-based) of the answer rows ([`GroundedRow::Answer`]); `None`: `layer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_layer: Option<usize>,
}

impl GroundingLoss {
    /// The decoder layer whose attention a row of kind `row` is supervised at.
    pub fn layer_of(&self, row: GroundedRow) -> usize {
        match row {
            GroundedRow::Phrase => self.layer,
            GroundedRow::Answer => self.answer_layer.unwrap_or(self.layer),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameter names and initial values
// ---------------------------------------------------------------------------------------------

/// The transformers 5.x in-memory key (what `named_parameters()` and `save_pretrained` use) of a
/// canonical [`Weights`] name, with its group prefix (`vision`, `projector` or `lm`).
pub fn hf_name(canonical: &str) -> (&'static str, String) {
    if let Some(r) = canonical.strip_prefix("vision.") {
        ("vision", format!("model.vision_tower.{r}"))
    } else if let Some(r) = canonical.strip_prefix("projector.") {
        ("projector", format!("model.multi_modal_projector.{r}"))
    } else if let Some(r) = canonical.strip_prefix("lm.") {
        ("lm", format!("model.language_model.{r}"))
    } else {
        ("lm", canonical.to_string())
    }
}

/// Initial values of parameter `name` (canonical) for [`TrainModel::init`]: biases 0, norm
/// weights 1, everything else uniform with standard deviation `std` from the LCG `state`.
pub(crate) fn init_values(name: &str, shape: &[usize], std: f32, state: &mut u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let last = name.rsplit('.').nth(1).unwrap_or("");
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    if last.contains("norm") || name == "lm.norm.weight" {
        return vec![1.0; n];
    }
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (*state >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * std * 3f32.sqrt()
        })
        .collect()
}

/// [`GroundingLoss`] of a batch from its decoder layers' probabilities (`probs(l)[i]`: layer `l`'s
/// `[heads, t, t]` of sequence `i`): `L_ground` (`None` when no row is grounded) and, for each
/// layer a row is supervised at, `weight · ∂L_ground/∂P` per sequence (empty where it has no row
/// at that layer). With `m = (1/H) Σ_h Σ_{j∈R} P_h[t, j]` of one of `n` rows,
/// `∂L/∂P_h[t, j] = −1 / (n · H · m)` for `j ∈ R`, zero elsewhere.
fn grounding_loss<'a>(
    batch: &[TrainSeq],
    probs: impl Fn(usize) -> &'a [Vec<f32>],
    heads: usize,
    image_token: u32,
    g: &GroundingLoss,
) -> Result<(Option<f32>, LayerDprobs)> {
    let n: usize = batch.iter().map(|s| s.grounding.len()).sum();
    if n == 0 {
        return Ok((None, LayerDprobs::new()));
    }
    let mut loss = 0.0f64;
    let mut dprobs = LayerDprobs::new();
    for (i, s) in batch.iter().enumerate() {
        let t = s.input_ids.len();
        let slots: Vec<usize> = (0..t).filter(|&j| s.input_ids[j] == image_token).collect();
        for r in &s.grounding {
            let bad = |msg: String| {
                Error::arg(
                    "grounding",
                    format!("sequence {i}, row {}: {msg}", r.position),
                )
            };
            if r.position >= t {
                return Err(bad(format!("the sequence has {t} rows")));
            }
            if r.patches.is_empty() || r.patches.windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad("patches must be non-empty and increasing".into()));
            }
            let cols: Vec<usize> = r
                .patches
                .iter()
                .map(|&j| match slots.get(j) {
                    Some(&c) if c < r.position => Ok(c),
                    Some(_) => Err(bad(format!("image token {j} does not precede the row"))),
                    None => Err(bad(format!(
                        "patch {j} is out of range for {} image tokens",
                        slots.len()
                    ))),
                })
                .collect::<Result<_>>()?;
            let share = r.heads.range(heads).ok_or_else(|| {
                bad(format!(
                    "head share {} of {} does not exist among {heads} heads",
                    r.heads.index, r.heads.count
                ))
            })?;
            let nh = share.len();
            let layer = g.layer_of(r.row);
            let pr = &probs(layer)[i];
            let mass = share
                .clone()
                .map(|h| {
                    let row = &pr[(h * t + r.position) * t..][..t];
                    cols.iter().map(|&c| row[c] as f64).sum::<f64>()
                })
                .sum::<f64>()
                / nh as f64;
            let mass = mass.max(f64::MIN_POSITIVE);
            loss -= mass.ln();
            let coef = (-g.weight / (n as f64 * nh as f64 * mass)) as f32;
            let dp = &mut dprobs
                .entry(layer)
                .or_insert_with(|| vec![Vec::new(); batch.len()])[i];
            if dp.is_empty() {
                *dp = vec![0.0f32; heads * t * t];
            }
            for h in share {
                let row = &mut dp[(h * t + r.position) * t..][..t];
                for &c in &cols {
                    row[c] += coef;
                }
            }
        }
    }
    Ok((Some((loss / n as f64) as f32), dprobs))
}

/// The grounding loss's gradient on attention probabilities: for each supervised decoder layer,
/// one `[heads, t, t]` per sequence (empty for sequences without a row at that layer).
type LayerDprobs = BTreeMap<usize, Vec<Vec<f32>>>;

/// The pruning of one forward (the trainer's side of [`PrunePlan::targets`] and
/// [`PrunePlan::select`], the stage the engine runs too): the kept count of each stage, each
/// sequence's first-prompt segments and the kept image tokens so far.
struct Pruning<'a> {
    plan: &'a PrunePlan,
    counts: Vec<usize>,
    /// Segment of each current row of each sequence that is part of its first prompt.
    prompts: Vec<Vec<Segment>>,
    /// Original image-token index of each current image row of each sequence.
    images: Vec<Vec<usize>>,
    /// `[sequence][stage]` kept image tokens (original indices).
    kept: Vec<Vec<Vec<usize>>>,
}

impl<'a> Pruning<'a> {
    fn new(plan: &'a PrunePlan, batch: &[TrainSeq], layers: usize, ntok: usize) -> Result<Self> {
        let counts = plan.kept_counts(layers, ntok)?;
        for (i, s) in batch.iter().enumerate() {
            let images = s.prompt.iter().filter(|&&g| g == Segment::Image).count();
            if images != ntok || s.prompt.len() > s.input_ids.len() {
                return Err(Error::Prompt(format!(
                    "sequence {i}: a pruned forward needs the first prompt's segments with its \
                     {ntok} image tokens (got {} segments, {images} image)",
                    s.prompt.len()
                )));
            }
        }
        Ok(Pruning {
            plan,
            counts,
            prompts: batch.iter().map(|s| s.prompt.clone()).collect(),
            images: batch.iter().map(|_| (0..ntok).collect()).collect(),
            kept: vec![Vec::new(); batch.len()],
        })
    }

    /// The number of image tokens to keep when a stage prunes before layer `layer`.
    fn prunes_at(&self, layer: usize) -> Option<usize> {
        let i = self.plan.stages.iter().position(|s| s.layer == layer)?;
        Some(self.counts[i])
    }

    /// Ranks every sequence's image tokens from the probabilities `probs[i]` (`[heads, t, t]`)
    /// of the layer before the stage, keeps `keep`, updates `pos`, and returns the surviving
    /// rows of the batch (indices into the current rows, end to end).
    fn prune(
        &mut self,
        keep: usize,
        probs: &[Vec<f32>],
        heads: usize,
        pos: &mut [Vec<usize>],
    ) -> Result<Vec<usize>> {
        let mut rows = Vec::new();
        let mut r0 = 0;
        for (i, pr) in probs.iter().enumerate() {
            let t = pos[i].len();
            let prompt = &self.prompts[i];
            let (q_rows, image_cols) = self.plan.targets(prompt);
            let mut sel = Vec::with_capacity(heads * q_rows.len() * image_cols.len());
            for h in 0..heads {
                for &q in &q_rows {
                    sel.extend(image_cols.iter().map(|&j| pr[(h * t + q) * t + j]));
                }
            }
            let att = SelectedAttention {
                heads,
                rows: q_rows,
                image_cols,
                probs: sel,
                positions: t,
            };
            let (ranking, survivors) = self.plan.select(prompt, &att, keep, t, &[]);
            let kept: Vec<usize> = ranking.kept.iter().map(|&k| self.images[i][k]).collect();
            self.kept[i].push(kept.clone());
            self.images[i] = kept;
            self.prompts[i] = survivors
                .iter()
                .filter(|&&j| j < prompt.len())
                .map(|&j| prompt[j])
                .collect();
            pos[i] = self.plan.positions_after(&pos[i], &survivors);
            rows.extend(survivors.iter().map(|&j| r0 + j));
            r0 += t;
        }
        Ok(rows)
    }
}

/// Rows of the LM head evaluated together: a loss never sees logits for more than this many
/// rows × the vocabulary at once (a 7B model's 2k-token batch would otherwise hold 2k × 32k
/// floats per model, teacher and student).
pub const HEAD_CHUNK: usize = 256;

/// A loss on the LM head's logits. The forward evaluates the head only on the rows some loss
/// reads, [`HEAD_CHUNK`] rows at a time, hands each chunk's logits to every loss and folds the
/// gradients they add into the head's and the final norm's gradients right away, so neither the
/// logits nor their gradient are kept for the backward. Rows are indices into the batch's
/// sequences laid end to end (sequence `i`'s row `t` is `offset_i + t`, see [`row_offsets`]);
/// row `r` predicts the token at `r + 1` of its sequence.
pub trait HeadLoss {
    /// Whether the loss reads row `row`.
    fn reads(&self, row: usize) -> bool;
    /// Adds the loss of the rows it reads among `rows` (increasing) to its running total and
    /// `∂(weight · loss)/∂logits` into `dlogits`; `logits` and `dlogits` are `[rows, vocab]`.
    fn chunk(&mut self, rows: &[usize], logits: &[f32], dlogits: &mut [f32]) -> Result<()>;
}

/// Where each sequence's rows start when a batch's sequences are laid end to end.
pub fn row_offsets(batch: &[TrainSeq]) -> Vec<usize> {
    batch
        .iter()
        .scan(0, |acc, s| {
            let o = *acc;
            *acc += s.input_ids.len();
            Some(o)
        })
        .collect()
}

/// LLaVA's loss as a [`HeadLoss`]: cross-entropy of every answer token given the rows before it
/// (row `t` predicts `labels[t + 1]` where that is not [`IGNORE_INDEX`]), the mean over the batch's
/// answer tokens, as `F.cross_entropy` on HF's shifted logits and labels. `weight` scales its
/// gradient (0 keeps the value for the log and trains nothing).
pub struct AnswerCe {
    /// Target of each row of the batch ([`IGNORE_INDEX`] where it predicts no answer token).
    targets: Vec<i64>,
    counted: usize,
    weight: f32,
    sum: f64,
}

impl AnswerCe {
    /// The loss of `batch`'s answer tokens.
    pub fn new(batch: &[TrainSeq], weight: f32) -> Self {
        let targets: Vec<i64> = batch
            .iter()
            .flat_map(|s| {
                (0..s.input_ids.len()).map(|t| s.labels.get(t + 1).copied().unwrap_or(IGNORE_INDEX))
            })
            .collect();
        let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        AnswerCe {
            targets,
            counted,
            weight,
            sum: 0.0,
        }
    }

    /// [`AnswerCe::new`] without the sequences `skip` marks (their rows count for nothing).
    pub fn new_masked(batch: &[TrainSeq], weight: f32, skip: &[bool]) -> Self {
        let mut ce = Self::new(batch, weight);
        let mut r0 = 0;
        for (s, &k) in batch.iter().zip(skip) {
            let n = s.input_ids.len();
            if k {
                ce.targets[r0..r0 + n].fill(IGNORE_INDEX);
            }
            r0 += n;
        }
        ce.counted = ce.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        ce
    }

    /// The mean cross-entropy over the rows seen so far (0 without answer tokens).
    pub fn loss(&self) -> f32 {
        if self.counted == 0 {
            0.0
        } else {
            (self.sum / self.counted as f64) as f32
        }
    }
}

impl HeadLoss for AnswerCe {
    fn reads(&self, row: usize) -> bool {
        self.targets.get(row).is_some_and(|&t| t != IGNORE_INDEX)
    }

    fn chunk(&mut self, rows: &[usize], logits: &[f32], dlogits: &mut [f32]) -> Result<()> {
        let vocab = logits.len() / rows.len().max(1);
        let targets: Vec<i64> = rows.iter().map(|&r| self.targets[r]).collect();
        let here = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        if here == 0 {
            return Ok(());
        }
        let (mean, g) = cross_entropy(logits, vocab, &targets, IGNORE_INDEX)?;
        self.sum += mean as f64 * here as f64;
        let scale = self.weight * here as f32 / self.counted as f32;
        dlogits
            .iter_mut()
            .zip(&g)
            .for_each(|(d, g)| *d += scale * g);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LLaVA
// ---------------------------------------------------------------------------------------------

/// Everything the backward of the last [`TrainModel::forward`] needs.
struct Cache {
    ids: Vec<u32>,
    lens: Vec<usize>,
    /// Row of each merged image feature (`[images·image_tokens]`, image by image).
    image_rows: Vec<usize>,
    /// The vision tower's and the projector's activations (`None` for a batch without images).
    vision: Option<(VisionCache, ProjectorCache)>,
    /// Each decoder layer's activations, with the batch row (before any pruning) of each of
    /// its input rows.
    decoder: Vec<(DecoderCache, Vec<usize>)>,
    /// With a prune plan: after which decoder layer rows were dropped, and the rows (of that
    /// layer's output) that went on.
    pruned_after: BTreeMap<usize, Vec<usize>>,
    final_in: Tensor,
    /// The batch row (before any pruning) of each row of `final_in`.
    final_origin: Vec<usize>,
    /// Gradient of the head losses on `final_out` (zero on rows no head loss reads) and on the
    /// LM head's weight (`None` when it is frozen), computed chunk by chunk in the forward.
    dfinal: Vec<f32>,
    dhead: Option<Vec<f32>>,
    /// The grounding loss's gradient on its layers' probabilities.
    dprobs: LayerDprobs,
    /// [`TrainModel::add_hidden_grad`]'s gradients on decoder layers' outputs.
    dhidden: BTreeMap<usize, Vec<f32>>,
    /// [`TrainModel::add_image_features_grad`]'s gradient on the projected image features.
    dimage: Option<Vec<f32>>,
}

/// What [`TrainModel::trace`] keeps of a forward pass.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The final norm's output, `[rows, hidden]`, the batch's rows end to end.
    pub final_out: Vec<f32>,
    /// Outputs of the decoder layers asked for, by layer.
    pub hidden: BTreeMap<usize, Vec<f32>>,
    /// Attention probabilities of the query rows asked for, by layer, then sequence:
    /// `[heads, rows, t]`.
    pub attention: BTreeMap<usize, Vec<Vec<f32>>>,
    /// The projected image features ([`TrainModel::image_features`]), when asked for.
    pub image_features: Vec<f32>,
}

/// What [`TrainModel::trace`] keeps.
#[derive(Debug, Clone, Default)]
pub struct TraceRequest {
    /// Decoder layers whose outputs to keep.
    pub hidden: Vec<usize>,
    /// Decoder layers whose attention probabilities to keep, for the rows `query_rows`.
    pub attention: Vec<usize>,
    /// Query rows of each sequence (increasing).
    pub query_rows: Vec<Vec<usize>>,
    /// Keep the projected image features.
    pub image_features: bool,
}

/// LLaVA with trainable f32 parameters: the model of [`crate::model`] (its blocks, their
/// forward and backward) over parameters the trainer owns.
pub struct TrainModel {
    pub config: LlavaConfig,
    /// Every parameter, in HF's `named_parameters()` order within each block, named by its
    /// transformers 5.x key and grouped by [`decay_group`].
    pub params: Vec<Param>,
    vision: VisionEncoder,
    lm: Llama,
    cache: Option<Cache>,
    /// Activations of the last [`TrainModel::vision_forward`] and its image count.
    vision_cache: Option<(VisionCache, usize)>,
    grounding: Option<GroundingLoss>,
    /// Pruning during the forward ([`TrainModel::set_prune`]).
    prune: Option<PrunePlan>,
    /// Image tokens each sequence kept at each stage of the last pruned forward.
    last_kept: Vec<Vec<Vec<usize>>>,
    /// `L_ground` of the last forward (`None` without a grounding loss or grounded rows).
    last_grounding: Option<f32>,
}

impl TrainModel {
    /// Loads a LLaVA checkpoint directory (`config.json` + safetensors, any key layout and dtype
    /// [`Weights`] reads), converting every weight to f32.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = super::llava_config(dir, "model")?;
        let mut w = Weights::from_dir(dir)?;
        w.place(Device::Cpu, Some(DType::F32));
        Self::build(config, &mut w)
    }

    /// A freshly initialised model: weights `N(0, std)`-like (uniform with that standard
    /// deviation, from a seeded generator), norm weights 1, biases 0, CLS and positions like weights.
    pub fn init(config: &LlavaConfig, std: f32, seed: u64) -> Result<Self> {
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut init = |name: &str, shape: &[usize]| Ok(init_values(name, shape, std, &mut state));
        Self::build(config.clone(), &mut init)
    }

    /// The model's blocks over parameters from `source` (canonical names), renamed to their
    /// transformers 5.x keys and grouped.
    fn build(config: LlavaConfig, source: &mut dyn ParamSource) -> Result<Self> {
        super::check_trainable(&config).map_err(|msg| Error::arg("model", msg))?;
        let mut b = ParamBuilder::new(source, true);
        let vision = VisionEncoder::load(&config, &mut b)?;
        let lm = Llama::load(&config.text, &mut b)?;
        let mut params = b.finish();
        for p in &mut params {
            let (prefix, hf) = hf_name(&p.name);
            p.group = decay_group(prefix, &hf);
            p.name = hf;
        }
        Ok(TrainModel {
            config,
            params,
            vision,
            lm,
            cache: None,
            vision_cache: None,
            grounding: None,
            last_grounding: None,
            prune: None,
            last_kept: Vec::new(),
        })
    }

    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The shape of parameter `i` (index into `params`).
    pub fn param_shape(&self, i: usize) -> &[usize] {
        self.params[i].value.shape()
    }

    /// Whether the LM head is the embedding matrix.
    pub fn tied(&self) -> bool {
        self.lm.tied()
    }

    /// Adds (or with `None` removes) the [`GroundingLoss`] to what [`TrainModel::backward`]
    /// differentiates. Errors on a layer the model lacks or a weight that is not positive.
    pub fn set_grounding(&mut self, g: Option<GroundingLoss>) -> Result<()> {
        if let Some(g) = g {
            let layers = self.lm.num_layers();
            for (key, l) in [("layer", Some(g.layer)), ("answer_layer", g.answer_layer)] {
                if let Some(l) = l.filter(|&l| l >= layers) {
                    return Err(Error::arg(
                        format!("grounding.{key}"),
                        format!("is {l} but the language model has {layers} layers"),
                    ));
                }
            }
            if !(g.weight.is_finite() && g.weight > 0.0) {
                return Err(Error::arg(
                    "grounding.weight",
                    format!("must be a positive number, got {}", g.weight),
                ));
            }
        }
        self.grounding = g;
        Ok(())
    }

    /// `L_ground` (unweighted) of the last [`TrainModel::forward`]: `None` without a grounding
    /// loss or when no sequence of the batch had a grounded row.
    pub fn grounding_loss(&self) -> Option<f32> {
        self.last_grounding
    }

    /// Runs the batch and returns the mean cross-entropy over its counted (answer) tokens, as
    /// torch's `F.cross_entropy` on the concatenation of the shifted logits/labels of every
    /// sequence with `ignore_index = -100`; keeps the activations for [`TrainModel::backward`].
    /// With a [`GroundingLoss`] set, the objective differentiated is this plus `weight ·`
    /// [`TrainModel::grounding_loss`].
    pub fn forward(&mut self, batch: &[TrainSeq]) -> Result<f32> {
        let mut ce = AnswerCe::new(batch, 1.0);
        self.forward_with(batch, &mut [&mut ce])?;
        Ok(ce.loss())
    }

    /// Runs the batch with `losses` on the LM head (each keeps its own value; see [`HeadLoss`])
    /// and keeps the activations for [`TrainModel::backward`], which differentiates the sum of
    /// the losses' weighted values, the [`GroundingLoss`] if set, and whatever
    /// [`TrainModel::add_hidden_grad`] adds in between.
    pub fn forward_with(
        &mut self,
        batch: &[TrainSeq],
        losses: &mut [&mut dyn HeadLoss],
    ) -> Result<()> {
        self.cache = None;
        self.vision_cache = None;
        self.last_grounding = None;
        let c = &self.config;
        let p = &self.params;
        let (th, vocab) = (c.text.hidden_size, c.text.vocab_size);
        let ntok = c.image_tokens();
        // Vision tower (all images at once; text-only sequences have none) and feature selection.
        let pixels: Vec<&[f32]> = batch
            .iter()
            .map(|s| s.pixel_values.as_slice())
            .filter(|px| !px.is_empty())
            .collect();
        let (img, vision) = if pixels.is_empty() {
            (Tensor::zeros(&[0, th]), None)
        } else {
            let (feats, vc) = self.vision.features(p, &pixels, true)?;
            let (img, pc) = self.vision.projector.forward(p, feats, true)?;
            (img, vc.zip(pc))
        };
        // Token embeddings with the image features merged in.
        let mut ids = Vec::new();
        let mut lens = Vec::with_capacity(batch.len());
        let mut image_rows = Vec::with_capacity(batch.len() * ntok);
        for (i, s) in batch.iter().enumerate() {
            if s.labels.len() != s.input_ids.len() {
                return Err(Error::arg(
                    "labels",
                    format!(
                        "sequence {i} has {} labels for {} tokens",
                        s.labels.len(),
                        s.input_ids.len()
                    ),
                ));
            }
            let slots: Vec<usize> = (0..s.input_ids.len())
                .filter(|&t| s.input_ids[t] == c.image_token_id)
                .map(|t| ids.len() + t)
                .collect();
            let want = if s.pixel_values.is_empty() { 0 } else { ntok };
            if slots.len() != want {
                return Err(Error::Prompt(format!(
                    "sequence {i} has {} image tokens (id {}) but its {} gives {want} features",
                    slots.len(),
                    c.image_token_id,
                    if want == 0 {
                        "lack of an image"
                    } else {
                        "image"
                    }
                )));
            }
            image_rows.extend(slots);
            ids.extend_from_slice(&s.input_ids);
            lens.push(s.input_ids.len());
        }
        // The image token may lie outside the vocabulary; its rows are overwritten anyway.
        let safe_ids: Vec<u32> = ids
            .iter()
            .map(|&t| if t == c.image_token_id { 0 } else { t })
            .collect();
        let mut x = self.lm.embed(p, &safe_ids)?;
        if !image_rows.is_empty() {
            let mut rows: Vec<usize> = (0..ids.len()).collect();
            for (k, &r) in image_rows.iter().enumerate() {
                rows[r] = ids.len() + k;
            }
            x = Tensor::cat_rows(&[&x, &img])?.gather_rows(&rows)?;
        }
        // Decoder layers, pruning image tokens where the plan says.
        let mut pos: Vec<Vec<usize>> = lens.iter().map(|&t| (0..t).collect()).collect();
        let mut origin: Vec<usize> = (0..ids.len()).collect();
        let layers = self.lm.num_layers();
        let mut decoder = Vec::with_capacity(layers);
        let mut pruning = match &self.prune {
            Some(plan) => Some(Pruning::new(plan, batch, layers, ntok)?),
            None => None,
        };
        let mut pruned_after = BTreeMap::new();
        for l in 0..layers {
            let dc = self.lm.layer_forward_train(p, l, &mut x, &pos)?;
            let layer_origin = origin.clone();
            if let Some(pr) = pruning.as_mut()
                && let Some(keep) = pr.prunes_at(l + 1)
            {
                let rows = pr.prune(keep, &dc.probs, c.text.num_attention_heads, &mut pos)?;
                x = x.gather_rows(&rows)?;
                origin = rows.iter().map(|&r| origin[r]).collect();
                pruned_after.insert(l, rows);
            }
            decoder.push((dc, layer_origin));
        }
        self.last_kept = pruning.map(|p| p.kept).unwrap_or_default();
        let final_out = self.lm.final_norm(p, &x)?;
        let final_out = host(&final_out)?;
        // The LM head and its losses, chunk by chunk of the rows they read.
        let head = self.lm.head();
        // Current rows read by some loss; the losses name rows as the batch had them.
        let read: Vec<usize> = (0..origin.len())
            .filter(|&r| losses.iter().any(|l| l.reads(origin[r])))
            .collect();
        let mut dfinal = vec![0.0f32; final_out.len()];
        let mut dhead = vec![0.0f32; if read.is_empty() { 0 } else { vocab * th }];
        for rows in read.chunks(HEAD_CHUNK) {
            let xr: Vec<f32> = rows
                .iter()
                .flat_map(|&r| &final_out[r * th..(r + 1) * th])
                .copied()
                .collect();
            let logits = Tensor::from_f32(&[rows.len(), th], xr.clone())?
                .linear(&p[head].value, None)?
                .into_f32_vec()?;
            let mut dlogits = vec![0.0f32; logits.len()];
            let named: Vec<usize> = rows.iter().map(|&r| origin[r]).collect();
            for l in losses.iter_mut() {
                l.chunk(&named, &logits, &mut dlogits)?;
            }
            let dxr = linear_backward(&xr, p[head].f32s()?, th, &dlogits, &mut dhead, None)?;
            for (k, &r) in rows.iter().enumerate() {
                dfinal[r * th..(r + 1) * th].copy_from_slice(&dxr[k * th..(k + 1) * th]);
            }
        }
        let dhead = (!p[head].frozen() && !dhead.is_empty()).then_some(dhead);
        let dprobs = match self.grounding {
            Some(g) => {
                if let Some(first) = self.prune.as_ref().and_then(|p| p.stages.first())
                    && [Some(g.layer), g.answer_layer]
                        .iter()
                        .flatten()
                        .any(|&l| l >= first.layer)
                {
                    return Err(Error::arg(
                        "grounding",
                        format!(
                            "supervises a layer at or after the first pruning stage (layer {}): \
                             its rows are no longer the batch's",
                            first.layer
                        ),
                    ));
                }
                let heads = c.text.num_attention_heads;
                let probs = |l: usize| decoder[l].0.probs.as_slice();
                let (l, dp) = grounding_loss(batch, probs, heads, c.image_token_id, &g)?;
                self.last_grounding = l;
                dp
            }
            None => LayerDprobs::new(),
        };
        self.cache = Some(Cache {
            ids,
            lens,
            image_rows,
            vision,
            decoder,
            pruned_after,
            final_in: x,
            final_origin: origin,
            dfinal,
            dhead,
            dprobs,
            dhidden: BTreeMap::new(),
            dimage: None,
        });
        Ok(())
    }

    /// A forward pass that keeps nothing for a backward, for a distillation teacher: the final
    /// norm's output of every row (`[rows, hidden]`, what [`TrainModel::head_logits`] reads),
    /// the outputs of the decoder layers `req.hidden` (as [`TrainModel::hidden_state`]) and, at
    /// the layers `req.attention`, the attention probabilities of the query rows
    /// `req.query_rows[i]` of each sequence `i` only (`[heads, rows, t]`).
    pub fn trace(&mut self, batch: &[TrainSeq], req: &TraceRequest) -> Result<Trace> {
        self.forward_with(batch, &mut [])?;
        let mut hidden = BTreeMap::new();
        for &l in &req.hidden {
            hidden.insert(l, self.hidden_state(l)?.to_vec());
        }
        let mut attention = BTreeMap::new();
        let heads = self.config.text.num_attention_heads;
        for &l in &req.attention {
            let mut per_seq = Vec::with_capacity(batch.len());
            for (i, s) in batch.iter().enumerate() {
                let rows = req.query_rows.get(i).map_or(&[][..], Vec::as_slice);
                let t = s.input_ids.len();
                let pr = self.attention_probs(l, i)?;
                let mut out = Vec::with_capacity(heads * rows.len() * t);
                for h in 0..heads {
                    for &r in rows {
                        out.extend_from_slice(&pr[(h * t + r) * t..(h * t + r + 1) * t]);
                    }
                }
                per_seq.push(out);
            }
            attention.insert(l, per_seq);
        }
        let image_features = if req.image_features {
            self.image_features()?
        } else {
            Vec::new()
        };
        let final_out = match self.cache.take() {
            Some(c) => self
                .lm
                .final_norm(&self.params, &c.final_in)?
                .into_f32_vec()?,
            None => Vec::new(),
        };
        Ok(Trace {
            final_out,
            hidden,
            attention,
            image_features,
        })
    }

    /// The attention probabilities `[heads, t, t]` (query row, then key) of decoder layer
    /// `layer` for sequence `seq` of the last forward.
    pub fn attention_probs(&self, layer: usize, seq: usize) -> Result<&[f32]> {
        let c = self.cache.as_ref().ok_or_else(|| {
            Error::arg("attention_probs", "no forward pass whose attention to read")
        })?;
        let lc = c.decoder.get(layer).ok_or_else(|| {
            Error::arg(
                "layer",
                format!(
                    "is {layer} but the model has {} decoder layers",
                    c.decoder.len()
                ),
            )
        })?;
        lc.0.probs.get(seq).map(Vec::as_slice).ok_or_else(|| {
            Error::arg(
                "sequence",
                format!("is {seq} but the batch has {}", lc.0.probs.len()),
            )
        })
    }

    /// Adds `grad` (the layout of [`TrainModel::attention_probs`]) to the gradient the next
    /// [`TrainModel::backward`] sends into those probabilities: the way an objective on
    /// attention maps (distillation's attention alignment) joins the backward.
    pub fn add_probs_grad(&mut self, layer: usize, seq: usize, grad: &[f32]) -> Result<()> {
        let want = self.attention_probs(layer, seq)?.len();
        if grad.len() != want {
            return Err(Error::Shape {
                name: format!("gradient of layer {layer}'s attention, sequence {seq}"),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        let c = self.cache.as_mut().expect("checked by attention_probs");
        let seqs = c.lens.len();
        let d = &mut c
            .dprobs
            .entry(layer)
            .or_insert_with(|| vec![Vec::new(); seqs])[seq];
        if d.is_empty() {
            *d = grad.to_vec();
        } else {
            ops::add(d, grad);
        }
        Ok(())
    }

    /// The LM head's logits `[rows, vocab]` of final-norm outputs `x` (`[rows, hidden]`).
    pub fn head_logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let th = self.config.text.hidden_size;
        Tensor::from_f32(&[x.len() / th.max(1), th], x.to_vec())?
            .linear(&self.params[self.lm.head()].value, None)?
            .into_f32_vec()
    }

    /// Freezes every parameter (drops their gradient buffers): a teacher.
    pub fn freeze(&mut self) {
        for p in &mut self.params {
            p.grad = Vec::new();
        }
    }

    /// Keeps only the last `n` encoder layers of the vision tower trainable (partial tuning of
    /// the tower, as TinyLLaVA's `tune_vision_tower_from_layer`): the patch, class and position
    /// embeddings, `pre_layrnorm` and the layers below move to group [`VISION_FROZEN_GROUP`] and
    /// lose their gradient buffers, and the vision backward stops at the lowest trainable layer.
    /// The layers counted are those the model holds (up to the deepest selected feature layer).
    /// Errors when `n` is 0 or more than that.
    pub fn train_last_vision_layers(&mut self, n: usize) -> Result<()> {
        let layers = self.vision.tower.num_layers();
        if n == 0 || n > layers {
            return Err(Error::arg(
                "vision_trainable_layers",
                format!(
                    "is {n} but the vision tower has {layers} encoder layers in use (1 to \
                     {layers}; freeze it whole with frozen = [\"vision\"])"
                ),
            ));
        }
        let keep = self.vision.tower.param_indices(layers - n);
        for (i, p) in self.params.iter_mut().enumerate() {
            if p.group.starts_with("vision.") && !keep.contains(&i) {
                p.group = VISION_FROZEN_GROUP.into();
                p.grad = Vec::new();
            }
        }
        Ok(())
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.lm.num_layers()
    }

    /// The output of decoder layer `layer` (the residual stream after it, before the final
    /// norm) in the last forward, `[rows, hidden]` with the batch's rows end to end (with a
    /// prune plan, the rows that go on to the next layer: see [`TrainModel::hidden_rows`]).
    pub fn hidden_state(&self, layer: usize) -> Result<&[f32]> {
        let c = self
            .cache
            .as_ref()
            .ok_or_else(|| Error::arg("hidden_state", "no forward pass whose states to read"))?;
        match layer.cmp(&(c.decoder.len().saturating_sub(1))) {
            std::cmp::Ordering::Less => host(&c.decoder[layer + 1].0.x),
            std::cmp::Ordering::Equal => host(&c.final_in),
            std::cmp::Ordering::Greater => Err(Error::arg(
                "layer",
                format!(
                    "is {layer} but the model has {} decoder layers",
                    c.decoder.len()
                ),
            )),
        }
    }

    /// The batch row (before any pruning) of each row of [`TrainModel::hidden_state`]`(layer)`.
    pub fn hidden_rows(&self, layer: usize) -> Result<&[usize]> {
        self.hidden_state(layer)?;
        let c = self.cache.as_ref().expect("checked by hidden_state");
        Ok(match c.decoder.get(layer + 1) {
            Some(d) => &d.1,
            None => &c.final_origin,
        })
    }

    /// Prunes image tokens in every following forward as `plan` says (`None`: no pruning), as
    /// the engine does at inference: after layer `K - 1`, the image tokens are ranked by the
    /// attention of the query rows the plan's query strategy picks from each sequence's first
    /// prompt ([`TrainSeq::prompt`]), weighted by its head strategy, and only the kept ones go on
    /// (RoPE positions kept, or renumbered with `plan.renumber`). Rows that read nothing after
    /// layer `K - 1` get no gradient from the layers above; the choice itself is not
    /// differentiated. Errors when a stage lies outside the model.
    pub fn set_prune(&mut self, plan: Option<PrunePlan>) -> Result<()> {
        if let Some(p) = &plan {
            use crate::prune::Scorer;
            if !matches!(p.scorer, Scorer::Attention | Scorer::Random(_)) || p.before_lm.is_some() {
                return Err(Error::arg(
                    "prune plan",
                    "the trainer's pruned forward ranks by attention or at random; DART, \
                     SparseVLM and reductions before the LM are not implemented there",
                ));
            }
            p.kept_counts(self.lm.num_layers(), self.config.image_tokens())?;
        }
        self.prune = plan;
        Ok(())
    }

    /// The image tokens (indices among the sequence's image tokens, ascending) each sequence
    /// kept at each stage of the last forward with a prune plan: `[sequence][stage]`.
    pub fn pruned_kept(&self) -> &[Vec<Vec<usize>>] {
        &self.last_kept
    }

    /// Adds `grad` (same layout as [`TrainModel::hidden_state`]) to the gradient the next
    /// [`TrainModel::backward`] sends into the output of decoder layer `layer`: the way an
    /// objective on hidden states (distillation's alignment losses) joins the backward.
    pub fn add_hidden_grad(&mut self, layer: usize, grad: &[f32]) -> Result<()> {
        let want = self.hidden_state(layer)?.len();
        if grad.len() != want {
            return Err(Error::Shape {
                name: format!("gradient of layer {layer}'s output"),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        let c = self.cache.as_mut().expect("checked by hidden_state");
        match c.dhidden.get_mut(&layer) {
            Some(d) => ops::add(d, grad),
            None => {
                c.dhidden.insert(layer, grad.to_vec());
            }
        }
        Ok(())
    }

    /// The projected image features of the last forward: the projector's output, which the LM
    /// reads as the image tokens' embeddings, `[images·image_tokens, hidden]`, image by image.
    pub fn image_features(&self) -> Result<Vec<f32>> {
        let c = self.cache.as_ref().ok_or_else(|| {
            Error::arg("image_features", "no forward pass whose features to read")
        })?;
        let th = self.config.text.hidden_size;
        let x0 = c
            .decoder
            .first()
            .map(|d| host(&d.0.x))
            .ok_or_else(|| Error::arg("image_features", "the model has no decoder layers"))??;
        Ok(c.image_rows
            .iter()
            .flat_map(|&r| &x0[r * th..(r + 1) * th])
            .copied()
            .collect())
    }

    /// Adds `grad` (the layout of [`TrainModel::image_features`]) to the gradient the next
    /// [`TrainModel::backward`] sends into the projected image features: how an objective on the
    /// features (distillation's vision alignment) reaches the projector and the vision tower.
    pub fn add_image_features_grad(&mut self, grad: &[f32]) -> Result<()> {
        let c = self.cache.as_mut().ok_or_else(|| {
            Error::arg(
                "add_image_features_grad",
                "no forward pass to differentiate",
            )
        })?;
        let want = c.image_rows.len() * self.config.text.hidden_size;
        if grad.len() != want {
            return Err(Error::Shape {
                name: "gradient of the image features".into(),
                expected: vec![want],
                got: vec![grad.len()],
            });
        }
        match c.dimage.as_mut() {
            Some(d) => ops::add(d, grad),
            None => c.dimage = Some(grad.to_vec()),
        }
        Ok(())
    }

    /// Accumulates the gradient of the last forward's loss into every non-frozen parameter's
    /// `grad` (call [`super::optim::zero_grads`] between steps). Consumes the cache.
    pub fn backward(&mut self) -> Result<()> {
        let cache = self
            .cache
            .take()
            .ok_or_else(|| Error::arg("backward", "no forward pass to differentiate"))?;
        let c = &self.config;
        let p = &mut self.params;
        let th = c.text.hidden_size;
        let head = self.lm.head();
        if let Some(dh) = &cache.dhead {
            ops::add(&mut p[head].grad, dh);
        }
        let mut dx = self.lm.norm.backward(
            p,
            host(&cache.final_in)?,
            c.text.rms_norm_eps,
            &cache.dfinal,
        )?;
        for (i, (lc, _)) in cache.decoder.iter().enumerate().rev() {
            if let Some(d) = cache.dhidden.get(&i) {
                ops::add(&mut dx, d);
            }
            // Rows dropped after this layer get no gradient from above.
            if let Some(rows) = cache.pruned_after.get(&i) {
                let mut full = vec![0.0f32; lc.x.len()];
                for (k, &r) in rows.iter().enumerate() {
                    full[r * th..(r + 1) * th].copy_from_slice(&dx[k * th..(k + 1) * th]);
                }
                dx = full;
            }
            let dprobs = cache.dprobs.get(&i).map_or(&[][..], Vec::as_slice);
            self.lm.layer_backward(p, i, lc, dprobs, &mut dx)?;
        }
        // Split the embedding gradient: image rows go to the projector, the rest to the table.
        let mut dimg = vec![0.0f32; cache.image_rows.len() * th];
        for (k, &r) in cache.image_rows.iter().enumerate() {
            dimg[k * th..(k + 1) * th].copy_from_slice(&dx[r * th..(r + 1) * th]);
            dx[r * th..(r + 1) * th].fill(0.0);
        }
        if let Some(d) = &cache.dimage {
            ops::add(&mut dimg, d);
        }
        let table = self.lm.embed_tokens();
        if !p[table].frozen() {
            let mut dtable = std::mem::take(&mut p[table].grad);
            let ids: Vec<u32> = cache
                .ids
                .iter()
                .map(|&t| if t == c.image_token_id { 0 } else { t })
                .collect();
            let r = embed::embed_backward(&ids, &dx, th, &mut dtable);
            p[table].grad = dtable;
            r?;
        }
        let upstream_frozen = p
            .iter()
            .filter(|q| q.group.starts_with("vision") || q.group.starts_with("projector"))
            .all(|q| q.grad.is_empty());
        let Some((vision, projector)) = &cache.vision else {
            return Ok(());
        };
        if upstream_frozen {
            return Ok(());
        }
        let dfeats = self.vision.projector.backward(p, projector, &dimg)?;
        let images = cache.image_rows.len() / self.config.image_tokens().max(1);
        self.features_backward(vision, images, &dfeats)
    }

    /// The vision tower's selected features of a batch of images (the projector's input):
    /// `[images * image_tokens, vision_hidden * feature_layers]`, the images' rows one after
    /// another. For objectives on the vision tower alone (see [`super::vision_pretrain`]);
    /// [`TrainModel::vision_backward`] differentiates the last call.
    pub fn vision_forward(&mut self, pixels: &[&[f32]]) -> Result<Vec<f32>> {
        self.cache = None;
        if pixels.is_empty() {
            return Err(Error::arg(
                "vision_forward",
                "no images to encode".to_string(),
            ));
        }
        let (feats, cache) = self.vision.features(&self.params, pixels, true)?;
        if let Some(cache) = cache {
            self.vision_cache = Some((cache, pixels.len()));
        }
        feats.into_f32_vec()
    }

    /// Accumulates into the vision parameters' `grad` the gradient reaching the features of the
    /// last [`TrainModel::vision_forward`] (`dfeats`, same layout). Consumes its activations.
    pub fn vision_backward(&mut self, dfeats: &[f32]) -> Result<()> {
        let (cache, images) = self
            .vision_cache
            .take()
            .ok_or_else(|| Error::arg("vision_backward", "no vision forward to differentiate"))?;
        self.features_backward(&cache, images, dfeats)
    }

    /// Width of one image token's selected features (`vision_hidden * feature_layers`).
    pub fn feature_width(&self) -> usize {
        self.vision.feature_width()
    }

    /// Backward of the vision features ([`VisionEncoder::features_backward`]); a no-op when the
    /// vision tower is frozen.
    fn features_backward(
        &mut self,
        cache: &VisionCache,
        images: usize,
        dfeats: &[f32],
    ) -> Result<()> {
        let p = &mut self.params;
        let vision_frozen = p
            .iter()
            .filter(|q| q.group.starts_with("vision"))
            .all(|q| q.grad.is_empty());
        if vision_frozen {
            return Ok(());
        }
        self.vision.features_backward(p, cache, images, dfeats)
    }
}
