//! The `Trainer` and its parts: configuration, optimisers with PyTorch's semantics,
//! learning-rate and batch-size schedules, losses, hooks for the techniques that plug
//! into the loop, evaluation, the event log, checkpoints, and the training-step benchmark.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod events;
pub mod hooks;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use config::{OptimizerKind, TrainConfig};
pub use error::{Error, Result};
pub use eval::{evaluate, ClassAccuracy, EvalReport};
pub use hooks::{CrossEntropy, Hook, LossFn, LossScaling, StepAction, StepContext};
pub use optim::{AdamW, AdamWConfig, Optimizer, Param, Sgd, SgdConfig};
pub use schedule::{BatchSchedule, LrScaling, LrSchedule, LrShape};
pub use trainer::{Rank, TrainSummary, Trainer};
