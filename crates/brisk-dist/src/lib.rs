//! Data-parallel training in Horovod's model: one process per rank, started by
//! `mpirun`. A `Communicator` (rank, world size, all-reduce, broadcast, barrier, abort)
//! with the backends `Local`, `Mpi` (cargo feature `mpi`, rsmpi over OpenMPI) and `Nccl`
//! (feature `nccl`: NCCL on GPUs through candle's cudarc, bootstrapped by MPI);
//! `GradientAllReduce`, the training hook that broadcasts rank 0's weights at the start,
//! averages gradients in fused buffers after every backward pass, averages batch-norm
//! running statistics before evaluations and checkpoints and sums evaluation figures;
//! `CommBatchNormSync` for synchronised batch-norm; tensor fusion and its benchmark
//! (`fusion`); and the launch helpers (launcher detection, threads per rank, the
//! same-configuration check).

pub mod comm;
pub mod error;
pub mod fusion;
pub mod hook;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(test)]
mod testing;

pub use comm::{broadcast_vec, host_name, rank_hosts, Communicator, Local};
pub use error::{Error, Result};
pub use fusion::{all_reduce_mean_fused, bench_all_reduce, AllReduceReport};
pub use hook::{CommBatchNormSync, GradientAllReduce, DEFAULT_FUSION_BYTES};
pub use launch::{check_same_config, connect, connect_nccl, launcher_variable, MPI_BUILT};
#[cfg(feature = "mpi")]
pub use mpi::Mpi;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
