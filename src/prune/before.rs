//! Reductions of the image tokens before the language model: the image's projected features
//! become fewer rows, and the prompt takes that many image tokens (nothing is pruned inside the
//! LM unless the plan also has stages).
//!
//! - [`BeforeLm::Pool`]: uniform spatial pooling, the naive baseline every table should have.
//!   The `g x g` patch grid of projected features is average-pooled to `s x s` with
//!   `s = ⌊√budget⌋`, as `torch.nn.functional.adaptive_avg_pool2d` pools (output cell `i`
//!   averages input rows `⌊i·g/s⌋ .. ⌈(i+1)·g/s⌉`, the same for columns), after the projector
//!   as LLaVA-OneVision's `get_2dPool` pools. The `full` strategy's CLS token stays in front,
//!   unpooled.
//! - [`BeforeLm::FasterVlm`]: FasterVLM's [CLS]-attention ranking (Zhang et al. 2024,
//!   github.com/Theia-4869/FasterVLM): the `budget` patches the vision tower's CLS token attends
//!   to most, in the layer whose output is the selected feature layer, averaged over heads
//!   (`clip_encoder.py` `feature_select`, lines 35-45: `attentions[select_layer][:, :, 0, 1:]`;
//!   `llava_arch.py` `encode_images`, lines 141-157: `mean(dim=1)`, `topk`, the kept features in
//!   patch order). The official code supports the `patch` feature selection only (the `default`
//!   strategy); ties go to the lower patch, where `torch.topk`'s order is unspecified.

use super::plan::Keep;
use crate::error::{Error, Result};

/// Which reduction runs before the language model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BeforeLm {
    Pool,
    FasterVlm,
}

impl BeforeLm {
    /// Whether it ranks by the vision tower's CLS attention ([`Reduce::rows`]' `scores`).
    pub fn needs_cls_attention(&self) -> bool {
        matches!(self, BeforeLm::FasterVlm)
    }
}

/// A reduction before the LM and its budget (of the image's patch tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduce {
    pub method: BeforeLm,
    pub keep: Keep,
}

impl Reduce {
    /// The budget as a count of the `n` patch tokens (a fraction rounded up, as stages do).
    fn budget(&self, n: usize) -> Result<usize> {
        match self.keep {
            Keep::Fraction(f) if f > 0.0 && f <= 1.0 => Ok((f * n as f64).ceil() as usize),
            Keep::Count(c) if (1..=n).contains(&c) => Ok(c),
            k => Err(Error::arg(
                "keep",
                format!("{k} is not a budget for {n} image tokens before the LM"),
            )),
        }
    }

    /// Feature rows the reduced image is made of: `Row(i)` is feature row `i` of the image
    /// unchanged, and `Mean(rows)` the mean of those rows; for an image of `grid x grid` patch
    /// rows after `cls` (0 or 1) leading CLS rows. `scores`: the CLS attention to each patch
    /// (FasterVLM's ranking; unused by pooling).
    pub fn rows(&self, grid: usize, cls: usize, scores: &[f32]) -> Result<Vec<Source>> {
        let n = grid * grid;
        match self.method {
            BeforeLm::FasterVlm => {
                if cls != 0 {
                    return Err(Error::arg(
                        "prune plan",
                        "FasterVLM ranks patches only (the `default` feature selection), as its \
                         official code does",
                    ));
                }
                if scores.len() != n {
                    return Err(Error::Shape {
                        name: "CLS attention to the patches".into(),
                        expected: vec![n],
                        got: vec![scores.len()],
                    });
                }
                let kept = super::score::top_k(scores, self.budget(n)?);
                Ok(kept.into_iter().map(Source::Row).collect())
            }
            BeforeLm::Pool => {
                let side = (self.budget(n)? as f64).sqrt().floor().max(1.0) as usize;
                let span = |i: usize| (i * grid / side)..(((i + 1) * grid).div_ceil(side));
                let mut out: Vec<Source> = (0..cls).map(Source::Row).collect();
                for i in 0..side {
                    for j in 0..side {
                        let rows = span(i)
                            .flat_map(|r| span(j).map(move |c| cls + r * grid + c))
                            .collect();
                        out.push(Source::Mean(rows));
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Where one row of a reduced image comes from ([`Reduce::rows`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Row(usize),
    Mean(Vec<usize>),
}

/// Applies `sources` to an image's features `[rows, d]` (host f32).
pub fn gather(features: &[f32], d: usize, sources: &[Source]) -> Vec<f32> {
    let mut out = Vec::with_capacity(sources.len() * d);
    for s in sources {
        match s {
            Source::Row(i) => out.extend_from_slice(&features[i * d..(i + 1) * d]),
            Source::Mean(rows) => {
                let mut acc = vec![0.0f32; d];
                for &r in rows {
                    for (a, x) in acc.iter_mut().zip(&features[r * d..(r + 1) * d]) {
                        *a += x;
                    }
                }
                out.extend(acc.into_iter().map(|a| a / rows.len() as f32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_by_hand() {
        let pool = |k| Reduce {
            method: BeforeLm::Pool,
            keep: Keep::Count(k),
        };
        // 3x3 grid to 2x2 (budget 4 or 5): adaptive windows [0,2) and [1,3) per axis.
        let rows = pool(5).rows(3, 0, &[]).unwrap();
        assert_eq!(
            rows,
            vec![
                Source::Mean(vec![0, 1, 3, 4]),
                Source::Mean(vec![1, 2, 4, 5]),
                Source::Mean(vec![3, 4, 6, 7]),
                Source::Mean(vec![4, 5, 7, 8]),
            ]
        );
        // The CLS row first, patch rows after it.
        let rows = pool(1).rows(2, 1, &[]).unwrap();
        assert_eq!(rows, vec![Source::Row(0), Source::Mean(vec![1, 2, 3, 4])]);
        let f: Vec<f32> = (0..5).map(|i| i as f32).collect();
        assert_eq!(gather(&f, 1, &rows), vec![0.0, 2.5]);
        assert!(pool(10).rows(3, 0, &[]).is_err());
    }

    #[test]
    fn fastervlm_by_hand() {
        let r = Reduce {
            method: BeforeLm::FasterVlm,
            keep: Keep::Count(2),
        };
        // The two largest, ties to the lower patch, in patch order.
        let rows = r.rows(2, 0, &[0.1, 0.4, 0.1, 0.4]).unwrap();
        assert_eq!(rows, vec![Source::Row(1), Source::Row(3)]);
        assert!(r.rows(2, 1, &[0.1; 4]).is_err());
        assert!(r.rows(2, 0, &[0.1; 3]).is_err());
    }
}
