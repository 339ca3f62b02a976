//! The error type of brisk-schema: every failure names the file, field or override.

/// Errors raised while reading, changing or checking a run's settings and records.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range.
    #[error("invalid setting `{field}`: {problem}")]
    InvalidConfig { field: &'static str, problem: String },

    /// A file or override could not be read as what it should hold.
    #[error("{source_name}: `{field}`: {message}")]
    ConfigParse {
        /// The file (or "override" for a command-line `--set`).
        source_name: String,
        field: String,
        message: String,
    },

    /// The model part of a setting is invalid (preset, spec file).
    #[error(transparent)]
    Spec(#[from] brisk_spec::Error),

    /// The precision part of a setting is invalid.
    #[error(transparent)]
    Precision(#[from] brisk_precision::Error),

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] brisk_files::Error),
}

/// The result type of brisk-schema.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(action, path, cause))
    }
}
