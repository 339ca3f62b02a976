//! Optimisers with PyTorch's update rules.

use std::collections::HashMap;

use brisk_ops::{sgd_update, SgdStep};
use brisk_schema::{AdamWConfig, OptimizerConfig, OptimizerKind, SgdConfig};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// A parameter an optimiser updates: its checkpoint name, its variable, and whether
/// weight decay applies to it (false for batch-norm and bias parameters when excluded).
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

impl Param {
    /// Parameters from `(name, var)` pairs, with weight decay on every one, or, when
    /// `decay_norm_and_bias` is false, on every one but the 1-D ones (batch-norm scales
    /// and shifts, biases), as the usual "no decay on BN and bias" recipe.
    pub fn from_named(vars: Vec<(String, Var)>, decay_norm_and_bias: bool) -> Vec<Param> {
        vars.into_iter()
            .map(|(name, var)| {
                let decay = decay_norm_and_bias || var.as_tensor().rank() > 1;
                Param { name, var, decay }
            })
            .collect()
    }
}

/// A copy of the loaded state tensor `key`, checked to have `like`'s shape and dtype.
pub(crate) fn state_tensor(state: &HashMap<String, Tensor>, key: &str, like: &Tensor) -> Result<Tensor> {
    let t = state.get(key).ok_or_else(|| Error::State {
        problem: format!("optimiser state `{key}` is missing"),
    })?;
    if t.dims() != like.dims() || t.dtype() != like.dtype() {
        return Err(Error::State {
            problem: format!(
                "optimiser state `{key}` has shape {:?} {:?}, the parameter {:?} {:?}",
                t.dims(),
                t.dtype(),
                like.dims(),
                like.dtype()
            ),
        });
    }
    // A copy: the optimiser updates its state in place.
    Ok(t.copy()?)
}

/// SGD with momentum, Nesterov and weight decay. For each parameter w with gradient g:
///
/// ```text
/// g ← g + weight_decay · w
/// b ← g                      on the first step,  b ← momentum · b + g  afterwards
/// d ← g + momentum · b       with Nesterov,      d ← b                 without
/// w ← w − lr · d
/// ```
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    params: Vec<SgdParam>,
}

#[derive(Debug)]
struct SgdParam {
    param: Param,
    /// The momentum buffer (also the scratch of plain SGD), created on the first step.
    velocity: Option<Tensor>,
}

impl Sgd {
    /// An optimiser over `params`.
    pub fn new(params: Vec<Param>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let params = params
            .into_iter()
            .map(|param| SgdParam {
                param,
                velocity: None,
            })
            .collect();
        Ok(Sgd { config, params })
    }

    pub fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Applies one update from the gradients in `grads`; parameters without a gradient
    /// are left alone (their velocity too), as PyTorch does. The update runs as brisk-ops'
    /// fused in-place kernel.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        for p in &mut self.params {
            let var = &p.param.var;
            let Some(g) = grads.get(var) else { continue };
            if !brisk_models::Kernels::run_on(var.device()) {
                // brisk's fused update is a CPU kernel; elsewhere the same rule in tensor ops.
                p.velocity = Some(tensor_sgd_step(var, g, p.velocity.as_ref(), &c, p.param.decay)?);
                continue;
            }
            let (velocity, first) = match &p.velocity {
                Some(v) => (v.clone(), false),
                None => (var.as_tensor().zeros_like()?, true),
            };
            let step = SgdStep {
                lr: c.lr as f32,
                momentum: c.momentum as f32,
                weight_decay: if p.param.decay { c.weight_decay as f32 } else { 0.0 },
                nesterov: c.nesterov,
                first,
            };
            sgd_update(var.as_tensor(), &velocity, g, step)?;
            p.velocity = Some(velocity);
        }
        Ok(())
    }

    /// The momentum buffers by key `velocity.<parameter>` (parameters not yet updated have none).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| Some((format!("velocity.{}", p.param.name), p.velocity.clone()?)))
            .collect()
    }

    /// Restores buffers written by [`Sgd::state`]; a parameter without one starts afresh.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let key = format!("velocity.{}", p.param.name);
            p.velocity = match state.contains_key(&key) {
                true => Some(state_tensor(state, &key, p.param.var.as_tensor())?),
                false => None,
            };
        }
        Ok(())
    }
}

/// One SGD update of `var` in candle tensor ops (for devices brisk-ops has no kernel
/// for); returns the new momentum buffer.
fn tensor_sgd_step(
    var: &Var,
    g: &Tensor,
    velocity: Option<&Tensor>,
    c: &SgdConfig,
    decay: bool,
) -> Result<Tensor> {
    let wd = if decay { c.weight_decay } else { 0.0 };
    let g = (g + (var.as_tensor() * wd)?)?;
    let v = match velocity {
        Some(v) => ((v * c.momentum)? + &g)?,
        None => g.clone(),
    };
    let d = if c.nesterov {
        (&g + (&v * c.momentum)?)?
    } else {
        v.clone()
    };
    var.set(&(var.as_tensor() - (d * c.lr)?)?)?;
    Ok(v)
}

/// AdamW with bias correction. For each parameter w with gradient g at step t:
///
/// ```text
/// w ← w − lr·wd·w
/// m ← β1·m + (1 − β1)·g        v ← β2·v + (1 − β2)·g²
/// w ← w − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + eps)
/// ```
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<AdamParam>,
}

#[derive(Debug)]
struct AdamParam {
    param: Param,
    /// First and second moments, and this parameter's step count.
    state: Option<(Tensor, Tensor, i32)>,
}

impl AdamW {
    /// An optimiser over `params`.
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let params = params
            .into_iter()
            .map(|param| AdamParam { param, state: None })
            .collect();
        Ok(AdamW { config, params })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Applies one update; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        for p in &mut self.params {
            let Some(g) = grads.get(&p.param.var) else {
                continue;
            };
            let (m, v, t) = match p.state.take() {
                Some(s) => s,
                None => (g.zeros_like()?, g.zeros_like()?, 0),
            };
            let t = t + 1;
            let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / (1.0 - c.beta1.powi(t)))?;
            let v_hat = (&v / (1.0 - c.beta2.powi(t)))?;
            let mut w = p.param.var.as_tensor().clone();
            if p.param.decay && c.weight_decay != 0.0 {
                w = (&w * (1.0 - c.lr * c.weight_decay))?;
            }
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            p.param.var.set(&(w - (update * c.lr)?)?)?;
            p.state = Some((m, v, t));
        }
        Ok(())
    }

    /// The moments and step counts by key `exp_avg.<p>`, `exp_avg_sq.<p>`, `step.<p>` (a
    /// one-element u32 tensor), PyTorch's names for them.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            if let Some((m, v, t)) = &p.state {
                let n = &p.param.name;
                out.push((format!("exp_avg.{n}"), m.clone()));
                out.push((format!("exp_avg_sq.{n}"), v.clone()));
                let step = Tensor::new(&[*t as u32], m.device())?;
                out.push((format!("step.{n}"), step));
            }
        }
        Ok(out)
    }

    /// Restores state written by [`AdamW::state`]; a parameter without any starts afresh.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let n = &p.param.name;
            let step_key = format!("step.{n}");
            p.state = match state.get(&step_key) {
                None => None,
                Some(step) => {
                    let like = p.param.var.as_tensor();
                    let m = state_tensor(state, &format!("exp_avg.{n}"), like)?;
                    let v = state_tensor(state, &format!("exp_avg_sq.{n}"), like)?;
                    let t = step.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                    let &[t] = t.as_slice() else {
                        return Err(Error::State {
                            problem: format!("optimiser state `{step_key}` must hold one number"),
                        });
                    };
                    Some((m, v, t as i32))
                }
            };
        }
        Ok(())
    }
}

/// The optimiser a training run uses, with its state for checkpoints.
#[derive(Debug)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    /// The optimiser `config` names over `vars`, at learning rate `lr`.
    pub fn new(config: &OptimizerConfig, vars: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        let params = Param::from_named(vars, config.decay_norm_and_bias);
        Ok(match config.kind {
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(params, config.sgd(lr))?),
            OptimizerKind::AdamW => Optimizer::AdamW(AdamW::new(params, config.adamw(lr))?),
        })
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.step(grads),
            Optimizer::AdamW(o) => o.step(grads),
        }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Optimizer::Sgd(o) => o.set_learning_rate(lr),
            Optimizer::AdamW(o) => o.set_learning_rate(lr),
        }
    }

    /// Sets SGD's momentum (AdamW's β1): what a schedule that cycles it asks for.
    pub fn set_momentum(&mut self, momentum: f64) {
        match self {
            Optimizer::Sgd(o) => o.config.momentum = momentum,
            Optimizer::AdamW(o) => o.config.beta1 = momentum,
        }
    }

    /// The state tensors to checkpoint, by name.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Optimizer::Sgd(o) => Ok(o.state()),
            Optimizer::AdamW(o) => o.state(),
        }
    }

    /// Restores the state written by [`Optimizer::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.load_state(state),
            Optimizer::AdamW(o) => o.load_state(state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three steps of SGD on loss = sum(w * k) (gradient k) against the update equations
    /// worked by hand in f64.
    fn check(config: SgdConfig) -> Result<()> {
        let dev = Device::Cpu;
        let w0 = [1.0f64, -2.0, 0.5];
        let k = [0.3f64, -0.1, 2.0];
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?)?;
        let kt = Tensor::new(&[0.3f32, -0.1, 2.0], &dev)?;
        let mut opt = Sgd::new(Param::from_named(vec![("w".into(), w.clone())], true), config)?;
        // The tensor-op update used off the CPU, run here on a copy.
        let w2 = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?)?;
        let mut v2: Option<Tensor> = None;
        let (mut wh, mut vh) = (w0, [0f64; 3]);
        for step in 0..3 {
            let grads = (w.as_tensor() * &kt)?.sum_all()?.backward()?;
            opt.step(&grads)?;
            let g2 = (w2.as_tensor() * &kt)?.sum_all()?.backward()?;
            let g2 = g2.get(&w2).expect("gradient");
            v2 = Some(tensor_sgd_step(&w2, g2, v2.as_ref(), &config, true)?);
            let diff = (w.as_tensor() - w2.as_tensor())?
                .abs()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "tensor-op update differs by {diff} ({config:?})");
            for i in 0..3 {
                let g = k[i] + config.weight_decay * wh[i];
                vh[i] = if step == 0 { g } else { config.momentum * vh[i] + g };
                let d = if config.nesterov {
                    g + config.momentum * vh[i]
                } else {
                    vh[i]
                };
                wh[i] -= config.lr * d;
            }
            let got = w.as_tensor().to_vec1::<f32>()?;
            for i in 0..3 {
                assert!(
                    (got[i] as f64 - wh[i]).abs() < 1e-6,
                    "step {step} w[{i}]: {} vs {} ({config:?})",
                    got[i],
                    wh[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn updates_follow_pytorch_equations() -> Result<()> {
        check(SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        })?;
        check(SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        })?;
        check(SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
        })?;
        check(SgdConfig {
            lr: 0.2,
            momentum: 0.5,
            nesterov: false,
            weight_decay: 0.1,
        })
    }

    #[test]
    fn adamw_follows_pytorch_equations() -> Result<()> {
        let dev = Device::Cpu;
        let c = AdamWConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?)?;
        let k = [0.3f64, -0.1, 2.0];
        let kt = Tensor::new(&[0.3f32, -0.1, 2.0], &dev)?;
        let mut opt = AdamW::new(Param::from_named(vec![("w".into(), w.clone())], true), c)?;
        let (mut wh, mut mh, mut vh) = ([1.0f64, -2.0, 0.5], [0f64; 3], [0f64; 3]);
        for t in 1..=3 {
            // Gradient of sum(w * k * w) = 2 k w: depends on w, so the steps interact.
            let grads = (w.as_tensor().sqr()? * &kt)?.sum_all()?.backward()?;
            opt.step(&grads)?;
            for i in 0..3 {
                let g = 2.0 * k[i] * wh[i];
                wh[i] *= 1.0 - c.lr * c.weight_decay;
                mh[i] = c.beta1 * mh[i] + (1.0 - c.beta1) * g;
                vh[i] = c.beta2 * vh[i] + (1.0 - c.beta2) * g * g;
                let (m_hat, v_hat) = (mh[i] / (1.0 - c.beta1.powi(t)), vh[i] / (1.0 - c.beta2.powi(t)));
                wh[i] -= c.lr * m_hat / (v_hat.sqrt() + c.eps);
            }
            let got = w.as_tensor().to_vec1::<f32>()?;
            for i in 0..3 {
                assert!(
                    (got[i] as f64 - wh[i]).abs() < 1e-6,
                    "step {t} w[{i}]: {} vs {}",
                    got[i],
                    wh[i]
                );
            }
        }
        assert!(AdamW::new(
            vec![],
            AdamWConfig {
                beta2: 1.0,
                ..Default::default()
            }
        )
        .is_err());
        Ok(())
    }

    /// Steps 1–2 in one optimiser, then its state into a fresh one for step 3, must give
    /// the bits of three steps in one optimiser (what a resumed run relies on).
    #[test]
    fn state_carries_over_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let kt = Tensor::new(&[0.3f32, -0.1, 2.0], &dev)?;
        let build = |kind: u8, w: &Var| -> Result<Optimizer> {
            let params = Param::from_named(vec![("w".into(), w.clone())], true);
            Ok(match kind {
                0 => Optimizer::Sgd(Sgd::new(params, SgdConfig::default())?),
                _ => Optimizer::AdamW(AdamW::new(params, AdamWConfig::default())?),
            })
        };
        let step = |opt: &mut Optimizer, w: &Var| -> Result<()> {
            opt.step(&(w.as_tensor().sqr()? * &kt)?.sum_all()?.backward()?)
        };
        for kind in [0u8, 1] {
            let w1 = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?)?;
            let mut one = build(kind, &w1)?;
            for _ in 0..3 {
                step(&mut one, &w1)?;
            }
            let w2 = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?)?;
            let mut first = build(kind, &w2)?;
            step(&mut first, &w2)?;
            step(&mut first, &w2)?;
            let state: HashMap<String, Tensor> = first.state()?.into_iter().collect();
            assert!(!state.is_empty());
            let mut second = build(kind, &w2)?;
            second.load_state(&state)?;
            step(&mut second, &w2)?;
            assert_eq!(w1.as_tensor().to_vec1::<f32>()?, w2.as_tensor().to_vec1::<f32>()?);
        }
        // A state of the wrong shape is refused, naming the tensor.
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &dev)?)?;
        let bad = HashMap::from([("velocity.w".to_string(), Tensor::new(&[1.0f32], &dev)?)]);
        let e = build(0, &w)?
            .load_state(&bad)
            .expect_err("wrong shape")
            .to_string();
        assert!(e.contains("velocity.w"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = |c: SgdConfig, field: &str| {
            let e = Sgd::new(vec![], c).expect_err("must be rejected").to_string();
            assert!(e.contains(field), "{e}");
        };
        bad(
            SgdConfig {
                lr: -1.0,
                ..Default::default()
            },
            "lr",
        );
        bad(
            SgdConfig {
                momentum: 1.5,
                ..Default::default()
            },
            "momentum",
        );
        bad(
            SgdConfig {
                momentum: 0.0,
                nesterov: true,
                ..Default::default()
            },
            "nesterov",
        );
        bad(
            SgdConfig {
                weight_decay: f64::NAN,
                ..Default::default()
            },
            "weight_decay",
        );
    }
}
