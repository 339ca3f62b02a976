//! Seeded, torchvision-style initialisation of a model's tensors.
//!
//! candle's CPU random generator cannot be seeded, so brisk draws initial weights itself
//! from a ChaCha stream: the same seed gives the same weights on every machine.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;
use brisk_spec::{Role, TensorInfo};

/// Draws the initial value of one tensor as torchvision does: Kaiming normal
/// (fan_out, ReLU gain) for convolution weights, PyTorch's default uniform ranges for
/// biases and the linear layer, batch-norm weight 1 (or 0) and bias 0, running mean 0
/// and running variance 1.
pub fn initial_value(info: &TensorInfo, rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    let n = info.numel();
    let uniform = |rng: &mut ChaCha8Rng, bound: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
    };
    let values: Vec<f32> = match info.role {
        Role::ConvWeight => {
            let fan_out: usize = info.shape[0] * info.shape[2..].iter().product::<usize>();
            let std = (2.0 / fan_out as f64).sqrt();
            let normal = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (0..n).map(|_| normal.sample(rng) as f32).collect()
        }
        Role::LinearWeight => {
            let fan_in = info.shape[1];
            uniform(rng, 1.0 / (fan_in as f32).sqrt())
        }
        Role::ConvBias { fan_in } | Role::LinearBias { fan_in } => uniform(rng, 1.0 / (fan_in as f32).sqrt()),
        Role::BnWeight { zero } => vec![if zero { 0.0 } else { 1.0 }; n],
        Role::BnBias | Role::RunningMean => vec![0.0; n],
        Role::RunningVar => vec![1.0; n],
    };
    Ok(Tensor::from_vec(values, info.shape.as_slice(), device)?)
}

/// The generator all initial weights of a model are drawn from, in tensor-table order.
pub fn init_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
