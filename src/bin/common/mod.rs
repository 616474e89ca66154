//! Flags shared by the `fineprune` and `prune-bench` command lines.

use clap::Args;
use fineprune::prune::StrategyParams;

/// Parameters of the pruning strategies (PRUNING.md).
#[derive(Args, Clone, Debug)]
pub struct StrategyFlags {
    /// rho: fraction of heads kept by every head strategy but sum.
    #[arg(long, default_value_t = 0.5)]
    pub head_keep: f64,
    /// n of last_n_tokens.
    #[arg(long, default_value_t = 3)]
    pub query_n: usize,
    /// k of top_k_sum (default ceil(0.1 N)).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// tau of adaptive_by_length: text_tokens_only above this many question tokens.
    #[arg(long, default_value_t = 16)]
    pub tau: usize,
    /// LLaVA-NeXT: rank the image_newline tokens (one per row of the tile grid) like the tiles'
    /// tokens instead of always keeping them (they count against --keep either way).
    #[arg(long)]
    pub drop_newlines: bool,
}

impl StrategyFlags {
    pub fn params(&self) -> StrategyParams {
        StrategyParams {
            query_n: self.query_n,
            top_k: self.top_k,
            tau: self.tau,
        }
    }
}
