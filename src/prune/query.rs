//! Query strategies: which prompt positions' attention rows rank the image tokens, and their
//! weights w (PRUNING.md, "Query strategies").
//!
//! Notation over the current sequence at the ranking layer (a later stage sees fewer Image
//! positions): L its length, V the Image positions, T the Text positions, P the non-image
//! positions, "P after the image" the positions after the last Image position (all non-image; all
//! of P when there is no Image position), m_q the image mass of position q.
//!
//! Degenerate cases, one rule for all: when the set a strategy draws from is empty (no Text, no
//! position after the image, no non-image position), it falls back to `last_token` (position L-1,
//! whatever its segment); an empty sequence has no candidates and no weights. Weights proportional
//! to m_q become uniform when every m_q is zero; a negative or non-finite m_q counts as zero.

use std::sync::Arc;

use super::{Segment, StrategyParams};
use crate::error::{Error, Result};

/// How the attention rows of prompt positions are chosen and weighted.
pub trait QueryStrategy: Send + Sync + std::fmt::Debug {
    /// CLI spelling.
    fn name(&self) -> String;
    /// Prompt positions whose attention rows the strategy needs (ascending); only these rows are
    /// ever scored.
    fn candidates(&self, segments: &[Segment]) -> Vec<usize>;
    /// Weights w over `candidates` (same order, non-negative, sum 1). `image_mass[i]` is m_q of
    /// `candidates[i]`: the mean over heads of the attention that position pays to the image tokens.
    fn weights(&self, segments: &[Segment], candidates: &[usize], image_mass: &[f32]) -> Vec<f32>;
}

/// CLI names of the built-in query strategies, in PRUNING.md's order.
pub const QUERY_STRATEGIES: [&str; 9] = [
    "last_token",
    "last_n_tokens",
    "last_5_tokens",
    "text_tokens_only",
    "weighted_recent",
    "system_and_text",
    "attention_weighted",
    "max_attention_token",
    "adaptive_by_length",
];

/// The built-in query strategy called `name` (one of [`QUERY_STRATEGIES`]), with its parameters
/// from `p`. Errors on an unknown name (the message lists the valid ones) and on `query_n == 0`.
pub fn query_strategy(name: &str, p: &StrategyParams) -> Result<Arc<dyn QueryStrategy>> {
    if p.query_n == 0 {
        return Err(Error::arg("query-n", "must be at least 1, got 0"));
    }
    Ok(match name {
        "last_token" => Arc::new(LastToken),
        "last_n_tokens" => Arc::new(LastNTokens { n: p.query_n }),
        "last_5_tokens" => Arc::new(Last5Tokens),
        "text_tokens_only" => Arc::new(TextTokensOnly),
        "weighted_recent" => Arc::new(WeightedRecent),
        "system_and_text" => Arc::new(SystemAndText),
        "attention_weighted" => Arc::new(AttentionWeighted),
        "max_attention_token" => Arc::new(MaxAttentionToken),
        "adaptive_by_length" => Arc::new(AdaptiveByLength { tau: p.tau }),
        _ => {
            return Err(Error::arg(
                "query",
                format!(
                    "unknown strategy `{name}`; valid: {}",
                    QUERY_STRATEGIES.join(", ")
                ),
            ));
        }
    })
}

/// `[L-1]`, or nothing for an empty sequence.
fn last(segments: &[Segment]) -> Vec<usize> {
    segments.len().checked_sub(1).into_iter().collect()
}

/// `positions`, or `last_token`'s when empty.
fn or_last(positions: Vec<usize>, segments: &[Segment]) -> Vec<usize> {
    if positions.is_empty() {
        last(segments)
    } else {
        positions
    }
}

/// Positions whose segment satisfies `keep`.
fn positions(segments: &[Segment], keep: impl Fn(Segment) -> bool) -> Vec<usize> {
    (0..segments.len()).filter(|&i| keep(segments[i])).collect()
}

/// P after the image: the positions after the last Image position (all of P without one).
fn after_image(segments: &[Segment]) -> Vec<usize> {
    let start = segments
        .iter()
        .rposition(|&s| s == Segment::Image)
        .map_or(0, |i| i + 1);
    (start..segments.len()).collect()
}

/// 1/n each.
fn uniform(n: usize) -> Vec<f32> {
    vec![1.0 / n as f32; n]
}

/// The image mass of candidate `i` as used in weights: negative, non-finite or missing is 0.
fn mass(image_mass: &[f32], i: usize) -> f64 {
    match image_mass.get(i) {
        Some(&m) if m.is_finite() && m > 0.0 => m as f64,
        _ => 0.0,
    }
}

/// `values` normalised to sum 1 (in f64), uniform when they sum to 0.
fn proportional(values: &[f64]) -> Vec<f32> {
    let total: f64 = values.iter().sum();
    if total > 0.0 {
        values.iter().map(|&v| (v / total) as f32).collect()
    } else {
        uniform(values.len())
    }
}

/// FastV: w = 1 on position L-1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastToken;

impl QueryStrategy for LastToken {
    fn name(&self) -> String {
        "last_token".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        last(segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        uniform(candidates.len())
    }
}

/// w = 1/n on each of the last n positions L-n..L-1, whatever their segment; all L positions when
/// L < n. `n = 0` is taken as 1 (the registry rejects it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastNTokens {
    pub n: usize,
}

impl Default for LastNTokens {
    fn default() -> Self {
        LastNTokens { n: 3 }
    }
}

impl QueryStrategy for LastNTokens {
    fn name(&self) -> String {
        "last_n_tokens".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        let l = segments.len();
        (l.saturating_sub(self.n.max(1))..l).collect()
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        uniform(candidates.len())
    }
}

/// [`LastNTokens`] with n = 5: w = 1/5 on positions L-5..L-1 (all L positions when L < 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Last5Tokens;

impl QueryStrategy for Last5Tokens {
    fn name(&self) -> String {
        "last_5_tokens".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        LastNTokens { n: 5 }.candidates(segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        uniform(candidates.len())
    }
}

/// w = 1/|T| on each Text position; `last_token` when there is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextTokensOnly;

impl QueryStrategy for TextTokensOnly {
    fn name(&self) -> String {
        "text_tokens_only".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        or_last(positions(segments, |s| s == Segment::Text), segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        uniform(candidates.len())
    }
}

/// Over the n positions of P after the image, oldest to newest: w_i = i / (n(n+1)/2), i = 1..n;
/// `last_token` when the image ends the sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightedRecent;

impl QueryStrategy for WeightedRecent {
    fn name(&self) -> String {
        "weighted_recent".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        or_last(after_image(segments), segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        let ramp: Vec<f64> = (1..=candidates.len()).map(|i| i as f64).collect();
        proportional(&ramp)
    }
}

/// w = 1/|P| on every non-image position (System rows included: under the causal mask they see no
/// image, m_q = 0); `last_token` when every position is an image token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemAndText;

impl QueryStrategy for SystemAndText {
    fn name(&self) -> String {
        "system_and_text".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        or_last(positions(segments, |s| s != Segment::Image), segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        uniform(candidates.len())
    }
}

/// Over P after the image: w_q = m_q / sum m (uniform when every m_q is 0); `last_token` when the
/// image ends the sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionWeighted;

impl QueryStrategy for AttentionWeighted {
    fn name(&self) -> String {
        "attention_weighted".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        or_last(after_image(segments), segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], image_mass: &[f32]) -> Vec<f32> {
        let m: Vec<f64> = (0..candidates.len()).map(|i| mass(image_mass, i)).collect();
        proportional(&m)
    }
}

/// w = 1 on argmax over P (every non-image position) of m_q, the lowest position on ties (so the
/// first candidate when every m_q is 0); `last_token` when every position is an image token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaxAttentionToken;

impl QueryStrategy for MaxAttentionToken {
    fn name(&self) -> String {
        "max_attention_token".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        or_last(positions(segments, |s| s != Segment::Image), segments)
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], image_mass: &[f32]) -> Vec<f32> {
        let mut w = vec![0.0; candidates.len()];
        let mut best: Option<(usize, f64)> = None;
        for i in 0..candidates.len() {
            let m = mass(image_mass, i);
            if best.is_none_or(|(_, b)| m > b) {
                best = Some((i, m));
            }
        }
        if let Some((i, _)) = best {
            w[i] = 1.0;
        }
        w
    }
}

/// `text_tokens_only` when |T| > tau, else `last_token` (tau = 16 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveByLength {
    pub tau: usize,
}

impl Default for AdaptiveByLength {
    fn default() -> Self {
        AdaptiveByLength { tau: 16 }
    }
}

impl QueryStrategy for AdaptiveByLength {
    fn name(&self) -> String {
        "adaptive_by_length".into()
    }
    fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
        let text = positions(segments, |s| s == Segment::Text);
        if text.len() > self.tau {
            text
        } else {
            last(segments)
        }
    }
    fn weights(&self, _: &[Segment], candidates: &[usize], _: &[f32]) -> Vec<f32> {
        // Both branches are uniform over their candidates.
        uniform(candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Segment::{Image as I, System as S, Template as M, Text as T};

    /// [System x3, Image x4, Template, Text x4, Template x2]:
    /// positions 0-2 System, 3-6 Image, 7 Template, 8-11 Text, 12-13 Template; L = 14.
    fn layout() -> Vec<Segment> {
        vec![S, S, S, I, I, I, I, M, T, T, T, T, M, M]
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// candidates and weights of `q` on `seg` with image masses `m` (one per candidate).
    fn run(q: &dyn QueryStrategy, seg: &[Segment], m: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let c = q.candidates(seg);
        let w = q.weights(seg, &c, m);
        (c, w)
    }

    fn zeros(n: usize) -> Vec<f32> {
        vec![0.0; n]
    }

    #[test]
    fn last_token() {
        let (c, w) = run(&LastToken, &layout(), &[0.3]);
        assert_eq!(c, vec![13]);
        close(&w, &[1.0]);
    }

    #[test]
    fn last_n_tokens() {
        // n = 3: positions 11, 12, 13, each 1/3.
        let (c, w) = run(&LastNTokens::default(), &layout(), &zeros(3));
        assert_eq!(c, vec![11, 12, 13]);
        close(&w, &[1.0 / 3.0; 3]);
        // n = 1 is last_token.
        let (c, w) = run(&LastNTokens { n: 1 }, &layout(), &zeros(1));
        assert_eq!(c, vec![13]);
        close(&w, &[1.0]);
        // Fewer than n positions: all of them. [Image, Text] with n = 3 -> 0, 1 at 1/2.
        let (c, w) = run(&LastNTokens { n: 3 }, &[I, T], &zeros(2));
        assert_eq!(c, vec![0, 1]);
        close(&w, &[0.5, 0.5]);
        // n = 0 is taken as 1.
        assert_eq!(LastNTokens { n: 0 }.candidates(&layout()), vec![13]);
        // Segments do not matter: n = 8 reaches into the image (6) and Template 7.
        assert_eq!(
            LastNTokens { n: 8 }.candidates(&layout()),
            vec![6, 7, 8, 9, 10, 11, 12, 13]
        );
    }

    #[test]
    fn last_5_tokens() {
        // positions 9..=13 (Text 9-11, Template 12-13), each 1/5.
        let (c, w) = run(&Last5Tokens, &layout(), &zeros(5));
        assert_eq!(c, vec![9, 10, 11, 12, 13]);
        close(&w, &[0.2; 5]);
        // L = 3 < 5: all three, 1/3 each.
        let (c, w) = run(&Last5Tokens, &[S, I, T], &zeros(3));
        assert_eq!(c, vec![0, 1, 2]);
        close(&w, &[1.0 / 3.0; 3]);
    }

    #[test]
    fn text_tokens_only() {
        // T = 8..=11, each 1/4; Template 7, 12, 13 excluded.
        let (c, w) = run(&TextTokensOnly, &layout(), &zeros(4));
        assert_eq!(c, vec![8, 9, 10, 11]);
        close(&w, &[0.25; 4]);
        // No Text: last_token, position 4.
        let (c, w) = run(&TextTokensOnly, &[S, I, I, M, M], &zeros(1));
        assert_eq!(c, vec![4]);
        close(&w, &[1.0]);
    }

    #[test]
    fn weighted_recent() {
        // P after the image: 7..=13, n = 7, n(n+1)/2 = 28 -> w = 1/28, 2/28, ..., 7/28.
        let (c, w) = run(&WeightedRecent, &layout(), &zeros(7));
        assert_eq!(c, vec![7, 8, 9, 10, 11, 12, 13]);
        close(
            &w,
            &[
                1.0 / 28.0,
                2.0 / 28.0,
                3.0 / 28.0,
                4.0 / 28.0,
                5.0 / 28.0,
                6.0 / 28.0,
                7.0 / 28.0,
            ],
        );
        // A later stage with 2 image tokens left: [S x3, I x2, M, T x4, M x2] -> 5..=11.
        let later = [S, S, S, I, I, M, T, T, T, T, M, M];
        assert_eq!(
            WeightedRecent.candidates(&later),
            vec![5, 6, 7, 8, 9, 10, 11]
        );
        // No image: all positions, [S, T, M] -> 1/6, 2/6, 3/6.
        let (c, w) = run(&WeightedRecent, &[S, T, M], &zeros(3));
        assert_eq!(c, vec![0, 1, 2]);
        close(&w, &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        // Image last: last_token (position 4, an image token).
        let (c, w) = run(&WeightedRecent, &[S, S, I, I, I], &zeros(1));
        assert_eq!(c, vec![4]);
        close(&w, &[1.0]);
    }

    #[test]
    fn system_and_text() {
        // P = 0, 1, 2, 7..=13: 10 positions at 1/10.
        let (c, w) = run(&SystemAndText, &layout(), &zeros(10));
        assert_eq!(c, vec![0, 1, 2, 7, 8, 9, 10, 11, 12, 13]);
        close(&w, &[0.1; 10]);
        // Only image tokens: last_token.
        let (c, w) = run(&SystemAndText, &[I, I, I], &zeros(1));
        assert_eq!(c, vec![2]);
        close(&w, &[1.0]);
    }

    #[test]
    fn attention_weighted() {
        // Candidates 7..=13 with m = .2, .6, 0, .4, .4, .2, .2: sum 2.0 ->
        // w = .1, .3, 0, .2, .2, .1, .1.
        let m = [0.2, 0.6, 0.0, 0.4, 0.4, 0.2, 0.2];
        let (c, w) = run(&AttentionWeighted, &layout(), &m);
        assert_eq!(c, vec![7, 8, 9, 10, 11, 12, 13]);
        close(&w, &[0.1, 0.3, 0.0, 0.2, 0.2, 0.1, 0.1]);
        // All m zero: uniform 1/7.
        let (_, w) = run(&AttentionWeighted, &layout(), &zeros(7));
        close(&w, &[1.0 / 7.0; 7]);
        // Negative and NaN masses count as 0: (.5, -1, NaN, .5) -> (.5, 0, 0, .5).
        let w = AttentionWeighted.weights(&[], &[0, 1, 2, 3], &[0.5, -1.0, f32::NAN, 0.5]);
        close(&w, &[0.5, 0.0, 0.0, 0.5]);
        // Image last: last_token.
        let (c, w) = run(&AttentionWeighted, &[S, I, I], &[0.0]);
        assert_eq!(c, vec![2]);
        close(&w, &[1.0]);
    }

    #[test]
    fn max_attention_token() {
        // P = 0, 1, 2, 7..=13 with m = 0, 0, 0 (System sees no image), .2, .6, .1, .6, .3, .5, .4:
        // max .6 at positions 8 and 10 -> the lower, 8 (candidate index 4).
        let m = [0.0, 0.0, 0.0, 0.2, 0.6, 0.1, 0.6, 0.3, 0.5, 0.4];
        let (c, w) = run(&MaxAttentionToken, &layout(), &m);
        assert_eq!(c, vec![0, 1, 2, 7, 8, 9, 10, 11, 12, 13]);
        close(&w, &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // All zero: every candidate ties -> the first, position 0.
        let (_, w) = run(&MaxAttentionToken, &layout(), &zeros(10));
        close(&w, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // NaN is ignored: (NaN, .1, .3, .3) -> index 2.
        let w = MaxAttentionToken.weights(&[], &[0, 1, 2, 3], &[f32::NAN, 0.1, 0.3, 0.3]);
        close(&w, &[0.0, 0.0, 1.0, 0.0]);
        // Only image tokens: last_token.
        let (c, w) = run(&MaxAttentionToken, &[I, I], &[0.7]);
        assert_eq!(c, vec![1]);
        close(&w, &[1.0]);
    }

    #[test]
    fn adaptive_by_length() {
        // |T| = 4. tau = 16: 4 > 16 false -> last_token.
        let (c, w) = run(&AdaptiveByLength::default(), &layout(), &zeros(1));
        assert_eq!(c, vec![13]);
        close(&w, &[1.0]);
        // tau = 3: 4 > 3 -> T at 1/4.
        let (c, w) = run(&AdaptiveByLength { tau: 3 }, &layout(), &zeros(4));
        assert_eq!(c, vec![8, 9, 10, 11]);
        close(&w, &[0.25; 4]);
        // tau = 4 (boundary): 4 > 4 false -> last_token.
        assert_eq!(AdaptiveByLength { tau: 4 }.candidates(&layout()), vec![13]);
        // tau = 0 with no Text: 0 > 0 false -> last_token.
        assert_eq!(AdaptiveByLength { tau: 0 }.candidates(&[S, I, M]), vec![2]);
    }

    #[test]
    fn empty_sequence() {
        for name in QUERY_STRATEGIES {
            let q = query_strategy(name, &StrategyParams::default()).unwrap();
            let (c, w) = run(q.as_ref(), &[], &[]);
            assert!(c.is_empty() && w.is_empty(), "{name}");
        }
    }

    #[test]
    fn weights_are_a_distribution() {
        let seg = layout();
        for name in QUERY_STRATEGIES {
            let q = query_strategy(name, &StrategyParams::default()).unwrap();
            let c = q.candidates(&seg);
            assert!(c.windows(2).all(|p| p[0] < p[1]), "{name}: {c:?}");
            let m: Vec<f32> = c.iter().map(|&i| (i % 3) as f32 * 0.1).collect();
            let w = q.weights(&seg, &c, &m);
            assert_eq!(w.len(), c.len(), "{name}");
            assert!(w.iter().all(|&x| x >= 0.0), "{name}: {w:?}");
            let total: f32 = w.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{name}: {w:?}");
        }
    }

    #[test]
    fn registry_round_trip() {
        let p = StrategyParams::default();
        for name in QUERY_STRATEGIES {
            assert_eq!(query_strategy(name, &p).unwrap().name(), name);
        }
        // Parameters reach the strategies.
        let p = StrategyParams {
            query_n: 2,
            tau: 3,
            ..StrategyParams::default()
        };
        let q = query_strategy("last_n_tokens", &p).unwrap();
        assert_eq!(q.candidates(&layout()), vec![12, 13]);
        let q = query_strategy("adaptive_by_length", &p).unwrap();
        assert_eq!(q.candidates(&layout()), vec![8, 9, 10, 11]);
        // last_5_tokens ignores query_n.
        let q = query_strategy("last_5_tokens", &p).unwrap();
        assert_eq!(q.candidates(&layout()).len(), 5);
    }

    #[test]
    fn registry_errors() {
        let err = query_strategy("first_token", &StrategyParams::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`query`"), "{err}");
        assert!(err.contains("unknown strategy `first_token`"), "{err}");
        for name in QUERY_STRATEGIES {
            assert!(err.contains(name), "{err} lacks {name}");
        }
        let p = StrategyParams {
            query_n: 0,
            ..StrategyParams::default()
        };
        let err = query_strategy("last_n_tokens", &p).unwrap_err().to_string();
        assert!(err.contains("query-n"), "{err}");
    }

    /// A user strategy: the first Text position only.
    #[derive(Debug)]
    struct FirstText;

    impl QueryStrategy for FirstText {
        fn name(&self) -> String {
            "first_text".into()
        }
        fn candidates(&self, segments: &[Segment]) -> Vec<usize> {
            segments.iter().position(|&s| s == T).into_iter().collect()
        }
        fn weights(&self, _: &[Segment], c: &[usize], _: &[f32]) -> Vec<f32> {
            vec![1.0; c.len()]
        }
    }

    #[test]
    fn user_strategy() {
        let q: Arc<dyn QueryStrategy> = Arc::new(FirstText);
        let (c, w) = run(q.as_ref(), &layout(), &[0.5]);
        assert_eq!(q.name(), "first_text");
        assert_eq!(c, vec![8]);
        close(&w, &[1.0]);
    }
}
