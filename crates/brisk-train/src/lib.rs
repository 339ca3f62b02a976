//! The `Trainer` and its parts: optimisers with PyTorch's semantics, losses, hooks for
//! the techniques that plug into the loop, evaluation, meters, the event log and progress,
//! checkpoints, and the training-step benchmark. The settings it runs from and the
//! records it writes are brisk-schema's types.

pub mod average;
pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod events;
pub mod hooks;
pub mod loss;
pub mod meters;
pub mod optim;
pub mod stepper;
pub mod trainer;
pub mod verify;

pub use average::WeightAverage;
/// The config, schedules, events and summary are brisk-schema's (no candle there, so the
/// experiment runner reads them without building a model).
pub use brisk_schema::{
    layout, BatchSchedule, Event, LrScaling, LrSchedule, LrShape, OptimizerKind, TrainConfig, TrainSummary,
};
pub use error::{Error, Result};
pub use eval::{evaluate, ClassAccuracy, EvalReport, EvalScope};
pub use hooks::{CrossEntropy, Hook, LossFn, LossScaling, StepAction, StepContext};
pub use optim::{AdamW, Optimizer, Param, Sgd};
pub use stepper::Stepper;
pub use trainer::{Rank, Trainer};
