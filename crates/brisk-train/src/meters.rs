//! The training loop's accumulators: `Meter` sums a span of batches (the interval between
//! `step` events, an epoch) into the figures the event log reports; `EpochClock` books
//! an epoch's training time and data waits into the run's `Clock`; `RunClock` is the
//! run's wall time across resumes.

use std::time::Instant;

use crate::checkpoint::Clock;

/// What one training batch did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// Images in the batch.
    pub images: usize,
    /// Mean training loss of the batch.
    pub loss: f32,
    /// Top-1 hits in the batch (train mode).
    pub correct: usize,
    /// Whether the optimiser applied the update (a hook may skip it).
    pub applied: bool,
}

/// Figures summed over a span of batches. Loss and accuracy count the batches whose
/// update was applied with a finite loss; every batch counts in `batches`.
#[derive(Clone, Debug)]
pub struct Meter {
    pub start: Instant,
    pub images: usize,
    pub loss_sum: f64,
    pub correct: usize,
    pub batches: u64,
    /// Seconds spent waiting for the loader.
    pub wait_s: f64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            start: Instant::now(),
            images: 0,
            loss_sum: 0.0,
            correct: 0,
            batches: 0,
            wait_s: 0.0,
        }
    }
}

impl Meter {
    pub fn add(&mut self, o: &StepOutcome) {
        self.batches += 1;
        if o.applied && o.loss.is_finite() {
            self.images += o.images;
            self.loss_sum += f64::from(o.loss) * o.images as f64;
            self.correct += o.correct;
        }
    }

    pub fn waited(&mut self, seconds: f64) {
        self.wait_s += seconds;
    }

    /// Mean loss per image.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.images.max(1) as f64
    }

    /// Top-1 accuracy.
    pub fn top1(&self) -> f64 {
        self.correct as f64 / self.images.max(1) as f64
    }

    /// Seconds since the span started (at least a nanosecond, to divide by).
    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn img_per_s(&self) -> f64 {
        self.images as f64 / self.seconds()
    }

    /// Fraction of the span's wall time spent waiting for data.
    pub fn data_wait(&self) -> f64 {
        self.wait_s / self.seconds()
    }
}

/// The run's wall time: the time of earlier processes (from the checkpoint) plus this
/// one's.
#[derive(Clone, Copy, Debug)]
pub struct RunClock {
    before: f64,
    start: Instant,
}

impl RunClock {
    pub fn start(before: f64) -> Self {
        RunClock {
            before,
            start: Instant::now(),
        }
    }

    pub fn elapsed_s(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

/// Books an epoch's training time and data waits into the run's [`Clock`], in parts: a
/// mid-epoch checkpoint books what came before it, so checkpoint time is not training
/// time.
#[derive(Clone, Debug)]
pub struct EpochClock {
    /// Training time not yet booked starts here.
    unbooked_since: Instant,
    unbooked_wait: f64,
    /// All of this epoch's waits, booked or not.
    pub wait_s: f64,
}

impl Default for EpochClock {
    fn default() -> Self {
        EpochClock {
            unbooked_since: Instant::now(),
            unbooked_wait: 0.0,
            wait_s: 0.0,
        }
    }
}

impl EpochClock {
    pub fn waited(&mut self, seconds: f64) {
        self.unbooked_wait += seconds;
        self.wait_s += seconds;
    }

    /// Starts counting training time again from now, leaving out the time since the last
    /// booking (an evaluation in between, say).
    pub fn restart(&mut self) {
        self.unbooked_since = Instant::now();
    }

    /// Adds the training time and waits since the last booking to `clock`.
    pub fn book(&mut self, clock: &mut Clock) {
        clock.train_s += self.unbooked_since.elapsed().as_secs_f64();
        clock.wait_s += self.unbooked_wait;
        self.unbooked_since = Instant::now();
        self.unbooked_wait = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_count_applied_finite_batches_only() {
        let mut m = Meter::default();
        let batch = |loss: f32, correct, applied| StepOutcome {
            images: 10,
            loss,
            correct,
            applied,
        };
        m.add(&batch(2.0, 5, true));
        m.add(&batch(1.0, 10, true));
        m.add(&batch(9.0, 0, false));
        m.add(&batch(f32::NAN, 0, true));
        assert_eq!((m.batches, m.images, m.correct), (4, 20, 15));
        assert_eq!(m.loss(), 1.5);
        assert_eq!(m.top1(), 0.75);
    }

    #[test]
    fn an_epoch_books_its_waits_once() {
        let mut e = EpochClock::default();
        let mut clock = Clock::default();
        e.waited(0.25);
        e.book(&mut clock);
        e.waited(0.5);
        e.book(&mut clock);
        e.book(&mut clock);
        assert_eq!(clock.wait_s, 0.75);
        assert_eq!(e.wait_s, 0.75);
        assert!(clock.train_s >= 0.0);
    }
}
