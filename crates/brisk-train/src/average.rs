//! `WeightAverage`: the exponential moving average of a network's weights (parameters and
//! batch-norm running statistics) that evaluations and saved models use in place of the
//! raw weights when `ema.decay` is set (brisk-schema's `EmaSettings`).

use std::collections::HashMap;

use brisk_models::Network;
use brisk_schema::EmaSettings;
use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::optim::state_tensor;

/// The prefix of the average's tensors in a checkpoint's optimiser file.
const PREFIX: &str = "average.";

/// An exponential moving average of every variable of a network. Call
/// [`WeightAverage::update`] after each optimiser update; [`WeightAverage::swap`]
/// exchanges the network's values with the average's (twice restores them).
#[derive(Debug)]
pub struct WeightAverage {
    settings: EmaSettings,
    vars: Vec<(String, Var)>,
    /// The average of each of `vars`, in the same order.
    values: Vec<Tensor>,
    /// Whether `vars` hold the average now (between two swaps).
    swapped: bool,
}

impl WeightAverage {
    /// An average of `net`'s variables that starts at their current values.
    pub fn new(net: &Network, settings: EmaSettings) -> Result<Self> {
        let vars = net.all_vars()?;
        let values = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(WeightAverage {
            settings,
            vars,
            values,
            swapped: false,
        })
    }

    /// Folds the current weights in after update `step` (0-based) was applied.
    pub fn update(&mut self, step: u64) -> Result<()> {
        debug_assert!(!self.swapped, "updating the average while it is swapped in");
        let d = self.settings.decay_at(step);
        for ((_, var), avg) in self.vars.iter().zip(&mut self.values) {
            *avg = ((&*avg * d)? + (var.as_tensor() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// Exchanges the network's values with the average's: after one call the network
    /// holds the average, after a second its own weights again.
    pub fn swap(&mut self) -> Result<()> {
        for ((_, var), avg) in self.vars.iter().zip(&mut self.values) {
            let current = var.as_tensor().copy()?;
            var.set(avg)?;
            *avg = current;
        }
        self.swapped = !self.swapped;
        Ok(())
    }

    /// Runs `f` with the average in the network, then restores the network's weights
    /// (also when `f` fails).
    pub fn with_average<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.swap()?;
        let out = f();
        self.swap()?;
        out
    }

    /// The average's tensors for a checkpoint: `average.<name>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .zip(&self.values)
            .map(|((name, _), avg)| (format!("{PREFIX}{name}"), avg.clone()))
            .collect()
    }

    /// Restores what [`WeightAverage::state`] wrote; a checkpoint without an average
    /// (written before it was turned on) starts it from the current weights.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for ((name, var), avg) in self.vars.iter().zip(&mut self.values) {
            let key = format!("{PREFIX}{name}");
            *avg = match state.contains_key(&key) {
                true => state_tensor(state, &key, var.as_tensor())?,
                false => var.as_tensor().copy()?,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use candle_core::Device;

    fn values(net: &Network) -> Result<Vec<Vec<f32>>> {
        net.named_tensors()?
            .iter()
            .map(|(_, t)| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    fn check(decay: f64, steps: u64) -> Result<()> {
        let net = Network::new(ModelSpec::resnet18_cifar(10).with_width(0.0625), 3, &Device::Cpu)?;
        let settings = EmaSettings { decay };
        let mut avg = WeightAverage::new(&net, settings.clone())?;
        let start = values(&net)?;
        // Each "update" adds 1 to every weight; the float64 average follows along.
        let mut expected: Vec<Vec<f64>> = start
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).collect())
            .collect();
        for t in 0..steps {
            for (_, var) in net.all_vars()? {
                var.set(&(var.as_tensor() + 1.0)?)?;
            }
            avg.update(t)?;
            let d = settings.decay_at(t);
            for (e, s) in expected.iter_mut().zip(&start) {
                for (x, &w0) in e.iter_mut().zip(s) {
                    *x = d * *x + (1.0 - d) * (w0 as f64 + (t + 1) as f64);
                }
            }
        }
        let raw = values(&net)?;
        let got = avg.with_average(|| values(&net))?;
        assert_eq!(values(&net)?, raw, "the weights are restored after the swap");
        for (g, e) in got.iter().zip(&expected) {
            for (&g, &e) in g.iter().zip(e) {
                assert!((g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
            }
        }
        // The average differs from the raw weights after an update (it lags them).
        assert_ne!(got, raw);
        // A checkpoint's state restores the same average.
        let state: HashMap<String, Tensor> = avg.state().into_iter().collect();
        let mut again = WeightAverage::new(&net, settings)?;
        again.load_state(&state)?;
        assert_eq!(again.with_average(|| values(&net))?, got);
        Ok(())
    }

    #[test]
    fn the_average_follows_the_weights_as_a_float64_reference() -> Result<()> {
        check(0.9, 5)?;
        check(0.999, 3)
    }
}
