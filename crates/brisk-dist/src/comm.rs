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

/// This machine's host name (its UTS name: a container's or a namespace's own).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// Every rank's host name, by rank (each rank broadcasts its own in turn): which rank ran
/// where, for messages about the job.
pub fn rank_hosts(comm: &dyn Communicator) -> Result<Vec<String>> {
    let mine = host_name();
    (0..comm.world())
        .map(|root| {
            let mut bytes = if comm.rank() == root {
                mine.clone().into_bytes()
            } else {
                Vec::new()
            };
            broadcast_vec(comm, &mut bytes, root)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::run_ranks;

    #[test]
    fn every_rank_learns_every_ranks_host() -> anyhow::Result<()> {
        let hosts = run_ranks(3, |comm| Ok(rank_hosts(comm.as_ref())?))?;
        // Three threads of one process: one host, the same list on every rank.
        assert!(hosts.iter().all(|h| *h == vec![host_name(); 3]), "{hosts:?}");
        assert_eq!(rank_hosts(&Local)?, vec![host_name()]);
        Ok(())
    }
}
