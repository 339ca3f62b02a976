//! Opening a CUDA device: the driver library is looked for first, so a machine without it
//! gets `Error::Missing` (cudarc itself panics when it cannot load a library).

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// Whether the CUDA driver library (libcuda, installed with the NVIDIA driver) loads here.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it could.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One CUDA device, opened.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
}

impl Gpu {
    /// Opens device `ordinal` (0 for the first GPU).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(Error::Missing {
                library: "libcuda (the NVIDIA driver's library)",
                hint: "this machine has no NVIDIA driver: install it (and have a GPU), or run on the CPU",
            });
        }
        let count = CudaContext::device_count().map_err(|e| Error::Driver {
            what: "counting devices".into(),
            detail: e.to_string(),
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Driver {
                what: format!("opening cuda:{ordinal}"),
                detail: format!("this machine has {count} CUDA device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Driver {
            what: format!("opening cuda:{ordinal}"),
            detail: e.to_string(),
        })?;
        Ok(Gpu { ctx })
    }

    /// The device's name ("NVIDIA H200", say).
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| Error::Driver {
            what: "reading the device name".into(),
            detail: e.to_string(),
        })
    }

    /// The device's architecture as NVRTC names it ("sm_90" for Hopper), the one brisk's
    /// kernels are compiled for.
    pub fn arch(&self) -> Result<&'static str> {
        let (major, minor) = self.ctx.compute_capability().map_err(|e| Error::Driver {
            what: "reading the compute capability".into(),
            detail: e.to_string(),
        })?;
        arch_name(major, minor).ok_or_else(|| Error::Driver {
            what: "choosing the kernels' architecture".into(),
            detail: format!("compute capability {major}.{minor} is not one brisk compiles for (7.0 to 12.1)"),
        })
    }

    /// The cudarc context, for launching kernels.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// NVRTC's name of compute capability `major.minor`, for the architectures CUDA 13
/// compiles for.
pub fn arch_name(major: i32, minor: i32) -> Option<&'static str> {
    Some(match (major, minor) {
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (10, 3) => "sm_103",
        (11, 0) => "sm_110",
        (12, 0) => "sm_120",
        (12, 1) => "sm_121",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capabilities_name_their_architecture() {
        assert_eq!(arch_name(9, 0), Some("sm_90"));
        assert_eq!(arch_name(8, 0), Some("sm_80"));
        assert_eq!(arch_name(12, 1), Some("sm_121"));
        assert_eq!(arch_name(6, 1), None); // Pascal: CUDA 13 dropped it
        assert_eq!(arch_name(9, 5), None);
    }

    #[test]
    fn a_machine_without_the_driver_gets_an_error_naming_it() {
        match Gpu::open(0) {
            Err(e) if !driver_present() => {
                let msg = e.to_string();
                assert!(msg.contains("libcuda") && msg.contains("NVIDIA driver"), "{msg}");
            }
            Ok(gpu) => {
                assert!(gpu.name().is_ok_and(|n| !n.is_empty()));
                assert!(gpu.arch().is_ok_and(|a| a.starts_with("sm_")));
            }
            // A driver without a GPU: an error from the driver, not a panic.
            Err(e) => assert!(matches!(e, Error::Driver { .. }), "{e}"),
        }
        // An ordinal past the devices is an error on every machine.
        assert!(Gpu::open(1 << 20).is_err());
    }
}
