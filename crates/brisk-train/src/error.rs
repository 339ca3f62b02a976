//! The error type of brisk-train.

/// Errors raised while training or benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A training or benchmark setting is out of range.
    #[error("invalid setting `{field}`: {problem}")]
    InvalidConfig { field: &'static str, problem: String },

    /// A model could not be built or run.
    #[error(transparent)]
    Model(#[from] brisk_models::Error),

    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of brisk-train.
pub type Result<T> = std::result::Result<T, Error>;
