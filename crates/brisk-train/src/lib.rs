//! The `Trainer` and its parts: optimisers with PyTorch's semantics, learning-rate and
//! batch-size schedules, and the training-step benchmark (the loop, losses, metrics and
//! checkpoints arrive with the rest of the training issue).

pub mod bench;
pub mod error;
pub mod optim;
pub mod schedule;

pub use error::{Error, Result};
pub use optim::{Sgd, SgdConfig};
pub use schedule::{BatchSchedule, LrScaling, LrSchedule, LrShape};
