//! Benchmarking: ShapesVQA (synthetic VQA with ground-truth relevance masks), scoring (VQA exact
//! match and soft accuracy, POPE, readers for LLaVA's eval files), sweeps over pruning
//! configurations and their shards, peak-memory measurement, and reports (tables, CSV, plots,
//! overlays).

pub mod eval;
pub mod mem;
pub mod report;
pub mod shapes;
pub mod shard;
pub mod sweep;
