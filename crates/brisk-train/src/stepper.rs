//! `Stepper`: a training batch's forward and backward, on brisk's engine when the
//! network allows it (f32 on brisk's kernels; see `brisk_models::Engine`), the batch split
//! across the compute threads where that pays (`brisk_models::SplitEngine`), else on
//! candle's autograd graph. Both hand back candle's `GradStore`, so losses, hooks and
//! optimisers are the same either way.

use brisk_models::{Engine, Network, OpTimes, Slices, SplitEngine};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Runs training batches through the engine or the graph.
#[derive(Debug)]
pub struct Stepper {
    engine: Option<SplitEngine>,
    /// The engine's logits of the batch in flight, as a leaf the loss is built on.
    logits: Option<Var>,
}

impl Stepper {
    /// A stepper for `net`: the engine when `allow_engine` and the network supports it,
    /// each batch split into `slices` (see [`Slices`]).
    pub fn new(net: &Network, allow_engine: bool, slices: Slices) -> Result<Self> {
        let engine = match allow_engine && Engine::supports(net).is_ok() {
            true => Some(SplitEngine::new(net, slices)?),
            false => None,
        };
        Ok(Stepper { engine, logits: None })
    }

    /// "engine" or "graph": which path runs the step.
    pub fn path(&self) -> &'static str {
        if self.engine.is_some() {
            "engine"
        } else {
            "graph"
        }
    }

    /// The slices the last batch was split into (1 on the graph).
    pub fn slices(&self) -> usize {
        self.engine.as_ref().map_or(1, SplitEngine::slices_used)
    }

    /// The engine's per-op wall times (`None` on the graph path, which has none).
    pub fn op_times(&self) -> Option<&OpTimes> {
        self.engine.as_ref().map(SplitEngine::op_times)
    }

    /// The training-mode logits of images `x` `[N, C, H, W]` (batch-norm running
    /// statistics updated); build the loss on them, then call [`Stepper::backward`].
    pub fn forward(&mut self, net: &Network, x: &Tensor) -> Result<Tensor> {
        let Some(engine) = &mut self.engine else {
            return Ok(net.forward_t(x, true)?);
        };
        let n = x.dim(0)?;
        let logits = engine.forward_train(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
        let classes = logits.len() / n.max(1);
        let logits = Var::from_tensor(&Tensor::from_vec(logits, (n, classes), x.device())?)?;
        let t = logits.as_tensor().clone();
        self.logits = Some(logits);
        Ok(t)
    }

    /// The evaluation-mode logits of images `x` (running statistics; nothing kept).
    pub fn forward_eval(&mut self, net: &Network, x: &Tensor) -> Result<Tensor> {
        let Some(engine) = &mut self.engine else {
            return Ok(net.forward_t(x, false)?);
        };
        let n = x.dim(0)?;
        let logits = engine.forward_eval(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
        let classes = logits.len() / n.max(1);
        Ok(Tensor::from_vec(logits, (n, classes), x.device())?)
    }

    /// The gradients of `loss` (built on the last [`Stepper::forward`]'s logits) for the
    /// trainable variables `params` (sorted by name, as `Network::trainable_vars` gives
    /// them).
    pub fn backward(&mut self, loss: &Tensor, params: &[(String, Var)]) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let Some(engine) = &mut self.engine else {
            return Ok(grads);
        };
        let logits = self.logits.take().ok_or_else(|| Error::State {
            problem: "backward without a forward pass".into(),
        })?;
        let dlogits = match grads.remove(logits.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            // The loss does not depend on the logits (a zero-weight loss, say).
            None => vec![0f32; logits.as_tensor().elem_count()],
        };
        for (name, g) in engine.backward(&dlogits)? {
            let i = params
                .binary_search_by(|(n, _)| n.as_str().cmp(&name))
                .map_err(|_| Error::State {
                    problem: format!("the engine computed a gradient for `{name}`, which is not trained"),
                })?;
            let t = params[i].1.as_tensor();
            grads.insert(t, Tensor::from_vec(g, t.dims(), t.device())?);
        }
        Ok(grads)
    }
}
