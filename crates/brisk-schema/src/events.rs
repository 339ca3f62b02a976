//! The event log's records: one [`Event`] per line of `metrics.jsonl`, as JSON objects
//! tagged by `event` (fields in docs/training.md). The trainer writes them and the
//! experiment runner reads them through these types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use brisk_spec::ModelSpec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::summary::TrainSummary;

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A fresh run begins.
    Start {
        seed: u64,
        epochs: usize,
        world: usize,
        threads: usize,
        model: ModelSpec,
        params: usize,
        macs: u64,
        train_images: usize,
        test_images: usize,
        /// Batches the whole run will train on.
        batches: u64,
        /// What runs each step: "engine" (brisk's, no autograd graph) or "graph"
        /// (candle's autograd).
        #[serde(default)]
        step_path: String,
    },
    /// Every `log_every` batches and at each epoch's end: figures over the batches since
    /// the previous `step` event.
    Step(StepRecord),
    /// A batch whose update a hook skipped (the loss scaler found inf/NaN gradients).
    Skip {
        step: u64,
        epoch: usize,
        batch: usize,
        reason: String,
    },
    /// An epoch ended: its training figures.
    Epoch {
        epoch: usize,
        step: u64,
        batch_size: usize,
        lr: f64,
        train_loss: f64,
        train_top1: f64,
        images: u64,
        batches: u64,
        img_per_s: f64,
        data_wait: f64,
        epoch_s: f64,
        elapsed_s: f64,
    },
    /// The test split was evaluated.
    Eval {
        epoch: usize,
        step: u64,
        /// Training images seen so far (this rank).
        images: u64,
        top1: f64,
        top5: f64,
        loss: f64,
        n: u64,
        elapsed_s: f64,
        /// Training time so far (evaluations excluded).
        #[serde(default)]
        train_s: f64,
    },
    /// Test top-1 on the first `n` test images, every `eval.probe_every_steps` updates.
    Probe {
        epoch: usize,
        step: u64,
        top1: f64,
        n: u64,
        /// Training time so far (probes and evaluations excluded).
        train_s: f64,
        elapsed_s: f64,
    },
    /// A checkpoint was written.
    Checkpoint { step: u64, epoch: usize, path: PathBuf },
    /// A stopped run continues from a checkpoint.
    Resume {
        step: u64,
        epoch: usize,
        batch: usize,
        from: Option<PathBuf>,
        /// Newer checkpoints that did not verify: "where it is now: why".
        #[serde(default)]
        skipped: Vec<String>,
    },
    /// The run finished: its summary.
    End(TrainSummary),
}

/// The figures of a `step` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimiser updates so far.
    pub step: u64,
    pub epoch: usize,
    /// The next batch of the epoch.
    pub batch: usize,
    pub epoch_progress: f64,
    pub batch_size: usize,
    pub lr: f64,
    /// Mean training loss and top-1 over the interval's applied batches (train mode).
    pub loss: f64,
    pub top1: f64,
    pub img_per_s: f64,
    /// Fraction of the interval's wall time spent waiting for the loader.
    pub data_wait: f64,
    /// Batches in the interval.
    pub batches: u64,
    pub elapsed_s: f64,
    /// The hooks' figures (e.g. `loss_scale`, `allreduce_s`).
    #[serde(flatten)]
    pub hooks: BTreeMap<String, f64>,
}

/// An event as read back from a log, with the line it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    pub line: usize,
    pub event: Event,
}

impl Event {
    /// The event as one line of the log (without the newline).
    pub fn to_line(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::ConfigParse {
            source_name: "event log".into(),
            field: String::new(),
            message: format!("cannot serialise an event: {e}"),
        })
    }

    /// Reads every event of a log; a line that is not an event is an error naming the
    /// file and the line.
    pub fn read_log(path: &Path) -> Result<Vec<EventRecord>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|event| EventRecord { line: i + 1, event })
                    .map_err(|e| Error::ConfigParse {
                        source_name: format!("{} line {}", path.display(), i + 1),
                        // An internally tagged enum loses serde's field path: show the line.
                        field: l.chars().take(160).collect(),
                        message: format!("not a brisk event: {e}"),
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> TrainSummary {
        TrainSummary {
            top1: 0.5,
            top5: 0.9,
            loss: 1.25,
            n: 100,
            best_top1: 0.55,
            best_epoch: 1,
            epochs: 2,
            updates: 20,
            skipped: 0,
            world: 1,
            images: 640,
            elapsed_s: 10.0,
            train_s: 8.0,
            img_per_s: 80.0,
            data_wait: 0.01,
            params: 1234,
            macs: 5678,
            checkpoint_bytes: 5000,
            peak_rss_mib: Some(200.0),
            hook_metrics: BTreeMap::from([("loss_scale".to_string(), 1024.0)]),
            model: "runs/x/model.safetensors".into(),
        }
    }

    #[test]
    fn events_are_flat_objects_tagged_by_event_and_read_back() -> Result<()> {
        let step = Event::Step(StepRecord {
            step: 5,
            epoch: 0,
            batch: 5,
            epoch_progress: 0.5,
            batch_size: 32,
            lr: 0.1,
            loss: 2.0,
            top1: 0.25,
            img_per_s: 100.0,
            data_wait: 0.0,
            batches: 5,
            elapsed_s: 1.5,
            hooks: BTreeMap::from([("loss_scale".to_string(), 65536.0)]),
        });
        let line = step.to_line()?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::ConfigParse {
            source_name: line.clone(),
            field: String::new(),
            message: e.to_string(),
        })?;
        // The documented layout: one flat object, hook figures beside the others.
        assert_eq!(v["event"], "step");
        assert_eq!(v["loss_scale"], 65536.0);
        assert_eq!(v["batch_size"], 32);
        let end = Event::End(summary());
        let v: serde_json::Value = serde_json::from_str(&end.to_line()?).map_err(|e| Error::ConfigParse {
            source_name: "end".into(),
            field: String::new(),
            message: e.to_string(),
        })?;
        assert_eq!(
            (v["event"].as_str(), v["top1"].as_f64()),
            (Some("end"), Some(0.5))
        );

        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let path = dir.path().join("metrics.jsonl");
        let eval = Event::Eval {
            epoch: 0,
            step: 10,
            images: 320,
            top1: 0.4,
            top5: 0.8,
            loss: 1.5,
            n: 100,
            elapsed_s: 4.0,
            train_s: 3.0,
        };
        let text = [step.clone(), eval.clone(), end.clone()]
            .iter()
            .map(Event::to_line)
            .collect::<Result<Vec<_>>>()?
            .join("\n");
        std::fs::write(&path, text).map_err(|e| Error::io("write", &path, e))?;
        let back: Vec<Event> = Event::read_log(&path)?.into_iter().map(|r| r.event).collect();
        assert_eq!(back, [step, eval, end]);
        // A damaged line is named.
        std::fs::write(&path, "{\"event\":\"eval\",\"epoch\":\"one\"}\n")
            .map_err(|e| Error::io("write", &path, e))?;
        let e = Event::read_log(&path).expect_err("bad line").to_string();
        assert!(e.contains("line 1") && e.contains("\"epoch\":\"one\""), "{e}");
        Ok(())
    }

    #[test]
    fn the_summary_round_trips_through_its_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let path = dir.path().join("summary.json");
        summary().write(&path)?;
        assert_eq!(TrainSummary::read(&path)?, summary());
        std::fs::write(&path, "{\"top1\": 0.5}").map_err(|e| Error::io("write", &path, e))?;
        let e = TrainSummary::read(&path).expect_err("fields missing").to_string();
        assert!(e.contains("summary.json"), "{e}");
        Ok(())
    }
}
