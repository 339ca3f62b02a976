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
use candle_core::{Tensor, Var};

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
    pub fn new(scaler: LossScaler) -> Self {
        LossScaling { scaler }
    }
}

impl Hook for LossScaling {
    fn name(&self) -> &'static str {
        "loss_scaler"
    }

    fn scale_loss(&mut self, loss: Tensor) -> Result<Tensor> {
        Ok(self.scaler.scale_loss(&loss)?)
    }

    fn after_backward(&mut self, ctx: &StepContext, grads: &mut GradStore) -> Result<StepAction> {
        let vars: Vec<Var> = ctx.params.iter().map(|(_, v)| v.clone()).collect();
        let scale = self.scaler.scale();
        let found_inf = self.scaler.unscale(grads, &vars)?;
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
