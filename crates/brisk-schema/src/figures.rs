//! What the compression commands (`brisk prune`, `distill`, `quantize`) report: a
//! model's cost and score before and after, printed by `--json` and read back by the
//! experiment runner.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a model costs and what it scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Non-zero parameters.
    pub params: u64,
    /// Multiply-accumulates of one forward pass (dense count).
    pub macs: u64,
    /// Size of the model file.
    pub bytes: u64,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
}

/// One compression command's result: `--json` prints it as one object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressReport {
    /// What was done, e.g. `prune --method global --sparsity 0.8`.
    pub method: String,
    /// The model given (the teacher, for distillation).
    pub before: Figures,
    /// The model written.
    pub after: Figures,
    /// The file written.
    pub model: PathBuf,
}
