//! Running a pruning study: every configuration (head x query x keep x layer, plus the unpruned
//! model) over every sample, scored, timed and measured.

use super::eval::{SampleScore, ScoreSummary, Scorecard, YesNo};
use super::mem;
use super::shapes::{self, Family, SHORT_ANSWER, ShapesConfig, Split};
use crate::engine::{Engine, ImageInput, Request};
use crate::error::{Error, Result};
use crate::io::{fnv1a64, write_atomic};
use crate::model::anyres::VisualToken;
use crate::model::image::load_image;
use crate::model::llava::VisionEncoder;
use crate::prune::before::{BeforeLm, Reduce};
use crate::prune::dart::Dart;
use crate::prune::sparsevlm::{self, SparseVlm};
use crate::prune::{
    Keep, PrunePlan, Scorer, Stage, StrategyParams, head_strategy, metrics::TileKept,
    plan::nearest_setting, pyramid, query_strategy,
};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One question about one image. Serialised (without its relevance) in a sweep's manifest
/// ([`super::shard::Manifest`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchItem {
    pub id: String,
    pub image: PathBuf,
    /// The question as asked (any answer-format instruction included).
    pub question: String,
    pub answers: Vec<String>,
    pub family: String,
    /// POPE-style yes/no label: scored with POPE's yes/no reading instead of answer matching.
    pub yes_no: Option<bool>,
    /// Ground truth, if known: whether each of the image's patch tokens is relevant, in prompt
    /// order ([`VisionEncoder::patch_tokens`]: the image's prompt tokens less the `full`
    /// strategy's CLS and LLaVA-NeXT's newlines). LLaVA-1.5: the vision tower's patch grid,
    /// row-major; LLaVA-NeXT: the base tile's patches, then the unpadded grid's row by row.
    #[serde(skip)]
    pub relevant: Option<Vec<bool>>,
}

/// How a model cuts an image into patch tokens, for relevance ground truth.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchGeometry {
    /// LLaVA-1.5: the image resized to one `size`-pixel square of `patch`-pixel patches.
    Square { size: u32, patch: u32 },
    /// LLaVA-NeXT: a base tile and a grid of `tile`-pixel tiles of `patch`-pixel patches at
    /// the best of `pinpoints` ([`crate::model::anyres`]).
    Anyres {
        pinpoints: Vec<(usize, usize)>,
        tile: u32,
        patch: u32,
    },
}

impl PatchGeometry {
    /// The geometry of `vision`'s input.
    pub fn of(vision: &VisionEncoder) -> PatchGeometry {
        let v = &vision.config.vision;
        let (size, patch) = (v.image_size as u32, v.patch_size as u32);
        match &vision.config.image_grid_pinpoints {
            Some(pins) => PatchGeometry::Anyres {
                pinpoints: pins.clone(),
                tile: size,
                patch,
            },
            None => PatchGeometry::Square { size, patch },
        }
    }

    /// Relevance of each patch token of `s` rendered at `width x height` (see
    /// [`BenchItem::relevant`]); `None` when the question references no object. A square model's
    /// input is the image resized to its square, so `(width, height)` matters only for
    /// LLaVA-NeXT.
    pub fn relevance(
        &self,
        s: &shapes::Sample,
        (width, height): (u32, u32),
    ) -> Result<Option<Vec<bool>>> {
        match self {
            PatchGeometry::Square { size, patch } => Ok(s.relevance(*size, *patch)),
            PatchGeometry::Anyres {
                pinpoints,
                tile,
                patch,
            } => {
                let image = (height as usize, width as usize);
                let tokens =
                    s.anyres_relevance(image, pinpoints, (*tile as usize, *patch as usize))?;
                Ok(tokens.map(|t| t.into_iter().flatten().collect()))
            }
        }
    }
}

/// The ShapesVQA test questions numbered `questions` (generator `seed`, settings `cfg`, whose
/// [`ShapesConfig::aspect`] shapes the scenes) as bench items: images rendered at `width x
/// height` into `dir/images`, questions with [`SHORT_ANSWER`], relevance of each patch token of
/// `geometry`, existence questions scored POPE-style. The generator is prefix-stable (question
/// `i` is the same whatever the count), so `a..b` are the same questions as in a run of `0..c`
/// for any `c >= b`: the slices of [`super::shard::Shard`] render only their own images.
pub fn shapes_items(
    questions: Range<usize>,
    seed: u64,
    cfg: &ShapesConfig,
    (width, height): (u32, u32),
    geometry: &PatchGeometry,
    dir: &Path,
) -> Result<Vec<BenchItem>> {
    let samples = shapes::generate(Split::Test, questions.end, seed, cfg)?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    samples
        .iter()
        .skip(questions.start)
        .map(|s| {
            let path = images.join(s.image_file());
            write_atomic(&path, &s.scene.png_at(width, height)?)?;
            Ok(BenchItem {
                id: s.id.clone(),
                image: path,
                question: format!("{}{SHORT_ANSWER}", s.question),
                answers: s.answers.clone(),
                family: s.family.name().to_string(),
                yes_no: (s.family == Family::Existence)
                    .then(|| s.answers.first().is_some_and(|x| x == "yes")),
                relevant: geometry.relevance(s, (width, height))?,
            })
        })
        .collect()
}

/// The methods `prune-bench --method` runs: FastV's head x query grid, and the peers.
pub const METHODS: [&str; 8] = [
    "fastv",
    "random",
    "dart",
    "pool",
    "fastervlm",
    "visionzip",
    "pdrop",
    "sparsevlm",
];

/// The error for a `--method` name that is not one of [`METHODS`].
pub fn unknown_method(name: &str) -> Error {
    Error::Unsupported {
        what: "pruning method (fastv, random, dart, pool, fastervlm, visionzip, pdrop, sparsevlm)",
        value: name.to_string(),
    }
}

/// What a matched-budget sweep ([`SweepConfig::matched`]) needs: the LM's depth and image
/// tokens, the layers of the single-stage methods and FastV's strategy grid.
#[derive(Debug, Clone)]
pub struct Matching {
    pub num_layers: usize,
    pub n_image: usize,
    /// First pruned layers K of fastv, random and dart.
    pub layers: Vec<usize>,
    pub heads: Vec<String>,
    pub queries: Vec<String>,
    pub params: StrategyParams,
    pub head_keep: f64,
    /// The random baseline's seed.
    pub seed: u64,
}

/// One configuration of a sweep.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// `unpruned`, `head/query/keep/Kn`, `random/keep/Kn` or `head/query/keep/Kn/pyramid1-2-3`.
    pub label: String,
    /// The line this configuration belongs to in plots: its label without the keep.
    pub series: String,
    pub head: String,
    pub query: String,
    /// The single-stage budget (a pyramid: the one it matches on average).
    pub keep: Option<Keep>,
    pub layer: Option<usize>,
    /// The plan's stages as `K:keep` joined by `+` (`-` when unpruned).
    pub stages: String,
    pub plan: Option<PrunePlan>,
}

/// `K:keep` of every stage, joined by `+`.
fn stages_text(stages: &[Stage]) -> String {
    let v: Vec<String> = stages
        .iter()
        .map(|s| format!("{}:{}", s.layer, s.keep))
        .collect();
    v.join("+")
}

impl SweepConfig {
    /// The unpruned baseline.
    pub fn unpruned() -> Self {
        SweepConfig {
            label: "unpruned".into(),
            series: "unpruned".into(),
            head: "-".into(),
            query: "-".into(),
            keep: None,
            layer: None,
            stages: "-".into(),
            plan: None,
        }
    }

    /// One stage `(layer, keep)` ranked by `head` and `query`.
    fn single(head: &str, query: &str, plan: PrunePlan, layer: usize, keep: Keep) -> Self {
        SweepConfig {
            label: format!("{head}/{query}/{keep}/K{layer}"),
            series: format!("{head}/{query}/K{layer}"),
            head: head.into(),
            query: query.into(),
            keep: Some(keep),
            layer: Some(layer),
            stages: stages_text(&plan.stages),
            plan: Some(plan),
        }
    }

    /// Every combination of the lists (one pruning stage each), after the unpruned baseline.
    pub fn grid(
        heads: &[String],
        queries: &[String],
        keeps: &[Keep],
        layers: &[usize],
        params: &StrategyParams,
        head_keep: f64,
    ) -> Result<Vec<SweepConfig>> {
        let mut out = vec![Self::unpruned()];
        for h in heads {
            let head = head_strategy(h, params)?;
            for q in queries {
                let query = query_strategy(q, params)?;
                for &layer in layers {
                    for &keep in keeps {
                        let mut plan = PrunePlan::new(vec![Stage { layer, keep }]);
                        plan.head = head.clone();
                        plan.query = query.clone();
                        plan.head_keep = head_keep;
                        out.push(Self::single(h, q, plan, layer, keep));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The runs of a method other than FastV's strategy grid ([`METHODS`]) at every keep (and
    /// every layer, for the methods that prune inside the LM):
    /// - `random`: the random-keep baseline ([`Scorer::Random`]; [`run`] mixes each sample's id
    ///   into `seed`, so samples draw independently and reproducibly);
    /// - `dart`: DART with the official defaults ([`Scorer::Dart`], 4 + 4 pivots; the keep is
    ///   its budget);
    /// - `pool`: uniform pooling before the LM ([`BeforeLm::Pool`]; no layer);
    /// - `fastervlm`: FasterVLM's CLS-attention ranking before the LM ([`BeforeLm::FasterVlm`]);
    /// - `visionzip`: VisionZip's dominant and contextual tokens before the LM
    ///   ([`BeforeLm::VisionZip`]).
    ///
    /// The reductions before the LM take the keep per tile on LLaVA-NeXT
    /// ([`crate::prune::before`]).
    pub fn method(name: &str, keeps: &[Keep], layers: &[usize], seed: u64) -> Result<Vec<Self>> {
        let in_lm = |scorer: Scorer| {
            let mut out = vec![];
            for &layer in layers {
                for &keep in keeps {
                    let mut plan = PrunePlan::new(vec![Stage { layer, keep }]);
                    plan.scorer = scorer;
                    let mut c = Self::single(name, "-", plan, layer, keep);
                    c.label = format!("{name}/{keep}/K{layer}");
                    c.series = format!("{name}/K{layer}");
                    out.push(c);
                }
            }
            out
        };
        match name {
            "random" => Ok(in_lm(Scorer::Random(seed))),
            "dart" => Ok(in_lm(Scorer::Dart(Dart::default()))),
            "pool" | "fastervlm" | "visionzip" => {
                let method = match name {
                    "pool" => BeforeLm::Pool,
                    "fastervlm" => BeforeLm::FasterVlm,
                    _ => BeforeLm::VisionZip,
                };
                Ok(keeps
                    .iter()
                    .map(|&keep| {
                        let mut plan = PrunePlan::new(vec![]);
                        plan.before_lm = Some(Reduce { method, keep });
                        SweepConfig {
                            label: format!("{name}/{keep}"),
                            series: name.into(),
                            head: name.into(),
                            query: "-".into(),
                            keep: Some(keep),
                            layer: None,
                            stages: "-".into(),
                            plan: Some(plan),
                        }
                    })
                    .collect())
            }
            "fastv" | "pdrop" | "sparsevlm" => Err(Error::arg(
                "--method",
                format!(
                    "{name} is built by its own constructor (SweepConfig::grid, ::pdrop, ::sparsevlm)"
                ),
            )),
            other => Err(unknown_method(other)),
        }
    }

    /// PyramidDrop as published ([`PrunePlan::pdrop`]) at every keep λ (a fraction, or a count
    /// of the `n_image` image tokens): stages before layers L/4, L/2 and 3L/4 of the
    /// `num_layers`-layer LM keeping λ, λ² and λ³ of the image tokens (the official 0.5, 0.25,
    /// 0.125 at 8, 16, 24 of 32 layers for λ = 0.5).
    pub fn pdrop(keeps: &[Keep], num_layers: usize, n_image: usize) -> Result<Vec<Self>> {
        let layers: Vec<usize> = (1..4).map(|i| i * num_layers / 4).collect();
        if layers[0] == 0 || layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::arg(
                "--method",
                format!(
                    "pdrop needs stages at L/4, L/2, 3L/4: a {num_layers}-layer LM is too shallow"
                ),
            ));
        }
        keeps
            .iter()
            .map(|&keep| {
                let lambda = match keep {
                    Keep::Fraction(f) | Keep::Floor(f) => f,
                    Keep::Count(c) => c as f64 / n_image.max(1) as f64,
                };
                let ratios: Vec<f64> = (1..4).map(|i| lambda.powi(i)).collect();
                let plan = PrunePlan::pdrop(&layers, &ratios)?;
                Ok(SweepConfig {
                    label: format!("pdrop/{keep}"),
                    series: "pdrop".into(),
                    head: "pdrop".into(),
                    query: "-".into(),
                    keep: Some(keep),
                    layer: Some(layers[0]),
                    stages: stages_text(&plan.stages),
                    plan: Some(plan),
                })
            })
            .collect()
    }

    /// SparseVLM ([`PrunePlan::sparsevlm`]) at every keep, the image tokens it should average
    /// over the LM layers (a fraction of the `n_image` image tokens, or a count: the official
    /// `RETAIN_TOKN`): on a 32-layer LM with 576 image tokens at a published setting (192, 128,
    /// 96, 64) its table as published ([`sparsevlm::PUBLISHED`]; it averages more than its name
    /// by this count, see [`sparsevlm::schedule`]), otherwise [`sparsevlm::schedule`].
    pub fn sparsevlm(keeps: &[Keep], num_layers: usize, n_image: usize) -> Result<Vec<Self>> {
        keeps
            .iter()
            .map(|&keep| {
                let avg = match keep {
                    Keep::Fraction(f) | Keep::Floor(f) => f * n_image as f64,
                    Keep::Count(c) => c as f64,
                };
                let published = (sparsevlm::PUBLISHED.iter())
                    .find(|(r, _)| *r as f64 == avg && num_layers == 32 && n_image == 576);
                let (layers, budgets) = match published {
                    Some((_, b)) => (sparsevlm::LAYERS.to_vec(), b.to_vec()),
                    None => sparsevlm::schedule(avg, num_layers, n_image)?,
                };
                Self::sparsevlm_plan(keep, &layers, &budgets, (num_layers, n_image))
            })
            .collect()
    }

    /// SparseVLM's configuration for `keep` with these sparse layers and budgets, checked to
    /// fit the `(layers, image tokens)` of the model.
    fn sparsevlm_plan(
        keep: Keep,
        layers: &[usize],
        budgets: &[usize],
        (num_layers, n_image): (usize, usize),
    ) -> Result<Self> {
        let plan = PrunePlan::sparsevlm(layers, budgets, SparseVlm::default())?;
        plan.kept_counts(num_layers, n_image)?;
        Ok(SweepConfig {
            label: format!("sparsevlm/{keep}"),
            series: "sparsevlm".into(),
            head: "sparsevlm".into(),
            query: "-".into(),
            keep: Some(keep),
            layer: plan.stages.first().map(|s| s.layer),
            stages: stages_text(&plan.stages),
            plan: Some(plan),
        })
    }

    /// Every method of `methods` ([`METHODS`]) at `avg` image tokens averaged over the LM
    /// layers (a fraction of the image tokens or a count), each method's own setting solved to
    /// realise it ([`PrunePlan::avg_image_tokens`]; before the LM, the tokens it leaves):
    /// - fastv (every head x query) and random, a stage at each K: keep
    ///   `c = round((avg L - K N) / (L - K))`;
    /// - dart: the budget whose kept count (`4 + 8 ⌊M / 8⌋`) is nearest that `c`;
    /// - pool: the square nearest `avg`; fastervlm and visionzip: `round(avg)` tokens;
    /// - pdrop: the λ (bisection) whose stages `int(N λ^i)` average nearest `avg`;
    /// - sparsevlm: [`sparsevlm::schedule`].
    ///
    /// Each is labelled `{series}@{avg}` and keeps `avg` as its keep. Returns the
    /// configurations and a note for each method (and K) that cannot reach `avg` (an in-LM
    /// stage at K averages at least `K N / L`).
    pub fn matched(methods: &[&str], avg: Keep, m: &Matching) -> Result<(Vec<Self>, Vec<String>)> {
        let (l, n) = (m.num_layers, m.n_image);
        let target = match avg {
            Keep::Fraction(f) if f > 0.0 && f <= 1.0 => f * n as f64,
            Keep::Count(c) if (1..=n).contains(&c) => c as f64,
            k => {
                return Err(Error::arg(
                    "--avg-budget",
                    format!("{k} is not a budget for {n} image tokens"),
                ));
            }
        };
        let (mut out, mut notes) = (vec![], vec![]);
        let single = |k: usize| -> Option<usize> {
            let c = ((target * l as f64 - (k * n) as f64) / (l - k) as f64).round();
            (c >= 1.0 && c <= n as f64 && k < l).then_some(c as usize)
        };
        let unreachable = |name: &str, k: usize| {
            format!(
                "{name} at K={k} cannot average {target:.1} image tokens over {l} layers: \
                 at least {:.1}",
                (k * n + l - k) as f64 / l as f64
            )
        };
        let tag = |mut c: SweepConfig| {
            c.label = format!("{}@{avg}", c.series);
            c.keep = Some(avg);
            c
        };
        for &name in methods {
            match name {
                "fastv" | "random" | "dart" => {
                    for &k in &m.layers {
                        let Some(c) = single(k) else {
                            notes.push(unreachable(name, k));
                            continue;
                        };
                        let configs = match name {
                            "fastv" => Self::grid(
                                &m.heads,
                                &m.queries,
                                &[Keep::Count(c)],
                                &[k],
                                &m.params,
                                m.head_keep,
                            )?
                            .split_off(1),
                            "dart" => {
                                let d = Dart::default();
                                let p = d.image_pivots + d.text_pivots;
                                let q = ((c as f64 - d.image_pivots as f64) / p as f64)
                                    .round()
                                    .max(0.0) as usize;
                                Self::method(name, &[Keep::Count((q * p).max(1))], &[k], m.seed)?
                            }
                            _ => Self::method(name, &[Keep::Count(c)], &[k], m.seed)?,
                        };
                        out.extend(configs.into_iter().map(tag));
                    }
                }
                "pool" | "fastervlm" | "visionzip" => {
                    let c = match name {
                        "pool" => (target.sqrt().round() as usize).pow(2),
                        _ => target.round() as usize,
                    };
                    let c = c.clamp(1, n);
                    out.extend(
                        Self::method(name, &[Keep::Count(c)], &[], m.seed)?
                            .into_iter()
                            .map(tag),
                    );
                }
                "pdrop" => {
                    let realised = |lam: f64| -> Option<f64> {
                        let c = Self::pdrop(&[Keep::Fraction(lam)], l, n).ok()?;
                        c[0].plan.as_ref()?.avg_image_tokens(l, n).ok()
                    };
                    match nearest_setting(realised, target, (0.0, 1.0)) {
                        Some((lam, err)) if err <= 0.05 * target + 1.0 => out.extend(
                            Self::pdrop(&[Keep::Fraction(lam)], l, n)?
                                .into_iter()
                                .map(tag),
                        ),
                        _ => notes.push(format!(
                            "pdrop cannot average {target:.1} image tokens over {l} layers \
                             (stages at L/4, L/2, 3L/4)"
                        )),
                    }
                }
                "sparsevlm" => match sparsevlm::schedule(target, l, n) {
                    Ok((layers, budgets)) => {
                        out.push(tag(Self::sparsevlm_plan(avg, &layers, &budgets, (l, n))?))
                    }
                    Err(Error::Arg { msg, .. }) => notes.push(format!("sparsevlm: {msg}")),
                    Err(e) => return Err(e),
                },
                other => return Err(unknown_method(other)),
            }
        }
        Ok((out, notes))
    }

    /// What a summary and a manifest say of this configuration (all but the plan).
    pub fn info(&self) -> ConfigInfo {
        ConfigInfo {
            label: self.label.clone(),
            series: self.series.clone(),
            head: self.head.clone(),
            query: self.query.clone(),
            keep: self.keep.map(|k| k.to_string()),
            layer: self.layer,
            stages: self.stages.clone(),
        }
    }

    /// The PyramidDrop-style twin of this single-stage configuration: stages before `layers`
    /// at the same image tokens averaged over the `num_layers` layers ([`pyramid`]), the same
    /// strategies. An error for the unpruned baseline or a plan that does not fit.
    pub fn pyramid(&self, layers: &[usize], num_layers: usize, n_image: usize) -> Result<Self> {
        let Some(plan) = &self.plan else {
            return Err(Error::arg(
                "pyramid",
                "the unpruned run has no budget to match",
            ));
        };
        let avg = plan.avg_image_tokens(num_layers, n_image)?;
        let (_, stages) = pyramid(layers, num_layers, n_image, avg)?;
        let mut p = plan.clone();
        p.stages = stages;
        p.kept_counts(num_layers, n_image)?;
        let tag: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        let tag = format!("pyramid{}", tag.join("-"));
        Ok(SweepConfig {
            label: format!("{}/{tag}", self.label),
            series: format!("{}/{}/{tag}", self.head, self.query),
            stages: stages_text(&p.stages),
            plan: Some(p),
            ..self.clone()
        })
    }
}

/// What happened to one sample under one configuration: everything [`summarize`] needs (a
/// shard's results.json carries them to `prune-bench merge`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRecord {
    pub config: String,
    pub id: String,
    pub family: String,
    pub prediction: String,
    pub score: f64,
    /// The yes/no reading of a POPE-style sample (the POPE metrics are computed over these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yes_no: Option<YesNo>,
    /// Image tokens after the last stage, and averaged over all LM layers.
    pub kept_after: usize,
    pub avg_kept: f64,
    /// Share of the relevant patch tokens among the kept tokens (all kept when unpruned).
    pub recall: Option<f64>,
    /// The random-keep baseline of `recall`: its expectation when the same number of patch
    /// tokens is kept uniformly at random, `kept patch tokens / all patch tokens` (exact, no
    /// sampling noise; LLaVA-NeXT's newlines are not patch tokens).
    pub random_recall: Option<f64>,
    /// Normalised entropy of the first stage's importance scores.
    pub concentration: Option<f64>,
    /// Mean pairwise cosine distance of the kept tokens' hidden states at the last stage.
    pub diversity: Option<f64>,
    pub prefill_ms: f64,
    pub decode_tokens_per_s: f64,
    pub prefill_gflops: f64,
    pub decode_gflops: f64,
    /// LLaVA-NeXT: the image tokens of each tile (and the row newlines) in the prompt and after
    /// the last stage ([`crate::prune::RunStats::tiles`]); empty for LLaVA-1.5's one tile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiles: Vec<TileRecord>,
    /// Patch tokens kept after the last stage (all when unpruned), as indices among the image's
    /// patch tokens ([`BenchItem::relevant`]'s order: LLaVA-1.5's patches).
    #[serde(skip)]
    pub kept_patches: Vec<usize>,
    /// Importance of each patch token at the first stage (empty when unpruned).
    #[serde(skip)]
    pub patch_importance: Vec<f32>,
}

/// One tile's image tokens in the prompt and after pruning ([`SampleRecord::tiles`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileRecord {
    /// `base` (the whole image squashed to one tile), `tile1`, `tile2`, ... (the grid's tiles,
    /// row by row) or `newlines` (the grid's row ends).
    pub part: String,
    pub total: usize,
    pub kept: usize,
}

impl TileRecord {
    /// The records of one image's [`TileKept`] counts: the base tile, the grid's tiles in order,
    /// the newlines last.
    pub fn of(tiles: &[TileKept]) -> Vec<TileRecord> {
        let mut tiles = tiles.to_vec();
        tiles.sort_by_key(|t| match t.part {
            VisualToken::Patch { tile, .. } => (0, tile),
            VisualToken::Newline { .. } => (1, 0),
        });
        tiles
            .iter()
            .map(|t| TileRecord {
                part: match t.part {
                    VisualToken::Patch { tile: 0, .. } => "base".into(),
                    VisualToken::Patch { tile, .. } => format!("tile{tile}"),
                    VisualToken::Newline { .. } => "newlines".into(),
                },
                total: t.total,
                kept: t.kept,
            })
            .collect()
    }

    /// `part:kept/total` of each, space separated (a samples.csv cell).
    pub fn cell(tiles: &[TileRecord]) -> String {
        let v: Vec<String> = tiles
            .iter()
            .map(|t| format!("{}:{}/{}", t.part, t.kept, t.total))
            .collect();
        v.join(" ")
    }
}

/// A configuration as summaries and manifests name it ([`SweepConfig::info`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigInfo {
    pub label: String,
    /// The plot line it belongs to ([`SweepConfig::series`]).
    pub series: String,
    pub head: String,
    pub query: String,
    pub keep: Option<String>,
    pub layer: Option<usize>,
    /// The plan's stages ([`SweepConfig::stages`]).
    pub stages: String,
}

/// Aggregates of one configuration ([`summarize`]).
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    #[serde(flatten)]
    pub config: ConfigInfo,
    /// Accuracy overall and per family, POPE metrics over the yes/no questions.
    pub scores: ScoreSummary,
    pub kept_after: f64,
    pub avg_kept: f64,
    pub recall: Option<f64>,
    /// Expected recall of a random kept set of the same size (see [`SampleRecord`]).
    pub random_recall: Option<f64>,
    pub concentration: Option<f64>,
    pub diversity: Option<f64>,
    /// Mean prefill time and decode speed of the samples (wall time; after `prune-bench merge`,
    /// measured by different processes, possibly on different machines).
    pub prefill_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Peak heap while the configuration ran ([`mem::peak_bytes`]); merged: the largest of the
    /// shards' peaks.
    pub peak_bytes: usize,
    pub prefill_gflops: f64,
    /// Unpruned prefill FLOPs / this configuration's, and the same for wall time.
    pub flops_speedup: f64,
    pub time_speedup: f64,
}

/// Options of a sweep run.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub max_new_tokens: usize,
    /// System prompt before `USER:` (None: llava-hf's template, which has none; models trained
    /// by `distill` saw [`crate::model::template::LLAVA_SYSTEM`]).
    pub system: Option<String>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

fn mean_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let xs: Vec<f64> = v.flatten().collect();
    (!xs.is_empty()).then(|| mean(xs.into_iter()))
}

/// Runs every configuration over every item, one request at a time so each prefill is timed
/// alone; `on_sample` runs after each (a progress bar). Returns the records (configuration by
/// configuration, items in order) and their [`summarize`]: the first configuration should be the
/// unpruned baseline, speedups are relative to it.
pub fn run(
    engine: &Engine,
    items: &[BenchItem],
    configs: &[SweepConfig],
    opts: &SweepOptions,
    on_sample: &dyn Fn(),
) -> Result<(Vec<SampleRecord>, Vec<ConfigSummary>)> {
    let vision = engine.model().vision.as_ref();
    let anyres = vision.is_some_and(|v| v.config.is_anyres());
    // Each item's patch token (if any) of every prompt image token; LLaVA-NeXT's depend on the
    // image's size, read from the image as the engine reads it.
    let units = items
        .iter()
        .map(|it| match vision {
            Some(v) => {
                let size = match anyres {
                    true => {
                        let img = load_image(&it.image)?;
                        Some((img.height() as usize, img.width() as usize))
                    }
                    false => None,
                };
                v.patch_tokens(size)
            }
            None => Ok(Vec::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut records = Vec::new();
    let mut peaks = Vec::with_capacity(configs.len());
    for cfg in configs {
        mem::reset_peak();
        let mut card = Scorecard::new();
        let mut recs = Vec::with_capacity(items.len());
        for (it, units) in items.iter().zip(&units) {
            let mut req = Request::new(
                it.question.clone(),
                Some(ImageInput::Path(it.image.clone())),
            );
            req.max_new_tokens = opts.max_new_tokens;
            req.options.system = opts.system.clone();
            req.prune = cfg.plan.clone().map(|mut p| {
                // The random baseline draws independently per sample.
                if let Scorer::Random(seed) = &mut p.scorer {
                    *seed ^= fnv1a64(it.id.as_bytes());
                }
                p
            });
            let g = engine.generate(&[req])?.remove(0);
            let pred = g.text.trim().to_string();
            // Scored as a scorecard scores; [`summarize`] rebuilds the scorecard from the records.
            let score = match it.yes_no {
                Some(label) => card.add_yes_no(&it.id, &it.family, &pred, label),
                None if it.answers.len() >= 10 => {
                    card.add_vqa(&it.id, &it.family, &pred, &it.answers)
                }
                None => card.add_exact(&it.id, &it.family, &pred, &it.answers),
            };
            let s = &g.stats;
            let n_image = s.image_tokens_per_layer.first().copied().unwrap_or(0);
            let n_patches = units.iter().flatten().count();
            // A reduction before the LM says which patch each token is as it is (none when it
            // merges them all, pooling: recall undefined).
            let reduced = &g.prompt.patches;
            let merged = cfg.plan.as_ref().is_some_and(|p| p.before_lm.is_some())
                && reduced.iter().all(Option::is_none);
            let to_patch = |t: usize| match reduced.is_empty() {
                true => units.get(t).copied().flatten(),
                false => reduced.get(t).copied().flatten(),
            };
            let kept_tokens: Vec<usize> = match s.stages.last() {
                _ if merged => vec![],
                Some(st) => st.kept.clone(),
                None => (0..n_image).collect(),
            };
            let kept_patches: Vec<usize> =
                kept_tokens.iter().filter_map(|&t| to_patch(t)).collect();
            let recall = it.relevant.as_ref().filter(|_| !merged).and_then(|rel| {
                let total = rel.iter().filter(|&&r| r).count();
                (total > 0).then(|| {
                    kept_patches
                        .iter()
                        .filter(|&&p| rel.get(p) == Some(&true))
                        .count() as f64
                        / total as f64
                })
            });
            // `recall` is defined only when some patch is relevant, so `rel` is not empty.
            let random_recall = recall
                .and(it.relevant.as_ref())
                .map(|rel| kept_patches.len().min(rel.len()) as f64 / rel.len() as f64);
            let patch_importance = match s.stages.first() {
                Some(st) => {
                    let mut v = vec![0.0f32; n_patches];
                    for (&t, &imp) in st.ranked.iter().zip(&st.ranking.importance) {
                        if let Some(p) = to_patch(t).filter(|&p| p < n_patches) {
                            v[p] = imp;
                        }
                    }
                    v
                }
                None => vec![],
            };
            recs.push(SampleRecord {
                config: cfg.label.clone(),
                id: it.id.clone(),
                family: it.family.clone(),
                prediction: pred,
                score,
                yes_no: card.samples.last().and_then(|s| s.yes_no),
                kept_after: s.kept_after_last(),
                avg_kept: s.avg_image_tokens(),
                recall,
                random_recall,
                concentration: s.stages.first().map(|st| st.importance_entropy()),
                diversity: s.stages.last().map(|st| st.diversity),
                prefill_ms: g.prefill_secs * 1e3,
                decode_tokens_per_s: if g.decode_secs > 0.0 {
                    g.tokens.len() as f64 / g.decode_secs
                } else {
                    0.0
                },
                prefill_gflops: s.prefill_flops / 1e9,
                decode_gflops: s.decode_flops / 1e9,
                tiles: match anyres {
                    true => TileRecord::of(&s.tiles),
                    false => Vec::new(),
                },
                kept_patches,
                patch_importance,
            });
            on_sample();
        }
        peaks.push(mem::peak_bytes());
        records.extend(recs);
    }
    let infos: Vec<ConfigInfo> = configs.iter().map(SweepConfig::info).collect();
    let summaries = summarize(&infos, &records, &peaks)?;
    Ok((records, summaries))
}

/// The summary of each of `configs` over its records (those whose `config` is its label, in
/// order), with `peak_bytes[i]` the peak memory of `configs[i]`: scores (accuracy, its
/// bootstrap interval, per family, POPE) from a [`Scorecard`] of the records, means of the
/// per-sample columns, speedups relative to the first configuration. [`run`] and
/// `prune-bench merge` both summarise here, so a merged sweep reports what one run would.
pub fn summarize(
    configs: &[ConfigInfo],
    records: &[SampleRecord],
    peak_bytes: &[usize],
) -> Result<Vec<ConfigSummary>> {
    if peak_bytes.len() != configs.len() {
        return Err(Error::arg(
            "peak_bytes",
            format!(
                "{} peaks for {} configurations",
                peak_bytes.len(),
                configs.len()
            ),
        ));
    }
    let mut summaries: Vec<ConfigSummary> = Vec::with_capacity(configs.len());
    for (cfg, &peak_bytes) in configs.iter().zip(peak_bytes) {
        let recs: Vec<&SampleRecord> = records.iter().filter(|r| r.config == cfg.label).collect();
        let card = Scorecard {
            samples: recs
                .iter()
                .map(|r| SampleScore {
                    question_id: r.id.clone(),
                    family: r.family.clone(),
                    prediction: r.prediction.clone(),
                    score: r.score,
                    yes_no: r.yes_no,
                })
                .collect(),
        };
        let prefill_ms = mean(recs.iter().map(|r| r.prefill_ms));
        let prefill_gflops = mean(recs.iter().map(|r| r.prefill_gflops));
        let (base_ms, base_gflops) = summaries
            .first()
            .map(|b| (b.prefill_ms, b.prefill_gflops))
            .unwrap_or((prefill_ms, prefill_gflops));
        summaries.push(ConfigSummary {
            config: cfg.clone(),
            scores: card.summary(),
            kept_after: mean(recs.iter().map(|r| r.kept_after as f64)),
            avg_kept: mean(recs.iter().map(|r| r.avg_kept)),
            recall: mean_opt(recs.iter().map(|r| r.recall)),
            random_recall: mean_opt(recs.iter().map(|r| r.random_recall)),
            concentration: mean_opt(recs.iter().map(|r| r.concentration)),
            diversity: mean_opt(recs.iter().map(|r| r.diversity)),
            prefill_ms,
            decode_tokens_per_s: mean(recs.iter().map(|r| r.decode_tokens_per_s)),
            peak_bytes,
            prefill_gflops,
            flops_speedup: base_gflops / prefill_gflops,
            time_speedup: base_ms / prefill_ms,
        });
    }
    Ok(summaries)
}
