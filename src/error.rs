//! The one error type of the crate. Every message names the file, key, shape or argument at fault.

use std::path::PathBuf;

/// Everything that can go wrong when loading a model, reading inputs or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A required file is absent (config.json, weights, tokenizer, ...).
    #[error("missing {what}: {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    /// config.json (or GGUF metadata) is malformed or lacks a key.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weight file (safetensors, index, GGUF) is truncated or corrupt.
    #[error("weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor `{name}` (looked for {tried}) in {source_desc}")]
    MissingTensor {
        name: String,
        tried: String,
        source_desc: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A dtype, architecture or quantisation we do not handle.
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },
    /// The tokenizer file is unreadable or a text cannot be tokenized.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// An image cannot be decoded or preprocessed.
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// A prompt the model cannot take (image placeholder count, length, ...).
    #[error("prompt: {0}")]
    Prompt(String),

    /// The CUDA backend: a missing library or device, a kernel that failed to build, a launch.
    #[error("cuda: {0}")]
    Cuda(String),
    /// An argument out of range (sampling parameters, batch, flags).
    #[error("invalid argument `{name}`: {msg}")]
    Arg { name: String, msg: String },
    /// A NaN or infinity appeared in a computation; `at` says where it first appeared (the
    /// layer, the row) so the weight or input at fault can be found.
    #[error("non-finite value ({value}) in {at}")]
    NonFinite { at: String, value: f32 },
    /// A batch step failed as a whole (not because of one request); every request in it fails
    /// with this.
    #[error("the batch step failed: {0}")]
    Step(String),
    /// The engine stopped (its scheduler thread ended) before the request finished.
    #[error("the engine stopped: {0}")]
    Stopped(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the request is at fault (a server answers 4xx) rather than the model, the files
    /// or the machine (5xx): a bad prompt, image, argument or sampling value. A client error's
    /// message names only what the request gave (its own image path at most), never a server
    /// file.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Error::Prompt(_) | Error::Arg { .. } | Error::Image { .. }
        )
    }

    /// An [`Error::Arg`] renamed to `name(old name)` (the flag or request field it came from);
    /// any other error as it is.
    pub fn renamed(self, name: impl FnOnce(&str) -> String) -> Self {
        match self {
            Error::Arg { name: old, msg } => Error::arg(name(&old), msg),
            e => e,
        }
    }

    /// Shorthand for [`Error::Arg`].
    pub fn arg(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Arg {
            name: name.into(),
            msg: msg.into(),
        }
    }
}
