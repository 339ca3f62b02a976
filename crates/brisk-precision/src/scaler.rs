//! `LossScaler`: dynamic loss scaling with PyTorch GradScaler's rules, so that small f16
//! gradients do not flush to zero: the loss is multiplied by the scale before backward,
//! the gradients divided by it after; a step whose gradients hold inf/NaN is skipped and
//! the scale halved; after `growth_interval` finite steps in a row the scale doubles.
//! The scaler keeps the rules and the state; the training loop multiplies and divides the
//! tensors (brisk-train's `LossScaling` hook).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The scaler's settings. By default, GradScaler's: initial scale 2^16, growth ×2 after
/// 2,000 consecutive finite steps, backoff ×0.5.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// What a checkpoint keeps of the scaler.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerState {
    pub scale: f64,
    /// Consecutive finite steps since the scale last changed.
    pub growth_tracker: u64,
    /// Steps skipped so far.
    pub skipped: u64,
}

/// The dynamic loss scaler.
#[derive(Clone, Debug)]
pub struct LossScaler {
    config: ScalerConfig,
    state: ScalerState,
}

impl LossScaler {
    pub fn new(config: ScalerConfig) -> Result<Self> {
        let bad = |field: &str, problem: &str| {
            Err(Error::InvalidConfig {
                field: format!("loss_scaler.{field}"),
                problem: problem.into(),
            })
        };
        if !(config.init_scale.is_finite() && config.init_scale > 0.0) {
            return bad("init_scale", "must be a positive number");
        }
        if !(config.growth_factor >= 1.0 && config.growth_factor.is_finite()) {
            return bad("growth_factor", "must be at least 1");
        }
        if !(config.backoff_factor > 0.0 && config.backoff_factor < 1.0) {
            return bad("backoff_factor", "must be in (0, 1)");
        }
        if config.growth_interval == 0 {
            return bad("growth_interval", "must be at least 1");
        }
        Ok(LossScaler {
            config,
            state: ScalerState {
                scale: config.init_scale,
                growth_tracker: 0,
                skipped: 0,
            },
        })
    }

    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    pub fn state(&self) -> ScalerState {
        self.state
    }

    pub fn set_state(&mut self, state: ScalerState) {
        self.state = state;
    }

    /// Updates the scale after a step: backoff (and count a skip) when `found_inf`, else
    /// growth after `growth_interval` finite steps in a row.
    pub fn update(&mut self, found_inf: bool) {
        let c = self.config;
        let s = &mut self.state;
        if found_inf {
            s.scale *= c.backoff_factor;
            s.growth_tracker = 0;
            s.skipped += 1;
        } else {
            s.growth_tracker += 1;
            if s.growth_tracker == c.growth_interval {
                s.scale *= c.growth_factor;
                s.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() -> Result<()> {
        let mut s = LossScaler::new(ScalerConfig::default())?;
        assert_eq!(s.scale(), 65536.0);
        s.update(true);
        assert_eq!((s.scale(), s.state().skipped), (32768.0, 1));
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 32768.0, "no growth before 2000 finite steps");
        s.update(false);
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.state().growth_tracker, 0);
        // An overflow resets the count of finite steps.
        for _ in 0..1500 {
            s.update(false);
        }
        s.update(true);
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 32768.0);
        // The state round-trips through JSON (checkpoints).
        let json = serde_json::to_string(&s.state()).expect("a state serialises");
        let back: ScalerState = serde_json::from_str(&json).expect("and reads back");
        assert_eq!(back, s.state());
        Ok(())
    }

    #[test]
    fn bad_settings_name_the_field() {
        let e = LossScaler::new(ScalerConfig {
            backoff_factor: 1.5,
            ..Default::default()
        })
        .expect_err("backoff above 1")
        .to_string();
        assert!(e.contains("loss_scaler.backoff_factor"), "{e}");
    }
}
