//! Learning-rate and batch-size schedules. Learning rates are functions of training
//! progress in epochs (fractional), not of optimiser steps, so that they mean the same
//! thing whatever the batch size — which the growing-batch schedule changes.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The shape of the learning rate over training, before warm-up and batch scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrShape {
    /// The base rate throughout.
    Constant,
    /// The base rate multiplied by `gamma` at each milestone epoch passed.
    Step { milestones: Vec<f64>, gamma: f64 },
    /// Cosine from the base rate down to `min_lr` at the end of training.
    Cosine {
        #[serde(default)]
        min_lr: f64,
    },
    /// Smith's one-cycle, as PyTorch's `OneCycleLR` (cosine annealing): from base/`div`
    /// up to the base rate over the first `pct_start` of training, then down to
    /// base/(`div` · `final_div`).
    OneCycle {
        #[serde(default = "default_pct_start")]
        pct_start: f64,
        #[serde(default = "default_div")]
        div: f64,
        #[serde(default = "default_final_div")]
        final_div: f64,
        /// Cycle the momentum against the learning rate, as `OneCycleLR` does with
        /// `cycle_momentum`: `[high, low]` (PyTorch's `[0.95, 0.85]`) goes from high to
        /// low while the rate rises and back while it falls; SGD's momentum (AdamW's β1)
        /// then follows it instead of `optimizer.momentum`. By default, none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        momentum: Option<[f64; 2]>,
    },
}

fn default_pct_start() -> f64 {
    0.3
}
fn default_div() -> f64 {
    25.0
}
fn default_final_div() -> f64 {
    1e4
}

/// A learning-rate schedule: a shape, an optional linear warm-up, over `epochs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// The peak (or constant) learning rate.
    pub base_lr: f64,
    pub shape: LrShape,
    /// Epochs of linear warm-up from 0 to the scheduled rate. By default, 0.
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Length of training in epochs.
    pub epochs: f64,
}

fn cosine(from: f64, to: f64, t: f64) -> f64 {
    to + (from - to) * (1.0 + (std::f64::consts::PI * t.clamp(0.0, 1.0)).cos()) / 2.0
}

impl LrSchedule {
    /// Checks the numbers; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem: String| Err(Error::InvalidConfig { field, problem });
        if !(self.base_lr.is_finite() && self.base_lr >= 0.0) {
            return bad(
                "lr",
                format!("must be a non-negative number, got {}", self.base_lr),
            );
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad("epochs", format!("must be positive, got {}", self.epochs));
        }
        if !(0.0..self.epochs).contains(&self.warmup_epochs) && self.warmup_epochs != 0.0 {
            return bad(
                "warmup_epochs",
                format!("must be in [0, epochs), got {}", self.warmup_epochs),
            );
        }
        let (ok, field) = match &self.shape {
            LrShape::Step { milestones, gamma } => (
                gamma.is_finite() && *gamma > 0.0 && milestones.iter().all(|m| m.is_finite()),
                "lr_schedule.gamma",
            ),
            LrShape::OneCycle {
                pct_start,
                div,
                final_div,
                momentum,
            } => (
                *pct_start > 0.0
                    && *pct_start < 1.0
                    && *div >= 1.0
                    && *final_div >= 1.0
                    && momentum.is_none_or(|m| m.iter().all(|v| (0.0..1.0).contains(v))),
                "lr_schedule.pct_start",
            ),
            LrShape::Cosine { min_lr } => (min_lr.is_finite() && *min_lr >= 0.0, "lr_schedule.min_lr"),
            LrShape::Constant => (true, ""),
        };
        if ok {
            Ok(())
        } else {
            bad(field, format!("out of range in {:?} (gamma > 0, 0 < pct_start < 1, div and final_div >= 1, min_lr >= 0, momentum in [0, 1))", self.shape))
        }
    }

    /// The learning rate at `epoch` (fractional: 2.5 is half-way through the third epoch).
    pub fn lr(&self, epoch: f64) -> f64 {
        let t = (epoch / self.epochs).clamp(0.0, 1.0);
        let base = self.base_lr;
        let shaped = match &self.shape {
            LrShape::Constant => base,
            LrShape::Step { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
            }
            LrShape::Cosine { min_lr } => cosine(base, *min_lr, t),
            LrShape::OneCycle {
                pct_start,
                div,
                final_div,
                ..
            } => {
                let start = base / div;
                if t < *pct_start {
                    cosine(start, base, t / pct_start)
                } else {
                    cosine(base, start / final_div, (t - pct_start) / (1.0 - pct_start))
                }
            }
        };
        if epoch < self.warmup_epochs {
            shaped * epoch / self.warmup_epochs
        } else {
            shaped
        }
    }
}

impl LrSchedule {
    /// The momentum at `epoch` when the shape cycles it (one-cycle with `momentum`),
    /// else `None` (the optimiser's own).
    pub fn momentum(&self, epoch: f64) -> Option<f64> {
        let LrShape::OneCycle {
            pct_start,
            momentum: Some([high, low]),
            ..
        } = &self.shape
        else {
            return None;
        };
        let t = (epoch / self.epochs).clamp(0.0, 1.0);
        Some(if t < *pct_start {
            cosine(*high, *low, t / pct_start)
        } else {
            cosine(*low, *high, (t - pct_start) / (1.0 - pct_start))
        })
    }
}

/// How the batch size evolves by epoch (Smith et al., "Don't decay the learning rate,
/// increase the batch size").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchSchedule {
    /// One size throughout.
    Fixed { size: usize },
    /// `sizes[e]` for epoch e; the last entry continues.
    List { sizes: Vec<usize> },
    /// `start`, multiplied by `factor` every `every` epochs, capped at `max`.
    Geometric {
        start: usize,
        factor: usize,
        every: usize,
        max: usize,
    },
}

/// Whether the learning rate follows the batch size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScaling {
    /// The scheduled learning rate whatever the batch size.
    #[default]
    Hold,
    /// Scaled by batch / first batch (Goyal et al.'s linear scaling rule).
    Linear,
}

impl BatchSchedule {
    /// Checks the sizes; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |problem: String| {
            Err(Error::InvalidConfig {
                field: "batch_schedule",
                problem,
            })
        };
        match self {
            BatchSchedule::Fixed { size: 0 } => bad("size must be at least 1".into()),
            BatchSchedule::List { sizes } if sizes.is_empty() || sizes.contains(&0) => bad(format!(
                "sizes must be a non-empty list of positive sizes, got {sizes:?}"
            )),
            BatchSchedule::Geometric {
                start,
                factor,
                every,
                max,
            } if *start == 0 || *factor == 0 || *every == 0 || max < start => bad(format!(
                "need start, factor, every >= 1 and max >= start; got {start}, {factor}, {every}, {max}"
            )),
            _ => Ok(()),
        }
    }

    /// The batch size of epoch `epoch` (0-based).
    pub fn size(&self, epoch: usize) -> usize {
        match self {
            BatchSchedule::Fixed { size } => *size,
            BatchSchedule::List { sizes } => sizes[epoch.min(sizes.len().saturating_sub(1))],
            BatchSchedule::Geometric {
                start,
                factor,
                every,
                max,
            } => {
                let steps = (epoch / every).min(64) as u32;
                factor
                    .checked_pow(steps)
                    .and_then(|f| start.checked_mul(f))
                    .map_or(*max, |s| s.min(*max))
            }
        }
    }

    /// The learning-rate multiplier for epoch `epoch` under `scaling`.
    pub fn lr_factor(&self, epoch: usize, scaling: LrScaling) -> f64 {
        match scaling {
            LrScaling::Hold => 1.0,
            LrScaling::Linear => self.size(epoch) as f64 / self.size(0) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &LrSchedule, at: &[(f64, f64)]) {
        s.validate().expect("valid schedule");
        for &(epoch, want) in at {
            let got = s.lr(epoch);
            assert!(
                (got - want).abs() < 1e-9 * want.abs().max(1.0),
                "{:?} at {epoch}: {got} vs {want}",
                s.shape
            );
        }
    }

    #[test]
    fn learning_rates_at_chosen_epochs() {
        let sched = |shape, warmup| LrSchedule {
            base_lr: 0.1,
            shape,
            warmup_epochs: warmup,
            epochs: 10.0,
        };
        check(&sched(LrShape::Constant, 0.0), &[(0.0, 0.1), (9.9, 0.1)]);
        check(
            &sched(LrShape::Constant, 2.0),
            &[(0.0, 0.0), (1.0, 0.05), (2.0, 0.1)],
        );
        check(
            &sched(
                LrShape::Step {
                    milestones: vec![3.0, 6.0],
                    gamma: 0.1,
                },
                0.0,
            ),
            &[(2.99, 0.1), (3.0, 0.01), (7.0, 0.001)],
        );
        check(
            &sched(LrShape::Cosine { min_lr: 0.0 }, 0.0),
            &[(0.0, 0.1), (5.0, 0.05), (10.0, 0.0)],
        );
        // One-cycle: 0.1/25 at the start, 0.1 at 30 %, 0.004/1e4 at the end; half-way up
        // the warm phase is the mean of its ends.
        let one = sched(
            LrShape::OneCycle {
                pct_start: 0.3,
                div: 25.0,
                final_div: 1e4,
                momentum: None,
            },
            0.0,
        );
        check(
            &one,
            &[
                (0.0, 0.004),
                (1.5, (0.004 + 0.1) / 2.0),
                (3.0, 0.1),
                (10.0, 0.004 / 1e4),
            ],
        );
        assert_eq!(one.momentum(1.0), None, "no cycle asked for");
    }

    #[test]
    fn one_cycle_cycles_the_momentum_against_the_rate_as_pytorch() {
        let sched = |shape, warmup_epochs| LrSchedule {
            base_lr: 0.1,
            shape,
            warmup_epochs,
            epochs: 10.0,
        };
        // torch.optim.lr_scheduler.OneCycleLR(max_lr=0.1, total_steps=101, pct_start=0.3)
        // with SGD(momentum=0.9): momentum 0.95 at step 0, 0.85 at the peak (step 30),
        // 0.95 at the end; half-way up it is 0.9.
        let s: LrShape = toml::from_str("kind = \"one_cycle\"\nmomentum = [0.95, 0.85]").expect("parses");
        let one = sched(s, 0.0);
        for (epoch, want) in [(0.0, 0.95), (1.5, 0.9), (3.0, 0.85), (6.5, 0.9), (10.0, 0.95)] {
            let got = one.momentum(epoch).expect("cycled");
            assert!((got - want).abs() < 1e-12, "momentum at {epoch}: {got} vs {want}");
        }
        let bad = sched(
            LrShape::OneCycle {
                pct_start: 0.3,
                div: 25.0,
                final_div: 1e4,
                momentum: Some([1.5, 0.85]),
            },
            0.0,
        );
        assert!(bad.validate().is_err(), "a momentum of 1.5 is refused");
    }

    #[test]
    fn batch_sizes_by_epoch() {
        let g = BatchSchedule::Geometric {
            start: 32,
            factor: 2,
            every: 2,
            max: 256,
        };
        g.validate().expect("valid");
        assert_eq!(
            (0..10).map(|e| g.size(e)).collect::<Vec<_>>(),
            [32, 32, 64, 64, 128, 128, 256, 256, 256, 256]
        );
        assert_eq!(g.lr_factor(4, LrScaling::Linear), 4.0);
        assert_eq!(g.lr_factor(4, LrScaling::Hold), 1.0);
        let l = BatchSchedule::List { sizes: vec![1, 8] };
        assert_eq!((0..4).map(|e| l.size(e)).collect::<Vec<_>>(), [1, 8, 8, 8]);
        assert_eq!(BatchSchedule::Fixed { size: 5 }.size(100), 5);
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let e = BatchSchedule::Geometric {
            start: 64,
            factor: 2,
            every: 1,
            max: 32,
        }
        .validate()
        .expect_err("max < start");
        assert!(e.to_string().contains("batch_schedule"), "{e}");
        assert!(BatchSchedule::List { sizes: vec![] }.validate().is_err());
        let lr = LrSchedule {
            base_lr: -1.0,
            shape: LrShape::Constant,
            warmup_epochs: 0.0,
            epochs: 1.0,
        };
        assert!(lr.validate().expect_err("negative").to_string().contains("`lr`"));
        let toml_err = toml::from_str::<LrShape>("kind = \"exponential\"").expect_err("unknown kind");
        assert!(toml_err.to_string().contains("exponential"), "{toml_err}");
    }
}
