//! The error type of brisk-precision.

/// Errors raised by precision settings and the loss scaler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A precision setting is out of range or unknown.
    #[error("invalid precision setting `{field}`: {problem}")]
    InvalidConfig { field: String, problem: String },
}

/// The result type of brisk-precision.
pub type Result<T> = std::result::Result<T, Error>;
