//! The error type of brisk-spec: every failure names the file or field at fault.

use std::path::PathBuf;

/// Errors raised while reading or checking a model description.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `ModelSpec` field holds a value the model cannot be built from.
    #[error("invalid model spec: field `{field}` {problem}")]
    InvalidSpec { field: String, problem: String },

    /// A spec file could not be parsed (syntax, unknown field, unknown architecture...).
    #[error("cannot parse model spec {path}: at `{field}`: {message}")]
    SpecParse {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A model cannot run on a dataset (classes, input channels or image shape differ).
    #[error("the model ({model}) does not fit the dataset {dataset}: {problem}")]
    DoesNotFit {
        model: String,
        dataset: PathBuf,
        problem: String,
    },

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] brisk_files::Error),
}

/// The result type of brisk-spec.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn spec(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn io(action: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(action, path, cause))
    }
}
