//! The error type of brisk-dist.

/// Errors raised by communication.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective operation failed (a rank left, a size mismatch, ...).
    #[error("rank {rank} of {world}: {message}")]
    Collective {
        rank: usize,
        world: usize,
        message: String,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] brisk_models::Error),
}

/// The result type of brisk-dist.
pub type Result<T> = std::result::Result<T, Error>;
