//! The error type of brisk-compress.

use std::path::PathBuf;

/// Errors raised while compressing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compression setting is out of range.
    #[error("invalid setting `{field}`: {problem}")]
    InvalidConfig { field: &'static str, problem: String },

    /// A compressed checkpoint is malformed.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },

    /// A file could not be read or written.
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error(transparent)]
    Model(#[from] brisk_models::Error),

    #[error(transparent)]
    Train(#[from] brisk_train::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of brisk-compress.
pub type Result<T> = std::result::Result<T, Error>;
