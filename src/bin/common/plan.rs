//! The prune plan of the `--prune-layer`, `--keep`, `--head`, `--query` flags (`fineprune`,
//! `serve-bench`).

use crate::common::StrategyFlags;
use fineprune::prune::{Keep, PrunePlan, Stage, head_strategy, query_strategy};

/// The plan of the pruning flags: a stage per `--prune-layer` keeping `--keep` (one value for
/// all, or one per layer), the named head and query strategies with the strategy flags.
pub fn plan_of_flags(
    layers: &[usize],
    keeps: &[Keep],
    head: &str,
    query: &str,
    strategy: &StrategyFlags,
    renumber: bool,
) -> fineprune::Result<PrunePlan> {
    let stages = Stage::per_layer(layers, keeps).map_err(|e| e.renamed(|_| "--keep".into()))?;
    let params = strategy.params();
    let mut plan = PrunePlan::new(stages);
    plan.head = head_strategy(head, &params)?;
    plan.query = query_strategy(query, &params)?;
    plan.head_keep = strategy.head_keep;
    plan.renumber = renumber;
    plan.keep_newlines = !strategy.drop_newlines;
    Ok(plan)
}
