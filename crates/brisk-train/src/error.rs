//! The error type of brisk-train.

use std::path::PathBuf;

/// Errors raised while training, evaluating or benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A training or benchmark setting is out of range.
    #[error("invalid setting `{field}`: {problem}")]
    InvalidConfig { field: &'static str, problem: String },

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] brisk_files::Error),

    /// The config, the event log or the summary is invalid.
    #[error(transparent)]
    Schema(#[from] brisk_schema::Error),

    /// Saved training state (optimiser, position, hooks) is missing or inconsistent.
    #[error("training state: {problem}")]
    State { problem: String },

    /// The loss became NaN or infinite and nothing (such as a loss scaler) handled it.
    #[error(
        "the loss is {value} at step {step} (epoch {epoch}, batch {batch}); training stopped. {}",
        advice(checkpoint)
    )]
    NonFiniteLoss {
        value: f32,
        step: u64,
        epoch: usize,
        batch: usize,
        checkpoint: Option<PathBuf>,
    },

    /// A weight holds NaN or infinity; a checkpoint is never written with such weights.
    #[error(
        "tensor `{name}` holds NaN or infinite values at step {step}; no checkpoint was written. {}",
        advice(checkpoint)
    )]
    NonFiniteWeights {
        name: String,
        step: u64,
        checkpoint: Option<PathBuf>,
    },

    /// Every update of many consecutive batches was skipped (e.g. the loss scaler kept
    /// finding inf/NaN gradients): training diverged.
    #[error(
        "{count} consecutive updates were skipped up to step {step} ({reason}); training stopped. {}",
        advice(checkpoint)
    )]
    TooManySkips {
        count: u64,
        step: u64,
        reason: String,
        checkpoint: Option<PathBuf>,
    },

    /// Training was stopped by a signal after saving a checkpoint.
    #[error("interrupted at step {step}; checkpoint {} written; continue with --resume", checkpoint.display())]
    Interrupted { step: u64, checkpoint: PathBuf },

    /// A precision setting is invalid.
    #[error(transparent)]
    Precision(#[from] brisk_precision::Error),

    /// A model could not be built or run.
    #[error(transparent)]
    Model(#[from] brisk_models::Error),

    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] brisk_data::Error),

    /// An error from candle's tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Where to go back to after training diverged.
fn advice(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(p) => format!(
            "The last good checkpoint is {}; lower the learning rate and resume from it.",
            p.display()
        ),
        None => "No checkpoint was written yet; lower the learning rate and start again.".into(),
    }
}

impl Error {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        Error::Io(brisk_files::Error::new(what, path, cause))
    }
}

/// The result type of brisk-train.
pub type Result<T> = std::result::Result<T, Error>;
