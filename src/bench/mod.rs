//! Benchmarking: scoring (VQA exact match and soft accuracy, POPE, readers for LLaVA's eval
//! files), peak-memory measurement, and reports (tables, CSV, plots, overlays).

pub mod eval;
pub mod mem;
pub mod report;
pub mod sweep;
