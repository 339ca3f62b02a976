//! Mixed precision for brisk: the `PrecisionPolicy` (which layers compute in f32, bf16 or
//! f16; master weights always stay f32) and the dynamic `LossScaler` (PyTorch GradScaler's
//! rules) that keeps f16 gradients from underflowing. The loop uses them through a hook;
//! the half-precision kernels live in brisk-ops. No tensor library here: the settings are
//! read by tools (the experiment runner) that never build a model.

pub mod error;
pub mod policy;
pub mod scaler;

pub use error::{Error, Result};
pub use policy::{Dtype, LayerKind, Precision, PrecisionPolicy};
pub use scaler::{LossScaler, ScalerConfig, ScalerState};
