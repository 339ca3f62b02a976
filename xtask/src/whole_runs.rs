//! `cargo xtask compare-torch --whole-runs`: whole training runs of small models on small
//! images (and the quick experiment's baseline), `brisk train` against the same recipe in PyTorch (scripts/torch_train.py),
//! both from one packed synthetic set, rounds alternated: training seconds (evaluation
//! excluded) and test top-1 side by side.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One whole run both sides make.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WholeRun {
    /// Image side (square, RGB synthetic images).
    pub image: usize,
    pub train: usize,
    pub test: usize,
    pub epochs: usize,
    pub width: f64,
}

/// The small-image runs — 8x8 (a digits-sized set) and 28x28 (an MNIST-sized one)
/// — and the quick experiment's baseline (32x32, width 0.125, 4 epochs: the same recipe).
pub const RUNS: [WholeRun; 3] = [
    WholeRun {
        image: 8,
        train: 1_400,
        test: 400,
        epochs: 30,
        width: 0.25,
    },
    WholeRun {
        image: 28,
        train: 4_000,
        test: 1_000,
        epochs: 10,
        width: 0.25,
    },
    WholeRun {
        image: 32,
        train: 4_500,
        test: 1_000,
        epochs: 4,
        width: 0.125,
    },
];

impl WholeRun {
    /// The training config both sides read: CIFAR ResNet-18 at `width`, batch 64,
    /// one-cycle 0.1, Nesterov SGD, one loader worker, no crops, the test split once at
    /// the end.
    pub fn config(&self, threads: usize) -> String {
        format!(
            "epochs = {}\nseed = 0\nthreads = {threads}\n\n\
             [model]\npreset = \"resnet18-cifar\"\nwidth = {}\n\n\
             [batch]\nkind = \"fixed\"\nsize = 64\n\n\
             [lr]\nbase = 0.1\nshape = {{ kind = \"one_cycle\" }}\n\n\
             [optimizer]\nkind = \"sgd\"\nmomentum = 0.9\nnesterov = true\nweight_decay = 5e-4\n\n\
             [loader]\nworkers = 1\ncrop_padding = 0\n\n\
             [eval]\nevery_epochs = 0\nflip = false\n",
            self.epochs, self.width
        )
    }

    fn name(&self) -> String {
        format!("{0}x{0}", self.image)
    }
}

/// What both sides print (`brisk train --json`, scripts/torch_train.py --json).
#[derive(Debug, Deserialize)]
struct Measured {
    top1: f64,
    train_s: f64,
}

/// Packs the run's synthetic set under `dir` unless it is there, writes its config, and
/// returns (data folder, config file).
fn prepare(run: &WholeRun, brisk: &Path, dir: &Path, threads: usize) -> Result<(PathBuf, PathBuf)> {
    let data = dir.join(format!("data-{}", run.name()));
    if !data.join("manifest.json").exists() {
        let packed = Command::new(brisk)
            .args(["pack", "synthetic", "--out"])
            .arg(&data)
            .args(["--train", &run.train.to_string(), "--test", &run.test.to_string()])
            .args(["--size", &run.image.to_string(), "--seed", "0"])
            .output()
            .context("cannot run brisk pack")?;
        if !packed.status.success() {
            bail!(
                "brisk pack synthetic for {} failed ({}): {}",
                run.name(),
                packed.status,
                String::from_utf8_lossy(&packed.stderr).trim()
            );
        }
    }
    let config = dir.join(format!("{}.toml", run.name()));
    std::fs::write(&config, run.config(threads))?;
    Ok((data, config))
}

fn measured(out: std::process::Output, who: &str) -> Result<Measured> {
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        bail!(
            "{who} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("{who} printed no summary: {text}"))
}

/// Runs every case of [`RUNS`] `rounds` times, brisk then PyTorch, and prints the table.
pub fn run(brisk: &Path, threads: usize, rounds: usize) -> Result<()> {
    let root = crate::root()?;
    let dir = root.join("target/compare-torch");
    let script = root.join(crate::torch_recipe::SCRIPT);
    std::fs::create_dir_all(&dir)?;
    println!("Whole runs, same recipe and packed data both sides, {threads} threads, {rounds} rounds alternated (median of rounds)");
    println!(
        "{:<6} {:>6} {:>7} {:>6} {:>14} {:>14} {:>12} {:>16}",
        "image",
        "train",
        "epochs",
        "width",
        "brisk train s",
        "torch train s",
        "speed ratio",
        "top-1 brisk/torch"
    );
    for case in &RUNS {
        let (data, config) = prepare(case, brisk, &dir, threads)?;
        let (mut b, mut t) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let out = dir.join(format!("run-{}", case.name()));
            if out.exists() {
                std::fs::remove_dir_all(&out)?;
            }
            let brisk_run = Command::new(brisk)
                .args(["train", "--quiet", "--json", "--config"])
                .arg(&config)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&out)
                .output()
                .context("cannot run brisk train")?;
            b.push(measured(brisk_run, "brisk train")?);
            let torch_run = crate::torch_recipe::command(&script, &config, &data, 0, threads)
                .output()
                .context("cannot run python3")?;
            t.push(measured(torch_run, "scripts/torch_train.py")?);
        }
        let median =
            |v: &[Measured], f: fn(&Measured) -> f64| crate::compare::median(v.iter().map(f).collect());
        let (bs, ts) = (median(&b, |m| m.train_s), median(&t, |m| m.train_s));
        println!(
            "{:<6} {:>6} {:>7} {:>6} {:>14.1} {:>14.1} {:>12.2} {:>16}",
            case.name(),
            case.train,
            case.epochs,
            case.width,
            bs,
            ts,
            ts / bs,
            format!(
                "{:.1}/{:.1}%",
                100.0 * median(&b, |m| m.top1),
                100.0 * median(&t, |m| m.top1)
            )
        );
    }
    println!("speed ratio: PyTorch's training seconds / brisk's (above 1: brisk is faster)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_read_the_stated_recipe() -> Result<()> {
        for case in RUNS {
            let config = brisk_schema::TrainConfig::from_toml_str(&case.config(2), "whole run")?;
            assert_eq!(config.epochs, case.epochs);
            assert_eq!(config.threads, 2);
            assert_eq!(config.loader.workers, 1);
            assert_eq!(config.batch, brisk_schema::BatchSchedule::Fixed { size: 64 });
            let spec = config.model_spec(10, 3, case.image)?;
            assert_eq!(spec.width, case.width);
        }
        Ok(())
    }
}
