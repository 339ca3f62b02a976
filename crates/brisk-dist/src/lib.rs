//! Data-parallel training in Horovod's model: a `Communicator` (rank, world size,
//! all-reduce, broadcast, barrier) and `GradientAllReduce`, the training hook that
//! broadcasts rank 0's weights at the start, averages gradients across ranks in fused
//! buffers after every backward pass, and sums evaluation figures across ranks.
//!
//! Backends: `Local` (one process, no MPI) here; MPI (rsmpi) and NCCL arrive with the rest
//! of the distributed issue behind cargo features, implementing the same trait.

pub mod comm;
pub mod error;
pub mod hook;

pub use comm::{Communicator, Local};
pub use error::{Error, Result};
pub use hook::{GradientAllReduce, DEFAULT_FUSION_BYTES};
