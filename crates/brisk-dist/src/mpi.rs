//! `Mpi`: the `Communicator` over MPI (rsmpi, with OpenMPI or MPICH underneath), one
//! process per rank, started by `mpirun`.

use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;

use crate::comm::Communicator;
use crate::error::{Error, Result};

/// MPI's world communicator. MPI is initialised with `Threading::Funneled`: only the
/// thread that created this value calls MPI (the compute threads never do), and every
/// method checks that. Dropping it finalises MPI.
pub struct Mpi {
    // Declared before the universe: dropped (freed) before MPI is finalised.
    world: SimpleCommunicator,
    local_ranks: usize,
    local_rank: usize,
    owner: ThreadId,
    _universe: Universe,
}

// SAFETY: the MPI handles inside are only used by the thread that initialised MPI:
// `on_owner` turns every other caller away before any MPI call, so moving or sharing the
// value between threads never leads to a concurrent or foreign-thread MPI call.
unsafe impl Send for Mpi {}
// SAFETY: as above: every method checks the calling thread first.
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.world.rank())
            .field("world", &self.world.size())
            .field("local_ranks", &self.local_ranks)
            .finish()
    }
}

impl Mpi {
    /// Initialises MPI (once per process) and joins the world of ranks `mpirun` started.
    pub fn init() -> Result<Self> {
        let (universe, _threading) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| Error::Mpi {
                problem: "MPI is already initialised in this process".into(),
            })?;
        let world = universe.world();
        let host = world.split_shared(world.rank());
        let (local_ranks, local_rank) = (host.size() as usize, host.rank() as usize);
        Ok(Mpi {
            world,
            local_ranks,
            local_rank,
            owner: std::thread::current().id(),
            _universe: universe,
        })
    }

    /// This rank's position among the ranks on its host (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn on_owner(&self, what: &str) -> Result<()> {
        if std::thread::current().id() == self.owner {
            return Ok(());
        }
        Err(Error::Collective {
            rank: self.rank(),
            world: self.world(),
            message: format!("{what} called from a thread other than the one that initialised MPI"),
        })
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn local_ranks(&self) -> usize {
        self.local_ranks
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.on_owner("all-reduce")?;
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.on_owner("all-reduce")?;
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.on_owner("broadcast")?;
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.on_owner("broadcast")?;
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.on_owner("barrier")?;
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        if self.on_owner("abort").is_err() {
            std::process::exit(code);
        }
        self.world.abort(code)
    }
}
