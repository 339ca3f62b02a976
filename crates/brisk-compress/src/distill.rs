//! Knowledge distillation (Hinton et al.) as a training loss: the student learns from a
//! teacher's softened outputs as well as from the labels.

use brisk_models::Network;
use brisk_train::loss::cross_entropy;
use brisk_train::LossFn;
use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// `loss = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)`, the KL term
/// averaged over the batch (PyTorch's `kl_div(..., reduction="batchmean")`). The teacher
/// runs in eval mode (running statistics) and no gradient flows into it.
#[derive(Debug)]
pub struct Distillation {
    teacher: Network,
    temperature: f64,
    alpha: f64,
}

impl Distillation {
    pub fn new(teacher: Network, temperature: f64, alpha: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::InvalidConfig {
                field: "temperature",
                problem: format!("must be positive, got {temperature}"),
            });
        }
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::InvalidConfig {
                field: "alpha",
                problem: format!("must be in [0, 1], got {alpha}"),
            });
        }
        Ok(Distillation {
            teacher,
            temperature,
            alpha,
        })
    }

    /// The loss for given student and teacher logits.
    pub fn loss_from_logits(&self, student: &Tensor, teacher: &Tensor, labels: &Tensor) -> Result<Tensor> {
        kd_loss(student, teacher, labels, self.temperature, self.alpha)
    }
}

fn kd_loss(student: &Tensor, teacher: &Tensor, labels: &Tensor, t: f64, alpha: f64) -> Result<Tensor> {
    let n = student.dim(0)? as f64;
    let log_ps = candle_nn::ops::log_softmax(&(student / t)?, D::Minus1)?;
    let log_pt = candle_nn::ops::log_softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let kl = (log_pt.exp()? * (&log_pt - &log_ps)?)?.sum_all()?;
    let soft = (kl * (alpha * t * t / n))?;
    if alpha == 1.0 {
        return Ok(soft);
    }
    let hard = (cross_entropy(student, labels, 0.0)? * (1.0 - alpha))?;
    Ok((soft + hard)?)
}

impl LossFn for Distillation {
    fn loss(&mut self, images: &Tensor, logits: &Tensor, labels: &Tensor) -> brisk_train::Result<Tensor> {
        let teacher = self.teacher.forward_t(images, false)?.detach();
        kd_loss(logits, &teacher, labels, self.temperature, self.alpha).map_err(|e| match e {
            Error::Candle(e) => brisk_train::Error::Candle(e),
            Error::Train(e) => e,
            other => brisk_train::Error::State {
                problem: other.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let zs = [[1.0f64, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let zt = [[2.0f64, 1.0, 0.0], [0.5, 0.5, 2.0]];
        let y = [1u32, 2];
        let (t, alpha) = (4.0, 0.7);
        let softmax = |z: &[f64; 3], t: f64| {
            let e: Vec<f64> = z.iter().map(|v| (v / t).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<_>>()
        };
        let mut kl = 0.0;
        let mut ce = 0.0;
        for i in 0..2 {
            let (ps, pt) = (softmax(&zs[i], t), softmax(&zt[i], t));
            kl += (0..3).map(|c| pt[c] * (pt[c].ln() - ps[c].ln())).sum::<f64>();
            ce += -softmax(&zs[i], 1.0)[y[i] as usize].ln();
        }
        let want = alpha * t * t * kl / 2.0 + (1.0 - alpha) * ce / 2.0;
        let flat =
            |z: [[f64; 3]; 2]| Tensor::from_vec(z.concat().iter().map(|&v| v as f32).collect(), (2, 3), &dev);
        let got =
            kd_loss(&flat(zs)?, &flat(zt)?, &Tensor::new(&y, &dev)?, t, alpha)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
        // With α = 0 it is the cross-entropy alone; identical logits give KL = 0.
        let ce_only =
            kd_loss(&flat(zs)?, &flat(zt)?, &Tensor::new(&y, &dev)?, t, 0.0)?.to_scalar::<f32>()? as f64;
        assert!((ce_only - ce / 2.0).abs() < 1e-5);
        let same = kd_loss(&flat(zs)?, &flat(zs)?, &Tensor::new(&y, &dev)?, t, 1.0)?.to_scalar::<f32>()?;
        assert!(same.abs() < 1e-6);
        Ok(())
    }
}
