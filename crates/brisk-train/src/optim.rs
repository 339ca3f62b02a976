//! Optimisers with PyTorch's update rules.

use brisk_ops::{sgd_update, SgdStep};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Settings of stochastic gradient descent, as `torch.optim.SGD` (without dampening).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor; 0 disables the velocity buffer.
    pub momentum: f64,
    /// Nesterov momentum (needs momentum > 0).
    pub nesterov: bool,
    /// L2 penalty added to the gradient (coupled weight decay, as PyTorch's SGD).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// lr 0.1, momentum 0.9, no Nesterov, weight decay 5e-4: the usual CIFAR recipe.
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        }
    }
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
    params: Vec<Param>,
}

#[derive(Debug)]
struct Param {
    var: Var,
    /// Weight decay applies to this parameter (false for excluded BN/bias parameters).
    decay: bool,
    /// The momentum buffer (also the scratch of plain SGD), created on the first step.
    velocity: Option<Tensor>,
}

impl Sgd {
    /// An optimiser over `vars`; weight decay applies to every one of them.
    pub fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self> {
        Self::with_decay_mask(vars.into_iter().map(|v| (v, true)).collect(), config)
    }

    /// An optimiser over `(var, apply weight decay)` pairs.
    pub fn with_decay_mask(vars: Vec<(Var, bool)>, config: SgdConfig) -> Result<Self> {
        if !(config.lr.is_finite() && config.lr >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "lr",
                problem: format!("must be a non-negative number, got {}", config.lr),
            });
        }
        if !(0.0..1.0).contains(&config.momentum) {
            return Err(Error::InvalidConfig {
                field: "momentum",
                problem: format!("must be in [0, 1), got {}", config.momentum),
            });
        }
        if config.nesterov && config.momentum == 0.0 {
            return Err(Error::InvalidConfig {
                field: "nesterov",
                problem: "needs a momentum above 0".into(),
            });
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "weight_decay",
                problem: format!("must be a non-negative number, got {}", config.weight_decay),
            });
        }
        let params = vars
            .into_iter()
            .map(|(var, decay)| Param {
                var,
                decay,
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
            let Some(g) = grads.get(&p.var) else { continue };
            let (velocity, first) = match &p.velocity {
                Some(v) => (v.clone(), false),
                None => (p.var.as_tensor().zeros_like()?, true),
            };
            let step = SgdStep {
                lr: c.lr as f32,
                momentum: c.momentum as f32,
                weight_decay: if p.decay { c.weight_decay as f32 } else { 0.0 },
                nesterov: c.nesterov,
                first,
            };
            sgd_update(p.var.as_tensor(), &velocity, g, step)?;
            p.velocity = Some(velocity);
        }
        Ok(())
    }
}

/// Settings of AdamW (Loshchilov & Hutter), as `torch.optim.AdamW`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: `w ← w − lr · weight_decay · w` before the Adam step.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
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
    var: Var,
    decay: bool,
    /// First and second moments, and this parameter's step count.
    state: Option<(Tensor, Tensor, i32)>,
}

impl AdamW {
    /// An optimiser over `(var, apply weight decay)` pairs.
    pub fn with_decay_mask(vars: Vec<(Var, bool)>, config: AdamWConfig) -> Result<Self> {
        let c = config;
        let checks = [
            ("lr", c.lr.is_finite() && c.lr >= 0.0),
            ("beta1", (0.0..1.0).contains(&c.beta1)),
            ("beta2", (0.0..1.0).contains(&c.beta2)),
            ("eps", c.eps.is_finite() && c.eps > 0.0),
            (
                "weight_decay",
                c.weight_decay.is_finite() && c.weight_decay >= 0.0,
            ),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(Error::InvalidConfig {
                field,
                problem: format!("out of range in {c:?}"),
            });
        }
        let params = vars
            .into_iter()
            .map(|(var, decay)| AdamParam {
                var,
                decay,
                state: None,
            })
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
            let Some(g) = grads.get(&p.var) else { continue };
            let (m, v, t) = match p.state.take() {
                Some(s) => s,
                None => (g.zeros_like()?, g.zeros_like()?, 0),
            };
            let t = t + 1;
            let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / (1.0 - c.beta1.powi(t)))?;
            let v_hat = (&v / (1.0 - c.beta2.powi(t)))?;
            let mut w = p.var.as_tensor().clone();
            if p.decay && c.weight_decay != 0.0 {
                w = (&w * (1.0 - c.lr * c.weight_decay))?;
            }
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            p.var.set(&(w - (update * c.lr)?)?)?;
            p.state = Some((m, v, t));
        }
        Ok(())
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
        let mut opt = Sgd::new(vec![w.clone()], config)?;
        let (mut wh, mut vh) = (w0, [0f64; 3]);
        for step in 0..3 {
            let grads = (w.as_tensor() * &kt)?.sum_all()?.backward()?;
            opt.step(&grads)?;
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
        let mut opt = AdamW::with_decay_mask(vec![(w.clone(), true)], c)?;
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
        assert!(AdamW::with_decay_mask(
            vec![],
            AdamWConfig {
                beta2: 1.0,
                ..Default::default()
            }
        )
        .is_err());
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
