//! The training-step benchmark behind `brisk bench step`: times whole SGD steps (or
//! eval-mode forwards) on random data, as `scripts/torch_reference.py` does for PyTorch.

use std::time::Instant;

use brisk_models::{Kernels, ModelSpec, Network, OpTimes};
use brisk_precision::{Precision, PrecisionPolicy};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::optim::{Param, Sgd};
use crate::stepper::Stepper;
use brisk_schema::SgdConfig;

/// What one benchmark run measures.
#[derive(Clone, Debug)]
pub struct StepBench {
    /// The model to time.
    pub spec: ModelSpec,
    /// Images per step.
    pub batch: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    /// Untimed steps first, so allocations and caches settle. By default, 2.
    pub warmup: usize,
    /// Run on candle's own ops (the reference) instead of the device's kernels.
    pub reference_ops: bool,
    /// Run training steps on brisk's engine when the network allows it (as training
    /// does), else on candle's autograd graph.
    pub engine: bool,
    /// The engine's split of each batch (see `brisk_models::Slices`).
    pub slices: brisk_models::Slices,
    /// Time eval-mode forward passes instead of training steps.
    pub eval: bool,
    /// Which layers compute in half precision. By default, none (f32).
    pub precision: Precision,
    /// Where to run: the CPU (brisk's kernels) or a CUDA GPU (candle's kernels).
    pub device: Device,
    /// Record the engine's wall time per kind of operation over the timed steps
    /// ([`StepReport::ops`]).
    pub profile: bool,
}

/// One row of the per-op table: the mean over the timed steps.
#[derive(Clone, Debug, Serialize)]
pub struct OpReport {
    /// An engine op's name (`brisk_models::Op::name`), `optimizer`, or `rest` (the
    /// loss, handing gradients to candle, what no op covers).
    pub op: String,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
}

/// Figures of one run; img/s are batch / step time.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Median images per second over the timed steps.
    pub img_per_s: f64,
    /// From the slowest step.
    pub img_per_s_min: f64,
    /// From the fastest step.
    pub img_per_s_max: f64,
    /// Median milliseconds of the forward pass (with the loss, in training).
    pub forward_ms: f64,
    /// Median milliseconds of the backward pass (0 in eval mode).
    pub backward_ms: f64,
    /// Median milliseconds of the optimiser update (0 in eval mode).
    pub optimizer_ms: f64,
    pub steps: usize,
    /// The kernels that ran: "brisk" or "candle".
    pub kernels: String,
    /// What ran the training step: "engine" or "graph" (see `Stepper`).
    pub step_path: String,
    /// The slices the engine split each batch into (1 on the graph).
    pub slices: usize,
    /// The process's peak resident memory in MiB (Linux; absent elsewhere).
    pub peak_rss_mib: Option<f64>,
    /// With [`StepBench::profile`] on the engine: where the mean step's time went, the
    /// rows summing to the mean step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<OpReport>>,
    /// On the engine: the step's buffers as a memory plan (`brisk_models::memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
}

/// The buffers of one step on the engine (every slice's, which run at once): what they
/// hold at most at one moment, and what one workspace per slice laid out by the memory
/// plan needs for them. Weights, optimiser state and the kernels' own scratch are not
/// in it.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub buffers: usize,
    /// The most MiB live at one moment (allocating each buffer alone needs this at least).
    pub live_peak_mib: f64,
    /// The plan's workspaces, MiB.
    pub plan_mib: f64,
    /// The heap as the step runs today, each buffer allocated alone (glibc; absent
    /// elsewhere): MiB allocated between steps (weights, gradients, optimiser state), and
    /// the heap's high-water mark (those, a step's buffers and the kernels' scratch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_between_steps_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_peak_mib: Option<f64>,
}

impl MemoryReport {
    /// The plans of a step of `net` on a batch of `batch` split into `slices`.
    pub fn of_step(net: &Network, batch: usize, slices: usize, train: bool) -> Result<Self> {
        let mib = |values: usize| mib(values * std::mem::size_of::<f32>());
        let (mut buffers, mut live, mut plan) = (0, 0, 0);
        for n in brisk_models::slice_sizes(batch, slices) {
            let p = brisk_models::plan_step(net, n, train)?;
            buffers += p.lifetimes().len();
            live += p.live_peak();
            plan += p.peak();
        }
        Ok(MemoryReport {
            buffers,
            live_peak_mib: mib(live),
            plan_mib: mib(plan),
            heap_between_steps_mib: None,
            heap_peak_mib: None,
        })
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Peak resident set size of this process (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl StepBench {
    /// Runs the benchmark: forward, cross-entropy, backward and an SGD step (lr 0.01,
    /// momentum 0.9, weight decay 5e-4, as the PyTorch reference) per step. On a GPU the
    /// kernels are candle's and every phase is timed to the device's completion.
    pub fn run(&self) -> Result<StepReport> {
        let dev = self.device.clone();
        let (net, kernels, mut sgd) = self.prepare()?;
        let (x, labels) = self.random_batch(&dev)?;
        let params = net.trainable_vars()?;
        let mut stepper = Stepper::new(&net, self.engine, self.slices)?;
        let (mut total, mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut heap_between_steps = None;
        for i in 0..self.warmup + self.steps {
            if i == self.warmup {
                heap_between_steps = brisk_ops::heap_bytes().map(|(_, used)| used);
                stepper.op_times().filter(|_| self.profile).map(OpTimes::enable);
            }
            let t0 = Instant::now();
            let (t1, t2);
            if self.eval {
                // candle's CPU backend is eager: the logits are computed when this returns.
                stepper.forward_eval(&net, &x)?;
                dev.synchronize()?;
                t1 = Instant::now();
                t2 = t1;
            } else {
                let logits = stepper.forward(&net, &x)?;
                let loss = crate::loss::cross_entropy(&logits, &labels, 0.0)?;
                dev.synchronize()?;
                t1 = Instant::now();
                let grads = stepper.backward(&loss, &params)?;
                dev.synchronize()?;
                t2 = Instant::now();
                sgd.step(&grads)?;
                dev.synchronize()?;
            }
            let t3 = Instant::now();
            if i >= self.warmup {
                total.push((t3 - t0).as_secs_f64());
                fwd.push((t1 - t0).as_secs_f64() * 1e3);
                bwd.push((t2 - t1).as_secs_f64() * 1e3);
                opt.push((t3 - t2).as_secs_f64() * 1e3);
            }
        }
        let ops = (stepper.op_times())
            .filter(|_| self.profile)
            .map(|t| op_table(t, &total, &opt));
        let memory = match stepper.path() {
            "engine" => Some(MemoryReport {
                heap_between_steps_mib: heap_between_steps.map(mib),
                heap_peak_mib: brisk_ops::heap_bytes().map(|(size, _)| mib(size)),
                ..MemoryReport::of_step(&net, self.batch, stepper.slices(), !self.eval)?
            }),
            _ => None,
        };
        let b = self.batch as f64;
        let slowest = total.iter().copied().fold(f64::MIN, f64::max);
        let fastest = total.iter().copied().fold(f64::MAX, f64::min);
        Ok(StepReport {
            img_per_s: b / median(&mut total),
            img_per_s_min: b / slowest,
            img_per_s_max: b / fastest,
            forward_ms: median(&mut fwd),
            backward_ms: median(&mut bwd),
            optimizer_ms: median(&mut opt),
            steps: self.steps,
            kernels: kernels.name().to_string(),
            step_path: stepper.path().to_string(),
            slices: stepper.slices(),
            peak_rss_mib: peak_rss_mib(),
            ops,
            memory,
        })
    }

    /// The settings checked, the network on its kernels and precision, and its optimiser.
    fn prepare(&self) -> Result<(Network, Kernels, Sgd)> {
        for (field, value) in [("batch", self.batch), ("steps", self.steps)] {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    problem: "must be at least 1".into(),
                });
            }
        }
        let mut net = Network::new(self.spec.clone(), 0, &self.device)?;
        let kernels = Kernels::for_device(&self.device, self.reference_ops);
        net.set_kernels(kernels)?;
        net.set_precision(PrecisionPolicy::new(self.precision))?;
        let sgd = Sgd::new(
            Param::from_named(net.trainable_vars()?, true),
            SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 5e-4,
            },
        )?;
        Ok((net, kernels, sgd))
    }

    /// Random images and fixed labels spread over the classes.
    fn random_batch(&self, dev: &Device) -> Result<(Tensor, Tensor)> {
        let size = self.spec.image_size;
        let x = Tensor::randn(0f32, 1.0, (self.batch, self.spec.in_channels, size, size), dev)?;
        let labels: Vec<u32> = (0..self.batch)
            .map(|i| ((7 * i + 3) % self.spec.classes) as u32)
            .collect();
        Ok((x, Tensor::new(labels.as_slice(), dev)?))
    }
}

/// The per-op table: the engine's ops, the optimiser, and the rest of the mean step
/// (`total` in seconds, `opt` in milliseconds, one entry per timed step).
fn op_table(times: &OpTimes, total: &[f64], opt: &[f64]) -> Vec<OpReport> {
    let steps = total.len().max(1) as f64;
    let mut rows: Vec<OpReport> = times
        .snapshot()
        .into_iter()
        .filter(|(_, t)| t.calls > 0)
        .map(|(op, t)| OpReport {
            op: op.name().to_string(),
            ms_per_step: t.seconds * 1e3 / steps,
            calls_per_step: t.calls as f64 / steps,
        })
        .collect();
    let optimizer = opt.iter().sum::<f64>() / steps;
    let step = total.iter().sum::<f64>() * 1e3 / steps;
    let covered: f64 = rows.iter().map(|r| r.ms_per_step).sum::<f64>() + optimizer;
    rows.push(OpReport {
        op: "optimizer".into(),
        ms_per_step: optimizer,
        calls_per_step: 1.0,
    });
    rows.push(OpReport {
        op: "rest".into(),
        ms_per_step: (step - covered).max(0.0),
        calls_per_step: 1.0,
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_benchmark_reports_consistent_figures() -> Result<()> {
        let mut spec = ModelSpec::resnet18_cifar(10).with_width(0.0625);
        spec.image_size = 8;
        for (eval, precision) in [false, true].into_iter().flat_map(|e| {
            [
                (e, Precision::F32),
                (e, Precision::MixedBf16),
                (e, Precision::MixedF16),
            ]
        }) {
            let r = StepBench {
                spec: spec.clone(),
                batch: 2,
                steps: 3,
                warmup: 1,
                reference_ops: false,
                engine: true,
                slices: brisk_models::Slices::Auto,
                eval,
                precision,
                device: Device::Cpu,
                profile: true,
            }
            .run()?;
            // f32 and mixed-bf16 run on the engine, f16 on candle's graph.
            let path = if precision == Precision::MixedF16 {
                "graph"
            } else {
                "engine"
            };
            assert_eq!(r.step_path, path);
            assert!(
                r.img_per_s_min <= r.img_per_s && r.img_per_s <= r.img_per_s_max,
                "{r:?}"
            );
            assert_eq!(r.steps, 3);
            assert_eq!(eval, r.backward_ms == 0.0);
            // The per-op table comes from the engine: every convolution of the plan
            // (stem, 16 in the blocks, 3 projections) once a step.
            match (&r.ops, path) {
                (Some(ops), "engine") => {
                    let calls = |name: &str| ops.iter().find(|o| o.op == name).map(|o| o.calls_per_step);
                    assert_eq!(calls("conv-forward"), Some(20.0), "{ops:?}");
                    assert_eq!(calls("conv-weight-grad"), (!eval).then_some(20.0), "{ops:?}");
                    assert_eq!(calls("optimizer"), Some(1.0));
                    // One row per kind of op, each named as the engine names them.
                    let mut names: Vec<&str> = ops.iter().map(|o| o.op.as_str()).collect();
                    names.sort_unstable();
                    names.dedup();
                    assert_eq!(names.len(), ops.len(), "an op listed twice: {ops:?}");
                    let known: Vec<&str> = brisk_models::Op::ALL.iter().map(|o| o.name()).collect();
                    assert!(
                        ops.iter().all(|o| ["optimizer", "rest"].contains(&o.op.as_str())
                            || known.contains(&o.op.as_str())),
                        "{ops:?}"
                    );
                }
                (None, "graph") => {}
                (ops, path) => panic!("{path} step with per-op table {ops:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn zero_batch_is_an_error() {
        let spec = ModelSpec::resnet18_cifar(10);
        let e = StepBench {
            spec,
            batch: 0,
            steps: 1,
            warmup: 0,
            reference_ops: false,
            engine: true,
            slices: brisk_models::Slices::Auto,
            eval: false,
            precision: Precision::F32,
            device: Device::Cpu,
            profile: false,
        }
        .run()
        .expect_err("batch 0");
        assert!(e.to_string().contains("batch"));
    }
}
