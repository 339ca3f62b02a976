//! `brisk prune`, `brisk distill`, `brisk quantize` and `brisk inspect-model`: shrink a
//! trained model and report parameters, MACs, bytes and accuracy before → after.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use brisk_compress::masks::{default_exclusions, Masks, Scope};
use brisk_compress::{
    load_model, prune_filters, sparse, Distillation, FilterCriterion, GradualPruning, MaskHook, PruneSchedule,
};
use brisk_data::{Dataset, Split};
use brisk_models::Network;
use brisk_train::{evaluate, TrainConfig, Trainer};
use candle_core::Device;
use serde::Serialize;

/// What a model costs and what it scores.
#[derive(Debug, Serialize)]
struct Figures {
    /// Non-zero parameters.
    params: usize,
    /// Multiply-accumulates of one forward pass (dense count).
    macs: u64,
    /// Size of the model file.
    bytes: u64,
    top1: f64,
    top5: f64,
    loss: f64,
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn nonzero_params(net: &Network) -> Result<usize> {
    let mut n = 0;
    for (_, v) in net.trainable_vars()? {
        n += v
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|x| **x != 0.0)
            .count();
    }
    Ok(n)
}

fn figures(net: &Network, data: &Arc<Dataset>, file: &Path) -> Result<Figures> {
    let r = evaluate(net, data, Split::Test, 256, (0, 1), &mut |_| Ok(()))?;
    let spec = net.spec();
    Ok(Figures {
        params: nonzero_params(net)?,
        macs: spec.macs(spec.image_size),
        bytes: file_size(file),
        top1: r.top1,
        top5: r.top5,
        loss: r.loss,
    })
}

fn report(what: &str, before: &Figures, after: &Figures, out: &Path, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({ "method": what, "before": before, "after": after, "model": out });
        println!("{v}");
        return Ok(());
    }
    println!("{what}: {}", out.display());
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

fn init(threads: Option<usize>) -> Result<()> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    brisk_ops::init_compute(n)?;
    Ok(())
}

fn model_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(brisk_train::checkpoint::MODEL_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The fine-tuning (or training) config shared by the commands: plain SGD on the given
/// data, a cosine schedule from `lr`, results in `out`.
fn train_config(
    data: &Path,
    out: &Path,
    epochs: usize,
    lr: f64,
    batch: usize,
    threads: Option<usize>,
) -> Result<TrainConfig> {
    let mut c = TrainConfig::default()
        .with_override("data", &format!("{:?}", data.display().to_string()))?
        .with_override("out", &format!("{:?}", out.display().to_string()))?
        .with_override("lr.shape", "{ kind = \"cosine\" }")?
        .with_override("batch", &format!("{{ kind = \"fixed\", size = {batch} }}"))?;
    c.epochs = epochs.max(1);
    c.lr.base = lr;
    c.threads = threads.unwrap_or(0);
    c.validate()?;
    Ok(c)
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
    #[arg(long, value_parser = ["global", "layer", "gradual", "filter"])]
    method: String,
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
    #[arg(long, default_value = "l1", value_parser = ["l1", "bn-scale"])]
    criterion: String,
    /// Layers left unpruned (exact names or prefixes). By default, conv1 and fc.
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,
    /// Compute threads. By default, every core.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object `{method, before, after, model}` on stdout.
    #[arg(long)]
    json: bool,
}

pub fn prune(a: &PruneArgs) -> Result<()> {
    init(a.threads)?;
    let file = model_file(&a.checkpoint);
    let net = load_model(&file, &Device::Cpu)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let before = figures(&net, &data, &file)?;
    if !(0.0..1.0).contains(&a.sparsity) {
        bail!("--sparsity must be in [0, 1), got {}", a.sparsity);
    }
    let exclude = if a.exclude.is_empty() {
        default_exclusions()
    } else {
        a.exclude.clone()
    };
    let config = train_config(&a.data, &a.out, a.finetune_epochs, a.lr, a.batch, a.threads)?;
    let (mut trainer, sparse_out) = match a.method.as_str() {
        "filter" => {
            let criterion = if a.criterion == "bn-scale" {
                FilterCriterion::BnScale
            } else {
                FilterCriterion::L1
            };
            let (pruned, _) = prune_filters(&net, 1.0 - a.sparsity, criterion)?;
            (Trainer::with_network(config, pruned)?, false)
        }
        "gradual" => {
            let steps_per_epoch = Dataset::len(&data, Split::Train).div_ceil(a.batch) as u64;
            let total = steps_per_epoch * a.finetune_epochs.max(1) as u64;
            // Prune over the first two thirds of fine-tuning, ten times or every step.
            let count = 10.min(total * 2 / 3).max(1);
            let every = (total * 2 / 3 / count).max(1);
            let schedule = PruneSchedule {
                initial: 0.0,
                final_sparsity: a.sparsity,
                start: every,
                every,
                count,
            };
            let mut t = Trainer::with_network(config, net)?;
            t.add_hook(Box::new(GradualPruning::new(
                schedule,
                Scope::Global,
                exclude.clone(),
            )?));
            (t, true)
        }
        method => {
            let scope = if method == "layer" {
                Scope::Layer
            } else {
                Scope::Global
            };
            let masks = Masks::magnitude(&net, a.sparsity, scope, &exclude)?;
            masks.apply()?;
            let mut t = Trainer::with_network(config, net)?;
            t.add_hook(Box::new(MaskHook::new(masks)));
            (t, true)
        }
    };
    trainer.set_quiet(a.json);
    if a.finetune_epochs > 0 {
        trainer.run()?;
    }
    let pruned = trainer.network();
    let dense = a.out.join("model.safetensors");
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    if a.finetune_epochs == 0 {
        pruned.save(&dense)?;
    }
    let out = if sparse_out {
        let path = a.out.join("model-sparse.safetensors");
        sparse::save(pruned, &path)?;
        path
    } else {
        dense
    };
    let after = figures(pruned, &data, &out)?;
    report(
        &format!("prune --method {} --sparsity {}", a.method, a.sparsity),
        &before,
        &after,
        &out,
        a.json,
    )
}

#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// The teacher model (file, or a folder holding model.safetensors).
    #[arg(long, value_name = "FILE")]
    teacher: PathBuf,
    /// The student: a preset name (`brisk models`) or a ModelSpec file.
    #[arg(long, value_name = "SPEC")]
    student: String,
    /// Width multiplier of the student preset.
    #[arg(long)]
    width: Option<f64>,
    /// Packed dataset.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Output folder of the student's training run.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Peak learning rate (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Softening temperature T (2 measured better than 4 on the synthetic set).
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Weight α of the distillation term (1 − α on the labels' cross-entropy).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object `{method, before (teacher), after (student), model}`.
    #[arg(long)]
    json: bool,
}

pub fn distill(a: &DistillArgs) -> Result<()> {
    init(a.threads)?;
    let file = model_file(&a.teacher);
    let teacher = load_model(&file, &Device::Cpu)?;
    let data = Arc::new(Dataset::open(&a.data)?);
    let before = figures(&teacher, &data, &file)?;
    let mut config = train_config(&a.data, &a.out, a.epochs, a.lr, a.batch, a.threads)?;
    if Path::new(&a.student).is_file() {
        config.model.spec_file = Some(PathBuf::from(&a.student));
    } else {
        config.model.preset = a.student.clone();
    }
    config.model.width = a.width;
    config.validate()?;
    let mut trainer = Trainer::new(config)?;
    trainer.set_loss(Box::new(Distillation::new(teacher, a.temperature, a.alpha)?));
    trainer.set_quiet(a.json);
    trainer.run()?;
    let out = a.out.join("model.safetensors");
    let after = figures(trainer.network(), &data, &out)?;
    report(
        &format!("distill T={} alpha={}", a.temperature, a.alpha),
        &before,
        &after,
        &out,
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
    /// Print one JSON object `{method, before, after, model}`.
    #[arg(long)]
    json: bool,
}

pub fn quantize(a: &QuantizeArgs) -> Result<()> {
    init(a.threads)?;
    let file = model_file(&a.checkpoint);
    let net = load_model(&file, &Device::Cpu)?;
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
    let before = figures(&net, &data, &file)?;
    let q = load_model(&out, &Device::Cpu)?;
    let after = figures(&q, &data, &out)?;
    report(
        "quantize int8 (per-channel, BN folded)",
        &before,
        &after,
        &out,
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
    let file = model_file(&a.file);
    let format = brisk_compress::model_format(&file)?.unwrap_or_else(|| "dense".into());
    let net = load_model(&file, &Device::Cpu)?;
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
        format!("{:?}", spec.stem).to_lowercase(),
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
