//! `brisk prune`, `brisk distill`, `brisk quantize` and `brisk inspect-model`: shrink a
//! trained model and report parameters, MACs, bytes and accuracy before → after.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use brisk_compress::masks::default_exclusions;
use brisk_compress::{measure, Distillation, FilterCriterion, FineTune, PruneMethod, PruneOptions, Pruning};
use brisk_data::Dataset;
use brisk_models::MODEL_FILE;
use brisk_schema::{BatchSchedule, CompressReport, Figures, TrainConfig};
use brisk_train::Trainer;
use candle_core::Device;
use serde::Serialize;

use super::{init_threads, load_model, named};

/// Prints a compression command's result: one JSON object, or a before/after table.
fn report(report: &CompressReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let (before, after): (&Figures, &Figures) = (&report.before, &report.after);
    println!("{}: {}", report.method, report.model.display());
    println!("{:<12} {:>14} {:>14} {:>8}", "", "before", "after", "ratio");
    let row = |name: &str, b: f64, a: f64, pct: bool| {
        let (bs, as_) = if pct {
            (format!("{:.2}%", 100.0 * b), format!("{:.2}%", 100.0 * a))
        } else {
            (format!("{b:.0}"), format!("{a:.0}"))
        };
        let ratio = if b != 0.0 {
            format!("{:.3}", a / b)
        } else {
            "-".into()
        };
        println!("{name:<12} {bs:>14} {as_:>14} {ratio:>8}");
    };
    row("params", before.params as f64, after.params as f64, false);
    row("MACs", before.macs as f64, after.macs as f64, false);
    row("bytes", before.bytes as f64, after.bytes as f64, false);
    row("top-1", before.top1, after.top1, true);
    row("top-5", before.top5, after.top5, true);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The trained model (file, or a folder holding model.safetensors).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Packed dataset to fine-tune and measure on.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Output folder (fine-tuning run, model.safetensors, and model-sparse.safetensors for
    /// unstructured methods).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// global: one magnitude threshold over all prunable layers; layer: the sparsity in
    /// each layer; gradual: Zhu & Gupta's cubic schedule during fine-tuning; filter:
    /// remove block-internal channels (a smaller dense model).
    #[arg(long, value_parser = named::<PruneMethod>(&PruneMethod::NAMES))]
    method: PruneMethod,
    /// Fraction of weights to remove (filter: fraction of block-internal channels).
    #[arg(long)]
    sparsity: f64,
    /// Epochs of fine-tuning after pruning (gradual: of pruning while training).
    #[arg(long, default_value_t = 1)]
    finetune_epochs: usize,
    /// Peak learning rate of fine-tuning (cosine decay).
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// Images per fine-tuning batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Filter ranking for --method filter: l1 (filter weights) or bn-scale (|γ|).
    #[arg(long, default_value = "l1", value_parser = named::<FilterCriterion>(&FilterCriterion::NAMES))]
    criterion: FilterCriterion,
    /// Layers left unpruned (exact names or prefixes). By default, conv1 and fc.
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,
    /// Seed of the fine-tuning's data order and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads. By default, every core.
    #[arg(long)]
    threads: Option<usize>,
    /// Measure accuracy (before, after, and during fine-tuning) with flip test-time
    /// augmentation, as a run with `eval.flip` does.
    #[arg(long)]
    flip: bool,
    /// Print one JSON object `{method, before, after, model}` on stdout.
    #[arg(long)]
    json: bool,
}

pub fn prune(a: &PruneArgs) -> Result<()> {
    init_threads(a.threads)?;
    let (file, net) = load_model(&a.checkpoint)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let before = measure(&net, &data, &file, a.flip)?;
    let options = PruneOptions {
        method: a.method,
        sparsity: a.sparsity,
        criterion: a.criterion,
        exclude: if a.exclude.is_empty() {
            default_exclusions()
        } else {
            a.exclude.clone()
        },
        finetune: FineTune {
            epochs: a.finetune_epochs,
            lr: a.lr,
            batch: a.batch,
            threads: a.threads,
            seed: a.seed,
            flip: a.flip,
        },
    };
    let mut pruning = Pruning::new(net, &data, &a.out, options)?;
    pruning.trainer_mut().set_quiet(a.json);
    let (pruned, out) = pruning.run()?;
    let after = measure(&pruned, &data, &out, a.flip)?;
    let method = format!("prune --method {} --sparsity {}", a.method, a.sparsity);
    report(
        &CompressReport {
            method,
            before,
            after,
            model: out,
        },
        a.json,
    )
}

#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// The teacher model (file, or a folder holding model.safetensors).
    #[arg(long, value_name = "FILE")]
    teacher: PathBuf,
    /// The student's training config (a `brisk train` config file: model, schedule,
    /// optimiser, loader, evaluation), so that a distilled student trains exactly as the
    /// same student trained alone; the flags below override its values. Without it the
    /// student trains with `brisk train`'s defaults and a cosine schedule.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The student: a preset name (`brisk models`) or a ModelSpec file (required unless
    /// `--config` names the model).
    #[arg(long, value_name = "SPEC", required_unless_present = "config")]
    student: Option<String>,
    /// Width multiplier of the student preset.
    #[arg(long)]
    width: Option<f64>,
    /// Packed dataset.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Output folder of the student's training run.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Epochs [default without --config: 4].
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate [default without --config: 0.1, cosine decay].
    #[arg(long)]
    lr: Option<f64>,
    /// Batch size [default without --config: 128].
    #[arg(long)]
    batch: Option<usize>,
    /// Softening temperature T (2 measured better than 4 on the synthetic set).
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Weight α of the distillation term (1 − α on the labels' cross-entropy).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Seed of the student's initial weights, data order and augmentation [default: the
    /// config's, else 0].
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    threads: Option<usize>,
    /// Measure accuracy (before, after, and during fine-tuning) with flip test-time
    /// augmentation, as a run with `eval.flip` does.
    #[arg(long)]
    flip: bool,
    /// Print one JSON object `{method, before (teacher), after (student), model}`.
    #[arg(long)]
    json: bool,
}

/// The student's training config: `--config` (or the fine-tuning defaults), then the flags.
fn student_config(a: &DistillArgs) -> Result<TrainConfig> {
    let mut config = match &a.config {
        Some(path) => {
            let mut c = TrainConfig::from_file(path)?;
            c.data = Some(a.data.clone());
            c.out = Some(a.out.clone());
            c.eval.flip |= a.flip;
            c
        }
        None => FineTune {
            epochs: 4,
            lr: 0.1,
            batch: 128,
            threads: None,
            seed: 0,
            flip: a.flip,
        }
        .config(&a.data, &a.out)?,
    };
    if let Some(student) = &a.student {
        if Path::new(student).is_file() {
            config.model.spec_file = Some(PathBuf::from(student));
        } else {
            config.model.preset = student.clone();
            config.model.spec_file = None;
        }
    }
    if let Some(w) = a.width {
        config.model.width = Some(w);
    }
    if let Some(e) = a.epochs {
        config.epochs = e;
    }
    if let Some(lr) = a.lr {
        config.lr.base = lr;
    }
    if let Some(b) = a.batch {
        config.batch = BatchSchedule::Fixed { size: b };
    }
    if let Some(s) = a.seed {
        config.seed = s;
    }
    if let Some(t) = a.threads {
        config.threads = t;
    }
    config.validate()?;
    Ok(config)
}

pub fn distill(a: &DistillArgs) -> Result<()> {
    init_threads(a.threads)?;
    let (file, teacher) = load_model(&a.teacher)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let config = student_config(a)?;
    let before = measure(&teacher, &data, &file, config.eval.flip)?;
    let mut trainer = Trainer::new(config)?;
    trainer.set_loss(Box::new(Distillation::new(teacher, a.temperature, a.alpha)?));
    trainer.set_quiet(a.json);
    trainer.run()?;
    let out = a.out.join(MODEL_FILE);
    let after = measure(trainer.network(), &data, &out, trainer.config().eval.flip)?;
    let method = format!("distill T={} alpha={}", a.temperature, a.alpha);
    report(
        &CompressReport {
            method,
            before,
            after,
            model: out,
        },
        a.json,
    )
}

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// The trained model (file, or a folder holding model.safetensors).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Packed dataset to measure accuracy on.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The int8 file to write. By default, `<checkpoint>-int8.safetensors` beside it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    /// Measure accuracy (before, after, and during fine-tuning) with flip test-time
    /// augmentation, as a run with `eval.flip` does.
    #[arg(long)]
    flip: bool,
    /// Print one JSON object `{method, before, after, model}`.
    #[arg(long)]
    json: bool,
}

pub fn quantize(a: &QuantizeArgs) -> Result<()> {
    init_threads(a.threads)?;
    let (file, net) = load_model(&a.checkpoint)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let out = a.out.clone().unwrap_or_else(|| {
        file.with_file_name(format!(
            "{}-int8.safetensors",
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    brisk_compress::quantize::save(&net, &out)?;
    let before = measure(&net, &data, &file, a.flip)?;
    let after = measure(
        &brisk_compress::load_model(&out, &Device::Cpu)?,
        &data,
        &out,
        a.flip,
    )?;
    let method = "quantize int8 (per-channel, BN folded)".to_string();
    report(
        &CompressReport {
            method,
            before,
            after,
            model: out,
        },
        a.json,
    )
}

#[derive(Debug, clap::Args)]
pub struct InspectModelArgs {
    /// A model file (dense, sparse or int8), or a folder holding model.safetensors.
    file: PathBuf,
    /// Print one JSON object `{format, params, nonzero, macs, bytes, layers: [...]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct LayerRow {
    name: String,
    shape: Vec<usize>,
    params: usize,
    zeros: usize,
    sparsity: f64,
}

pub fn inspect_model(a: &InspectModelArgs) -> Result<()> {
    let (file, net) = load_model(&a.file)?;
    let file_size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let format = brisk_compress::model_format(&file)?.unwrap_or_else(|| "dense".into());
    let mut rows = Vec::new();
    for (name, v) in net.trainable_vars()? {
        let values = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let zeros = values.iter().filter(|x| **x == 0.0).count();
        rows.push(LayerRow {
            name,
            shape: v.as_tensor().dims().to_vec(),
            params: values.len(),
            zeros,
            sparsity: zeros as f64 / values.len().max(1) as f64,
        });
    }
    let spec = net.spec();
    let params: usize = rows.iter().map(|r| r.params).sum();
    let zeros: usize = rows.iter().map(|r| r.zeros).sum();
    if a.json {
        let v = serde_json::json!({
            "format": format, "params": params, "nonzero": params - zeros,
            "macs": spec.macs(spec.image_size), "bytes": file_size(&file),
            "channels": spec.resolved_channels(), "layers": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({format}): {} {} width {}, {params} parameters, {} non-zero ({:.1}% sparse), {} MACs at {}x{}, {} bytes",
        file.display(),
        spec.arch.name(),
        spec.stem,
        spec.width,
        params - zeros,
        100.0 * zeros as f64 / params.max(1) as f64,
        spec.macs(spec.image_size),
        spec.image_size,
        spec.image_size,
        file_size(&file)
    );
    let ch = spec.resolved_channels();
    println!(
        "channels: stem {}; blocks (mid/out) {}",
        ch.stem,
        ch.blocks
            .iter()
            .map(|b| format!("{}/{}", b.mid, b.out))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "\n{:<32} {:>18} {:>10} {:>9}",
        "tensor", "shape", "params", "sparsity"
    );
    for r in rows.iter().filter(|r| r.shape.len() > 1) {
        println!(
            "{:<32} {:>18} {:>10} {:>8.1}%",
            r.name,
            format!("{:?}", r.shape),
            r.params,
            100.0 * r.sparsity
        );
    }
    Ok(())
}
