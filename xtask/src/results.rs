//! What each run of an experiment's variants measured (`RunResult`, one per seed, grouped
//! in a `Variant`), read from the run folder brisk wrote — `summary.json` and
//! `metrics.jsonl` through brisk-schema's types, and the JSON line a compression command
//! prints.

use std::path::Path;

use anyhow::{Context, Result};
use brisk_schema::layout::{LOG_FILE, MODEL_FILE, SUMMARY_FILE};
use brisk_schema::{CompressReport, Event, TrainSummary};
use serde::{Deserialize, Serialize};

use crate::plan::{Kind, Plan};
use crate::stats::Estimate;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Skipped,
    Failed,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
        }
    }
}

/// PyTorch's img/s for a variant's model, batch and precision, beside brisk's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Torch {
    pub arch: String,
    pub width: f64,
    pub batch: usize,
    pub precision: String,
    pub threads: usize,
    pub brisk_img_per_s: f64,
    pub torch_img_per_s: f64,
    /// brisk / PyTorch.
    pub ratio: f64,
}

/// What one run of a variant (one seed) measured. Absent figures (a skipped run, a
/// quantised model that was not trained) are `None`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// The training seed (weights, data order, augmentation); a compression run's
    /// starting model is the baseline's run with the same seed.
    pub seed: u64,
    pub hash: String,
    pub status: Status,
    /// Why a run was skipped or failed.
    pub reason: Option<String>,
    /// Wall time of the run's brisk command (for compression variants: of the
    /// compression step alone, after the baseline).
    pub wall_s: f64,
    /// Training time (without set-up, evaluations and final writes), when it trained.
    pub train_s: Option<f64>,
    /// The training run's own clock (across resumes).
    #[serde(default)]
    pub elapsed_s: Option<f64>,
    /// Training images/s (all ranks together).
    pub img_per_s: Option<f64>,
    pub data_wait: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub best_top1: Option<f64>,
    /// Test images the final accuracy was measured on.
    pub test_images: Option<u64>,
    pub epochs: Option<usize>,
    pub updates: Option<u64>,
    /// Parameters (non-zero ones for pruned models).
    pub params: Option<u64>,
    pub macs: Option<u64>,
    /// Size of the model file written.
    pub bytes: Option<u64>,
    /// Peak resident memory of one process, MiB.
    pub peak_rss_mib: Option<f64>,
    /// (training seconds, test top-1) at each probe (a fixed subset of the test split)
    /// and each evaluation (all of it), in training-time order.
    pub curve: Vec<(f64, f64)>,
    /// The full training config (training variants).
    pub config: Option<String>,
    /// The brisk revision the run was measured at (`git rev-parse HEAD`, `-dirty` with
    /// changes): a cached run keeps its own, which the report names where it differs from
    /// the report's. Absent in runs cached before it was recorded.
    #[serde(default)]
    pub revision: Option<String>,
}

impl RunResult {
    pub fn new(seed: u64, hash: &str) -> Self {
        RunResult {
            seed,
            hash: hash.into(),
            status: Status::Done,
            reason: None,
            wall_s: 0.0,
            train_s: None,
            elapsed_s: None,
            img_per_s: None,
            data_wait: None,
            top1: None,
            top5: None,
            best_top1: None,
            test_images: None,
            epochs: None,
            updates: None,
            params: None,
            macs: None,
            bytes: None,
            peak_rss_mib: None,
            curve: Vec::new(),
            config: None,
            revision: None,
        }
    }

    pub fn skip(&mut self, why: String) {
        self.status = Status::Skipped;
        self.reason = Some(why);
    }

    pub fn fail(&mut self, why: String) {
        self.status = Status::Failed;
        self.reason = Some(why);
    }

    /// Training seconds to the first probe or evaluation at or above `target` top-1.
    pub fn time_to(&self, target: f64) -> Option<f64> {
        self.curve.iter().find(|(_, a)| *a >= target).map(|(t, _)| *t)
    }
}

/// A variant of an experiment: what it changes and its runs, one per seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    pub note: String,
    pub kind: Kind,
    pub ranks: usize,
    /// The variant this one is also compared with.
    #[serde(default)]
    pub control: Option<String>,
    pub runs: Vec<RunResult>,
    pub pytorch: Option<Torch>,
    /// Runs that share no random draws with brisk's runs of the same seed (PyTorch's):
    /// compared by Welch's interval, never paired by seed.
    #[serde(default)]
    pub unpaired: bool,
}

impl Variant {
    pub fn new(plan: &Plan) -> Self {
        Variant {
            name: plan.name.clone(),
            note: plan.note.clone(),
            kind: plan.kind,
            ranks: plan.ranks,
            control: plan.control.clone(),
            runs: Vec::new(),
            pytorch: None,
            unpaired: false,
        }
    }

    /// Done when every run finished; failed when one failed; otherwise skipped.
    pub fn status(&self) -> Status {
        if self.runs.iter().any(|r| r.status == Status::Failed) {
            Status::Failed
        } else if !self.runs.is_empty() && self.runs.iter().all(|r| r.status == Status::Done) {
            Status::Done
        } else {
            Status::Skipped
        }
    }

    /// Why the first run that did not finish did not.
    pub fn reason(&self) -> Option<&str> {
        self.runs
            .iter()
            .find(|r| r.status != Status::Done)
            .and_then(|r| r.reason.as_deref())
    }

    /// The finished runs.
    pub fn done(&self) -> impl Iterator<Item = &RunResult> {
        self.runs.iter().filter(|r| r.status == Status::Done)
    }

    /// Mean and 95% interval of a figure over the finished runs that have it.
    pub fn estimate(&self, figure: impl Fn(&RunResult) -> Option<f64>) -> Option<Estimate> {
        let xs: Vec<f64> = self.done().filter_map(figure).collect();
        Estimate::of(&xs)
    }

    /// A figure of each finished run that has it, keyed by the run's seed (an unpaired
    /// variant's keys match no seed, so differences with it are Welch's).
    pub fn by_seed(&self, figure: impl Fn(&RunResult) -> Option<f64>) -> Vec<(u64, f64)> {
        let key = |seed: u64| if self.unpaired { seed | 1 << 63 } else { seed };
        self.done()
            .filter_map(|r| Some((key(r.seed), figure(r)?)))
            .collect()
    }

    /// Each finished run's training seconds to `target` top-1 (`None`: not reached).
    pub fn times_to(&self, target: f64) -> Vec<Option<f64>> {
        self.done().map(|r| r.time_to(target)).collect()
    }

    /// Mean and interval of the time to `target` over the runs that reached it, and how
    /// many of the finished runs did.
    pub fn time_to(&self, target: f64) -> (Option<Estimate>, usize, usize) {
        let times = self.times_to(target);
        let reached: Vec<f64> = times.iter().flatten().copied().collect();
        (Estimate::of(&reached), reached.len(), times.len())
    }
}

/// Test-accuracy curve from a run's `probe` and `eval` events: (training seconds,
/// top-1), in training-time order.
fn curve(run: &Path) -> Result<Vec<(f64, f64)>> {
    let log = run.join(LOG_FILE);
    let mut points: Vec<(f64, f64)> = Event::read_log(&log)?
        .into_iter()
        .filter_map(|r| match r.event {
            Event::Eval { train_s, top1, .. } | Event::Probe { train_s, top1, .. } => Some((train_s, top1)),
            _ => None,
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(points)
}

/// A training run's figures from its summary.json and metrics.jsonl.
fn fill_training(r: &mut RunResult, run: &Path) -> Result<()> {
    let s = TrainSummary::read(&run.join(SUMMARY_FILE))?;
    r.train_s = Some(s.train_s);
    r.elapsed_s = Some(s.elapsed_s);
    r.img_per_s = Some(s.img_per_s);
    r.data_wait = Some(s.data_wait);
    r.top1 = Some(s.top1);
    r.top5 = Some(s.top5);
    r.best_top1 = Some(s.best_top1);
    r.test_images = Some(s.n);
    r.epochs = Some(s.epochs);
    r.updates = Some(s.updates);
    r.params = Some(s.params as u64);
    r.macs = Some(s.macs);
    r.peak_rss_mib = s.peak_rss_mib;
    r.bytes = std::fs::metadata(run.join(MODEL_FILE)).ok().map(|m| m.len());
    r.curve = curve(run)?;
    Ok(())
}

/// Reads what a finished run measured into `r`: the run folder of a training (or
/// fine-tuning) run, and a compression command's JSON line on `stdout`.
pub fn fill(r: &mut RunResult, plan: &Plan, run: &Path, stdout: &str, peak_mib: Option<f64>) -> Result<()> {
    if plan.kind != Kind::Quantize {
        fill_training(r, run)?;
    }
    if plan.kind == Kind::Train {
        return Ok(());
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON result on brisk's output")?;
    let report: CompressReport = serde_json::from_str(line).context("brisk's JSON result")?;
    let after = report.after;
    r.top1 = Some(after.top1);
    r.top5 = Some(after.top5);
    r.params = Some(after.params);
    r.macs = Some(after.macs);
    r.bytes = Some(after.bytes);
    // A quantiser is no training run: its own process's peak is the figure.
    r.peak_rss_mib = match plan.kind {
        Kind::Quantize => peak_mib,
        _ => r.peak_rss_mib.or(peak_mib),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_a_run_folder() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = dir.path();
        let summary = TrainSummary {
            top1: 0.5,
            top5: 0.9,
            loss: 1.0,
            n: 100,
            best_top1: 0.55,
            best_epoch: 0,
            epochs: 1,
            updates: 7,
            skipped: 0,
            world: 1,
            images: 800,
            elapsed_s: 12.0,
            train_s: 10.0,
            img_per_s: 80.5,
            data_wait: 0.01,
            params: 1234,
            macs: 99,
            checkpoint_bytes: 64,
            peak_rss_mib: Some(250.0),
            hook_metrics: Default::default(),
            model: run.join(MODEL_FILE),
        };
        summary.write(&run.join(SUMMARY_FILE))?;
        let eval = |train_s: f64, top1| Event::Eval {
            epoch: 0,
            step: 1,
            images: 1,
            top1,
            top5: 1.0,
            loss: 1.0,
            n: 100,
            elapsed_s: train_s + 1.0,
            train_s,
        };
        let probe = Event::Probe {
            epoch: 0,
            step: 1,
            top1: 0.45,
            n: 50,
            train_s: 7.0,
            elapsed_s: 7.5,
        };
        // Probes and evaluations join in training-time order.
        let log = [eval(5.0, 0.4), eval(11.0, 0.5), probe]
            .iter()
            .map(Event::to_line)
            .collect::<std::result::Result<Vec<_>, _>>()?
            .join("\n");
        std::fs::write(run.join(LOG_FILE), log)?;
        std::fs::write(run.join(MODEL_FILE), [0u8; 64])?;
        let plans = crate::plan::plan(&toml::from_str(
            "description = \"d\"\n[data]\n[baseline]\n[[variants]]\nname = \"p\"\nkind = \"prune\"\nargs = [\"--sparsity\", \"0.5\"]\n",
        )?)?;
        let mut r = RunResult::new(0, "h");
        fill(&mut r, &plans[0], run, "", None)?;
        assert_eq!(r.curve, vec![(5.0, 0.4), (7.0, 0.45), (11.0, 0.5)]);
        assert_eq!((r.updates, r.bytes, r.top1), (Some(7), Some(64), Some(0.5)));
        assert_eq!(r.time_to(0.45), Some(7.0));
        assert_eq!(r.time_to(0.46), Some(11.0));
        // A pruning variant takes accuracy and size from brisk's JSON line.
        let mut p = RunResult::new(0, "h");
        let stdout = "progress\n{\"method\":\"global\",\"before\":{\"params\":1,\"macs\":1,\"bytes\":1,\"top1\":0.5,\"top5\":1.0,\"loss\":1.0},\
                      \"after\":{\"params\":600,\"macs\":99,\"bytes\":32,\"top1\":0.49,\"top5\":0.9,\"loss\":1.1},\"model\":\"m\"}\n";
        fill(&mut p, &plans[1], run, stdout, Some(300.0))?;
        assert_eq!((p.top1, p.params, p.bytes), (Some(0.49), Some(600), Some(32)));
        assert_eq!(p.img_per_s, Some(80.5));
        // A result line that is not a compression report is an error, not a silent gap.
        assert!(fill(&mut p, &plans[1], run, "{\"top1\": 1}", None).is_err());
        Ok(())
    }
}
