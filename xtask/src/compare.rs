//! brisk and PyTorch on the same work, side by side: `brisk bench step --json` and
//! `scripts/torch_reference.py --json` for one model, batch and precision (`StepCase`),
//! run one after the other. Used by `cargo xtask compare-torch` (runs alternated, img/s
//! and peak memory with ratios) and by `cargo xtask experiment --with-pytorch`. The only
//! place xtask runs PyTorch.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use brisk_schema::{BatchSchedule, TrainConfig};
use brisk_spec::Arch;
use serde::Deserialize;

use crate::plan::{Kind, Plan};
use crate::results::{Status, Torch, Variant};

/// The reference script, in the repository.
const SCRIPT: &str = "scripts/torch_reference.py";

/// One measurement both sides make.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCase {
    pub arch: Arch,
    pub stem: &'static str,
    pub width: f64,
    pub classes: usize,
    pub image: usize,
    /// Image channels (3, or 1 for grey-scale images).
    pub channels: usize,
    pub batch: usize,
    pub threads: usize,
    pub steps: usize,
    /// brisk's precision name; PyTorch runs autocast in its half format.
    pub precision: &'static str,
    pub eval: bool,
    /// Ask both sides for their per-op tables (`--profile`).
    pub profile: bool,
}

impl StepCase {
    /// PyTorch's counterpart of the brisk precision: f32, or autocast to its half format.
    pub fn torch_dtype(&self) -> &'static str {
        match self.precision {
            "f32" => "f32",
            p if p.ends_with("f16") && !p.ends_with("bf16") => "f16",
            _ => "bf16",
        }
    }

    fn common_args(&self) -> Vec<String> {
        let mut args = vec![
            "--arch".to_string(),
            self.arch.name().into(),
            "--stem".into(),
            self.stem.into(),
            "--width".into(),
            self.width.to_string(),
            "--classes".into(),
            self.classes.to_string(),
            "--image".into(),
            self.image.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--threads".into(),
            self.threads.to_string(),
            "--steps".into(),
            self.steps.to_string(),
            "--json".into(),
        ];
        if self.eval {
            args.push("--eval".into());
        }
        if self.profile {
            args.push("--profile".into());
        }
        args
    }

    /// `brisk bench step` on this case.
    pub fn brisk(&self, brisk: &Path) -> Result<Figure> {
        let mut cmd = Command::new(brisk);
        cmd.args(["bench", "step", "--dtype", self.precision])
            .args(["--channels", &self.channels.to_string()])
            .args(self.common_args());
        figure(&mut cmd)
    }

    /// The PyTorch reference on this case.
    pub fn torch(&self, root: &Path) -> Result<Figure> {
        let mut cmd = Command::new("python3");
        cmd.arg(root.join(SCRIPT))
            .args(["--dtype", self.torch_dtype()])
            .args(["--in-channels", &self.channels.to_string()]);
        let args = self.common_args();
        // The script takes `--mode eval` where brisk takes `--eval`.
        let args: Vec<String> = args
            .into_iter()
            .flat_map(|a| match a.as_str() {
                "--eval" => vec!["--mode".to_string(), "eval".to_string()],
                _ => vec![a],
            })
            .collect();
        figure(cmd.args(args))
    }

    /// The case of a training variant's config (single rank, fixed batch, a ResNet-18
    /// or SE-ResNet-18), or `None` when PyTorch has no like-for-like counterpart.
    pub fn of_variant(
        config: &TrainConfig,
        classes: usize,
        image: usize,
        threads: usize,
    ) -> Result<Option<Self>> {
        let BatchSchedule::Fixed { size: batch } = config.batch else {
            return Ok(None);
        };
        let spec = config.model_spec(classes, 3, image)?;
        if !matches!(spec.arch, Arch::Resnet18 | Arch::Seresnet18) || spec.channels.is_some() {
            return Ok(None);
        }
        Ok(Some(StepCase {
            arch: spec.arch,
            stem: spec.stem.name(),
            width: spec.width,
            classes,
            image,
            channels: 3,
            batch,
            threads,
            steps: 5,
            precision: config.precision.mode.name(),
            eval: false,
            profile: false,
        }))
    }
}

/// What one side measured.
#[derive(Clone, Debug, Deserialize)]
pub struct Figure {
    pub img_per_s: f64,
    /// How brisk multiplied its bf16 layers' operands (`brisk_ops::half_products`: amx,
    /// avx512-bf16 or avx512 for f32 products); absent from PyTorch's figures.
    #[serde(default)]
    pub half_products: Option<String>,
    pub peak_rss_mib: Option<f64>,
    /// The per-op table, when asked for (`--profile`, training steps).
    #[serde(default)]
    pub ops: Vec<OpRow>,
}

/// One row of a side's per-op table, by brisk's op names.
#[derive(Clone, Debug, Deserialize)]
pub struct OpRow {
    pub op: String,
    pub ms_per_step: f64,
}

/// Runs a measuring command and reads the JSON object it prints last.
fn figure(cmd: &mut Command) -> Result<Figure> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{cmd:?} printed no JSON result: {stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("{cmd:?}'s result: {line}"))
}

/// Why PyTorch cannot run here, if it cannot.
pub fn torch_missing() -> Option<String> {
    match Command::new("python3").args(["-c", "import torch"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "python3 cannot import torch ({}); pip install torch",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// `cargo xtask compare-torch`'s options.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// brisk precisions to time (PyTorch runs f32, or autocast to the same half format).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    precisions: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    batches: Vec<usize>,
    /// Compute threads of both.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps per run.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Runs per side, alternated; the median is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Image sides (square images).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    images: Vec<usize>,
    /// Image channels (1 for grey-scale images, as 8x8 digits or 28x28 MNIST-like sets).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Width multipliers of the network.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    widths: Vec<f64>,
    /// Architectures (resnet18, seresnet18).
    #[arg(long, value_delimiter = ',', default_value = "resnet18")]
    archs: Vec<String>,
    /// Leave eval-mode forwards out.
    #[arg(long)]
    no_eval: bool,
    /// After each training row, where the step's time goes on both sides: brisk's engine
    /// timing itself per kind of op, PyTorch's profiler (self CPU time per op, grouped
    /// under brisk's names), medians of the rounds.
    #[arg(long)]
    profile: bool,
    /// Instead of single steps: whole training runs of CIFAR ResNet-18 on small synthetic
    /// images (width 0.25: 8x8, 1,400 images, 30 epochs; 28x28, 4,000, 10 epochs) and the
    /// quick experiment's baseline (width 0.125, 32x32, 4,500 images, 4 epochs), `brisk
    /// train` against scripts/torch_train.py on the same packed data and recipe, `--rounds`
    /// alternated: training seconds and top-1.
    #[arg(long)]
    whole_runs: bool,
}

/// The median of `v` (NaN-safe ordering).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The cases `compare-torch` times: every architecture × width × precision × batch,
/// training steps, then eval forwards in f32.
fn cases(a: &CompareArgs) -> Result<Vec<StepCase>> {
    let mut out = Vec::new();
    for eval in [false, true] {
        if eval && a.no_eval {
            continue;
        }
        for arch in &a.archs {
            let arch: Arch = arch.parse().with_context(|| format!("--archs {arch}"))?;
            for &width in &a.widths {
                for precision in &a.precisions {
                    let precision: &'static str = brisk_precision::Precision::NAMES
                        .into_iter()
                        .find(|p| p == precision)
                        .with_context(|| format!("--precisions: unknown {precision:?}"))?;
                    // Eval forwards are timed in f32 only.
                    if eval && precision != "f32" {
                        continue;
                    }
                    for (&image, &batch) in a
                        .images
                        .iter()
                        .flat_map(|i| a.batches.iter().map(move |b| (i, b)))
                    {
                        out.push(StepCase {
                            arch,
                            stem: "cifar",
                            width,
                            classes: 10,
                            image,
                            channels: a.channels,
                            batch,
                            threads: a.threads,
                            steps: a.steps,
                            precision,
                            eval,
                            profile: a.profile && !eval,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `cargo xtask compare-torch`: CIFAR ResNet training steps and eval forwards, brisk and
/// PyTorch alternated, medians of `rounds`.
pub fn run(a: &CompareArgs) -> Result<()> {
    let counts = [a.threads, a.steps, a.rounds, a.channels];
    if a.batches.is_empty() || a.batches.contains(&0) || a.images.contains(&0) || counts.contains(&0) {
        bail!("every count must be at least 1");
    }
    if let Some(why) = torch_missing() {
        bail!("PyTorch is needed: {why}");
    }
    if a.whole_runs {
        return crate::whole_runs::run(&crate::build_brisk(false)?, a.threads, a.rounds);
    }
    let cases = cases(a)?;
    let root = crate::root()?;
    let brisk = crate::build_brisk(false)?;
    println!(
        "CIFAR-stem ResNet, {} threads, {} timed steps a run, {} rounds alternated (median of rounds)",
        a.threads, a.steps, a.rounds
    );
    println!("machine: {}", crate::machine::Machine::read().cpu_and_isa());
    println!(
        "{:<6} {:<11} {:>6} {:>8} {:<22} {:>5} {:>12} {:>16} {:>7} {:>11} {:>11}",
        "mode",
        "arch",
        "width",
        "image",
        "precision",
        "batch",
        "brisk img/s",
        "torch img/s",
        "ratio",
        "brisk MiB",
        "torch MiB"
    );
    for case in &cases {
        print_row(case, &brisk, root, a.rounds)?;
    }
    Ok(())
}

fn print_row(case: &StepCase, brisk: &Path, root: &Path, rounds: usize) -> Result<()> {
    let (mut b, mut t, mut bm, mut tm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bops, mut tops) = (Vec::new(), Vec::new());
    let mut products = None;
    for _ in 0..rounds {
        let fb = case.brisk(brisk)?;
        products = fb.half_products.clone();
        let ft = case.torch(root)?;
        b.push(fb.img_per_s);
        t.push(ft.img_per_s);
        bm.push(fb.peak_rss_mib.unwrap_or(f64::NAN));
        tm.push(ft.peak_rss_mib.unwrap_or(f64::NAN));
        bops.push(fb.ops);
        tops.push(ft.ops);
    }
    let (b, t) = (median(b), median(t));
    // A bf16 mode names the products its half layers ran on.
    let precision = match products {
        Some(p) if case.precision.contains("bf16") => format!("{}/{p}", case.precision),
        _ => case.precision.to_string(),
    };
    println!(
        "{:<6} {:<11} {:>6} {:>8} {:<22} {:>5} {:>12.1} {:>16} {:>7.2} {:>11.0} {:>11.0}",
        if case.eval { "eval" } else { "train" },
        case.arch.name(),
        case.width,
        format!("{0}x{0}x{1}", case.image, case.channels),
        precision,
        case.batch,
        b,
        format!("{t:.1} ({})", if case.eval { "f32" } else { case.torch_dtype() }),
        b / t,
        median(bm),
        median(tm)
    );
    if case.profile {
        print!("{}", op_table(&bops, &tops));
    }
    Ok(())
}

/// brisk's two convolution gradients, which PyTorch computes in one op.
const CONV_GRADS: [&str; 2] = ["conv-input-grad", "conv-weight-grad"];

/// The median over rounds of each op's ms per step (0 where a round lacks it).
fn op_medians(rounds: &[Vec<OpRow>], op: &str) -> Option<f64> {
    let found: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.iter().find(|o| o.op == op).map(|o| o.ms_per_step))
        .collect();
    (!found.is_empty()).then(|| median(found))
}

/// The side-by-side per-op table: brisk's rows in its order, its two convolution
/// gradients also summed as PyTorch's `conv-backward`, then PyTorch's rows brisk lacks.
fn op_table(brisk: &[Vec<OpRow>], torch: &[Vec<OpRow>]) -> String {
    let names = |rounds: &[Vec<OpRow>]| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for o in rounds.iter().flatten() {
            if !v.contains(&o.op) {
                v.push(o.op.clone());
            }
        }
        v
    };
    let mut ops = names(brisk);
    if let Some(i) = ops.iter().position(|o| o == CONV_GRADS[1]) {
        ops.insert(i + 1, "conv-backward".into());
    }
    for op in names(torch) {
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut out = format!(
        "       {:<22} {:>10} {:>10} {:>12}\n",
        "op (ms per step)", "brisk", "torch", "brisk/torch"
    );
    let (mut bsum, mut tsum) = (0.0, 0.0);
    for op in &ops {
        let b = if op == "conv-backward" {
            let parts: Vec<f64> = CONV_GRADS.iter().filter_map(|g| op_medians(brisk, g)).collect();
            (!parts.is_empty()).then(|| parts.iter().sum())
        } else {
            op_medians(brisk, op)
        };
        let t = op_medians(torch, op);
        if op != "conv-backward" {
            bsum += b.unwrap_or(0.0);
        }
        tsum += t.unwrap_or(0.0);
        let ratio = match (b, t) {
            (Some(b), Some(t)) if t > 0.0 => format!("{:.2}", b / t),
            _ => "-".into(),
        };
        out += &format!("       {op:<22} {:>10} {:>10} {ratio:>12}\n", cell(b), cell(t));
    }
    out += &format!(
        "       {:<22} {:>10.1} {:>10.1} {:>12.2}\n",
        "sum",
        bsum,
        tsum,
        bsum / tsum.max(f64::MIN_POSITIVE)
    );
    out
}

/// Adds PyTorch's training-step img/s beside brisk's for each distinct case among the
/// single-rank, fixed-batch training variants that finished.
pub fn add_pytorch(
    results: &mut [Variant],
    plans: &[Plan],
    brisk: &Path,
    classes: usize,
    image: usize,
) -> Result<()> {
    if let Some(why) = torch_missing() {
        eprintln!("xtask: --with-pytorch: skipped: {why}");
        return Ok(());
    }
    let root = crate::root()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut seen: Vec<(StepCase, Torch)> = Vec::new();
    for r in results.iter_mut().filter(|r| r.status() == Status::Done) {
        let Some(plan) = plans
            .iter()
            .find(|p| p.name == r.name && p.kind == Kind::Train && p.ranks == 1)
        else {
            continue;
        };
        let config = TrainConfig::from_toml_str(plan.config.as_deref().unwrap_or_default(), &r.name)?;
        let Some(case) = StepCase::of_variant(&config, classes, image, threads)? else {
            continue;
        };
        if let Some((_, t)) = seen.iter().find(|(c, _)| *c == case) {
            r.pytorch = Some(t.clone());
            continue;
        }
        eprintln!(
            "xtask: --with-pytorch: {} width {} batch {} {}",
            case.arch.name(),
            case.width,
            case.batch,
            case.precision
        );
        let (b, t) = match (case.brisk(brisk), case.torch(root)) {
            (Ok(b), Ok(t)) => (b, t),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("xtask: --with-pytorch: a measurement failed, left out: {e:#}");
                continue;
            }
        };
        let torch = Torch {
            arch: case.arch.name().into(),
            width: case.width,
            batch: case.batch,
            precision: format!("{} (PyTorch {})", case.precision, case.torch_dtype()),
            threads,
            brisk_img_per_s: b.img_per_s,
            torch_img_per_s: t.img_per_s,
            ratio: b.img_per_s / t.img_per_s,
        };
        seen.push((case, torch.clone()));
        r.pytorch = Some(torch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_names_its_like_for_like_case() -> Result<()> {
        let mut c = TrainConfig::default();
        c.set_text("model.width", "0.125")?;
        c.set_text("precision.mode", "mixed-f16")?;
        let case = StepCase::of_variant(&c, 10, 32, 2)?.context("a fixed-batch ResNet-18")?;
        assert_eq!((case.arch, case.batch, case.width), (Arch::Resnet18, 128, 0.125));
        assert_eq!(case.torch_dtype(), "f16");
        assert!(case.common_args().contains(&"0.125".to_string()));
        c.set_text(
            "batch",
            "{ kind = \"geometric\", start = 32, factor = 2, every = 1, max = 128 }",
        )?;
        assert_eq!(
            StepCase::of_variant(&c, 10, 32, 2)?,
            None,
            "a growing batch has no counterpart"
        );
        Ok(())
    }

    fn rows(v: &[(&str, f64)]) -> Vec<OpRow> {
        v.iter()
            .map(|&(op, ms)| OpRow {
                op: op.into(),
                ms_per_step: ms,
            })
            .collect()
    }

    #[test]
    fn the_op_table_pairs_brisks_conv_gradients_with_torchs_one_op() {
        let brisk = [
            rows(&[
                ("conv-forward", 10.0),
                ("conv-input-grad", 8.0),
                ("conv-weight-grad", 12.0),
            ]),
            rows(&[
                ("conv-forward", 14.0),
                ("conv-input-grad", 10.0),
                ("conv-weight-grad", 14.0),
            ]),
        ];
        let torch = [
            rows(&[("conv-forward", 6.0), ("conv-backward", 11.0), ("rest", 1.0)]),
            rows(&[("conv-forward", 6.0), ("conv-backward", 13.0), ("rest", 3.0)]),
        ];
        let table = op_table(&brisk, &torch);
        let line = |op: &str| -> Vec<String> {
            let l = table
                .lines()
                .find(|l| l.split_whitespace().next() == Some(op))
                .unwrap_or_else(|| panic!("no {op} row in\n{table}"));
            l.split_whitespace().skip(1).map(String::from).collect()
        };
        // Medians of the two rounds; the gradients' medians summed (9 + 13).
        assert_eq!(line("conv-forward"), ["12.0", "6.0", "2.00"]);
        assert_eq!(line("conv-input-grad"), ["9.0", "-", "-"]);
        assert_eq!(line("conv-backward"), ["22.0", "12.0", "1.83"]);
        assert_eq!(line("rest"), ["-", "2.0", "-"]);
        // The sum counts brisk's gradients once: 12 + 9 + 13.
        assert_eq!(line("sum"), ["34.0", "20.0", "1.70"]);
        let order: Vec<&str> = table
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            order,
            [
                "conv-forward",
                "conv-input-grad",
                "conv-weight-grad",
                "conv-backward",
                "rest",
                "sum"
            ]
        );
    }
}
