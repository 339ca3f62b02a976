//! The error type of brisk-data: every failure names the file and what is wrong with it.

use std::path::PathBuf;

/// Errors raised while packing, opening or verifying a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] brisk_files::Error),

    /// A file exists but its contents are not what brisk wrote (or expects).
    #[error("{path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },

    /// A setting given to a writer or generator is out of range.
    #[error("invalid setting `{field}`: {problem}")]
    InvalidConfig { field: &'static str, problem: String },
}

/// The result type of brisk-data.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(action, path, cause))
    }

    pub(crate) fn corrupt(path: &std::path::Path, problem: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}
