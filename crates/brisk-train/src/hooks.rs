//! The seams of the training loop: `Hook`s (loss scaling, gradient all-reduce, pruning
//! masks, …) and the pluggable `LossFn` (cross-entropy; distillation adds its own).
//!
//! The loop calls, for every batch: `LossFn::loss` → every hook's `scale_loss` →
//! backward → every hook's `after_backward` (in the order added; any `Skip` skips the
//! update) → the optimiser step → every hook's `after_step`. Hooks also see the start
//! of training, can reduce evaluation sums across ranks, add figures to the event log
//! and carry state through checkpoints.

use brisk_models::Network;
use brisk_precision::{LossScaler, ScalerState};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::loss::cross_entropy;

/// Where training stands when a hook is called.
#[derive(Debug)]
pub struct StepContext<'a> {
    pub net: &'a Network,
    /// The trainable variables by name, sorted by name.
    pub params: &'a [(String, Var)],
    /// Optimiser updates applied so far (before this one, in `after_backward`).
    pub step: u64,
    pub epoch: usize,
    /// Training progress in epochs (fractional).
    pub progress: f64,
}

/// What to do with the gradients of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum StepAction {
    Apply,
    /// Skip the optimiser update (e.g. a loss scaler found inf/NaN gradients); the reason
    /// goes to the event log.
    Skip(String),
}

/// Something that takes part in every training step. Every method has a default that
/// does nothing, so a hook implements only what it needs.
pub trait Hook: Send {
    /// A short name: the key of its state in checkpoints and of its figures in the log.
    fn name(&self) -> &'static str;

    /// Once, before the first step (after a resume too), with the network built.
    fn on_start(&mut self, _net: &Network) -> Result<()> {
        Ok(())
    }

    /// The loss about to be differentiated (a loss scaler multiplies it).
    fn scale_loss(&mut self, loss: Tensor) -> Result<Tensor> {
        Ok(loss)
    }

    /// The gradients of this batch, before the optimiser sees them: all-reduce them,
    /// unscale them, or decide to skip the update.
    fn after_backward(&mut self, _ctx: &StepContext, _grads: &mut GradStore) -> Result<StepAction> {
        Ok(StepAction::Apply)
    }

    /// After the optimiser update (e.g. re-apply pruning masks).
    fn after_step(&mut self, _ctx: &StepContext) -> Result<()> {
        Ok(())
    }

    /// Sums computed on this rank's share (evaluation loss and counts, stop requests); a
    /// distributed hook sums them across ranks in place.
    fn reduce_sums(&mut self, _sums: &mut [f64]) -> Result<()> {
        Ok(())
    }

    /// Before an evaluation and before a checkpoint, on every rank: bring per-rank state
    /// together (a distributed hook averages batch-norm running statistics).
    fn synchronize(&mut self, _net: &Network) -> Result<()> {
        Ok(())
    }

    /// Figures for `step` events (e.g. the loss scale).
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// State to carry through a checkpoint.
    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }

    /// Restores what [`Hook::state`] returned.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// The training loss of a batch.
pub trait LossFn: Send {
    /// The mean loss of `logits` `[N, classes]` for `labels` `[N]`; `images` `[N, C, H, W]`
    /// are there for losses that need them (a distillation teacher).
    fn loss(&mut self, images: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<Tensor>;
}

/// Cross-entropy with optional label smoothing: the default training loss.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy {
    pub smoothing: f64,
}

impl LossFn for CrossEntropy {
    fn loss(&mut self, _images: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        cross_entropy(logits, labels, self.smoothing)
    }
}

/// Dynamic loss scaling for f16 layers (PyTorch GradScaler's rules): the loss is scaled
/// before backward, the gradients unscaled after; a batch with inf/NaN gradients is
/// skipped and the scale backed off. Its state travels in checkpoints.
#[derive(Debug)]
pub struct LossScaling {
    scaler: LossScaler,
}

impl LossScaling {
    /// The hook's name (its checkpoint key).
    pub const NAME: &'static str = "loss_scaler";

    pub fn new(scaler: LossScaler) -> Self {
        LossScaling { scaler }
    }

    /// Divides the gradients of `vars` by the scale in place and reports whether any
    /// holds inf or NaN (then the update must be skipped).
    fn unscale(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<bool> {
        let inv = 1.0 / self.scaler.scale();
        let mut found_inf = false;
        for (_, var) in vars {
            let Some(g) = grads.get(var) else { continue };
            let g = (g * inv)?;
            // A sum over a tensor holding inf or NaN is inf or NaN.
            let total = g.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            found_inf |= !total.is_finite();
            grads.insert(var.as_tensor(), g);
        }
        Ok(found_inf)
    }
}

impl Hook for LossScaling {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn scale_loss(&mut self, loss: Tensor) -> Result<Tensor> {
        Ok((loss * self.scaler.scale())?)
    }

    fn after_backward(&mut self, ctx: &StepContext, grads: &mut GradStore) -> Result<StepAction> {
        let scale = self.scaler.scale();
        let found_inf = self.unscale(grads, ctx.params)?;
        self.scaler.update(found_inf);
        Ok(if found_inf {
            StepAction::Skip(format!(
                "inf/NaN gradients at loss scale {scale}; scale now {}",
                self.scaler.scale()
            ))
        } else {
            StepAction::Apply
        })
    }

    fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![("loss_scale", self.scaler.scale())]
    }

    fn state(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self.scaler.state()).map_err(|e| crate::Error::State {
            problem: format!("cannot save the loss scaler: {e}"),
        })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: ScalerState = serde_json::from_value(state.clone()).map_err(|e| crate::Error::State {
            problem: format!("loss scaler state {state}: {e}"),
        })?;
        self.scaler.set_state(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use brisk_precision::ScalerConfig;
    use candle_core::Device;

    #[test]
    fn loss_scaling_unscales_and_skips_on_overflow() -> Result<()> {
        let dev = Device::Cpu;
        let mut spec = ModelSpec::resnet18_cifar(2).with_width(0.0625);
        spec.image_size = 8;
        let net = Network::new(spec, 0, &dev)?;
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev)?)?;
        let params = vec![("w".to_string(), w.clone())];
        let ctx = StepContext {
            net: &net,
            params: &params,
            step: 0,
            epoch: 0,
            progress: 0.0,
        };
        let mut hook = LossScaling::new(LossScaler::new(ScalerConfig {
            init_scale: 1024.0,
            ..Default::default()
        })?);
        let loss = (w.as_tensor() * 3.0)?.sum_all()?;
        let mut grads = hook.scale_loss(loss)?.backward()?;
        assert_eq!(hook.after_backward(&ctx, &mut grads)?, StepAction::Apply);
        let g = grads.get(&w).map(|g| g.to_vec1::<f32>()).transpose()?;
        assert_eq!(g, Some(vec![3.0, 3.0]), "the gradient is unscaled");
        // An overflowed gradient skips the update and halves the scale.
        let loss = (w.as_tensor() * f64::INFINITY)?.sum_all()?;
        let mut grads = hook.scale_loss(loss)?.backward()?;
        assert!(matches!(
            hook.after_backward(&ctx, &mut grads)?,
            StepAction::Skip(_)
        ));
        assert_eq!(hook.metrics(), vec![("loss_scale", 512.0)]);
        Ok(())
    }
}
