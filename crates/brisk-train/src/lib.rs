//! The `Trainer` and its parts: optimisers with PyTorch's semantics, and the training-step
//! benchmark (the loop, schedules, metrics and checkpoints arrive with the training issue).

pub mod bench;
pub mod error;
pub mod optim;

pub use error::{Error, Result};
pub use optim::{Sgd, SgdConfig};
