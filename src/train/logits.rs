//! Settings shared by logit distillation ([`super::distill`]) and the teacher cache
//! ([`super::teacher_cache`]): the `[distill.logits]` table, and which rows a loss reads (the
//! `tokens` setting of every `[distill]` loss).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::model::TrainSeq;
use crate::ops::kd::{Divergence, LogitKd};

pub(super) fn one() -> f64 {
    1.0
}
fn default_temperature() -> f32 {
    1.0
}
fn default_beta() -> f64 {
    0.5
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
    /// these settings ([`TeacherCache`](super::teacher_cache::TeacherCache)): read instead of
    /// running the teacher, whose forward is then skipped unless hidden or attention alignment
    /// needs it.
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
