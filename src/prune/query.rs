//! TEMP trait stub (replaced by the strategies branch).
use super::Segment;
use super::head::StrategyParams;
use crate::error::Result;
use std::sync::Arc;
pub trait QueryStrategy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    fn candidates(&self, segments: &[Segment]) -> Vec<usize>;
    fn weights(&self, segments: &[Segment], candidates: &[usize], image_mass: &[f32]) -> Vec<f32>;
}
pub fn query_strategy(name: &str, p: &StrategyParams) -> Result<Arc<dyn QueryStrategy>> {
    let _ = (name, p);
    Ok(Arc::new(LastToken))
}
#[derive(Debug)]
pub struct LastToken;
impl QueryStrategy for LastToken {
    fn name(&self) -> String {
        "last_token".into()
    }
    fn candidates(&self, s: &[Segment]) -> Vec<usize> {
        vec![s.len() - 1]
    }
    fn weights(&self, _: &[Segment], c: &[usize], _: &[f32]) -> Vec<f32> {
        vec![1.0; c.len()]
    }
}
