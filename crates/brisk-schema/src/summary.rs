//! `TrainSummary`: what a finished run reports, written as `summary.json`, printed by
//! `brisk train --json` and logged as the `end` event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    /// Test images evaluated.
    pub n: u64,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub epochs: usize,
    /// Optimiser updates applied.
    pub updates: u64,
    /// Batches whose update a hook skipped.
    pub skipped: u64,
    /// Ranks that trained (1: a single process).
    #[serde(default = "one")]
    pub world: usize,
    /// Training images read, by all ranks together.
    pub images: u64,
    pub elapsed_s: f64,
    pub train_s: f64,
    /// Training images per second of training time, all ranks together.
    pub img_per_s: f64,
    /// Fraction of training time spent waiting for data.
    pub data_wait: f64,
    pub params: usize,
    pub macs: u64,
    pub checkpoint_bytes: u64,
    pub peak_rss_mib: Option<f64>,
    /// The hooks' figures at the end (e.g. `allreduce_s_total`, `loss_scale`).
    #[serde(default)]
    pub hook_metrics: BTreeMap<String, f64>,
    /// The final model.
    pub model: PathBuf,
}

fn one() -> usize {
    1
}

impl TrainSummary {
    /// Reads a run's `summary.json`; errors name the file and the field.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
        Ok(brisk_files::checksum::json_checked(&text, path)?.0)
    }

    /// Writes `summary.json` atomically, with its checksum.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = brisk_files::checksum::json_with_checksum(self, path)?;
        Ok(brisk_files::write_atomic(path, &text)?)
    }
}
