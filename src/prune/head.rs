//! Head strategies: the weights beta over heads in s = sum_h beta_h a_h (PRUNING.md, "Head
//! strategies"). a_h is head h's attention over the N image tokens still present.
//!
//! Conventions of the built-in scores:
//! - Computed in f64 from the values of a_h sorted ascending, then rounded to f32: a head's score
//!   does not depend on the order of its image tokens, so heads that are permutations of each other
//!   tie exactly (and the tie goes to the lower head index).
//! - p = a_h / sum(a_h); when sum(a_h) is not positive (a head that pays the image no attention),
//!   p is uniform (1/N each). Entropies use the natural log with 0 ln 0 = 0.
//! - N = 0 (no image tokens): every score is 0.
//! - A NaN score ranks below every other in [`top_heads`].

use std::cmp::Ordering;
use std::sync::Arc;

use super::StrategyParams;
use crate::error::{Error, Result};

/// How heads are scored and weighted.
pub trait HeadStrategy: Send + Sync + std::fmt::Debug {
    /// CLI spelling.
    fn name(&self) -> String;
    /// One score per head (higher = kept) from `a[h]`, head h's attention over the N image tokens
    /// (a_h of PRUNING.md).
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32>;
    /// Head weights beta (sum 1). Default: the top ceil(head_keep * H) heads by score (ties ->
    /// lower head index), equal weights.
    fn weights(&self, scores: &[f32], head_keep: f64) -> Vec<f32> {
        top_heads(scores, head_keep)
    }
}

/// CLI names of the built-in head strategies, in PRUNING.md's order.
pub const HEAD_STRATEGIES: [&str; 9] = [
    "sum",
    "variance",
    "entropy",
    "max_attention",
    "attention_range",
    "sparsity",
    "top_k_sum",
    "weighted_quality",
    "gini_coefficient",
];

/// The built-in head strategy called `name` (one of [`HEAD_STRATEGIES`]), with its parameters from
/// `p`. Errors on an unknown name (the message lists the valid ones) and on `top_k == Some(0)`.
pub fn head_strategy(name: &str, p: &StrategyParams) -> Result<Arc<dyn HeadStrategy>> {
    if p.top_k == Some(0) {
        return Err(Error::arg("top-k", "must be at least 1, got 0"));
    }
    Ok(match name {
        "sum" => Arc::new(Sum),
        "variance" => Arc::new(Variance),
        "entropy" => Arc::new(Entropy),
        "max_attention" => Arc::new(MaxAttention),
        "attention_range" => Arc::new(AttentionRange),
        "sparsity" => Arc::new(Sparsity),
        "top_k_sum" => Arc::new(TopKSum { k: p.top_k }),
        "weighted_quality" => Arc::new(WeightedQuality),
        "gini_coefficient" => Arc::new(GiniCoefficient),
        _ => {
            return Err(Error::arg(
                "head",
                format!(
                    "unknown strategy `{name}`; valid: {}",
                    HEAD_STRATEGIES.join(", ")
                ),
            ));
        }
    })
}

/// `--head-keep` must lie in (0, 1].
pub fn check_head_keep(head_keep: f64) -> Result<()> {
    if head_keep > 0.0 && head_keep <= 1.0 {
        Ok(())
    } else {
        Err(Error::arg(
            "head-keep",
            format!("must be in (0, 1], got {head_keep}"),
        ))
    }
}

/// How many of `h` heads `head_keep` keeps: ceil(head_keep * h), within [1, h] (0 when h = 0).
/// The product is taken with a 1e-9 tolerance so that 0.07 * 100 = 7.000000000000001 keeps 7.
pub fn heads_kept(h: usize, head_keep: f64) -> usize {
    let k = (head_keep * h as f64 - 1e-9).ceil();
    if k.is_nan() {
        return h.min(1);
    }
    (k.max(1.0) as usize).min(h)
}

/// Equal weights 1/k on the k = [`heads_kept`] heads with the highest scores (ties -> lower head
/// index, NaN lowest), 0 elsewhere.
pub fn top_heads(scores: &[f32], head_keep: f64) -> Vec<f32> {
    let h = scores.len();
    let k = heads_kept(h, head_keep);
    // Descending score, NaN after every number, then ascending index.
    let mut order: Vec<usize> = (0..h).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (scores[i], scores[j]);
        let by_score = match (a.is_nan(), b.is_nan()) {
            (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
            (nan_a, nan_b) => nan_a.cmp(&nan_b),
        };
        by_score.then(i.cmp(&j))
    });
    let mut w = vec![0.0; h];
    for &i in &order[..k] {
        w[i] = 1.0 / k as f32;
    }
    w
}

/// a_h in f64, ascending (NaN last).
fn sorted(a: &[f32]) -> Vec<f64> {
    let mut x: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    x.sort_by(f64::total_cmp);
    x
}

/// p = x / sum(x), uniform when sum(x) is not positive; ascending when x is.
fn distribution(x: &[f64]) -> Vec<f64> {
    let total: f64 = x.iter().sum();
    if total > 0.0 {
        x.iter().map(|&v| v / total).collect()
    } else {
        vec![1.0 / x.len() as f64; x.len()]
    }
}

/// H(p) = -sum p ln p (0 ln 0 = 0).
fn entropy(p: &[f64]) -> f64 {
    -p.iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| v * v.ln())
        .sum::<f64>()
}

/// `f` of each head's sorted values, 0 for a head without image tokens.
fn per_head(a: &[Vec<f32>], f: impl Fn(&[f64]) -> f64) -> Vec<f32> {
    a.iter()
        .map(|h| {
            if h.is_empty() {
                0.0
            } else {
                f(&sorted(h)) as f32
            }
        })
        .collect()
}

/// Plain FastV: beta_h = 1/H for every head, whatever `head_keep`. Score sum(a_h), only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum;

impl HeadStrategy for Sum {
    fn name(&self) -> String {
        "sum".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| x.iter().sum())
    }
    fn weights(&self, scores: &[f32], _head_keep: f64) -> Vec<f32> {
        vec![1.0 / scores.len() as f32; scores.len()]
    }
}

/// Population variance: (1/N) sum_i (a_i - mean)^2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Variance;

impl HeadStrategy for Variance {
    fn name(&self) -> String {
        "variance".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| {
            let n = x.len() as f64;
            let mean = x.iter().sum::<f64>() / n;
            x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f64>() / n
        })
    }
}

/// -H(p) = sum_i p_i ln p_i: low-entropy (focused) heads are kept; -ln N for a head with no image
/// attention (uniform p).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entropy;

impl HeadStrategy for Entropy {
    fn name(&self) -> String {
        "entropy".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| -entropy(&distribution(x)))
    }
}

/// max_i a_i.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaxAttention;

impl HeadStrategy for MaxAttention {
    fn name(&self) -> String {
        "max_attention".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| x[x.len() - 1])
    }
}

/// max_i a_i - min_i a_i.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionRange;

impl HeadStrategy for AttentionRange {
    fn name(&self) -> String {
        "attention_range".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| x[x.len() - 1] - x[0])
    }
}

/// ||p||_2 = sqrt(sum_i p_i^2): 1 for a one-hot head, 1/sqrt(N) for a uniform one (and for a head
/// with no image attention).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sparsity;

impl HeadStrategy for Sparsity {
    fn name(&self) -> String {
        "sparsity".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| {
            distribution(x).iter().map(|&p| p * p).sum::<f64>().sqrt()
        })
    }
}

/// Sum of the k largest a_i; k = ceil(0.1 N) when `None` (integer arithmetic: (N + 9) / 10), and
/// clamped to [1, N].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopKSum {
    pub k: Option<usize>,
}

impl TopKSum {
    /// The k used for N image tokens.
    pub fn k_for(&self, n: usize) -> usize {
        self.k.unwrap_or(n.div_ceil(10)).max(1).min(n)
    }
}

impl HeadStrategy for TopKSum {
    fn name(&self) -> String {
        "top_k_sum".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| {
            let k = self.k_for(x.len());
            x[x.len() - k..].iter().sum()
        })
    }
}

/// Mean of three terms, each min-max normalised across heads ((t - min) / (max - min), 0 for every
/// head when all heads are equal):
/// concentration 1 - H(p)/ln N (1 when N = 1, where ln N = 0), sharpness max(p) * N, coverage
/// sum(a_h).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightedQuality;

impl HeadStrategy for WeightedQuality {
    fn name(&self) -> String {
        "weighted_quality".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        let terms: Vec<[f64; 3]> = a
            .iter()
            .map(|h| {
                if h.is_empty() {
                    return [0.0; 3];
                }
                let x = sorted(h);
                let n = x.len() as f64;
                let p = distribution(&x);
                let concentration = if x.len() > 1 {
                    1.0 - entropy(&p) / n.ln()
                } else {
                    1.0
                };
                let sharpness = p[p.len() - 1] * n;
                let coverage: f64 = x.iter().sum();
                [concentration, sharpness, coverage]
            })
            .collect();
        let mut score = vec![0.0f64; a.len()];
        for t in 0..3 {
            let lo = terms.iter().map(|v| v[t]).fold(f64::INFINITY, f64::min);
            let hi = terms.iter().map(|v| v[t]).fold(f64::NEG_INFINITY, f64::max);
            if hi > lo {
                for (s, v) in score.iter_mut().zip(&terms) {
                    *s += (v[t] - lo) / (hi - lo);
                }
            }
        }
        score.iter().map(|&s| (s / 3.0) as f32).collect()
    }
}

/// Gini(a_h) = sum_i sum_j |a_i - a_j| / (2 N sum a), computed in O(N log N) from the ascending
/// order x_(1) <= ... <= x_(N) as sum_i (2i - N - 1) x_(i) / (N sum x). 0 when sum(a_h) is not
/// positive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GiniCoefficient;

impl HeadStrategy for GiniCoefficient {
    fn name(&self) -> String {
        "gini_coefficient".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        per_head(a, |x| {
            let n = x.len() as f64;
            let total: f64 = x.iter().sum();
            if total <= 0.0 {
                return 0.0;
            }
            let weighted: f64 = x
                .iter()
                .enumerate()
                .map(|(i, &v)| (2.0 * (i + 1) as f64 - n - 1.0) * v)
                .sum();
            weighted / (n * total)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 heads x 5 image tokens:
    /// h0 uniform [.25; 5] (sum 1.25, p = .2 each), h1 one-hot [0, 0, 1, 0, 0] (sum 1),
    /// h2 two-peak [.75, 0, 0, .75, .5] (sum 2, p = .375, 0, 0, .375, .25), h3 all-zero (p uniform).
    fn heads() -> Vec<Vec<f32>> {
        vec![
            vec![0.25; 5],
            vec![0.0, 0.0, 1.0, 0.0, 0.0],
            vec![0.75, 0.0, 0.0, 0.75, 0.5],
            vec![0.0; 5],
        ]
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    const T: f32 = 1.0 / 3.0;
    /// Selected heads for the ranking h1 > h2 > h0 >= h3 (h0 before h3 on a tie):
    /// head_keep 1.0 -> 4 heads, .75 -> 3, .5 -> 2, .25 -> 1.
    const RANK_1203: [(f64, [f32; 4]); 4] = [
        (1.0, [0.25; 4]),
        (0.75, [T, T, T, 0.0]),
        (0.5, [0.0, 0.5, 0.5, 0.0]),
        (0.25, [0.0, 1.0, 0.0, 0.0]),
    ];

    fn check(s: &dyn HeadStrategy, want_scores: &[f32], want_weights: &[(f64, [f32; 4])]) {
        let scores = s.scores(&heads());
        close(&scores, want_scores);
        for (keep, w) in want_weights {
            close(&s.weights(&scores, *keep), w);
        }
    }

    #[test]
    fn sum() {
        // 5 * .25 = 1.25, 1, .75 + .75 + .5 = 2, 0; every head 1/4 whatever head_keep.
        let all = [0.25; 4];
        check(
            &Sum,
            &[1.25, 1.0, 2.0, 0.0],
            &[(1.0, all), (0.5, all), (0.25, all)],
        );
    }

    #[test]
    fn variance() {
        // h0: 0. h1: mean .2, (4 * .04 + .64) / 5 = .16.
        // h2: mean .4, deviations .35, -.4, -.4, .35, .1 -> (2 * .1225 + 2 * .16 + .01) / 5 = .115.
        // h3: 0 (ties h0).
        check(&Variance, &[0.0, 0.16, 0.115, 0.0], &RANK_1203);
    }

    #[test]
    fn entropy() {
        // h0, h3: p = .2 -> -H = ln .2 = -1.6094379 (exact tie).  h1: 0.
        // h2: 2 * .375 ln .375 + .25 ln .25 = .75 * -0.9808293 + .25 * -1.3862944
        //     = -0.7356219 - 0.3465736 = -1.0821955.
        check(
            &Entropy,
            &[-1.609_438, 0.0, -1.082_195_5, -1.609_438],
            &RANK_1203,
        );
    }

    #[test]
    fn max_attention() {
        // .25, 1, .75, 0.
        check(&MaxAttention, &[0.25, 1.0, 0.75, 0.0], &RANK_1203);
    }

    #[test]
    fn attention_range() {
        // .25 - .25 = 0, 1 - 0, .75 - 0, 0 - 0 (h0, h3 tie).
        check(&AttentionRange, &[0.0, 1.0, 0.75, 0.0], &RANK_1203);
    }

    #[test]
    fn sparsity() {
        // h0, h3: sqrt(5 * .04) = sqrt(.2) = 0.4472136 (exact tie). h1: 1.
        // h2: sqrt(2 * .140625 + .0625) = sqrt(.34375) = 0.5863020.
        check(
            &Sparsity,
            &[0.447_213_6, 1.0, 0.586_302, 0.447_213_6],
            &RANK_1203,
        );
    }

    #[test]
    fn top_k_sum() {
        // Default k = ceil(.1 * 5) = 1: the max, .25, 1, .75, 0.
        check(&TopKSum::default(), &[0.25, 1.0, 0.75, 0.0], &RANK_1203);
        // k = 2: .25 + .25 = .5, 1 + 0 = 1, .75 + .75 = 1.5, 0 -> ranking h2, h1, h0, h3.
        check(
            &TopKSum { k: Some(2) },
            &[0.5, 1.0, 1.5, 0.0],
            &[
                (1.0, [0.25; 4]),
                (0.75, [T, T, T, 0.0]),
                (0.5, [0.0, 0.5, 0.5, 0.0]),
                (0.25, [0.0, 0.0, 1.0, 0.0]),
            ],
        );
        // k larger than N: all of them, 1.25, 1, 2, 0.
        let s = TopKSum { k: Some(9) }.scores(&heads());
        close(&s, &[1.25, 1.0, 2.0, 0.0]);
        // ceil(.1 N) in integers: N = 11 -> 2, N = 30 -> 3, N = 576 -> 58, N = 1 -> 1, N = 0 -> 0.
        let d = TopKSum::default();
        assert_eq!(
            [
                d.k_for(11),
                d.k_for(30),
                d.k_for(576),
                d.k_for(1),
                d.k_for(0)
            ],
            [2, 3, 58, 1, 0]
        );
        // N = 11 with values 0..=10: k = 2 -> 10 + 9 = 19.
        let a: Vec<f32> = (0..11).map(|v| v as f32).collect();
        close(&d.scores(&[a]), &[19.0]);
    }

    #[test]
    fn weighted_quality() {
        // concentration 1 - H/ln 5: h0 0, h1 1, h2 1 - 1.0821955 / 1.6094379 = 0.3275941, h3 0;
        //   min 0, max 1 -> unchanged.
        // sharpness 5 max(p): 1, 5, 5 * .375 = 1.875, 1 -> (x - 1) / 4: 0, 1, .21875, 0.
        // coverage 1.25, 1, 2, 0 -> x / 2: .625, .5, 1, 0.
        // mean: h0 .625 / 3 = 0.2083333, h1 2.5 / 3 = 0.8333333,
        //       h2 (0.3275941 + .21875 + 1) / 3 = 0.5154480, h3 0.
        check(
            &WeightedQuality,
            &[0.208_333_33, 0.833_333_3, 0.515_448, 0.0],
            &RANK_1203,
        );
    }

    #[test]
    fn weighted_quality_degenerate() {
        // N = 1: concentration 1 and sharpness 1 * 1 for both heads -> normalised 0;
        // coverage .5, .3 -> 1, 0. Scores 1/3, 0.
        close(
            &WeightedQuality.scores(&[vec![0.5], vec![0.3]]),
            &[1.0 / 3.0, 0.0],
        );
        // All heads equal: every term normalises to 0.
        let same = vec![vec![0.1, 0.7, 0.2]; 3];
        close(&WeightedQuality.scores(&same), &[0.0; 3]);
    }

    #[test]
    fn gini_coefficient() {
        // h0: 0. h1: sorted 0,0,0,0,1: (2*5 - 6) * 1 / (5 * 1) = .8
        //   (pairwise: 8 ordered pairs with |1 - 0| = 1 -> 8 / (2 * 5 * 1) = .8).
        // h2: sorted 0, 0, .5, .75, .75: (0 * .5 + 2 * .75 + 4 * .75) / (5 * 2) = 4.5 / 10 = .45
        //   (pairwise: 4 * .75 + 2 * .25 + 2 * .5 = 4.5 unordered -> 9 / 20 = .45).
        // h3: sum 0 -> 0 (ties h0).
        check(&GiniCoefficient, &[0.0, 0.8, 0.45, 0.0], &RANK_1203);
    }

    #[test]
    fn gini_matches_pairwise_definition() {
        // The O(N log N) form against the literal double sum on an irregular vector.
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32 * 0.01).collect();
        let n = x.len() as f64;
        let total: f64 = x.iter().map(|&v| v as f64).sum();
        let mut pairs = 0.0f64;
        for &a in &x {
            for &b in &x {
                pairs += (a as f64 - b as f64).abs();
            }
        }
        let want = (pairs / (2.0 * n * total)) as f32;
        let got = GiniCoefficient.scores(&[x])[0];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn no_image_tokens_and_no_heads() {
        for name in HEAD_STRATEGIES {
            let s = head_strategy(name, &StrategyParams::default()).unwrap();
            close(&s.scores(&[vec![], vec![]]), &[0.0, 0.0]);
            assert!(s.scores(&[]).is_empty(), "{name}");
            assert!(s.weights(&[], 0.5).is_empty(), "{name}");
        }
    }

    #[test]
    fn single_token() {
        // N = 1: p = [1] -> entropy 0, sparsity 1, gini 0 (a single value has no spread).
        let a = [vec![0.5], vec![0.0]];
        close(&Entropy.scores(&a), &[0.0, 0.0]);
        close(&Sparsity.scores(&a), &[1.0, 1.0]);
        close(&GiniCoefficient.scores(&a), &[0.0, 0.0]);
    }

    #[test]
    fn permuted_heads_tie_exactly() {
        // Same values in a different order: every score ties bit for bit, so head 0 wins at 1/2.
        let a = [vec![0.1, 0.5, 0.4, 0.3], vec![0.4, 0.3, 0.1, 0.5]];
        for name in HEAD_STRATEGIES {
            let s = head_strategy(name, &StrategyParams::default()).unwrap();
            let scores = s.scores(&a);
            assert_eq!(scores[0].to_bits(), scores[1].to_bits(), "{name}");
            if name != "sum" {
                assert_eq!(s.weights(&scores, 0.5), vec![1.0, 0.0], "{name}");
            }
        }
    }

    #[test]
    fn top_heads_ties_and_rounding() {
        // Tie at the top: .9 at heads 1 and 2 -> head 1.
        close(
            &top_heads(&[0.3, 0.9, 0.9, 0.1], 0.25),
            &[0.0, 1.0, 0.0, 0.0],
        );
        // Tie at the cut: .5 at heads 0, 2, 3, two kept -> heads 0 and 2.
        close(
            &top_heads(&[0.5, 0.2, 0.5, 0.5], 0.5),
            &[0.5, 0.0, 0.5, 0.0],
        );
        // NaN ranks last, below -inf.
        close(
            &top_heads(&[f32::NAN, f32::NEG_INFINITY, 0.0], 0.5),
            &[0.0, 0.5, 0.5],
        );
        // ceil(.4 * 4) = ceil(1.6) = 2; ceil(.3 * 5) = 2; at least one head: ceil(.01 * 4) = 1.
        assert_eq!(heads_kept(4, 0.4), 2);
        assert_eq!(heads_kept(5, 0.3), 2);
        assert_eq!(heads_kept(4, 0.01), 1);
        // 0.07 * 100 = 7.000000000000001 in f64: 7 heads, not 8.
        assert_eq!(heads_kept(100, 0.07), 7);
        assert_eq!(heads_kept(32, 1.0), 32);
        assert_eq!(heads_kept(0, 0.5), 0);
    }

    #[test]
    fn head_keep_range() {
        assert!(check_head_keep(1.0).is_ok());
        assert!(check_head_keep(0.001).is_ok());
        for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            let err = check_head_keep(bad).unwrap_err().to_string();
            assert!(err.contains("head-keep"), "{err}");
        }
    }

    #[test]
    fn registry_round_trip() {
        for name in HEAD_STRATEGIES {
            let s = head_strategy(name, &StrategyParams::default()).unwrap();
            assert_eq!(s.name(), name);
        }
        // top_k reaches top_k_sum: k = 2 -> .5, 1, 1.5, 0.
        let p = StrategyParams {
            top_k: Some(2),
            ..StrategyParams::default()
        };
        let s = head_strategy("top_k_sum", &p).unwrap();
        close(&s.scores(&heads()), &[0.5, 1.0, 1.5, 0.0]);
    }

    #[test]
    fn registry_errors() {
        let err = head_strategy("median", &StrategyParams::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`head`"), "{err}");
        assert!(err.contains("unknown strategy `median`"), "{err}");
        for name in HEAD_STRATEGIES {
            assert!(err.contains(name), "{err} lacks {name}");
        }
        let p = StrategyParams {
            top_k: Some(0),
            ..StrategyParams::default()
        };
        let err = head_strategy("top_k_sum", &p).unwrap_err().to_string();
        assert!(err.contains("top-k"), "{err}");
    }

    /// A user strategy: keep the heads that attend least to the image (default weights).
    #[derive(Debug)]
    struct LeastAttention;

    impl HeadStrategy for LeastAttention {
        fn name(&self) -> String {
            "least_attention".into()
        }
        fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
            a.iter().map(|h| -h.iter().sum::<f32>()).collect()
        }
    }

    #[test]
    fn user_strategy() {
        let s: Arc<dyn HeadStrategy> = Arc::new(LeastAttention);
        // Scores -1.25, -1, -2, 0 -> top 2: h3 (0), h1 (-1).
        let scores = s.scores(&heads());
        close(&scores, &[-1.25, -1.0, -2.0, 0.0]);
        close(&s.weights(&scores, 0.5), &[0.0, 0.5, 0.0, 0.5]);
        assert_eq!(s.name(), "least_attention");
    }
}
