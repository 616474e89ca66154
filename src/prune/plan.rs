//! A pruning plan: stages `(layer K, keep)`, the head and query strategies that rank the image
//! tokens, and whether position ids are renumbered after a stage.

use super::Segment;
use super::before::Reduce;
use super::dart::Dart;
use super::head::{self, HeadStrategy};
use super::query::{self, QueryStrategy};
use super::score::{self, Ranking, SelectedAttention};
use super::sparsevlm::{self, SparseVlm};
use crate::error::{Error, Result};
use std::sync::Arc;

/// How many image tokens a stage keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// A fraction of the prompt's image tokens (all of them, not only the survivors of earlier
    /// stages), rounded up.
    Fraction(f64),
    /// An absolute count.
    Count(usize),
    /// A fraction of the prompt's image tokens rounded down, at least 1: PyramidDrop's
    /// `int(N · ratio)`, per prompt (LLaVA-NeXT's counts vary with the image). Written `0.5N`.
    Floor(f64),
}

impl std::str::FromStr for Keep {
    type Err = Error;

    /// `0.5` is a fraction, `144` (an integer > 1) a count; `1` means everything (fraction 1.0);
    /// `0.5N` a fraction rounded down ([`Keep::Floor`]).
    fn from_str(s: &str) -> Result<Keep> {
        let bad = || {
            Error::arg(
                "keep",
                format!("`{s}` is neither a fraction in (0, 1] nor a token count"),
            )
        };
        if let Some(f) = s.strip_suffix('N') {
            return f.parse::<f64>().map(Keep::Floor).map_err(|_| bad());
        }
        if let Ok(n) = s.parse::<usize>() {
            return Ok(if n <= 1 {
                Keep::Fraction(n as f64)
            } else {
                Keep::Count(n)
            });
        }
        s.parse::<f64>().map(Keep::Fraction).map_err(|_| bad())
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Fraction(x) => write!(f, "{x}"),
            Keep::Count(n) => write!(f, "{n}"),
            Keep::Floor(x) => write!(f, "{x}N"),
        }
    }
}

/// One pruning stage: layers `< layer` see every surviving image token, layers `>= layer` only
/// the kept ones; the ranking uses layer `layer - 1`'s attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub layer: usize,
    pub keep: Keep,
}

/// Where and how to prune the image tokens of one request.
#[derive(Debug, Clone)]
pub struct PrunePlan {
    /// Stages in increasing layer order.
    pub stages: Vec<Stage>,
    /// Which heads vote (PRUNING.md, head strategies).
    pub head: Arc<dyn HeadStrategy>,
    /// Which query positions vote (PRUNING.md, query strategies).
    pub query: Arc<dyn QueryStrategy>,
    /// rho: the fraction of heads kept by every head strategy but `sum`.
    pub head_keep: f64,
    /// Renumber RoPE position ids after each stage (default: keep the original ones, as FastV).
    pub renumber: bool,
    /// What ranks the image tokens at each stage (default: attention, [`Scorer::Attention`]).
    pub scorer: Scorer,
    /// A reduction of the image's features before the LM ([`Reduce`]; the stages, if any,
    /// then prune what it left).
    pub before_lm: Option<Reduce>,
    /// Whose attention ranks at a stage K ([`Scorer::Attention`] and [`Scorer::Random`]):
    /// layer K-1's, as it ran (FastV; default), or layer K's own queries and keys of its input,
    /// computed before it runs (PyramidDrop's `pdrop_rank_drop`).
    pub rank_layer: RankLayer,
    /// LLaVA-NeXT: keep every `image_newline` token (on by default: a row separator costs one
    /// token per row). They count against each stage's budget (the keep fraction is of all
    /// visual tokens, newlines included) and are kept before any ranked token; off, they are
    /// ranked like the tiles' tokens.
    pub keep_newlines: bool,
}

/// Whose attention ranks the image tokens at a stage K ([`PrunePlan::rank_layer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankLayer {
    /// Layer K-1's attention (its cached keys): FastV.
    Previous,
    /// Layer K's projections of its input (layer K-1's output): PyramidDrop.
    Next,
}

/// What ranks the image tokens at a stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scorer {
    /// The attention of the query strategy's rows, weighted by the head strategy (FastV and
    /// its variants; PRUNING.md).
    Attention,
    /// The random-keep baseline: seeded random draws instead of attention
    /// ([`score::random_importance`]); the head strategy is not run (its scores and weights stay
    /// empty in the ranking). The draws depend on the seed alone: give each request its own
    /// seed for independent draws.
    Random(u64),
    /// DART ([`Dart`]): the image tokens least duplicated with a few pivots, no attention
    /// scores. A stage's keep count is DART's budget, of which it keeps
    /// [`Dart::kept_count`] (the official code's rounding). Query and head strategies unused;
    /// LLaVA-NeXT's newlines are image tokens to it, as in the official code (not pinned).
    Dart(Dart),
    /// SparseVLM ([`SparseVlm`]): the attention of text raters chosen by relevance (layer K-1's,
    /// averaged over heads and raters) keeps `min(keep, n - 1)` image tokens, and the pruned
    /// ones are partly recycled into merged tokens placed after the kept ones, which count as
    /// image tokens after the stage ([`SparseVlm::after`]). Query and head strategies unused.
    SparseVlm(SparseVlm),
}

impl Stage {
    /// One stage per layer of `layers`, keeping `keeps`: one value for every stage, or one per
    /// stage. A count that matches neither is an [`Error::Arg`] on `keep`.
    pub fn per_layer(layers: &[usize], keeps: &[Keep]) -> Result<Vec<Stage>> {
        let keep = |i: usize| match keeps.len() {
            1 => Ok(keeps[0]),
            n if n == layers.len() => Ok(keeps[i]),
            n => Err(Error::arg(
                "keep",
                format!(
                    "{n} values for {} stages (give one, or one per layer)",
                    layers.len()
                ),
            )),
        };
        (layers.iter().enumerate())
            .map(|(i, &layer)| {
                Ok(Stage {
                    layer,
                    keep: keep(i)?,
                })
            })
            .collect()
    }
}

impl PrunePlan {
    /// PyramidDrop as published (Xing et al. 2024, github.com/Cooperx521/PyramidDrop,
    /// `llava/model/modeling_llama_pdrop.py`: `pdrop_forward` lines 1220-1268 and
    /// `pdrop_rank_drop` lines 1291-1420; settings from `scripts/v1_5/pdrop_eval/*.sh`): stages
    /// before `layers` (8, 16, 24 for a 32-layer LM) keeping `int(N · ratio)` of the prompt's
    /// N image tokens ([`Keep::Floor`]; ratios 0.5, 0.25, 0.125), LLaVA-1.5's or LLaVA-NeXT's
    /// (`scripts/v1_6/pdrop_eval`, per image's count); each stage ranks by layer K's own
    /// queries and keys of its input ([`RankLayer::Next`]), the last prompt token's attention
    /// averaged over the heads (`last_token`, `sum`), and the positions are renumbered after
    /// every stage, as the official code does; LLaVA-NeXT's newlines are ranked like any image
    /// token (`keep_newlines` off), as there.
    pub fn pdrop(layers: &[usize], ratios: &[f64]) -> Result<Self> {
        if layers.len() != ratios.len() {
            return Err(Error::arg(
                "pdrop",
                format!("{} layers for {} ratios", layers.len(), ratios.len()),
            ));
        }
        let stages = (layers.iter().zip(ratios))
            .map(|(&layer, &r)| Stage {
                layer,
                keep: Keep::Floor(r),
            })
            .collect();
        let mut plan = Self::new(stages);
        plan.rank_layer = RankLayer::Next;
        plan.renumber = true;
        plan.keep_newlines = false;
        Ok(plan)
    }

    /// SparseVLM as published ([`SparseVlm`]): after each sparse layer of `layers` (0-based, the
    /// layer whose attention ranks; the official 2, 6, 15 of 32) keep `keeps[i]` image tokens
    /// (the official tables: [`super::sparsevlm::PUBLISHED`]), recycling the pruned ones, with
    /// the positions renumbered after every stage; LLaVA-NeXT's newlines are ranked like any
    /// image token (`keep_newlines` off), as the official code's visual block is.
    pub fn sparsevlm(layers: &[usize], keeps: &[usize], sparse: SparseVlm) -> Result<Self> {
        if layers.len() != keeps.len() {
            return Err(Error::arg(
                "sparsevlm",
                format!("{} layers for {} budgets", layers.len(), keeps.len()),
            ));
        }
        let stages = (layers.iter().zip(keeps))
            .map(|(&layer, &k)| Stage {
                layer: layer + 1,
                keep: Keep::Count(k.max(1)),
            })
            .collect();
        let mut plan = Self::new(stages);
        plan.scorer = Scorer::SparseVlm(sparse);
        plan.renumber = true;
        plan.keep_newlines = false;
        Ok(plan)
    }

    /// FastV: one stage `(2, 0.5)`, every head (`sum`), the last prompt token as query.
    pub fn fastv() -> Self {
        Self::new(vec![Stage {
            layer: 2,
            keep: Keep::Fraction(0.5),
        }])
    }

    /// A plan with the given stages and FastV's strategies (`sum`, `last_token`).
    pub fn new(stages: Vec<Stage>) -> Self {
        let p = super::StrategyParams::default();
        PrunePlan {
            stages,
            // The default strategies exist by construction.
            head: head::head_strategy("sum", &p).unwrap_or_else(|_| unreachable!()),
            query: query::query_strategy("last_token", &p).unwrap_or_else(|_| unreachable!()),
            head_keep: 0.5,
            renumber: false,
            scorer: Scorer::Attention,
            before_lm: None,
            rank_layer: RankLayer::Previous,
            keep_newlines: true,
        }
    }

    /// Ranks the image tokens of one stage from the selected attention `att` and the query
    /// weights, keeping `keep`, the `pinned` ones first ([`score::top_k_pinned`]): by attention
    /// ([`score::rank`]), at random with [`Scorer::Random`], or by SparseVLM's relation (the
    /// rows weigh the same; `keep` is the stage's budget, [`SparseVlm::select`]).
    pub fn rank(
        &self,
        att: &SelectedAttention,
        query_weights: Vec<f32>,
        keep: usize,
        pinned: &[bool],
    ) -> Ranking {
        let (importance, kept, recycle, query_weights) = match self.scorer {
            Scorer::Random(seed) => {
                let importance = score::random_importance(seed, att.image_cols.len());
                let kept = score::top_k_pinned(&importance, keep, pinned);
                (importance, kept, vec![], query_weights)
            }
            Scorer::SparseVlm(s) => {
                let importance = sparsevlm::relation(att);
                let sel = s.select(&importance, keep, pinned);
                let w = vec![1.0 / att.rows.len().max(1) as f32; att.rows.len()];
                (importance, sel.kept, sel.candidates, w)
            }
            Scorer::Attention | Scorer::Dart(_) => {
                let (head, rho) = (self.head.as_ref(), self.head_keep);
                return score::rank(att, query_weights, head, rho, keep, pinned);
            }
        };
        Ranking {
            query_weights,
            query_rows: att.rows.clone(),
            head_scores: vec![],
            head_weights: vec![],
            kept,
            importance,
            recycle,
        }
    }

    /// The first half of a stage on one sequence whose (prompt) rows have `segments`: the rows
    /// whose attention votes (the query strategy's candidates) and the image rows ranked.
    pub fn targets(&self, segments: &[Segment]) -> (Vec<usize>, Vec<usize>) {
        let image_cols = (0..segments.len())
            .filter(|&i| segments[i] == Segment::Image)
            .collect();
        (self.query.candidates(segments), image_cols)
    }

    /// The second half: ranks the image rows from `att` (the attention of the rows
    /// [`PrunePlan::targets`] chose, however the backend computed it), keeps `keep` (the
    /// `newlines` among `att.image_cols` first with [`PrunePlan::keep_newlines`]), and returns
    /// the ranking with the sequence's surviving rows out of its `rows` (every row that is not a
    /// dropped image row, ascending). The engine, the trainer's pruned forward and the benches
    /// all prune through this, then gather the surviving rows (and RoPE positions).
    pub fn select(
        &self,
        segments: &[Segment],
        att: &SelectedAttention,
        keep: usize,
        rows: usize,
        newlines: &[bool],
    ) -> (Ranking, Vec<usize>) {
        let w = self.query.weights(segments, &att.rows, &att.image_mass());
        let pinned = if self.keep_newlines { newlines } else { &[] };
        let ranking = self.rank(att, w, keep, pinned);
        let kept_rows = self.survivors(&att.image_cols, &ranking.kept, rows);
        (ranking, kept_rows)
    }

    /// The surviving rows out of `rows` when the image rows `image_cols` keep those at `kept`
    /// (indices into `image_cols`): every other row, and the kept image rows, ascending.
    pub fn survivors(&self, image_cols: &[usize], kept: &[usize], rows: usize) -> Vec<usize> {
        let mut survive = vec![true; rows];
        for &c in image_cols {
            survive[c] = false;
        }
        for &k in kept {
            survive[image_cols[k]] = true;
        }
        (0..rows).filter(|&r| survive[r]).collect()
    }

    /// RoPE positions after a stage kept `rows` of a sequence at `positions`: renumbered
    /// `0..` with [`PrunePlan::renumber`], else each kept row's own.
    pub fn positions_after(&self, positions: &[usize], rows: &[usize]) -> Vec<usize> {
        if self.renumber {
            (0..rows.len()).collect()
        } else {
            rows.iter().map(|&r| positions[r]).collect()
        }
    }

    /// Each stage's budget (its [`Keep`] as a count) and the image tokens kept after it, for a
    /// prompt with `n_image` of them: the same unless the scorer rounds its budget
    /// ([`Dart::kept_count`]). An error when the plan does not fit a `num_layers`-layer model
    /// or this many image tokens.
    pub fn budgets(&self, num_layers: usize, n_image: usize) -> Result<Vec<(usize, usize)>> {
        if self.stages.is_empty() && self.before_lm.is_none() {
            return Err(Error::arg("prune plan", "has no stages"));
        }
        if n_image == 0 {
            return Err(Error::arg(
                "prune plan",
                "the prompt has no image tokens to prune (a text-only prompt or a model without a vision tower)",
            ));
        }
        head::check_head_keep(self.head_keep)?;
        let mut prev_layer = 0;
        let mut survivors = n_image;
        let mut counts = Vec::with_capacity(self.stages.len());
        for s in &self.stages {
            if s.layer == 0 || s.layer >= num_layers {
                return Err(Error::arg(
                    "prune layer",
                    format!(
                        "{} is outside the model: a {num_layers}-layer model prunes after layer 1..={}",
                        s.layer,
                        num_layers.saturating_sub(1)
                    ),
                ));
            }
            if s.layer <= prev_layer {
                return Err(Error::arg(
                    "prune layer",
                    format!(
                        "stages must have increasing layers, got {} after {prev_layer}",
                        s.layer
                    ),
                ));
            }
            let k = match s.keep {
                Keep::Fraction(f) if f > 0.0 && f <= 1.0 => (f * n_image as f64).ceil() as usize,
                Keep::Floor(f) if f > 0.0 && f <= 1.0 => ((f * n_image as f64) as usize).max(1),
                Keep::Fraction(f) | Keep::Floor(f) => {
                    return Err(Error::arg(
                        "keep",
                        format!("fraction {f} is outside (0, 1]"),
                    ));
                }
                Keep::Count(c) if c >= 1 && c <= n_image => c,
                Keep::Count(c) => {
                    return Err(Error::arg(
                        "keep",
                        format!("{c} tokens is more than the prompt's {n_image} image tokens"),
                    ));
                }
            };
            if k > survivors {
                return Err(Error::arg(
                    "keep",
                    format!(
                        "stage at layer {} keeps {k} image tokens but only {survivors} survive the earlier stages",
                        s.layer
                    ),
                ));
            }
            let kept = match self.scorer {
                Scorer::Dart(d) => d.kept_count(k, survivors),
                Scorer::SparseVlm(s) => s.after(k, survivors),
                _ => k,
            };
            counts.push((k, kept));
            survivors = kept;
            prev_layer = s.layer;
        }
        Ok(counts)
    }

    /// Image tokens kept after each stage ([`PrunePlan::budgets`]).
    pub fn kept_counts(&self, num_layers: usize, n_image: usize) -> Result<Vec<usize>> {
        Ok(self
            .budgets(num_layers, n_image)?
            .into_iter()
            .map(|(_, kept)| kept)
            .collect())
    }

    /// Image tokens averaged over the `num_layers` decoder layers (as papers report budgets):
    /// `(K_1 N + Σ_i c_i (K_{i+1} - K_i)) / L` with `c_i` kept after stage i and `K_{m+1} = L`.
    pub fn avg_image_tokens(&self, num_layers: usize, n_image: usize) -> Result<f64> {
        let counts = self.kept_counts(num_layers, n_image)?;
        let Some(first) = self.stages.first() else {
            return Ok(n_image as f64);
        };
        let mut total = (first.layer * n_image) as f64;
        for (i, c) in counts.iter().enumerate() {
            let next = self.stages.get(i + 1).map_or(num_layers, |s| s.layer);
            total += (c * (next - self.stages[i].layer)) as f64;
        }
        Ok(total / num_layers as f64)
    }
}

/// PyramidDrop-style stages before `layers` (increasing, in `1..num_layers`) at a given average
/// budget: after the i-th stage (i = 1..m) `c_i = max(1, round(λ^i N))` of the `n_image` image
/// tokens remain, with the ratio λ in (0, 1] solved (bisection, 60 steps) so that
/// `(K_1 N + Σ_i λ^i N (K_{i+1} - K_i)) / L` equals `avg`, the image tokens averaged over the
/// `num_layers` layers. Returns λ and the stages (counts); rounding moves the realised average by
/// at most half a token per stage. An error names the budget when no λ reaches it: below
/// `K_1 N / L` the first stage comes too late, above N nothing is pruned.
pub fn pyramid(
    layers: &[usize],
    num_layers: usize,
    n_image: usize,
    avg: f64,
) -> Result<(f64, Vec<Stage>)> {
    let bad = |m: String| Error::arg("pyramid", m);
    if layers.is_empty() {
        return Err(bad("needs at least one stage layer".into()));
    }
    if let Some(w) = layers.windows(2).find(|w| w[1] <= w[0]) {
        return Err(bad(format!(
            "stage layers must increase, got {} after {}",
            w[1], w[0]
        )));
    }
    if let Some(&l) = layers.iter().find(|&&l| l == 0 || l >= num_layers) {
        return Err(bad(format!(
            "layer {l} is outside the model: a {num_layers}-layer model prunes after layer 1..={}",
            num_layers.saturating_sub(1)
        )));
    }
    let n = n_image as f64;
    let lambda_avg = |lam: f64| {
        let mut total = layers[0] as f64 * n;
        for (i, &l) in layers.iter().enumerate() {
            let next = layers.get(i + 1).copied().unwrap_or(num_layers);
            total += lam.powi(i as i32 + 1) * n * (next - l) as f64;
        }
        total / num_layers as f64
    };
    let (lo_avg, hi_avg) = (lambda_avg(0.0), lambda_avg(1.0));
    if !(avg > lo_avg && avg <= hi_avg) {
        return Err(bad(format!(
            "an average of {avg:.1} image tokens per layer is out of reach of stages at {layers:?}: \
             it must lie in ({lo_avg:.1}, {hi_avg:.1}]"
        )));
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if lambda_avg(mid) < avg {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let lam = 0.5 * (lo + hi);
    let stages = layers
        .iter()
        .enumerate()
        .map(|(i, &layer)| Stage {
            layer,
            keep: Keep::Count(((lam.powi(i as i32 + 1) * n).round() as usize).max(1)),
        })
        .collect();
    Ok((lam, stages))
}

/// The setting `x` in `[lo, hi]` whose realised image-token average `realised(x)` comes nearest
/// `target`, for a `realised` that does not fall as `x` grows (`None` where no plan fits):
/// 50 steps of bisection, then the nearer end of the last bracket. Returns `x` and its distance
/// `|realised(x) - target|`; `None` when neither end realises a plan. Matches a method whose
/// plan rounds (PyramidDrop's λ in `--avg-budget`, SparseVLM's budget scale) to an average.
pub(crate) fn nearest_setting(
    realised: impl Fn(f64) -> Option<f64>,
    target: f64,
    (mut lo, mut hi): (f64, f64),
) -> Option<(f64, f64)> {
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        match realised(mid) {
            Some(a) if a < target => lo = mid,
            _ => hi = mid,
        }
    }
    [lo, hi]
        .into_iter()
        .filter_map(|x| realised(x).map(|a| (x, (a - target).abs())))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdrop_as_published() {
        // 8, 16, 24 of 32 layers keeping int(576 x 0.5^i), positions renumbered, ranked by the
        // next layer's own projections.
        let p = PrunePlan::pdrop(&[8, 16, 24], &[0.5, 0.25, 0.125]).unwrap();
        assert_eq!(p.kept_counts(32, 576).unwrap(), vec![288, 144, 72]);
        assert!(p.renumber && p.rank_layer == RankLayer::Next);
        // int() floors: 25 x 0.5 keeps 12, 25 x 0.25 keeps 6; never fewer than 1.
        let p = PrunePlan::pdrop(&[1, 2], &[0.5, 0.25]).unwrap();
        assert_eq!(p.kept_counts(3, 25).unwrap(), vec![12, 6]);
        assert_eq!(p.kept_counts(3, 3).unwrap(), vec![1, 1]);
        assert!(PrunePlan::pdrop(&[1], &[0.5, 0.25]).is_err());
        assert!(
            PrunePlan::pdrop(&[1], &[1.5])
                .unwrap()
                .kept_counts(3, 25)
                .is_err()
        );
        let k: Keep = "0.25N".parse().unwrap();
        assert_eq!((k, k.to_string()), (Keep::Floor(0.25), "0.25N".to_string()));
    }

    #[test]
    fn counts_round_up_and_bad_plans_are_refused() {
        let mut p = PrunePlan::fastv();
        assert_eq!(p.kept_counts(32, 576).unwrap(), vec![288]);
        assert_eq!(p.kept_counts(3, 25).unwrap(), vec![13]);
        p.stages.push(Stage {
            layer: 8,
            keep: Keep::Count(100),
        });
        assert_eq!(p.kept_counts(32, 576).unwrap(), vec![288, 100]);
        let err = |p: &PrunePlan, n| p.kept_counts(3, n).unwrap_err().to_string();
        assert!(err(&p, 25).contains("outside the model"));
        let bad = |keep| PrunePlan::new(vec![Stage { layer: 1, keep }]);
        assert!(err(&bad(Keep::Fraction(0.0)), 25).contains("outside (0, 1]"));
        assert!(err(&bad(Keep::Fraction(1.5)), 25).contains("outside (0, 1]"));
        assert!(err(&bad(Keep::Count(26)), 25).contains("more than the prompt's 25"));
        assert!(err(&bad(Keep::Count(3)), 0).contains("no image tokens"));
        let two = PrunePlan::new(vec![
            Stage {
                layer: 1,
                keep: Keep::Count(5),
            },
            Stage {
                layer: 2,
                keep: Keep::Fraction(0.5),
            },
        ]);
        assert!(err(&two, 25).contains("only 5 survive"));
        let order = PrunePlan::new(vec![
            Stage {
                layer: 2,
                keep: Keep::Count(5),
            },
            Stage {
                layer: 1,
                keep: Keep::Count(3),
            },
        ]);
        assert!(err(&order, 25).contains("increasing"));
        assert_eq!("0.25".parse::<Keep>().unwrap(), Keep::Fraction(0.25));
        assert_eq!("144".parse::<Keep>().unwrap(), Keep::Count(144));
        assert_eq!("1".parse::<Keep>().unwrap(), Keep::Fraction(1.0));
        assert!("half".parse::<Keep>().is_err());
    }

    #[test]
    fn pyramid_matches_the_single_stage_budget() {
        // FastV (2, 0.25) on a 4-layer model with 144 image tokens: (2*144 + 2*36) / 4 = 90.
        let single = PrunePlan::new(vec![Stage {
            layer: 2,
            keep: Keep::Fraction(0.25),
        }]);
        let avg = single.avg_image_tokens(4, 144).unwrap();
        assert_eq!(avg, 90.0);
        // Stages at 1, 2, 3: 144 + 144 (λ + λ² + λ³) = 360, so λ + λ² + λ³ = 1.5.
        let (lam, stages) = pyramid(&[1, 2, 3], 4, 144, avg).unwrap();
        assert!((lam + lam * lam + lam.powi(3) - 1.5).abs() < 1e-9, "{lam}");
        let counts: Vec<Keep> = stages.iter().map(|s| s.keep).collect();
        let want = |p: i32| Keep::Count((lam.powi(p) * 144.0).round() as usize);
        assert_eq!(counts, vec![want(1), want(2), want(3)]);
        let plan = PrunePlan::new(stages);
        let realised = plan.avg_image_tokens(4, 144).unwrap();
        assert!((realised - 90.0).abs() <= 1.5 / 4.0 * 3.0, "{realised}");
        // One stage is the single-stage plan itself.
        let (lam1, one) = pyramid(&[2], 4, 144, avg).unwrap();
        assert!((lam1 - 0.25).abs() < 1e-9);
        assert_eq!(one[0].keep, Keep::Count(36));
        let err = |l: &[usize], a| pyramid(l, 4, 144, a).unwrap_err().to_string();
        assert!(err(&[3], 90.0).contains("out of reach"));
        assert!(err(&[1, 4], 90.0).contains("outside the model"));
        assert!(err(&[2, 2], 90.0).contains("must increase"));
        assert!(err(&[], 90.0).contains("at least one"));
        assert!(err(&[1], 200.0).contains("out of reach"));
    }
}
