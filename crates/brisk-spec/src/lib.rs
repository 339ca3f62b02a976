//! The description of a brisk model, with no tensor library: `ModelSpec` (serde, JSON or
//! TOML, named presets), the block plan and the tensor table it derives (torchvision
//! names, shapes, roles, conv → batch-norm pairs), exact counts (parameters, buffers,
//! MACs, checkpoint bytes), batch-norm's constants, and the model file's JSON sidecar.
//!
//! Everything that needs to know what a model is without running it — the CPU network
//! in brisk-models, compression, distribution, the experiment runner — asks this crate.
//!
//! ```
//! use brisk_spec::ModelSpec;
//! let spec = ModelSpec::resnet18_cifar(10);
//! assert_eq!(spec.param_count(), 11_173_962);
//! ```

pub mod error;
pub mod files;
pub mod layers;
pub mod spec;
pub mod tensors;

pub use error::{Error, Result};
pub use files::{model_file, read_sidecar, sidecar_path, write_sidecar, MODEL_FILE};
pub use layers::{BlockConvs, ConvPlan, PoolPlan};
pub use spec::{Arch, BlockChannels, BlockPlan, Channels, ModelSpec, Stem};
pub use tensors::{is_ignored_name, tensor_name, ConvBnPair, Role, TensorInfo};

/// Batch-norm's ε, added to the variance before the square root (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;
/// Momentum of batch-norm's running statistics: new = (1 − m)·old + m·batch (PyTorch's).
pub const BN_MOMENTUM: f64 = 0.1;
