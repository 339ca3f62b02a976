//! The error type of brisk-models: every failure names the file, field or tensor at fault.

use std::path::PathBuf;

/// Errors raised while describing, building, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The precision policy is invalid.
    #[error(transparent)]
    Precision(#[from] brisk_precision::Error),

    /// The model description is invalid or its file unreadable.
    #[error(transparent)]
    Spec(#[from] brisk_spec::Error),

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] brisk_files::Error),

    /// A checkpoint file is not a readable safetensors file.
    #[error("checkpoint {path} is not a valid safetensors file: {message}")]
    CheckpointFormat { path: PathBuf, message: String },

    /// A tensor the model needs is absent from a checkpoint.
    #[error("checkpoint {path} lacks tensor `{name}` (the model expects shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },

    /// A checkpoint holds a tensor the model has no place for.
    #[error("checkpoint {path} has tensor `{name}` of shape {shape:?}, which the model does not have")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
    },

    /// A checkpoint tensor's shape differs from the one the spec implies.
    #[error("tensor `{name}` in {path} has shape {found:?} but the model spec expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    /// A checkpoint tensor is stored in a dtype the model cannot take.
    #[error("tensor `{name}` in {path} has dtype {found} but {expected} is required")]
    DtypeMismatch {
        path: PathBuf,
        name: String,
        found: String,
        expected: &'static str,
    },

    /// Batch-norm statistics cannot be computed from a single value per channel.
    #[error("batch-norm `{layer}` in training mode needs more than one value per channel (got a batch of shape {shape:?})")]
    BatchTooSmall { layer: String, shape: Vec<usize> },

    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of brisk-models.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(action, path, cause))
    }
}
