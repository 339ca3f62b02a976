//! `Communicator`: what data-parallel training needs from a collective-communication
//! engine (MPI, NCCL), and `Local`, the single-process one.

use crate::error::Result;

/// Collective operations over the ranks of a job. Every rank must call the same
/// operations in the same order with buffers of the same length. Implementations that
/// wrap MPI are called from the thread that initialised it (the training thread).
pub trait Communicator: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Ranks running on this host (this one included): the compute threads of a host
    /// are shared between them.
    fn local_ranks(&self) -> usize;
    /// Element-wise sum over all ranks, in place on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// The same for f64 (evaluation counts and loss sums, statistics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank receives `root`'s buffer.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank receives `root`'s bytes (same length on every rank).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job at once with `code` (after a rank's error: the others
    /// would otherwise wait for it forever).
    fn abort(&self, code: i32) -> !;
}

/// Every rank receives `root`'s byte string, whatever length the others hold.
pub fn broadcast_vec(comm: &dyn Communicator, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
    let mut len = [if comm.rank() == root {
        bytes.len() as f64
    } else {
        0.0
    }];
    comm.all_reduce_sum_f64(&mut len)?;
    bytes.resize(len[0] as usize, 0);
    comm.broadcast_bytes(bytes, root)
}

/// The communicator of a single process: world 1, every operation the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_ranks(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
