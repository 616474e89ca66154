//! fineprune: a hand-written LLaVA engine with FastV-style visual token pruning.
//!
//! ```no_run
//! use fineprune::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};
//! use fineprune::{Engine, ImageInput, Model, Request};
//! use std::sync::Arc;
//!
//! let engine = Engine::new(Arc::new(Model::load("path/to/llava-1.5-7b-hf")?));
//! let mut req = Request::new("What is in the picture?", Some(ImageInput::Path("cat.jpg".into())));
//! let mut plan = PrunePlan::new(vec![Stage { layer: 2, keep: Keep::Fraction(0.25) }]);
//! plan.head = head_strategy("variance", &StrategyParams::default())?;
//! plan.query = query_strategy("text_tokens_only", &StrategyParams::default())?;
//! req.prune = Some(plan);
//! let out = engine.generate(&[req])?;
//! println!("{} ({} image tokens kept)", out[0].text, out[0].stats.kept_after_last());
//! # Ok::<(), fineprune::Error>(())
//! ```

pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod io;
pub mod model;
pub mod ops;
pub mod prune;
#[cfg(feature = "serve")]
pub mod serve;
pub mod tensor;
#[cfg(feature = "train")]
pub mod train;

pub use engine::{
    Batch, Budget, Engine, Event, Generation, ImageInput, Request, RequestMetrics, Sampling,
    Scheduler, StopReason,
};
pub use error::{Error, Result};
pub use model::Model;
pub use tensor::{DType, Device, Tensor};
