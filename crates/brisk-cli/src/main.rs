//! The `brisk` command line: parses flags and hands the work to the brisk crates.
//!
//! Exit status: 0 on success, 1 on a runtime error (message on stderr), 2 on a usage error.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// brisk: pack image datasets, train ResNets fast, shrink them, and measure what each
/// technique bought.
///
/// Every command that reports figures accepts --json and then prints exactly one JSON
/// object on stdout; progress and human text go to stderr.
#[derive(Debug, Parser)]
#[command(name = "brisk", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the model presets (or given spec files) with parameters, MACs and size on disk.
    Models(commands::models::Args),
    /// Measure speed: `bench step` (training steps or eval forwards), `bench loader`.
    Bench(commands::bench::Args),
    /// Pack a dataset into memory-mapped safetensors shards with a manifest.
    Pack(commands::data::PackArgs),
    /// Counts, shape, classes, per-class histogram, mean and std of a packed dataset.
    Inspect(commands::data::InspectArgs),
    /// Check every checksum of a packed dataset, a model file, or a run, checkpoint or
    /// best/ folder.
    Verify(commands::verify::VerifyArgs),
    /// Write a PNG grid of sample images, one row per class.
    Preview(commands::data::PreviewArgs),
    /// Train a model on a packed dataset: checkpoints, event log, resumable (--resume).
    Train(commands::train::TrainArgs),
    /// Measure a model on a packed dataset: top-1/top-5 accuracy, loss, per-class accuracy.
    Eval(commands::train::EvalArgs),
    /// Prune a trained model (magnitude global/layer, gradual, or filter) and fine-tune it.
    Prune(commands::compress::PruneArgs),
    /// Train a student model from a teacher's softened outputs (knowledge distillation).
    Distill(commands::compress::DistillArgs),
    /// Write int8 weights (per-channel, batch-norm folded) and measure the accuracy cost.
    Quantize(commands::compress::QuantizeArgs),
    /// Per-layer parameters, sparsity and channels of a model file (dense, sparse or int8).
    InspectModel(commands::compress::InspectModelArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Ok(isa) = std::env::var("BRISK_ISA") {
        if let Err(e) = check_isa(&isa) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Models(args) => commands::models::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Pack(args) => commands::data::pack(&args),
        Command::Inspect(args) => commands::data::inspect(&args),
        Command::Verify(args) => commands::verify::verify(&args),
        Command::Preview(args) => commands::data::preview(&args),
        Command::Train(args) => commands::train::train(&args),
        Command::Eval(args) => commands::train::eval(&args),
        Command::Prune(args) => commands::compress::prune(&args),
        Command::Distill(args) => commands::compress::distill(&args),
        Command::Quantize(args) => commands::compress::quantize(&args),
        Command::InspectModel(args) => commands::compress::inspect_model(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by Ctrl-C/SIGTERM after writing a checkpoint: 130, as shells report an
        // interrupted command, so scripts can tell it from a failure.
        Err(e) if matches!(e.downcast_ref(), Some(brisk_train::Error::Interrupted { .. })) => {
            eprintln!("stopped: {e:#}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Checks a `BRISK_ISA` value: one brisk knows ([`brisk_ops::ISA_CHOICES`]) and one this
/// CPU has, so a comparison never measures another path than the one it names.
fn check_isa(isa: &str) -> Result<(), String> {
    let known = brisk_ops::ISA_CHOICES
        .iter()
        .map(|(name, what)| format!("{name:?} ({what})"))
        .collect::<Vec<_>>()
        .join(", ");
    if !brisk_ops::ISA_CHOICES.iter().any(|(name, _)| *name == isa) {
        return Err(format!(
            "BRISK_ISA={isa:?} is not a kernel path brisk knows: set one of {known}, or unset it"
        ));
    }
    if !brisk_ops::isa_supported(isa) {
        return Err(format!(
            "BRISK_ISA={isa:?}: this CPU lacks that path (see /proc/cpuinfo: amx needs amx_bf16 \
             and amx_tile and a kernel that grants the tile state; avx512-bf16 needs avx512_bf16; \
             avx512 needs avx512f; avx2 needs avx2 and fma); unset it to let brisk choose"
        ));
    }
    Ok(())
}
