//! Benchmarks with ground truth for pruning studies.
//!
//! [`shapes`] is ShapesVQA: seeded synthetic scenes of coloured shapes and text signs, questions in
//! six families whose answers are known by construction, and for every question the set of image
//! patches that hold the objects it is about, so "recall of the relevant patches among the kept image
//! tokens" can be measured next to accuracy. It exports to and reads back from LLaVA's training and
//! evaluation file formats.

pub mod shapes;
