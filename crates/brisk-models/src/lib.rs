//! The brisk model zoo: ResNet-18/34 and SE-ResNet described by a serde `ModelSpec`,
//! built on candle, counted exactly, and saved under torchvision's tensor names.
//!
//! ```
//! use brisk_models::{ModelSpec, Network};
//! let spec = ModelSpec::resnet18_cifar(10).with_width(0.125);
//! let net = Network::new(spec, 0, &candle_core::Device::Cpu).unwrap();
//! let x = candle_core::Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
//! assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 10]);
//! ```

pub mod error;
pub mod init;
pub mod network;
pub mod resnet;
pub mod spec;
pub mod tensors;

pub use error::{Error, Result};
pub use network::{read_sidecar, sidecar_path, write_atomic, write_sidecar, Network};
pub use resnet::{Kernels, ResNet};
pub use spec::{Arch, BlockChannels, BlockPlan, Channels, ModelSpec, Stem};
pub use tensors::{Role, TensorInfo};
