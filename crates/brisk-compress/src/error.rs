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
    #[error(transparent)]
    Io(#[from] brisk_files::Error),

    #[error(transparent)]
    Spec(#[from] brisk_spec::Error),

    #[error(transparent)]
    Data(#[from] brisk_data::Error),

    #[error(transparent)]
    Schema(#[from] brisk_schema::Error),

    #[error(transparent)]
    Model(#[from] brisk_models::Error),

    #[error(transparent)]
    Train(#[from] brisk_train::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of brisk-compress.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(what, path, cause))
    }
}
