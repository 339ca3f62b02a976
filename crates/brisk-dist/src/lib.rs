//! `Communicator` for data-parallel training over MPI or NCCL (filled by the distributed issue).
