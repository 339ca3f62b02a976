//! Project tasks run with `cargo xtask TASK`: the test gate CI runs, experiments and
//! their reports, and the side-by-side comparison with PyTorch.

use std::process::Command;

use anyhow::{bail, Context, Result};

mod compare;
mod experiment;
mod mpi;
mod report;

const TASKS: &str = "\
Usage: cargo xtask <TASK>

Tasks:
  test            cargo fmt --check, cargo clippy -D warnings and the whole test suite,
                  the distributed tests under mpirun included (what CI runs; the README's
                  test command). Needs OpenMPI and libclang: installed with apt-get when
                  run as root, else the install command is printed.
                  [--skip-mpi]: build without MPI and skip the distributed tests
  experiment      run an ablation from experiments/NAME.toml and write a report:
                  NAME [--data DIR] [--only V1,V2] [--force] [--with-pytorch]
                  (`cargo xtask experiment --help`; quick: ~10 minutes on 2 cores)
  compare-torch   brisk vs PyTorch, side by side on this machine: training-step and
                  eval-forward img/s of CIFAR ResNet-18, runs alternated, with ratios
                  [--batches 32,128] [--threads 2] [--steps 5] [--rounds 2]
                  (needs python3 with torch; ../shared/reference/torch_train_step.py)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            print!("{TASKS}");
            Ok(())
        }
        Some("test") => test(&args[1..]),
        Some("compare-torch") => compare::run(&args[1..]),
        Some("experiment") => experiment::run(&args[1..]),
        Some(other) => {
            eprint!("unknown task `{other}`\n\n{TASKS}");
            std::process::exit(2);
        }
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

fn test(extra: &[String]) -> Result<()> {
    let skip_mpi = match extra {
        [] => false,
        [flag] if flag == "--skip-mpi" => true,
        [flag, ..] => bail!("`cargo xtask test` takes only --skip-mpi (got `{flag}`)"),
    };
    let features: &[&str] = if skip_mpi {
        eprintln!("xtask: --skip-mpi: building without MPI; the distributed tests are SKIPPED");
        &[]
    } else {
        mpi::ensure()?;
        &["--features", "brisk-cli/mpi"]
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
    cargo(&[&["test", "--workspace"], features].concat())?;
    if skip_mpi {
        eprintln!("xtask: all checks passed, except the distributed tests (skipped by --skip-mpi)");
    } else {
        eprintln!("xtask: all checks passed");
    }
    Ok(())
}
