//! Numeric faults injected into a run: a NaN in one gradient (skipped by a loss scaler,
//! else stopped), in one weight, in one batch's loss. The run skips or stops as
//! docs/training.md says, and never writes a checkpoint with non-finite weights.

use std::path::Path;

use anyhow::Result;
use brisk_precision::{LossScaler, ScalerConfig};
use brisk_testkit::pack_synthetic;
use brisk_train::{
    checkpoint, CrossEntropy, Error, Hook, LossFn, LossScaling, StepAction, StepContext, TrainConfig, Trainer,
};
use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// The step at which each fault strikes.
const AT: u64 = 6;

fn config(dir: &Path) -> Result<TrainConfig> {
    let data = dir.join("data");
    pack_synthetic(&data, 96, 16, 16)?;
    let text = format!(
        "data = {data:?}\nout = {:?}\nepochs = 2\nlog_every = 1\n[model]\nwidth = 0.0625\n\
         [batch]\nkind = \"fixed\"\nsize = 8\n[checkpoint]\nevery_steps = 1\nkeep_last = 100\n",
        dir.join("run")
    );
    Ok(TrainConfig::from_toml_str(&text, "faults")?)
}

/// Every checkpoint on disk verifies and holds finite weights.
fn checkpoints_are_finite(dir: &Path) -> Result<usize> {
    let found = checkpoint::list(&dir.join("run/checkpoints"))?;
    for (step, path) in &found {
        let ck = checkpoint::read(path, &candle_core::Device::Cpu)?;
        checkpoint::check_finite(&ck.net, *step)?;
    }
    Ok(found.len())
}

/// Puts a NaN into the first parameter's gradient once, at step `AT`.
#[derive(Default)]
struct NanGradient {
    done: bool,
}

impl Hook for NanGradient {
    fn name(&self) -> &'static str {
        "nan_gradient"
    }

    fn after_backward(
        &mut self,
        ctx: &StepContext,
        grads: &mut GradStore,
    ) -> brisk_train::Result<StepAction> {
        if ctx.step == AT && !self.done {
            self.done = true;
            let var = &ctx.params[0].1;
            let g = Tensor::full(f32::NAN, var.as_tensor().dims(), var.as_tensor().device())?;
            grads.insert(var.as_tensor(), g);
        }
        Ok(StepAction::Apply)
    }
}

/// Puts a NaN into one weight after step `AT`.
struct NanWeight;

impl Hook for NanWeight {
    fn name(&self) -> &'static str {
        "nan_weight"
    }

    fn after_step(&mut self, ctx: &StepContext) -> brisk_train::Result<()> {
        if ctx.step == AT {
            let var = &ctx.params[0].1;
            var.set(&(var.as_tensor() * f64::NAN)?)?;
        }
        Ok(())
    }
}

/// Cross-entropy whose `AT`-th batch comes out NaN (as a batch of NaN pixels would).
struct NanBatch {
    calls: u64,
}

impl LossFn for NanBatch {
    fn loss(&mut self, images: &Tensor, logits: &Tensor, labels: &Tensor) -> brisk_train::Result<Tensor> {
        self.calls += 1;
        let loss = CrossEntropy { smoothing: 0.0 }.loss(images, logits, labels)?;
        Ok(if self.calls == AT + 1 {
            (loss * f64::NAN)?
        } else {
            loss
        })
    }
}

#[test]
fn a_nan_gradient_is_skipped_by_a_loss_scaler() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(config(dir.path())?)?;
    t.set_quiet(true);
    t.add_hook(Box::new(NanGradient::default()));
    t.add_hook(Box::new(LossScaling::new(LossScaler::new(
        ScalerConfig::default(),
    )?)));
    let summary = t.run()?;
    assert_eq!(summary.skipped, 1, "one update skipped");
    let log = std::fs::read_to_string(dir.path().join("run/metrics.jsonl"))?;
    assert_eq!(log.matches("\"event\":\"skip\"").count(), 1);
    assert!(checkpoints_are_finite(dir.path())? > 0);
    Ok(())
}

/// The run stopped with one of the documented errors, and no checkpoint is non-finite.
fn stopped(result: brisk_train::Result<brisk_schema::TrainSummary>, dir: &Path) -> Result<String> {
    let e = match result {
        Ok(_) => anyhow::bail!("the run finished despite the fault"),
        Err(e) => e,
    };
    assert!(
        matches!(e, Error::NonFiniteLoss { .. } | Error::NonFiniteWeights { .. }),
        "unexpected error: {e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("checkpoint"),
        "the error names the last good checkpoint: {msg}"
    );
    checkpoints_are_finite(dir)?;
    Ok(msg)
}

#[test]
fn a_nan_gradient_without_a_scaler_stops_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(config(dir.path())?)?;
    t.set_quiet(true);
    t.add_hook(Box::new(NanGradient::default()));
    let msg = stopped(t.run(), dir.path())?;
    // The NaN update lands at step AT + 1: its checkpoint is refused, naming a tensor.
    assert!(msg.contains(&format!("step {}", AT + 1)), "{msg}");
    Ok(())
}

#[test]
fn a_nan_weight_stops_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(config(dir.path())?)?;
    t.set_quiet(true);
    t.add_hook(Box::new(NanWeight));
    stopped(t.run(), dir.path())?;
    Ok(())
}

#[test]
fn a_nan_batch_stops_the_run_naming_the_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(config(dir.path())?)?;
    t.set_quiet(true);
    t.set_loss(Box::new(NanBatch { calls: 0 }));
    let msg = stopped(t.run(), dir.path())?;
    assert!(msg.contains(&format!("the loss is NaN at step {AT}")), "{msg}");
    Ok(())
}
