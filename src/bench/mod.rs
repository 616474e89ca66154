//! Benchmarking: result reports and plots.

pub mod mem;
pub mod report;
