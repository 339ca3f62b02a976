//! The files of a run's output folder (docs/training.md): where each is written, so the
//! trainer that writes them and the tools that read them agree.

pub use brisk_spec::MODEL_FILE;

/// The run's resolved config (`TrainConfig` as TOML).
pub const CONFIG_FILE: &str = "config.toml";
/// The event log: one [`crate::Event`] per line.
pub const LOG_FILE: &str = "metrics.jsonl";
/// The run's [`crate::TrainSummary`].
pub const SUMMARY_FILE: &str = "summary.json";
/// Checkpoint folders, `step-NNNNNNNNN/`.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The best evaluation's model.
pub const BEST_DIR: &str = "best";
/// The sparse model a magnitude-pruning run writes beside the dense one.
pub const SPARSE_MODEL_FILE: &str = "model-sparse.safetensors";
