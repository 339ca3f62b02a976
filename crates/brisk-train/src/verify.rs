//! `brisk verify RUN`: every file of a run folder (or of one checkpoint, or `best/`)
//! checked against its checksums — config, summary, models with their sidecars,
//! optimizer state, checkpoint state — each reported on its own.

use std::path::{Path, PathBuf};

use brisk_files::Checksum;
use brisk_schema::layout::{BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, SUMMARY_FILE};
use brisk_schema::{TrainConfig, TrainSummary};

use crate::checkpoint;
use crate::error::{Error, Result};

/// One file's verdict.
#[derive(Clone, Debug)]
pub struct FileCheck {
    pub path: PathBuf,
    /// Its checksums matched (or it carries none), or why it is damaged.
    pub result: std::result::Result<Checksum, String>,
}

/// Checks every file brisk reads back in `dir`: a run's output folder, a checkpoint
/// folder or `best/`. An error only when `dir` holds none of them.
pub fn verify_run(dir: &Path) -> Result<Vec<FileCheck>> {
    let mut checks = Vec::new();
    let check = |path: PathBuf, f: &dyn Fn(&Path) -> std::result::Result<Checksum, String>| FileCheck {
        result: f(&path),
        path,
    };
    let model = |p: &Path| brisk_models::verify_model_file(p).map_err(|e| e.to_string());
    let config = |p: &Path| {
        TrainConfig::from_file(p)
            .map(|_| Checksum::Verified)
            .map_err(|e| e.to_string())
    };
    let summary = |p: &Path| {
        TrainSummary::read(p)
            .map(|_| Checksum::Verified)
            .map_err(|e| e.to_string())
    };
    let state = |p: &Path| checkpoint::verify_files(p).map_err(|e| e.to_string());
    // Models with their sidecars (a checkpoint folder's other safetensors file is its
    // optimiser state, checked with the state below).
    let in_checkpoint = checkpoint::is_checkpoint(dir);
    for folder in [dir.to_path_buf(), dir.join(BEST_DIR)] {
        for path in safetensors_files(&folder)? {
            if !in_checkpoint || checkpoint::is_model(&path) {
                checks.push(check(path, &model));
            }
        }
    }
    if dir.join(CONFIG_FILE).is_file() {
        checks.push(check(dir.join(CONFIG_FILE), &config));
    }
    if dir.join(SUMMARY_FILE).is_file() {
        checks.push(check(dir.join(SUMMARY_FILE), &summary));
    }
    if in_checkpoint {
        checks.push(check(dir.to_path_buf(), &state));
    }
    for (_, ck) in checkpoint::list(&dir.join(CHECKPOINTS_DIR))? {
        for path in safetensors_files(&ck)? {
            if checkpoint::is_model(&path) {
                checks.push(check(path, &model));
            }
        }
        checks.push(check(ck, &state));
    }
    if checks.is_empty() {
        return Err(Error::State {
            problem: format!(
                "{} holds no brisk run, checkpoint or model to verify (a dataset folder has manifest.json)",
                dir.display()
            ),
        });
    }
    Ok(checks)
}

/// The `.safetensors` files directly in `dir`, sorted (none when it is absent).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("cannot list", dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}
