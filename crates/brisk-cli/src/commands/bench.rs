//! `brisk bench`: measurements printed as figures (`step`: training-step or eval
//! throughput; `loader`: the data loader alone; `allreduce`: gradient all-reduce across
//! the ranks of an `mpirun` job).

use anyhow::Result;
use brisk_models::{model_file, Arch, ModelSpec, Stem};
use brisk_precision::Precision;
use brisk_train::bench::StepBench;

use super::{init_threads, named};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Time training steps (forward + cross-entropy + backward + SGD with momentum) on
    /// random data and print images/s: median, min and max over the timed steps.
    Step(StepArgs),
    /// Time the data loader alone (crop + flip + normalise into f32 batches) over whole
    /// epochs of a packed dataset and print images/s.
    Loader(LoaderArgs),
    /// Time the gradient all-reduce of a data-parallel step across the ranks `mpirun`
    /// started (`mpirun -np 2 brisk bench allreduce`): a model's gradient count in f32,
    /// packed into fusion buffers, averaged; prints ms per step and bandwidth.
    Allreduce(AllreduceArgs),
}

#[derive(Debug, clap::Args)]
struct AllreduceArgs {
    /// Model preset whose gradients are reduced (`brisk models` lists them).
    #[arg(long, default_value = "resnet18-cifar")]
    model: String,
    /// Width multiplier of the model.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Fusion buffer size in MiB (Horovod's default: 64).
    #[arg(long, default_value_t = 64)]
    fusion_mib: usize,
    /// Timed all-reduces of the whole gradient (after 2 untimed ones).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Run through MPI even without an MPI launcher's variables.
    #[arg(long)]
    distributed: bool,
    /// All-reduce with NCCL on one GPU per rank (bootstrapped through MPI) instead of MPI;
    /// needs a build with `--features nccl`. The buffers start and end in host memory.
    #[arg(long)]
    nccl: bool,
    /// Print one JSON object on stdout (rank 0).
    #[arg(long)]
    json: bool,
}

fn allreduce(a: &AllreduceArgs) -> Result<()> {
    let comm = if a.nccl {
        brisk_dist::connect_nccl()?
    } else {
        brisk_dist::connect(a.distributed)?
    };
    let spec = ModelSpec::preset_named(&a.model)
        .ok_or_else(|| anyhow::anyhow!("unknown model preset {:?} (see `brisk models`)", a.model))?
        .with_width(a.width);
    spec.validate()?;
    let backend = match (a.nccl, comm.world()) {
        (true, _) => "nccl",
        (false, 1) => "local",
        (false, _) => "mpi",
    };
    let r = brisk_dist::bench_all_reduce(comm.as_ref(), &spec, (&a.model, backend), a.fusion_mib, a.rounds)?;
    if comm.rank() != 0 {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} all-reduce of {} gradients ({:.1} MiB f32) over {} ranks, {} buffer(s) of at most {} MiB: \
             median {:.2} ms (min {:.2}, max {:.2}) | {:.2} GB/s algorithm, {:.2} GB/s bus",
            r.backend,
            r.gradients,
            r.bytes as f64 / (1 << 20) as f64,
            r.world,
            r.buffers,
            r.fusion_mib,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.algorithm_gb_per_s,
            r.bus_gb_per_s
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct LoaderArgs {
    /// Packed dataset folder.
    #[arg(long, value_name = "DIR")]
    data: std::path::PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Make batches in the calling thread (no workers, no prefetch), for comparison.
    #[arg(long)]
    sync: bool,
    /// Epochs to time.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn loader(a: &LoaderArgs) -> Result<()> {
    let data = std::sync::Arc::new(brisk_data::Dataset::open(&a.data)?);
    let workers = if a.sync { 0 } else { a.threads };
    let config = brisk_data::LoaderConfig {
        workers,
        ..brisk_data::LoaderConfig::train(&data)
    };
    let loader = brisk_data::Loader::new(data.clone(), config)?;
    let t = loader.measure(a.batch, a.epochs)?;
    if a.json {
        let v = serde_json::json!({
            "img_per_s": t.img_per_s, "images": t.images, "seconds": t.seconds,
            "batch": a.batch, "threads": workers, "sync": a.sync,
        });
        println!("{v}");
    } else {
        println!(
            "brisk loader {} batch={} workers={}: {:.0} img/s ({} images in {:.3} s)",
            a.data.display(),
            a.batch,
            workers,
            t.img_per_s,
            t.images,
            t.seconds
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct StepArgs {
    /// Architecture.
    #[arg(long, default_value = "resnet18", value_parser = named::<Arch>(&Arch::NAMES))]
    arch: Arch,
    /// Stem: cifar (3x3/1 conv) or imagenet (7x7/2 conv + max-pool).
    #[arg(long, default_value = "cifar", value_parser = named::<Stem>(&Stem::NAMES))]
    stem: Stem,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Width multiplier on the stage widths 64/128/256/512.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Image height and width. By default, 32 for the cifar stem and 224 for imagenet.
    #[arg(long)]
    image: Option<usize>,
    /// Image channels (1 for grey-scale images).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Compute threads. By default, every available core.
    #[arg(long)]
    threads: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Precision: f32, bf16, f16 (every conv and the classifier in half precision),
    /// mixed-bf16 or mixed-f16 (first conv and classifier in f32, the rest half).
    #[arg(long, default_value = "f32", value_parser = named::<Precision>(&Precision::NAMES))]
    dtype: Precision,
    /// Where to run: cpu, cuda or cuda:N. By default, the CPU. (GPU steps are being
    /// built on brisk's own CUDA backend: today a GPU device is checked and refused with
    /// the reason; docs/gpu.md.)
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: brisk_schema::DeviceChoice,
    /// Time the architecture of this model file (its `model.json` spec: a pruned model's
    /// channels, say) instead of --arch/--stem/--width/--classes.
    #[arg(long, value_name = "FILE")]
    model: Option<std::path::PathBuf>,
    /// Use candle's own convolution ops instead of brisk's kernels, for comparison.
    #[arg(long)]
    reference_ops: bool,
    /// Split each batch on the engine into this many slices run side by side (in-process
    /// data parallelism, as the config's `slices`); 0 chooses from the model's size.
    #[arg(long, default_value_t = 0)]
    slices: usize,
    /// Run training steps on candle's autograd graph instead of brisk's engine, for
    /// comparison (the engine runs f32 steps on brisk's kernels; see docs/kernels.md).
    #[arg(long)]
    graph: bool,
    /// Time eval-mode forward passes instead of training steps.
    #[arg(long)]
    eval: bool,
    /// Also print where the step's time goes: the engine's wall time per kind of
    /// operation (convolution forward, input and weight gradients, batch-norm, ...), the
    /// optimiser and the rest, per step (engine steps only; `cargo xtask compare-torch
    /// --profile` puts PyTorch's profiler beside it).
    #[arg(long)]
    profile: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    match &args.what {
        What::Step(a) => step(a),
        What::Loader(a) => loader(a),
        What::Allreduce(a) => allreduce(a),
    }
}

/// The model `bench step` times: a model file's spec, or the flags'.
fn step_spec(a: &StepArgs) -> Result<ModelSpec> {
    let spec = match &a.model {
        Some(file) => {
            let mut spec = brisk_models::read_sidecar(&model_file(file))?;
            spec.image_size = a.image.unwrap_or(spec.image_size);
            spec
        }
        None => ModelSpec {
            width: a.width,
            in_channels: a.channels,
            image_size: a.image.unwrap_or(a.stem.default_image_size()),
            ..ModelSpec::new(a.arch, a.stem, a.classes)
        },
    };
    spec.validate()?;
    Ok(spec)
}

fn step(a: &StepArgs) -> Result<()> {
    super::check_device(a.device)?;
    let threads = init_threads(a.threads)?;
    let spec = step_spec(a)?;
    let (arch, stem, width, image) = (spec.arch, spec.stem, spec.width, spec.image_size);
    let bench = StepBench {
        spec,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        reference_ops: a.reference_ops,
        engine: !a.graph,
        slices: brisk_models::Slices::from_config(a.slices),
        eval: a.eval,
        precision: a.dtype,
        device: candle_core::Device::Cpu,
        profile: a.profile,
    };
    let mode = if a.eval { "eval" } else { "train" };
    eprintln!(
        "brisk bench step: {arch} {stem} width {width} {image}x{image} batch {} threads {threads} ({mode}), {} warm-up + {} timed steps; bf16 layers multiply on {}",
        a.batch,
        a.warmup,
        a.steps,
        brisk_ops::half_products()
    );
    let r = bench.run()?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["batch"] = a.batch.into();
        v["threads"] = threads.into();
        v["dtype"] = a.dtype.name().into();
        v["half_products"] = brisk_ops::half_products().into();
        v["arch"] = arch.name().into();
        v["width"] = width.into();
        v["image"] = image.into();
        v["mode"] = mode.into();
        println!("{v}");
    } else {
        println!(
            "brisk {arch} {} batch={} on {} kernels ({}, {} slice(s)): img/s median {:.2} (min {:.2} max {:.2}); forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
            a.dtype,
            a.batch,
            r.kernels,
            r.step_path,
            r.slices,
            r.img_per_s,
            r.img_per_s_min,
            r.img_per_s_max,
            r.forward_ms,
            r.backward_ms,
            r.optimizer_ms
        );
        match &r.ops {
            Some(ops) => print_ops(ops),
            None if a.profile => {
                println!("(no per-op table: the step ran on candle's graph, not brisk's engine)")
            }
            None => {}
        }
        if let (Some(m), true) = (&r.memory, a.profile) {
            println!(
                "step buffers: {} ({} slice(s)), at most {:.1} MiB live at once; one workspace per slice by the memory plan: {:.1} MiB",
                m.buffers, r.slices, m.live_peak_mib, m.plan_mib,
            );
            if let (Some(between), Some(peak)) = (m.heap_between_steps_mib, m.heap_peak_mib) {
                println!(
                    "heap: {between:.1} MiB held between steps, high-water {peak:.1} MiB (a step's buffers and scratch as allocated today: {:.1} MiB)",
                    peak - between
                );
            }
        }
    }
    Ok(())
}

/// The per-op table of `--profile`.
fn print_ops(ops: &[brisk_train::bench::OpReport]) {
    let step: f64 = ops.iter().map(|o| o.ms_per_step).sum();
    println!(
        "{:<22} {:>10} {:>7} {:>11}",
        "op", "ms/step", "share", "calls/step"
    );
    for o in ops {
        println!(
            "{:<22} {:>10.1} {:>6.1}% {:>11.0}",
            o.op,
            o.ms_per_step,
            100.0 * o.ms_per_step / step.max(f64::MIN_POSITIVE),
            o.calls_per_step
        );
    }
    println!("{:<22} {:>10.1}", "mean step", step);
}
