//! FastV-style visual token pruning (PRUNING.md is the contract).
//!
//! At a ranking layer, a [`query::QueryStrategy`] picks the prompt positions whose attention rows
//! are scored and weights them (w), giving each head h its attention over the image tokens
//! a_h = sum_q w_q A[h, q, V]; a [`head::HeadStrategy`] weights the heads (beta), and the image
//! tokens with the largest s = sum_h beta_h a_h are kept. Both are open traits; the built-in ones
//! are looked up by their CLI names with [`head::head_strategy`] and [`query::query_strategy`].

pub mod before;
pub mod dart;
pub mod head;
pub mod metrics;
pub mod plan;
pub mod query;
pub mod score;
pub mod sparsevlm;

pub use crate::model::template::Segment;
pub use head::{HEAD_STRATEGIES, HeadStrategy, check_head_keep, head_strategy};
pub use plan::{Keep, PrunePlan, RankLayer, Scorer, Stage, pyramid};
pub use query::{QUERY_STRATEGIES, QueryStrategy, query_strategy};

/// Parameters of the built-in strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrategyParams {
    /// n of `last_n_tokens` (`--query-n`, default 3, at least 1).
    pub query_n: usize,
    /// k of `top_k_sum`; `None` is ceil(0.1 N) for N image tokens (at least 1 when given).
    pub top_k: Option<usize>,
    /// tau of `adaptive_by_length` (default 16).
    pub tau: usize,
}

impl Default for StrategyParams {
    fn default() -> Self {
        StrategyParams {
            query_n: 3,
            top_k: None,
            tau: 16,
        }
    }
}
