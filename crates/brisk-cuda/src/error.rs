//! What can go wrong on the GPU path: a CUDA library that is not installed, a driver call
//! that fails, a kernel that does not compile.

/// brisk-cuda's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CUDA library cannot be loaded on this machine.
    #[error("{library} cannot be loaded: {hint}")]
    Missing {
        library: &'static str,
        hint: &'static str,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {what}: {detail}")]
    Driver { what: String, detail: String },
    /// A shape the GPU path cannot take (a convolution cuDNN cannot describe, say).
    #[error("{0}")]
    Shape(String),
    /// A kernel did not compile (NVRTC's log included).
    #[error("kernel {kernel} does not compile for {arch}: {log}")]
    Compile {
        kernel: &'static str,
        arch: &'static str,
        log: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
