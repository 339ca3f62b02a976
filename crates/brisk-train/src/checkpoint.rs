//! Training checkpoints: a folder `checkpoints/step-NNNNNNNNN/` holding the model
//! (`model.safetensors` with torchvision names + `model.json`), the optimiser state
//! (`optimizer.safetensors`) and `state.json` (position, schedules' progress, best result,
//! hook state). Written in a `.partial` folder, fsynced, then renamed: a crash leaves
//! the previous checkpoints intact and at most a `.partial` folder, which is ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use brisk_files::{checksum, sync_dir, write_atomic};
use brisk_models::{Network, MODEL_FILE};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const STATE_FORMAT: &str = "brisk-train-state";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Where training stands: enough to continue exactly where it stopped. The sample order
/// and augmentations depend only on (seed, epoch, index), so the position is the RNG state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The epoch in progress (0-based).
    pub epoch: usize,
    /// The next batch of that epoch.
    pub batch: usize,
    /// Optimiser updates applied.
    pub step: u64,
    /// Batches trained on (updates + skipped).
    pub batches: u64,
    /// Images trained on.
    pub images: u64,
}

/// Time spent so far, in seconds. Time lost to a crash is not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clock {
    /// Wall time of the run: training, evaluation and checkpoints.
    pub elapsed_s: f64,
    /// Time in training epochs (evaluation excluded).
    pub train_s: f64,
    /// Of `train_s`, time spent waiting for the loader.
    pub wait_s: f64,
}

/// The best evaluation so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Best {
    pub top1: f64,
    pub epoch: usize,
    pub step: u64,
}

/// The non-tensor part of a checkpoint (`state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format: String,
    pub version: u32,
    pub position: Position,
    pub clock: Clock,
    pub best: Option<Best>,
    /// Length of metrics.jsonl when the checkpoint was written: a resume cuts the log
    /// back to it, so events of the lost work are not read twice.
    pub log_bytes: u64,
    /// Each hook's state, by hook name.
    pub hooks: BTreeMap<String, serde_json::Value>,
}

impl TrainState {
    pub fn new(position: Position, clock: Clock, best: Option<Best>, log_bytes: u64) -> Self {
        TrainState {
            format: STATE_FORMAT.into(),
            version: 1,
            position,
            clock,
            best,
            log_bytes,
            hooks: BTreeMap::new(),
        }
    }
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub net: Network,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The step of a complete checkpoint folder's name (`.partial` folders have none).
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Fails when a tensor holds NaN or infinity, naming it.
pub fn check_finite(net: &Network, step: u64) -> Result<()> {
    for (name, t) in net.named_tensors()? {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(Error::NonFiniteWeights {
                name,
                step,
                checkpoint: None,
            });
        }
    }
    Ok(())
}

/// Writes a checkpoint of `net`, the optimiser `state` tensors and `train` into
/// `root/step-N/` (N = the update count), atomically; returns its folder. Refuses to
/// write non-finite weights.
pub fn write(
    root: &Path,
    net: &Network,
    optimizer: &[(String, Tensor)],
    train: &TrainState,
) -> Result<PathBuf> {
    check_finite(net, train.position.step)?;
    let name = step_dir_name(train.position.step);
    let done = root.join(&name);
    let partial = root.join(format!("{name}.partial"));
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |e| Error::io(what, path, e)
    }
    std::fs::create_dir_all(root).map_err(io("cannot create", root))?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io("cannot remove", &partial))?;
    }
    std::fs::create_dir(&partial).map_err(io("cannot create", &partial))?;
    net.save(&partial.join(MODEL_FILE))?;
    let opt_path = partial.join(OPTIMIZER_FILE);
    let views: Vec<(String, &Tensor)> = optimizer.iter().map(|(n, t)| (n.clone(), t)).collect();
    let bytes = checksum::safetensors_with_checksums(views, HashMap::new(), &opt_path)?;
    write_atomic(&opt_path, &bytes)?;
    let state_path = partial.join(STATE_FILE);
    write_atomic(&state_path, &checksum::json_with_checksum(train, &state_path)?)?;
    sync_dir(&partial)?;
    if done.exists() {
        // Written twice at one step (epoch end and step cadence coincide): replace.
        std::fs::remove_dir_all(&done).map_err(io("cannot remove", &done))?;
    }
    std::fs::rename(&partial, &done).map_err(io("cannot rename", &partial))?;
    sync_dir(root)?;
    Ok(done)
}

/// The complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(root).map_err(|e| Error::io("cannot list", root, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = step_of(&name) {
            if entry.path().join(STATE_FILE).is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Removes all but the newest `keep` checkpoints and any `.partial` leftovers.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    for (_, dir) in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io("cannot remove old checkpoint", dir, e))?;
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// A checkpoint that did not verify when a run resumed: renamed `…​.damaged` (kept for
/// inspection, out of the way of new checkpoints and pruning, never deleted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// Where it is now.
    pub path: PathBuf,
    /// Why it could not be used.
    pub reason: String,
}

/// Reads the newest checkpoint under `root` that verifies. Newer ones that do not are
/// reported and, when `set_aside` (the rank that writes), renamed `step-N.damaged`.
/// An error when none verifies, naming each and why.
pub fn read_newest_good(root: &Path, device: &Device, set_aside: bool) -> Result<(Checkpoint, Vec<Skipped>)> {
    let mut skipped = Vec::new();
    for (_, dir) in list(root)?.into_iter().rev() {
        match read(&dir, device) {
            Ok(ck) => return Ok((ck, skipped)),
            Err(e) => {
                let path = if set_aside { set_aside_damaged(&dir)? } else { dir };
                skipped.push(Skipped {
                    path,
                    reason: e.to_string(),
                });
            }
        }
    }
    let problem = if skipped.is_empty() {
        format!(
            "{} holds no checkpoint to resume from; start the run again without --resume",
            root.display()
        )
    } else {
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}: {}", s.path.display(), s.reason))
            .collect();
        format!(
            "no checkpoint under {} verifies ({}); start the run again without --resume",
            root.display(),
            reasons.join("; ")
        )
    };
    Err(Error::State { problem })
}

/// Renames a damaged checkpoint folder `step-N` to `step-N.damaged` (or `.damaged-2`, …).
fn set_aside_damaged(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut to = dir.with_file_name(format!("{name}.damaged"));
    let mut k = 2;
    while to.exists() {
        to = dir.with_file_name(format!("{name}.damaged-{k}"));
        k += 1;
    }
    std::fs::rename(dir, &to).map_err(|e| Error::io("cannot set aside damaged checkpoint", dir, e))?;
    Ok(to)
}

/// Whether `dir` is a checkpoint folder (it holds a training state).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file()
}

/// Whether a checkpoint's safetensors file is its model (not its optimiser state).
pub fn is_model(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == MODEL_FILE)
}

/// Checks a checkpoint's optimiser state and training state (its model is a model file:
/// `brisk_models::verify_model_file`).
pub fn verify_files(dir: &Path) -> Result<brisk_files::Checksum> {
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(|e| Error::io("cannot read", &opt_path, e))?;
    let opt = checksum::verify_safetensors(&bytes, &opt_path)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| Error::io("cannot read", &state_path, e))?;
    let (_, state): (TrainState, _) = checksum::json_checked(&text, &state_path)?;
    Ok(match (opt, state) {
        (brisk_files::Checksum::Verified, brisk_files::Checksum::Verified) => brisk_files::Checksum::Verified,
        _ => brisk_files::Checksum::Absent,
    })
}

/// Reads the checkpoint in `dir`, verifying every file's checksums.
pub fn read(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let net = Network::load(&dir.join(MODEL_FILE), device)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(|e| Error::io("cannot read", &opt_path, e))?;
    checksum::verify_safetensors(&bytes, &opt_path)?;
    let optimizer = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::State {
        problem: format!("cannot read {}: {e}", opt_path.display()),
    })?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| Error::io("cannot read", &state_path, e))?;
    let (state, _): (TrainState, _) = checksum::json_checked(&text, &state_path)?;
    if state.format != STATE_FORMAT || state.version != 1 {
        return Err(Error::State {
            problem: format!(
                "{} is not a brisk training state (format {:?} version {})",
                state_path.display(),
                state.format,
                state.version
            ),
        });
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        net,
        optimizer,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;

    fn tiny() -> Result<Network> {
        let mut spec = ModelSpec::resnet18_cifar(3).with_width(0.0625);
        spec.image_size = 8;
        Ok(Network::new(spec, 1, &Device::Cpu)?)
    }

    #[test]
    fn checkpoints_round_trip_and_rotate() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let root = dir.path().join("checkpoints");
        let net = tiny()?;
        let velocity = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)?;
        for step in [3u64, 7, 11] {
            let position = Position {
                epoch: 1,
                batch: 2,
                step,
                batches: step + 1,
                images: 40,
            };
            let mut state = TrainState::new(position, Clock::default(), None, 99);
            state
                .hooks
                .insert("scaler".into(), serde_json::json!({"scale": 1024.0}));
            write(&root, &net, &[("velocity.w".into(), velocity.clone())], &state)?;
            prune(&root, 2)?;
        }
        // A torn write leaves a `.partial` folder: ignored, then cleaned.
        std::fs::create_dir_all(root.join("step-000000012.partial"))
            .map_err(|e| Error::io("mkdir", &root, e))?;
        let kept = list(&root)?;
        assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), [7, 11]);
        let back = read(&kept[1].1, &Device::Cpu)?;
        assert_eq!(back.state.position.step, 11);
        assert_eq!(back.state.hooks["scaler"]["scale"], 1024.0);
        assert_eq!(back.optimizer["velocity.w"].to_vec1::<f32>()?, [1.5, -2.0]);
        for ((n1, a), (n2, b)) in net.named_tensors()?.iter().zip(back.net.named_tensors()?) {
            assert_eq!(n1, &n2);
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
        }
        prune(&root, 2)?;
        assert!(!root.join("step-000000012.partial").exists());
        Ok(())
    }

    #[test]
    fn non_finite_weights_are_never_written() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let net = tiny()?;
        let (name, var) = net.trainable_vars()?.remove(0);
        var.set(&(var.as_tensor() * f64::NAN)?)?;
        let state = TrainState::new(Position::default(), Clock::default(), None, 0);
        let e = write(dir.path(), &net, &[], &state).expect_err("NaN weights");
        assert!(e.to_string().contains(&name), "{e}");
        assert!(list(dir.path())?.is_empty());
        Ok(())
    }
}
