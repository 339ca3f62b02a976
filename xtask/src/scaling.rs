//! `cargo xtask scaling`: measures the gradient all-reduce (`brisk bench allreduce`, 2
//! ranks) against message size over shared memory on one host and over TCP on a veth link
//! between two simulated hosts (brisk-hosts), fits the ring all-reduce cost
//! T(N) = 2(N−1)·α + 2(N−1)/N · bytes/β to each, and predicts the efficiency of ResNet-18
//! data parallelism at 2–64 ranks for several link speeds and per-rank step times. Writes
//! scaling.json, scaling.md and two SVG plots (measured points on them) to `--out`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// `cargo xtask scaling`'s options.
#[derive(Debug, clap::Args)]
pub struct ScalingArgs {
    /// Where the figures go.
    #[arg(long, value_name = "DIR", default_value = "docs/scaling")]
    out: PathBuf,
    /// Timed all-reduces per measurement (the median is kept).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Model widths whose gradients are all-reduced (ResNet-18 CIFAR: 0.17 MB at 0.0625
    /// to 44.7 MB at 1).
    #[arg(long, value_delimiter = ',', default_value = "0.0625,0.125,0.25,0.5,1")]
    widths: Vec<f64>,
    /// Per-rank training-step seconds of another device to predict for, as NAME=SECONDS
    /// (the H200's is PyTorch's 17,727 img/s at batch 256 in docs/gpu.md).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "H200 (PyTorch f32 batch 256)=0.01444"
    )]
    step: Vec<String>,
}

/// One measured all-reduce.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub transport: String,
    pub ranks: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// A fitted ring all-reduce cost: α per message step, β bytes per second.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Ring {
    pub alpha_s: f64,
    pub beta_bytes_per_s: f64,
}

impl Ring {
    /// Ring all-reduce time of `bytes` over `n` ranks.
    pub fn time(&self, n: usize, bytes: f64) -> f64 {
        let n = n as f64;
        2.0 * (n - 1.0) * self.alpha_s + 2.0 * (n - 1.0) / n * bytes / self.beta_bytes_per_s
    }

    /// Least-squares fit of T = 2(N−1)α + 2(N−1)/N·bytes/β to points at one rank count,
    /// in relative error (weights 1/T²), so that small messages (which set α) count as
    /// much as large ones (which set β).
    pub fn fit(points: &[&Point]) -> Result<Ring> {
        let n = points.first().context("no points to fit")?.ranks as f64;
        if points.len() < 2 || n < 2.0 {
            bail!("a fit needs two message sizes or more over two ranks or more");
        }
        // T = a + b·x with a = 2(N−1)α, b = 2(N−1)/(N·β); weighted means.
        let w: Vec<f64> = points.iter().map(|p| 1.0 / (p.seconds * p.seconds)).collect();
        let sw: f64 = w.iter().sum();
        let mean = |f: &dyn Fn(&Point) -> f64| points.iter().zip(&w).map(|(p, w)| w * f(p)).sum::<f64>() / sw;
        let (mx, my) = (mean(&|p| p.bytes as f64), mean(&|p| p.seconds));
        let sxx = mean(&|p| (p.bytes as f64 - mx).powi(2));
        let sxy = mean(&|p| (p.bytes as f64 - mx) * (p.seconds - my));
        let b = sxy / sxx;
        let a = (my - b * mx).max(0.0);
        if b <= 0.0 {
            bail!("the measured times do not grow with the message size: no bandwidth to fit");
        }
        Ok(Ring {
            alpha_s: a / (2.0 * (n - 1.0)),
            beta_bytes_per_s: 2.0 * (n - 1.0) / (n * b),
        })
    }

    /// The largest |model − measured| / measured over `points`.
    pub fn worst_error(&self, points: &[&Point]) -> f64 {
        points
            .iter()
            .map(|p| (self.time(p.ranks, p.bytes as f64) - p.seconds).abs() / p.seconds)
            .fold(0.0, f64::max)
    }
}

/// Data-parallel efficiency with all-reduce time `comm` after a step of `step` seconds:
/// without overlap (communication after backward) and with perfect overlap.
pub fn efficiency(step: f64, comm: f64) -> (f64, f64) {
    (step / (step + comm), step / step.max(comm))
}

/// Everything `scaling` measured and predicted.
#[derive(Debug, Serialize, Deserialize)]
pub struct Scaling {
    pub points: Vec<Point>,
    pub shared_memory: Ring,
    pub veth: Ring,
    /// ResNet-18 (CIFAR, full width) gradient bytes.
    pub resnet18_bytes: usize,
    /// (device, per-rank step seconds).
    pub steps: Vec<(String, f64)>,
    /// (link, α, β) the predictions use.
    pub links: Vec<(String, Ring)>,
}

/// Runs one `brisk bench allreduce --json` under `cmd` (an mpirun) and reads it.
fn measure(mut cmd: Command, brisk: &Path, width: f64, rounds: usize, transport: &str) -> Result<Point> {
    cmd.arg(brisk).args([
        "bench",
        "allreduce",
        "--width",
        &width.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--json",
    ]);
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{transport} all-reduce at width {width} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON from brisk bench allreduce")?
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let point = Point {
        transport: transport.into(),
        ranks: v["world"].as_u64().context("world")? as usize,
        bytes: v["bytes"].as_u64().context("bytes")? as usize,
        seconds: v["median_ms"].as_f64().context("median_ms")? / 1e3,
    };
    eprintln!(
        "xtask: {transport}: {:.2} MB in {:.3} ms",
        point.bytes as f64 / 1e6,
        point.seconds * 1e3
    );
    Ok(point)
}

/// This machine's full-width ResNet-18 training step, seconds (batch 128, all cores).
fn cpu_step(brisk: &Path) -> Result<f64> {
    let out = Command::new(brisk)
        .args([
            "bench", "step", "--width", "1", "--batch", "128", "--steps", "2", "--warmup", "1", "--json",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "brisk bench step failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("no JSON from brisk bench step")?,
    )?;
    Ok(128.0 / v["img_per_s"].as_f64().context("img_per_s")?)
}

pub fn run(a: &ScalingArgs) -> Result<()> {
    crate::mpi::ensure()?;
    let brisk = crate::build_brisk(true)?;
    let hosts = brisk_hosts::Hosts::create(1).context("the veth measurement needs two simulated hosts")?;
    let mut points = Vec::new();
    for &w in &a.widths {
        let mut shm = Command::new("mpirun");
        shm.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args([
                "--oversubscribe",
                "--bind-to",
                "none",
                "-np",
                "2",
                "--mca",
                "btl",
                "vader,self",
            ]);
        points.push(measure(shm, &brisk, w, a.rounds, "shared memory")?);
        let mut veth = hosts.mpirun(2);
        veth.args(["--mca", "btl", "tcp,self"]);
        points.push(measure(veth, &brisk, w, a.rounds, "TCP over veth")?);
    }
    let of = |t: &str| points.iter().filter(|p| p.transport == t).collect::<Vec<_>>();
    let shared_memory = Ring::fit(&of("shared memory"))?;
    let veth = Ring::fit(&of("TCP over veth"))?;
    let resnet18_bytes = points.iter().map(|p| p.bytes).max().context("no points")?;
    let mut steps = vec![("this CPU (brisk, batch 128)".to_string(), cpu_step(&brisk)?)];
    for s in &a.step {
        let (name, secs) = s.rsplit_once('=').context("--step NAME=SECONDS")?;
        steps.push((name.to_string(), secs.parse().context("--step NAME=SECONDS")?));
    }
    // Real links: the veth's per-message latency (OpenMPI's TCP path) and the line rate.
    let links: Vec<(String, Ring)> = [10.0, 25.0, 100.0]
        .iter()
        .map(|gbit: &f64| {
            (
                format!("{gbit:.0} Gb/s"),
                Ring {
                    alpha_s: veth.alpha_s,
                    beta_bytes_per_s: gbit * 1e9 / 8.0,
                },
            )
        })
        .collect();
    let s = Scaling {
        points,
        shared_memory,
        veth,
        resnet18_bytes,
        steps,
        links,
    };
    let out = crate::root()?.join(&a.out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("scaling.json"), serde_json::to_string_pretty(&s)?)?;
    let md = markdown(&s);
    std::fs::write(out.join("scaling.md"), &md)?;
    plot_allreduce(&out.join("allreduce.svg"), &s)?;
    plot_efficiency(&out.join("efficiency.svg"), &s)?;
    print!("{md}");
    eprintln!("xtask: scaling figures written to {}", out.display());
    Ok(())
}

const RANKS: [usize; 6] = [2, 4, 8, 16, 32, 64];

fn markdown(s: &Scaling) -> String {
    let mut m = String::new();
    let mb = s.resnet18_bytes as f64 / 1e6;
    let _ = writeln!(
        m,
        "# Measured all-reduce and predicted scaling\n\nWritten by `cargo xtask scaling`. 2 ranks, median of timed all-reduces of a ResNet-18's \
         gradients at several widths (one fused buffer each).\n\n| transport | bytes | ms | GB/s (algorithm) |\n|---|---|---|---|"
    );
    for p in &s.points {
        let _ = writeln!(
            m,
            "| {} | {:.2} MB | {:.3} | {:.2} |",
            p.transport,
            p.bytes as f64 / 1e6,
            p.seconds * 1e3,
            p.bytes as f64 / p.seconds / 1e9
        );
    }
    let of = |t: &str| s.points.iter().filter(|p| p.transport == t).collect::<Vec<_>>();
    let _ = writeln!(
        m,
        "\nFitted T(N) = 2(N−1)·α + 2(N−1)/N · bytes/β (least squares in relative error):\n\n\
         - shared memory: α = {:.1} µs, β = {:.2} GB/s (worst point off by {:.0}%)\n\
         - TCP over veth: α = {:.1} µs, β = {:.2} GB/s (worst point off by {:.0}%)\n",
        s.shared_memory.alpha_s * 1e6,
        s.shared_memory.beta_bytes_per_s / 1e9,
        100.0 * s.shared_memory.worst_error(&of("shared memory")),
        s.veth.alpha_s * 1e6,
        s.veth.beta_bytes_per_s / 1e9,
        100.0 * s.veth.worst_error(&of("TCP over veth"))
    );
    let _ = writeln!(
        m,
        "Predicted data-parallel efficiency of ResNet-18 ({mb:.1} MB of f32 gradients), without overlap \
         (all-reduce after backward) / with perfect overlap, links with the veth's α:\n"
    );
    let _ = writeln!(
        m,
        "| step (per rank) | link | {} |\n|---|---|{}",
        RANKS.map(|n| format!("{n} ranks")).join(" | "),
        RANKS.map(|_| "---|").concat()
    );
    for (device, step) in &s.steps {
        for (link, ring) in &s.links {
            let cells: Vec<String> = RANKS
                .iter()
                .map(|&n| {
                    let (a, b) = efficiency(*step, ring.time(n, s.resnet18_bytes as f64));
                    format!("{:.0}% / {:.0}%", 100.0 * a, 100.0 * b)
                })
                .collect();
            let _ = writeln!(
                m,
                "| {device}: {:.1} ms | {link} | {} |",
                step * 1e3,
                cells.join(" | ")
            );
        }
    }
    m
}

/// All-reduce time against bytes, measured points and fitted lines, log-log.
fn plot_allreduce(path: &Path, s: &Scaling) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = s.points.iter().map(|p| p.bytes as f64);
    let (xmin, xmax) = (
        xs.clone().fold(f64::MAX, f64::min) * 0.7,
        xs.fold(0.0, f64::max) * 1.4,
    );
    let ys = s.points.iter().map(|p| p.seconds * 1e3);
    let (ymin, ymax) = (
        ys.clone().fold(f64::MAX, f64::min) * 0.5,
        ys.fold(0.0, f64::max) * 2.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "2-rank all-reduce: measured (points) and fitted ring model (lines)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("gradient bytes")
        .y_desc("milliseconds")
        .draw()?;
    for (i, (name, ring)) in [("shared memory", s.shared_memory), ("TCP over veth", s.veth)]
        .into_iter()
        .enumerate()
    {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = (0..=40)
            .map(|k| {
                let x = xmin * (xmax / xmin).powf(k as f64 / 40.0);
                (x, ring.time(2, x) * 1e3)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(
            s.points
                .iter()
                .filter(|p| p.transport == name)
                .map(|p| Circle::new((p.bytes as f64, p.seconds * 1e3), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Predicted efficiency (no overlap) against ranks, one line per step time and link; the
/// points at 2 ranks over veth are from the measured all-reduce.
fn plot_efficiency(path: &Path, s: &Scaling) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ResNet-18 data-parallel efficiency without overlap (lines: model; points: measured veth all-reduce)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((2.0f64..64.0).log_scale(), 0.0f64..100.0)?;
    chart
        .configure_mesh()
        .x_desc("ranks")
        .y_desc("efficiency (%)")
        .draw()?;
    let mut i = 0;
    for (device, step) in &s.steps {
        for (link, ring) in &s.links {
            let color = Palette99::pick(i).to_rgba();
            i += 1;
            let line: Vec<(f64, f64)> = RANKS
                .iter()
                .map(|&n| {
                    (
                        n as f64,
                        100.0 * efficiency(*step, ring.time(n, s.resnet18_bytes as f64)).0,
                    )
                })
                .collect();
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))?
                .label(format!("{device}, {link}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        let measured = s
            .points
            .iter()
            .filter(|p| p.transport == "TCP over veth" && p.bytes == s.resnet18_bytes);
        chart.draw_series(measured.map(|p| {
            Circle::new(
                (p.ranks as f64, 100.0 * efficiency(*step, p.seconds).0),
                5,
                BLACK.filled(),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_fit_recovers_a_known_link() -> Result<()> {
        // α = 50 µs, β = 2 GB/s at N = 2: T = 100 µs + bytes / 2e9.
        let truth = Ring {
            alpha_s: 50e-6,
            beta_bytes_per_s: 2e9,
        };
        let points: Vec<Point> = [1e5, 1e6, 1e7, 4e7]
            .iter()
            .map(|&b| Point {
                transport: "t".into(),
                ranks: 2,
                bytes: b as usize,
                seconds: truth.time(2, b),
            })
            .collect();
        let all: Vec<&Point> = points.iter().collect();
        let fit = Ring::fit(&all)?;
        assert!((fit.alpha_s - 50e-6).abs() < 1e-9, "{fit:?}");
        assert!((fit.beta_bytes_per_s / 2e9 - 1.0).abs() < 1e-9, "{fit:?}");
        assert!(fit.worst_error(&all) < 1e-9);
        // The ring's bandwidth term tends to 2·bytes/β; its latency grows with N.
        let t64 = truth.time(64, 4e7);
        assert!((t64 - (126.0 * 50e-6 + 2.0 * 63.0 / 64.0 * 4e7 / 2e9)).abs() < 1e-12);
        // Efficiency: a 10 ms step with a 10 ms all-reduce is 50% without overlap, 100% with.
        assert_eq!(efficiency(0.01, 0.01), (0.5, 1.0));
        assert!(Ring::fit(&points[..1].iter().collect::<Vec<_>>()).is_err());
        Ok(())
    }
}
