//! `brisk train` and `brisk eval`: run the training loop from a config file and flags,
//! resume a stopped run, and measure a model on a packed dataset.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use brisk_data::{Dataset, Split};
use brisk_dist::{CommBatchNormSync, Communicator, GradientAllReduce};
use brisk_precision::Precision;
use brisk_schema::OptimizerKind;
use brisk_train::{evaluate, EvalReport, EvalScope, Rank, TrainConfig, Trainer};
use toml::Value;

use super::named;

/// Flags that set one config field each; `--set` reaches any other.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Packed dataset folder (from `brisk pack`). Overrides `data` in the config.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Output folder: config.toml, metrics.jsonl, checkpoints/, best/, model.safetensors,
    /// summary.json. Overrides `out` in the config.
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// TOML config file (see docs/training.md); flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue the run in DIR from its newest checkpoint, with its own config (only
    /// --data may be given too, if the dataset moved).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "config", "set", "epochs", "batch", "lr", "model", "width", "spec", "seed", "threads", "device", "optimizer", "workers", "precision"])]
    resume: Option<PathBuf>,
    /// Model preset (`brisk models` lists them). By default, resnet18-cifar.
    #[arg(long, value_name = "PRESET")]
    model: Option<String>,
    /// ModelSpec file (.json or .toml) instead of a preset.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Width multiplier of the model. By default, the preset's own (1).
    #[arg(long)]
    width: Option<f64>,
    /// Epochs. By default, 30.
    #[arg(long)]
    epochs: Option<usize>,
    /// Fixed batch size (use `--set batch=...` for a growing one). By default, 128.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate. By default, 0.1.
    #[arg(long)]
    lr: Option<f64>,
    /// Optimiser. By default, sgd (momentum 0.9, Nesterov).
    #[arg(long, value_parser = named::<OptimizerKind>(&OptimizerKind::NAMES))]
    optimizer: Option<OptimizerKind>,
    /// Precision: f32, bf16, f16, mixed-bf16 (first conv and classifier in f32, other
    /// convs in bf16) or mixed-f16 (the same in f16, with dynamic loss scaling).
    /// By default, f32.
    #[arg(long, value_parser = named::<Precision>(&Precision::NAMES))]
    precision: Option<Precision>,
    /// Seed of the weights, sample order and augmentations. By default, 0.
    #[arg(long)]
    seed: Option<u64>,
    /// Compute threads. By default, every core (shared between the ranks on a host).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute: cpu, cuda or cuda:N (config `device`). By default, the CPU. (GPU
    /// training is being built: today a GPU device is checked and refused with the reason.)
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Run as one rank of a data-parallel job through MPI even when no MPI launcher
    /// variable is seen (under `mpirun` this is automatic). Needs a build with
    /// `--features mpi`; docs/distributed.md.
    #[arg(long)]
    distributed: bool,
    /// Loader worker threads (0: load in the training thread). By default, 2.
    #[arg(long)]
    workers: Option<usize>,
    /// Set any config field, dotted, to a TOML value: `--set optimizer.momentum=0.8`,
    /// `--set 'batch={kind="geometric",start=32,factor=2,every=2,max=512}'`.
    /// May be given several times; applied after the other flags.
    #[arg(long, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// No progress display (the event log is written all the same).
    #[arg(long)]
    quiet: bool,
    /// Print the run's summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// The config: the file (or defaults), then the flags, then `--set`s.
fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut config = match &a.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    let path = |p: &PathBuf| Value::String(p.display().to_string());
    let int = |v: usize| Value::Integer(v as i64);
    let flags = [
        ("data", a.data.as_ref().map(path)),
        ("out", a.out.as_ref().map(path)),
        ("model.preset", a.model.clone().map(Value::String)),
        ("model.spec_file", a.spec.as_ref().map(path)),
        ("model.width", a.width.map(Value::Float)),
        ("epochs", a.epochs.map(int)),
        (
            "batch",
            a.batch
                .map(|b| Value::Table(toml::toml! { kind = "fixed" size = (b as i64) })),
        ),
        ("lr.base", a.lr.map(Value::Float)),
        (
            "optimizer.kind",
            a.optimizer.map(|k| Value::String(k.name().into())),
        ),
        (
            "precision.mode",
            a.precision.map(|p| Value::String(p.name().into())),
        ),
        ("seed", a.seed.map(|v| Value::Integer(v as i64))),
        ("threads", a.threads.map(int)),
        ("device", a.device.clone().map(Value::String)),
        ("loader.workers", a.workers.map(int)),
    ];
    for (key, value) in flags {
        if let Some(value) = value {
            config.set(key, value)?;
        }
    }
    for s in &a.set {
        let (key, value) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
        config.set_text(key.trim(), value.trim())?;
    }
    config.validate()?;
    Ok(config)
}

/// Ctrl-C (or SIGTERM) asks the run to checkpoint and stop; a second one exits at once.
fn stop_on_signal(job: Option<String>) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            eprintln!("brisk: stopping now, without a checkpoint");
            std::process::exit(130);
        }
        if let Some(job) = &job {
            // Under mpirun a stop signal is usually the launcher ending the job because a
            // rank or a host failed: say which ranks ran where.
            eprintln!(
                "brisk: {job}: a stop signal (Ctrl-C, or mpirun ending the job after a rank or host failed)"
            );
        }
        eprintln!("brisk: stopping after this batch and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}

/// The start lines of a run (rank 0, unless --quiet): ranks and threads, model, data,
/// epochs and output folder, and a warning when the launcher's binding idles cores.
fn announce(trainer: &Trainer, rank: Rank, a: &TrainArgs) {
    let out = trainer.config().out.clone().unwrap_or_default();
    if rank.world > 1 {
        eprintln!(
            "brisk train: {} ranks ({} on this host), {} compute threads each",
            rank.world,
            rank.local_ranks,
            brisk_ops::compute_threads()
        );
        if a.threads.is_none() {
            if let Some(w) = brisk_ops::binding_warning(rank.local_ranks) {
                eprintln!("brisk train: {w}");
            }
        }
    }
    let spec = trainer.network().spec();
    eprintln!(
        "brisk train: {} (width {}, {} parameters) on {} for {} epochs -> {}",
        spec.arch.name(),
        spec.width,
        spec.param_count(),
        trainer
            .config()
            .data
            .as_deref()
            .unwrap_or(Path::new("?"))
            .display(),
        trainer.config().epochs,
        out.display()
    );
}

/// In a job of several ranks, which rank this is and where every rank runs ("rank 0 of 2
/// on h1 (this job: rank 0 on h1, rank 1 on h2)"); collective: every rank calls it.
fn job_description(comm: &dyn Communicator, rank: Rank) -> Result<Option<String>> {
    if rank.world < 2 {
        return Ok(None);
    }
    let hosts = brisk_dist::rank_hosts(comm)?;
    let map: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(r, h)| format!("rank {r} on {h}"))
        .collect();
    Ok(Some(format!(
        "rank {} of {} on {} (this job: {})",
        rank.rank,
        rank.world,
        hosts.get(rank.rank).map_or("?", String::as_str),
        map.join(", ")
    )))
}

/// Config fields that may differ between ranks.
const PER_RANK_FIELDS: [&str; 1] = ["threads"];

pub fn train(a: &TrainArgs) -> Result<()> {
    let comm = brisk_dist::connect(a.distributed)?;
    if comm.world() == 1 {
        return train_as(a, comm);
    }
    let (rank, world) = (comm.rank(), comm.world());
    match train_as(a, comm.clone()) {
        Ok(()) => Ok(()),
        // Every rank agreed to stop after the same batch: end normally.
        Err(e) if matches!(e.downcast_ref(), Some(brisk_train::Error::Interrupted { .. })) => Err(e),
        Err(e) => {
            // The other ranks would wait for this one forever: end the whole job.
            eprintln!("error: rank {rank} of {world}: {e:#}");
            eprintln!("brisk: rank {rank} failed; ending all {world} ranks");
            comm.abort(1)
        }
    }
}

/// Trains as one rank of `comm` (a single process when its world is 1).
fn train_as(a: &TrainArgs, comm: Arc<dyn Communicator>) -> Result<()> {
    let rank = Rank {
        rank: comm.rank(),
        world: comm.world(),
        local_ranks: comm.local_ranks(),
    };
    let mut trainer = match &a.resume {
        Some(dir) => {
            let t = Trainer::resume_as(dir, a.data.clone(), rank)
                .with_context(|| format!("cannot resume the run in {}", dir.display()))?;
            if rank.writes() {
                for s in t.skipped_checkpoints() {
                    eprintln!(
                        "brisk train: skipped a damaged checkpoint, kept as {}: {}",
                        s.path.display(),
                        s.reason
                    );
                }
            }
            super::check_device(t.config().device)?;
            t
        }
        None => {
            let config = build_config(a)?;
            super::check_device(config.device)?;
            brisk_dist::check_same_config(comm.as_ref(), &config.to_toml()?, &PER_RANK_FIELDS)?;
            Trainer::new_as(config, rank)?
        }
    };
    if rank.world > 1 {
        let settings = trainer.config().distributed.clone();
        if settings.sync_batch_norm {
            trainer.set_batch_norm_sync(Some(Arc::new(CommBatchNormSync(comm.clone()))))?;
        }
        trainer.add_hook(Box::new(GradientAllReduce::new(
            comm.clone(),
            settings.fusion_mib << 20,
        )));
    }
    trainer.set_quiet(a.quiet);
    let job = job_description(comm.as_ref(), rank)?;
    trainer.set_stop_flag(stop_on_signal(job)?);
    if !a.quiet && rank.writes() {
        announce(&trainer, rank, a);
    }
    let summary = trainer.run()?;
    if !rank.writes() {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "done: test top1 {:.2}% top5 {:.2}% loss {:.4} (best {:.2}% at epoch {}) | {} updates, {:.0} img/s, data wait {:.1}% | {:.0} s | model {}",
            100.0 * summary.top1,
            100.0 * summary.top5,
            summary.loss,
            100.0 * summary.best_top1,
            summary.best_epoch + 1,
            summary.updates,
            summary.img_per_s,
            100.0 * summary.data_wait,
            summary.elapsed_s,
            summary.model.display()
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model file (`model.safetensors` with its `model.json`; dense, sparse or int8), or a
    /// folder holding one (a run's output folder, `best/`, or a checkpoint folder).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Packed dataset folder.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Split to measure.
    #[arg(long, default_value = "test", value_parser = named::<Split>(&Split::NAMES))]
    split: Split,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Compute threads. By default, every core.
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute: cpu, cuda or cuda:N. By default, the CPU. (GPU evaluation is
    /// being built: today a GPU device is checked and refused with the reason.)
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: brisk_schema::DeviceChoice,
    /// Also print the confusion matrix (rows: true class, columns: predicted).
    #[arg(long)]
    confusion: bool,
    /// Test-time augmentation: classify each image and its mirror image and average the
    /// two logits (as `eval.flip` does during training).
    #[arg(long)]
    flip: bool,
    /// Run the forward passes on candle's graph instead of brisk's engine (the same
    /// logits to rounding: a check of the engine).
    #[arg(long)]
    graph: bool,
    /// Print one JSON object on stdout: top1, top5, loss, n, per_class, confusion and
    /// path ("engine" or "graph": what ran).
    #[arg(long)]
    json: bool,
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    super::check_device(a.device)?;
    super::init_threads(a.threads)?;
    let (file, net) = super::load_model(&a.checkpoint)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let scope = EvalScope {
        flip: a.flip,
        engine: !a.graph,
        ..EvalScope::all(a.split, a.batch)
    };
    let report = evaluate(&net, &data, scope, (0, 1), &mut |_| Ok(()))
        .with_context(|| format!("cannot evaluate {}", file.display()))?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if !a.confusion {
            if let Some(o) = v.as_object_mut() {
                o.remove("confusion");
            }
        }
        println!("{v}");
    } else {
        print_report(&report, a.confusion);
    }
    Ok(())
}

fn print_report(r: &EvalReport, confusion: bool) {
    println!(
        "top1 {:.2}%  top5 {:.2}%  loss {:.4}  n {}",
        100.0 * r.top1,
        100.0 * r.top5,
        r.loss,
        r.n
    );
    let width = r
        .per_class
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("\n{:<width$}  {:>8}  {:>7}", "class", "accuracy", "images");
    for c in &r.per_class {
        println!(
            "{:<width$}  {:>7.2}%  {:>7}",
            c.class,
            100.0 * c.accuracy,
            c.total
        );
    }
    if confusion {
        println!("\nconfusion (rows: true class, columns: predicted)");
        let cell = r
            .confusion
            .iter()
            .flatten()
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        print!("{:<width$}", "");
        for j in 0..r.confusion.len() {
            print!(" {j:>cell$}");
        }
        println!();
        for (i, row) in r.confusion.iter().enumerate() {
            print!("{:<width$}", format!("{i} {}", r.per_class[i].class));
            for v in row {
                print!(" {v:>cell$}");
            }
            println!();
        }
    }
}
