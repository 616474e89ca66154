//! FastV-style visual token pruning (`../shared/PRUNING.md`): after layer K-1 the image tokens are
//! ranked by the attention selected query rows pay them, weighted over heads; layers >= K run on
//! the kept ones only.

pub mod head;
pub mod metrics;
pub mod plan;
pub mod query;
pub mod score;

pub use crate::model::template::Segment;
pub use plan::{Keep, PrunePlan, Stage};
