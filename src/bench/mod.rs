//! Benchmarking: result reports and plots.

pub mod report;
