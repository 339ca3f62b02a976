//! The brisk model zoo on candle: the ResNet-18/34 and SE-ResNet that a `ModelSpec`
//! (brisk-spec) describes, built on brisk's CPU kernels or candle's ops, initialised
//! reproducibly, and saved under torchvision's tensor names.
//!
//! ```
//! use brisk_models::{ModelSpec, Network};
//! let spec = ModelSpec::resnet18_cifar(10).with_width(0.125);
//! let net = Network::new(spec, 0, &candle_core::Device::Cpu).unwrap();
//! let x = candle_core::Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
//! assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 10]);
//! ```

pub mod backend;
pub mod engine;
pub mod error;
pub mod init;
pub mod memory;
pub mod network;
pub mod op_times;
pub mod resnet;
pub mod split;

pub use backend::{Backend, BnArgs, CpuBackend};
/// The geometry of a convolution as a backend receives it.
pub use brisk_ops::{ConvShape, Products};
pub use brisk_spec::{
    model_file, read_sidecar, sidecar_path, write_sidecar, Arch, BlockChannels, BlockConvs, BlockPlan,
    Channels, ConvPlan, ModelSpec, PoolPlan, Role, Stem, TensorInfo, MODEL_FILE,
};
pub use engine::{Engine, Executor};
pub use error::{Error, Result};
pub use memory::{plan_step, Lifetime, MemoryPlan, Planner};
pub use network::{verify_model_file, Network};
pub use op_times::{Op, OpTime, OpTimes};
pub use resnet::{Kernels, ResNet};
pub use split::{slice_sizes, Slices, SplitEngine};
