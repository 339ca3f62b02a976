//! `Nccl`: the `Communicator` over NVIDIA's NCCL, one GPU per rank, bootstrapped through
//! MPI (rank 0 creates the NCCL unique id and broadcasts it with the `Mpi` communicator,
//! which also serves barriers, byte broadcasts and aborts). Cargo feature `nccl`: NCCL on
//! brisk-cuda's cudarc, the driver and libnccl looked for before they are used.

use brisk_cuda::nccl::{Comm, CudaSlice, CudaStream, DeviceRepr, Id, NcclStatus, ReduceOp};
use brisk_cuda::Gpu;
use std::sync::Arc;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::mpi::Mpi;

/// NCCL over the GPUs of the ranks `mpirun` started: rank r uses the GPU numbered by its
/// position among the ranks on its host.
///
/// Buffers here are host slices (brisk's training loop runs on the CPU, so that is where
/// the gradients are): each collective copies to the GPU, reduces there, and copies back.
/// A GPU training loop would hand NCCL its device buffers directly instead.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    mpi: Mpi,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls on one
// communicator are not concurrent; every method here takes `&self` and the training
// loop calls them from its one thread, as it does for `Mpi` (whose own checks apply to
// the bootstrap and the byte broadcasts, barriers and aborts delegated to it).
unsafe impl Send for Nccl {}
// SAFETY: as above.
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .field("gpu", &self.comm.ordinal())
            .finish()
    }
}

fn cuda_err(rank: usize, world: usize, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective {
        rank,
        world,
        message: format!("NCCL {what}: {e:?}"),
    }
}

impl Nccl {
    /// Joins the NCCL clique of the MPI world `mpi`.
    pub fn init(mpi: Mpi) -> Result<Self> {
        let (rank, world) = (mpi.rank(), mpi.world());
        let gpu = mpi.local_rank();
        let unusable = |e: brisk_cuda::Error| Error::Collective {
            rank,
            world,
            message: format!("NCCL cannot run on GPU {gpu}: {e}"),
        };
        brisk_cuda::nccl::check().map_err(unusable)?;
        let device = Gpu::open(gpu).map_err(unusable)?;
        let stream = device.context().default_stream();
        let mut id_bytes = vec![0u8; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| cuda_err(rank, world, "unique id", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(&id_bytes) {
            *c = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| cuda_err(rank, world, "init", e))?;
        Ok(Nccl { comm, stream, mpi })
    }

    /// Copies `buf` to the GPU, runs `op` on the device copy, and copies the result back.
    fn through_gpu<T, E: std::fmt::Debug>(
        &self,
        buf: &mut [T],
        what: &str,
        op: impl FnOnce(&Comm, &mut CudaSlice<T>) -> std::result::Result<NcclStatus, E>,
    ) -> Result<()>
    where
        T: DeviceRepr + Copy,
    {
        let (rank, world) = (self.rank(), self.world());
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(|e| cuda_err(rank, world, "copy to GPU", e))?;
        op(&self.comm, &mut dev).map_err(|e| cuda_err(rank, world, what, e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| cuda_err(rank, world, "copy from GPU", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err(rank, world, "synchronize", e))
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn local_ranks(&self) -> usize {
        self.mpi.local_ranks()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.through_gpu(buf, "all-reduce", |c, d| c.all_reduce_in_place(d, &ReduceOp::Sum))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.through_gpu(buf, "all-reduce", |c, d| c.all_reduce_in_place(d, &ReduceOp::Sum))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.through_gpu(buf, "broadcast", |c, d| c.broadcast_in_place(d, root as i32))
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.mpi.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
