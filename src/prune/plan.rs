//! A pruning plan: stages `(layer K, keep)`, the head and query strategies that rank the image
//! tokens, and whether position ids are renumbered after a stage.

use super::head::{self, HeadStrategy};
use super::query::{self, QueryStrategy};
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
}

impl std::str::FromStr for Keep {
    type Err = Error;

    /// `0.5` is a fraction, `144` (an integer > 1) a count; `1` means everything (fraction 1.0).
    fn from_str(s: &str) -> Result<Keep> {
        let bad = || {
            Error::arg(
                "keep",
                format!("`{s}` is neither a fraction in (0, 1] nor a token count"),
            )
        };
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
}

impl PrunePlan {
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
        }
    }

    /// Image tokens kept after each stage for a prompt with `n_image` of them; an error when the
    /// plan does not fit a `num_layers`-layer model or this many image tokens.
    pub fn kept_counts(&self, num_layers: usize, n_image: usize) -> Result<Vec<usize>> {
        if self.stages.is_empty() {
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
                Keep::Fraction(f) => {
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
            counts.push(k);
            survivors = k;
            prev_layer = s.layer;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
