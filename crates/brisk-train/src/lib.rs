//! The `Trainer` and its parts: optimisers with PyTorch's semantics, learning-rate and
//! batch-size schedules, losses and accuracy, and the training-step benchmark (the loop,
//! metrics log and checkpoints arrive with the rest of the training issue).

pub mod bench;
pub mod error;
pub mod loss;
pub mod optim;
pub mod schedule;

pub use error::{Error, Result};
pub use optim::{AdamW, AdamWConfig, Sgd, SgdConfig};
pub use schedule::{BatchSchedule, LrScaling, LrSchedule, LrShape};
