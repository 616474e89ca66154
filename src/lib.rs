//! fineprune: a hand-written LLaVA engine with FastV-style visual token pruning.

pub mod error;
pub mod model;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
pub mod bench;
pub mod engine;
pub mod io;
pub mod ops;
pub mod prune;
pub mod train;

pub use engine::{Engine, Generation, ImageInput, Request, Sampling, StopReason};
pub use model::Model;
