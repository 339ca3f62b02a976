//! `cargo xtask compare-torch`: brisk and PyTorch on the same work, runs alternated so the
//! machine's drift hits both, reported as img/s and the ratio brisk / PyTorch.

use std::process::Command;

use anyhow::{bail, Context, Result};

struct Options {
    /// brisk precisions to time; PyTorch runs f32 for f32 and bf16 autocast for the others.
    precisions: Vec<String>,
    batches: Vec<usize>,
    threads: usize,
    steps: usize,
    rounds: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        precisions: vec!["f32".into()],
        batches: vec![32, 128],
        threads: 2,
        steps: 5,
        rounds: 2,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .with_context(|| format!("{flag}: `{v}` is not a positive integer"))
        };
        match flag.as_str() {
            "--batches" => o.batches = value.split(',').map(number).collect::<Result<_>>()?,
            "--threads" => o.threads = number(value)?,
            "--steps" => o.steps = number(value)?,
            "--rounds" => o.rounds = number(value)?,
            "--precisions" => o.precisions = value.split(',').map(str::to_string).collect(),
            other => bail!(
                "unknown flag `{other}` (expected --precisions, --batches, --threads, --steps, --rounds)"
            ),
        }
    }
    if o.batches.is_empty() || o.batches.contains(&0) || o.threads == 0 || o.steps == 0 || o.rounds == 0 {
        bail!("every count must be at least 1");
    }
    Ok(o)
}

/// Runs a command and returns its stdout, failing with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// One measurement: img/s median and peak resident memory in MiB.
struct Figure {
    img_per_s: f64,
    peak_mib: f64,
}

/// PyTorch's counterpart of a brisk precision: f32, else bf16 autocast (the reference
/// script's only half-precision mode).
fn torch_dtype(precision: &str) -> &'static str {
    if precision == "f32" {
        "f32"
    } else {
        "bf16"
    }
}

fn brisk(o: &Options, precision: &str, batch: usize, eval: bool) -> Result<Figure> {
    let bin = super::root()?.join("target/release/brisk");
    let mut cmd = Command::new(bin);
    cmd.args([
        "bench",
        "step",
        "--json",
        "--batch",
        &batch.to_string(),
        "--threads",
        &o.threads.to_string(),
    ]);
    cmd.args(["--steps", &o.steps.to_string(), "--dtype", precision]);
    if eval {
        cmd.arg("--eval");
    }
    let v: serde_json::Value = serde_json::from_str(output(&mut cmd)?.trim())?;
    Ok(Figure {
        img_per_s: v["img_per_s"].as_f64().context("no img_per_s")?,
        peak_mib: v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
    })
}

fn torch(o: &Options, precision: &str, batch: usize, eval: bool) -> Result<Figure> {
    let root = super::root()?;
    let script = if eval {
        root.join("scripts/torch_eval_forward.py")
    } else {
        root.join("../shared/reference/torch_train_step.py")
    };
    // Run the script in-process so its peak memory can be read afterwards.
    let wrapper = "import resource, runpy, sys\n\
        sys.argv = sys.argv[1:]\n\
        runpy.run_path(sys.argv[0], run_name='__main__')\n\
        print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", wrapper]).arg(&script);
    cmd.args([
        "--batch",
        &batch.to_string(),
        "--threads",
        &o.threads.to_string(),
        "--steps",
        &o.steps.to_string(),
    ]);
    if !eval {
        cmd.args(["--dtype", torch_dtype(precision)]);
    }
    let text = output(&mut cmd)?;
    let img = text
        .split("img/s median ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse::<f64>().ok())
        .with_context(|| format!("cannot read img/s from {script:?}'s output: {text}"))?;
    let peak = text
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib "))
        .and_then(|t| t.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |k| k / 1024.0);
    Ok(Figure {
        img_per_s: img,
        peak_mib: peak,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    output(Command::new("python3").args(["-c", "import torch, torchvision"]))
        .context("PyTorch is needed: pip install torch torchvision")?;
    super::cargo(&["build", "--release", "--quiet", "--package", "brisk-cli"])?;
    println!(
        "CIFAR ResNet-18, {} threads, {} timed steps a run, {} rounds (median of rounds)",
        o.threads, o.steps, o.rounds
    );
    println!(
        "{:<6} {:<10} {:>5} {:>12} {:>16} {:>7} {:>11} {:>11}",
        "mode", "precision", "batch", "brisk img/s", "torch img/s", "ratio", "brisk MiB", "torch MiB"
    );
    for eval in [false, true] {
        for precision in &o.precisions {
            // The eval reference runs in f32 only.
            if eval && precision != "f32" {
                continue;
            }
            for &batch in &o.batches {
                let (mut b, mut t, mut bm, mut tm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..o.rounds {
                    let fb = brisk(&o, precision, batch, eval)?;
                    let ft = torch(&o, precision, batch, eval)?;
                    b.push(fb.img_per_s);
                    t.push(ft.img_per_s);
                    bm.push(fb.peak_mib);
                    tm.push(ft.peak_mib);
                }
                let (b, t) = (median(b), median(t));
                let torch_label = format!("{t:.1} ({})", if eval { "f32" } else { torch_dtype(precision) });
                println!(
                    "{:<6} {:<10} {:>5} {:>12.1} {:>16} {:>7.2} {:>11.0} {:>11.0}",
                    if eval { "eval" } else { "train" },
                    precision,
                    batch,
                    b,
                    torch_label,
                    b / t,
                    median(bm),
                    median(tm)
                );
            }
        }
    }
    Ok(())
}
