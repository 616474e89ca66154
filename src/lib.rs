//! fineprune: a hand-written LLaVA engine with FastV-style visual token pruning.

pub mod error;
pub mod model;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
