//! brisk's own GPU compute path (issue 15), the first pieces: CUDA devices opened through
//! cudarc's dynamic loading — so `cargo build` needs no GPU, driver or toolkit, and a
//! machine without the driver gets an error naming the missing library instead of
//! cudarc's panic — and brisk's element-wise and reduction kernels (fused SGD, softmax
//! cross-entropy with label smoothing and top-1/top-5 counts, global average pooling, the
//! SE gate, batch-norm over NHWC activations with its residual-add and ReLU fused), CUDA C compiled at run time by NVRTC for the device's architecture and cached
//! per process, and `DeviceKernels`, which loads them on a device and launches them on device
//! buffers; with feature `nccl`, NCCL on the same cudarc. Convolutions (cuDNN) and the
//! training step that joins them are the next pieces; see docs/gpu.md.

pub mod batchnorm;
pub mod conv_plan;
pub mod cudnn;
pub mod dense;
mod device;
pub mod elementwise;
mod error;
pub mod kernels;
mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod pool;

pub use batchnorm::{BnDevice, NhwcShape};
pub use device::{driver_present, Gpu};
pub use error::{Error, Result};
pub use kernels::{compile, nvrtc_present, Kernel, KERNELS};
pub use launch::{DeviceKernels, ScaledSgdStep};
