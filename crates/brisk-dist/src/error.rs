//! The error type of brisk-dist.

/// Errors raised by communication and by the start of a distributed run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective operation failed (a rank left, a size mismatch, ...).
    #[error("rank {rank} of {world}: {message}")]
    Collective {
        rank: usize,
        world: usize,
        message: String,
    },

    /// MPI could not be started or is not available in this build.
    #[error("MPI: {problem}")]
    Mpi { problem: String },

    /// The ranks were started with different training configurations.
    #[error(
        "rank {rank}'s configuration differs from rank 0's in `{field}`: {theirs} on rank {rank}, {ours} on rank 0 \
         (every rank must run the same command)"
    )]
    ConfigMismatch {
        rank: usize,
        field: String,
        ours: String,
        theirs: String,
    },

    /// A setting given to a distributed helper is out of range.
    #[error("invalid setting: {problem}")]
    Setting { problem: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] brisk_models::Error),
}

/// The result type of brisk-dist.
pub type Result<T> = std::result::Result<T, Error>;
