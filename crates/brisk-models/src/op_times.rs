//! `OpTimes`: where the engine's step spends its wall time, by kind of operation — the
//! per-op table of `brisk bench step --profile` and `cargo xtask compare-torch --profile`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A kind of work in the engine's step. Batch-norm's forward includes the ReLU and the
/// residual add that brisk fuses into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Copying the weights out of candle's variables at the start of a step.
    ReadWeights,
    ConvForward,
    ConvInputGrad,
    ConvWeightGrad,
    /// Batch statistics, normalisation, residual add and ReLU.
    BatchNormForward,
    /// Batch-norm's weight, bias and input gradients.
    BatchNormBackward,
    /// ReLU's backward and the residual branches' gradient sums.
    ReluBackward,
    /// Global average pooling, the classifier, the ImageNet stem's max-pool (forward and
    /// backward).
    PoolAndClassifier,
    /// Squeeze-and-excitation units (forward and backward).
    SqueezeExcitation,
}

impl Op {
    /// Every kind, in declaration order.
    pub const ALL: [Op; 9] = [
        Op::ReadWeights,
        Op::ConvForward,
        Op::ConvInputGrad,
        Op::ConvWeightGrad,
        Op::BatchNormForward,
        Op::BatchNormBackward,
        Op::ReluBackward,
        Op::PoolAndClassifier,
        Op::SqueezeExcitation,
    ];

    /// The name printed in tables and written in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Op::ReadWeights => "read-weights",
            Op::ConvForward => "conv-forward",
            Op::ConvInputGrad => "conv-input-grad",
            Op::ConvWeightGrad => "conv-weight-grad",
            Op::BatchNormForward => "batch-norm-forward",
            Op::BatchNormBackward => "batch-norm-backward",
            Op::ReluBackward => "relu-backward",
            Op::PoolAndClassifier => "pool-and-classifier",
            Op::SqueezeExcitation => "squeeze-excitation",
        }
    }
}

/// Wall time and calls of one kind of operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct OpTime {
    pub seconds: f64,
    pub calls: usize,
}

/// Accumulated wall time per [`Op`]; off (free) until [`OpTimes::enable`].
#[derive(Debug, Default)]
pub struct OpTimes {
    table: Mutex<Option<Vec<OpTime>>>,
}

impl OpTimes {
    /// Starts (or restarts, from zero) recording.
    pub fn enable(&self) {
        *self.lock() = Some(vec![OpTime::default(); Op::ALL.len()]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<OpTime>>> {
        // A panic while the lock was held cannot leave the table inconsistent (each
        // update is one assignment), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f`, adding its wall time to `op` when recording.
    pub fn time<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        if self.lock().is_none() {
            return f();
        }
        let start = Instant::now();
        let out = f();
        self.add(op, start.elapsed());
        out
    }

    fn add(&self, op: Op, d: Duration) {
        if let Some(table) = self.lock().as_mut() {
            // `Op::ALL` lists the variants in declaration order.
            let i = op as usize;
            table[i].seconds += d.as_secs_f64();
            table[i].calls += 1;
        }
    }

    /// What was recorded since [`OpTimes::enable`], every op in [`Op::ALL`]'s order
    /// (empty when not recording).
    pub fn snapshot(&self) -> Vec<(Op, OpTime)> {
        self.lock()
            .as_ref()
            .map(|t| Op::ALL.iter().copied().zip(t.iter().copied()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_until_enabled_and_enable_restarts() {
        let t = OpTimes::default();
        assert_eq!(t.time(Op::ConvForward, || 3), 3);
        assert!(t.snapshot().is_empty());
        t.enable();
        t.time(Op::ConvForward, || ());
        t.time(Op::ReluBackward, || ());
        // Durations add up per op (given here, not slept: no test measures a clock).
        t.add(Op::ConvForward, Duration::from_millis(2));
        t.add(Op::ConvForward, Duration::from_millis(3));
        let s = t.snapshot();
        assert_eq!(s.len(), Op::ALL.len());
        let conv = s.iter().find(|(o, _)| *o == Op::ConvForward).expect("conv").1;
        assert_eq!(conv.calls, 3);
        assert!((0.005..0.006).contains(&conv.seconds), "{conv:?}");
        let relu = s.iter().find(|(o, _)| *o == Op::ReluBackward).expect("relu").1;
        assert!(relu.seconds < 0.005, "another op's time landed here: {relu:?}");
        assert_eq!(s.iter().map(|(_, t)| t.calls).sum::<usize>(), 4);
        t.enable();
        assert!(t.snapshot().iter().all(|(_, t)| t.calls == 0));
    }
}
