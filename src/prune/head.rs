//! TEMP trait stub (replaced by the strategies branch).
use crate::error::Result;
use std::sync::Arc;
pub trait HeadStrategy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32>;
    fn weights(&self, scores: &[f32], head_keep: f64) -> Vec<f32> {
        let _ = head_keep;
        vec![1.0 / scores.len() as f32; scores.len()]
    }
}
#[derive(Debug, Clone, Default)]
pub struct StrategyParams {
    pub query_n: usize,
    pub top_k: Option<usize>,
    pub tau: usize,
}
pub fn head_strategy(name: &str, p: &StrategyParams) -> Result<Arc<dyn HeadStrategy>> {
    let _ = (name, p);
    Ok(Arc::new(Sum))
}
#[derive(Debug)]
pub struct Sum;
impl HeadStrategy for Sum {
    fn name(&self) -> String {
        "sum".into()
    }
    fn scores(&self, a: &[Vec<f32>]) -> Vec<f32> {
        a.iter().map(|x| x.iter().sum()).collect()
    }
}
pub fn check_head_keep(x: f64) -> Result<()> {
    let _ = x;
    Ok(())
}
