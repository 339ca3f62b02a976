//! `--with-pytorch`'s time to accuracy: the baseline's training recipe run by PyTorch
//! (scripts/torch_train.py) once per seed, cached like brisk's runs, and reported as one
//! more training variant, `pytorch`, whose runs pair with no brisk run (PyTorch draws
//! its own random numbers, so a seed fixes the settings, not the draws).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::experiment::{decide, write_entry, CacheDecision, CacheEntry};
use crate::plan::{fnv64, Kind, Plan};
use crate::results::{RunResult, Variant};

/// The variant's name in reports.
pub const NAME: &str = "pytorch";

/// The recipe's PyTorch script, in the repository.
pub const SCRIPT: &str = "scripts/torch_train.py";

/// What scripts/torch_train.py prints.
#[derive(Debug, Deserialize)]
struct TorchRun {
    top1: f64,
    train_s: f64,
    img_per_s: f64,
    updates: u64,
    curve: Vec<(f64, f64)>,
}

/// The (empty) variant PyTorch's runs of the baseline's recipe go into.
pub fn variant(base: &Plan) -> Variant {
    let mut variant = Variant::new(base);
    variant.name = NAME.into();
    variant.note = "the baseline's recipe in eager PyTorch (scripts/torch_train.py), same threads".into();
    variant.unpaired = true;
    variant
}

/// The baseline's recipe in PyTorch with `seed`, run in (or reused from)
/// `runs/pytorch/seed-S/`.
pub fn run(base: &Plan, data: &Path, runs: &Path, seed: u64, force: bool) -> Result<RunResult> {
    let script = crate::root()?.join(SCRIPT);
    let script_text =
        std::fs::read_to_string(&script).with_context(|| format!("cannot read {}", script.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = base.run(seed)?;
    let hash = fnv64(&[&plan.hash, "pytorch", &script_text, &threads.to_string()]);
    let dir = runs.join(NAME).join(format!("seed-{seed}"));
    if decide(&dir, &hash, Kind::Quantize, force) == CacheDecision::Reuse {
        let entry: CacheEntry =
            serde_json::from_str(&std::fs::read_to_string(dir.join(crate::experiment::CACHE_FILE))?)?;
        if let Some(r) = entry.result {
            eprintln!("xtask: {NAME} (seed {seed}): cached, not rerun");
            return Ok(r);
        }
    }
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, plan.config.as_deref().unwrap_or_default())?;
    let mut result = RunResult::new(seed, &hash);
    train(&script, &config, data, threads, &dir, &mut result)?;
    result.epochs =
        brisk_schema::TrainConfig::from_toml_str(plan.config.as_deref().unwrap_or_default(), NAME)
            .ok()
            .map(|c| c.epochs);
    result.revision = Some(crate::machine::git_revision());
    write_entry(
        &dir,
        &CacheEntry {
            hash,
            result: Some(result.clone()),
        },
    )?;
    Ok(result)
}

/// scripts/torch_train.py (`script`) training `config` on `data` with `seed` and
/// `threads`, printing its summary as JSON.
pub fn command(script: &Path, config: &Path, data: &Path, seed: u64, threads: usize) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg("--config")
        .arg(config)
        .arg("--data")
        .arg(data)
        .args([
            "--seed",
            &seed.to_string(),
            "--threads",
            &threads.to_string(),
            "--json",
        ]);
    cmd
}

/// Runs scripts/torch_train.py on `config` and reads what it measured into `result`
/// (or why it failed); its error output goes to `dir/stderr.log`.
fn train(
    script: &Path,
    config: &Path,
    data: &Path,
    threads: usize,
    dir: &Path,
    result: &mut RunResult,
) -> Result<()> {
    let label = format!("{NAME} (seed {})", result.seed);
    eprintln!("xtask: {label}: python3 scripts/torch_train.py");
    let start = Instant::now();
    let out = command(script, config, data, result.seed, threads)
        .output()
        .context("cannot run python3")?;
    std::fs::write(dir.join("stderr.log"), &out.stderr)?;
    result.wall_s = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<TorchRun>(stdout.trim()) {
        Ok(t) if out.status.success() => {
            result.top1 = Some(t.top1);
            result.train_s = Some(t.train_s);
            result.img_per_s = Some(t.img_per_s);
            result.updates = Some(t.updates);
            result.curve = t.curve;
            eprintln!(
                "xtask: {label}: top-1 {:.2}% in {:.0} s",
                100.0 * t.top1,
                result.wall_s
            );
        }
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            result.fail(format!(
                "scripts/torch_train.py failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            eprintln!(
                "xtask: {label}: FAILED (see {})",
                dir.join("stderr.log").display()
            );
        }
    }
    Ok(())
}
