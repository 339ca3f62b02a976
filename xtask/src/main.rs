//! Project tasks run with `cargo xtask TASK`: the test gate CI runs, experiments and
//! their reports, and the side-by-side comparison with PyTorch. xtask builds no model: it
//! reads brisk's configs and records through brisk-schema (no candle), so its own build
//! takes seconds and a fresh clone's main job compiles candle once, for `brisk` itself.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod compare;
mod document;
mod experiment;
mod machine;
mod mpi;
mod nvrtc;
mod plan;
mod report;
mod results;
mod scaling;
mod stats;
#[cfg(test)]
mod tidy;
mod torch_recipe;
mod whole_runs;

/// brisk's project tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// cargo fmt --check, cargo clippy -D warnings and the whole test suite, the
    /// distributed tests under mpirun included (what CI runs; the README's test command).
    /// Needs OpenMPI and libclang: installed with apt-get when run as root, else the
    /// install command is printed.
    Test(TestArgs),
    /// Run an ablation from experiments/NAME.toml and write a report (quick: about 10
    /// minutes on 2 cores).
    Experiment(experiment::ExperimentArgs),
    /// brisk vs PyTorch side by side on this machine: training-step and eval-forward img/s
    /// of CIFAR ResNet-18, runs alternated, with ratios (needs python3 with torch; the
    /// reference is scripts/torch_reference.py).
    CompareTorch(compare::CompareArgs),
    /// Measure the gradient all-reduce over shared memory and over a veth link between two
    /// simulated hosts (needs root and network namespaces), fit the ring all-reduce model
    /// and predict ResNet-18's data-parallel efficiency at 2-64 ranks (docs/scaling/).
    Scaling(scaling::ScalingArgs),
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Build without MPI and skip the distributed tests (said at the end).
    #[arg(long)]
    skip_mpi: bool,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test(a) => test(a.skip_mpi),
        Task::Experiment(a) => experiment::run(&a),
        Task::CompareTorch(a) => compare::run(&a),
        Task::Scaling(a) => scaling::run(&a),
    }
}

/// The workspace root.
fn root() -> Result<&'static std::path::Path> {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent folder")
}

/// Runs `cargo ARGS` from the workspace root, failing with the command line on error.
fn cargo(args: &[&str]) -> Result<()> {
    let root = root()?;
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the release `brisk` (with MPI when asked) and returns its path.
fn build_brisk(mpi: bool) -> Result<std::path::PathBuf> {
    let mut args = vec!["build", "--release", "-p", "brisk-cli"];
    if mpi {
        args.extend(["--features", "mpi"]);
    }
    cargo(&args)?;
    Ok(root()?.join("target/release/brisk"))
}

fn test(skip_mpi: bool) -> Result<()> {
    let features: &[&str] = if skip_mpi {
        eprintln!("xtask: --skip-mpi: building without MPI; the distributed tests are SKIPPED");
        &[]
    } else {
        mpi::ensure()?;
        // NCCL builds with nothing installed (brisk-cuda's cudarc loads it at run time):
        // compiled and linted here, its missing library checked to be named.
        &["--features", "brisk-cli/mpi,brisk-cli/nccl"]
    };
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(
        &[
            &["clippy", "--workspace", "--all-targets"],
            features,
            &["--", "-D", "warnings"],
        ]
        .concat(),
    )?;
    // Tests that cannot run here (the multi-host tests without network namespaces) record
    // themselves in this folder; they are listed at the end, never passed silently.
    let skips = root()?.join("target/test-skips");
    if skips.exists() {
        std::fs::remove_dir_all(&skips).with_context(|| format!("cannot clear {}", skips.display()))?;
    }
    // xtask is single-threaded here; the variable is for the test processes.
    std::env::set_var("BRISK_SKIP_DIR", &skips);
    nvrtc::provide();
    cargo(&[&["test", "--workspace"], features].concat())?;
    let skipped: Vec<String> = std::fs::read_dir(&skips)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let why = std::fs::read_to_string(e.path()).unwrap_or_default();
                    format!("{}: {}", e.file_name().to_string_lossy(), why.trim())
                })
                .collect()
        })
        .unwrap_or_default();
    for s in &skipped {
        eprintln!("xtask: SKIPPED {s}");
    }
    match (skip_mpi, skipped.is_empty()) {
        (true, _) => {
            eprintln!("xtask: all checks passed, except the distributed tests (skipped by --skip-mpi)")
        }
        (false, true) => eprintln!("xtask: all checks passed"),
        (false, false) => eprintln!(
            "xtask: all checks passed, except {} test(s) SKIPPED above (they could not run on this machine)",
            skipped.len()
        ),
    }
    Ok(())
}
