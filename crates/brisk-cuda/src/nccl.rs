//! NCCL through brisk-cuda's cudarc (feature `nccl`), loaded at run time like the other
//! CUDA libraries: [`check`] looks for the library first, so a machine without it gets an
//! error naming it instead of cudarc's panic. brisk-dist's `Nccl` communicator is built on
//! these types.

pub use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
pub use cudarc::nccl::result::NcclStatus;
pub use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::error::{Error, Result};

/// Whether the NCCL library loads here.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it could.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// `Ok` where NCCL and the CUDA driver load; otherwise an error naming the missing one.
pub fn check() -> Result<()> {
    if !crate::driver_present() {
        return Err(Error::Missing {
            library: "libcuda (the NVIDIA driver's library)",
            hint: "NCCL needs a GPU and its driver on every rank",
        });
    }
    if !nccl_present() {
        return Err(Error::Missing {
            library: "libnccl",
            hint: "install NCCL (the `nvidia-nccl-cu13` wheel has it) and put its folder on LD_LIBRARY_PATH \
                   with a `libnccl.so` link beside `libnccl.so.2` (the names cudarc looks for do not include `.so.2`)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        match check() {
            Ok(()) => assert!(crate::driver_present() && nccl_present()),
            Err(e) => {
                let msg = e.to_string();
                let named = if crate::driver_present() {
                    "libnccl"
                } else {
                    "libcuda"
                };
                assert!(msg.contains(named), "{msg}");
            }
        }
    }
}
