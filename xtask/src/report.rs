//! An experiment's report: the table of every variant against the baseline, the
//! reading generated from the numbers, and the files — report.md, report.html (self-
//! contained, with the plots), results.json, results.csv and plotters SVGs.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::plan::{Kind, BASELINE};
use crate::results::{Status, VariantResult};

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub os: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
            .map_or_else(|| "unknown".into(), |s| s.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map_or_else(
                || std::env::consts::OS.to_string(),
                |s| s.trim_matches('"').to_string(),
            );
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: kib / (1024.0 * 1024.0),
            os,
        }
    }
}

/// `git rev-parse HEAD`, with `-dirty` when the tree has changes.
pub fn git_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::root().unwrap_or(Path::new(".")))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

/// Everything a report shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub experiment: String,
    pub description: String,
    pub data: String,
    pub started: String,
    pub elapsed_s: f64,
    pub git: String,
    pub machine: Machine,
    pub baseline_config: String,
    pub variants: Vec<VariantResult>,
}

impl Report {
    fn baseline(&self) -> Option<&VariantResult> {
        self.variants
            .iter()
            .find(|v| v.name == BASELINE && v.status == Status::Done)
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.2}%", 100.0 * v))
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!(" ({:.2}x)", v / b),
        _ => String::new(),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn count(v: Option<u64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1_000_000 => format!("{:.2} M", v as f64 / 1e6),
        Some(v) if v >= 1_000 => format!("{:.1} k", v as f64 / 1e3),
        Some(v) => v.to_string(),
    }
}

fn to_f(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

/// The table's columns.
const COLUMNS: [&str; 15] = [
    "variant",
    "change",
    "top-1",
    "Δ top-1",
    "best top-1",
    "wall s",
    "time to baseline top-1",
    "img/s",
    "data wait",
    "updates",
    "params",
    "MACs",
    "model bytes",
    "peak RSS MiB",
    "status",
];

/// The table's rows as cells (shared by Markdown and HTML).
fn table(report: &Report) -> Vec<Vec<String>> {
    let base = report.baseline();
    report.variants.iter().map(|v| row(v, base)).collect()
}

/// A count with its ratio to the baseline's.
fn counted(v: Option<u64>, base: Option<u64>) -> String {
    format!("{}{}", count(v), ratio(to_f(v), to_f(base)))
}

/// One variant's cells, ratios against the baseline `base`.
fn row(v: &VariantResult, base: Option<&VariantResult>) -> Vec<String> {
    let target = base.and_then(|b| b.top1);
    let delta = match (v.top1, target) {
        (Some(a), Some(b)) => format!("{:+.2}", 100.0 * (a - b)),
        _ => "–".into(),
    };
    let tta = match (v.kind, target) {
        (Kind::Train, Some(t)) => match v.time_to(t) {
            Some(s) => format!("{s:.0} s{}", ratio(Some(s), base.and_then(|b| b.time_to(t)))),
            None if v.status == Status::Done => "not reached".into(),
            None => "–".into(),
        },
        _ => "n/a".into(),
    };
    let status = match (&v.status, &v.reason) {
        (Status::Done, _) => "done".to_string(),
        (s, Some(r)) => format!("{}: {}", s.name(), r.lines().next().unwrap_or("")),
        (s, None) => s.name().to_string(),
    };
    let wall = if v.status == Status::Done {
        format!("{:.0}{}", v.wall_s, ratio(Some(v.wall_s), base.map(|b| b.wall_s)))
    } else {
        "–".into()
    };
    let b = |f: fn(&VariantResult) -> Option<u64>| base.and_then(f);
    vec![
        v.name.clone(),
        v.note.clone(),
        pct(v.top1),
        delta,
        pct(v.best_top1),
        wall,
        tta,
        format!(
            "{}{}",
            num(v.img_per_s, 0),
            ratio(v.img_per_s, base.and_then(|b| b.img_per_s))
        ),
        v.data_wait.map_or("–".into(), |w| format!("{:.1}%", 100.0 * w)),
        v.updates.map_or("–".into(), |u| u.to_string()),
        counted(v.params, b(|x| x.params)),
        counted(v.macs, b(|x| x.macs)),
        counted(v.bytes, b(|x| x.bytes)),
        num(v.peak_rss_mib, 0),
        status,
    ]
}

/// The report's reading: one plain sentence per variant against the baseline, with
/// this machine's noise in mind. Generated from the numbers, so it can say "slower".
fn reading(report: &Report) -> Vec<String> {
    let Some(base) = report.baseline() else {
        return vec!["The baseline did not finish, so nothing can be compared.".into()];
    };
    let mut out = vec![format!(
        "One run per variant on a shared {}-core machine: speed differences under about 10% and \
         accuracy differences under about 1 point are within run-to-run noise here. Time to the \
         baseline's accuracy is measured at the evaluations (once per epoch), so it is coarse.",
        report.machine.cores
    )];
    for v in report.variants.iter().filter(|v| v.name != BASELINE) {
        if v.status != Status::Done {
            out.push(format!(
                "**{}** was {}: {}",
                v.name,
                v.status.name(),
                v.reason.as_deref().unwrap_or("").lines().next().unwrap_or("")
            ));
            continue;
        }
        let mut parts = accuracy_and_speed(v, base);
        parts.extend(costs(v, base));
        let control = v.control.as_ref().and_then(|c| {
            report
                .variants
                .iter()
                .find(|x| &x.name == c && x.status == Status::Done)
        });
        if let (Some(c), Some(a), Some(b)) = (control, v.top1, control.and_then(|c| c.top1)) {
            parts.push(format!(
                "{:+.2} points against {} ({})",
                100.0 * (a - b),
                c.name,
                pct(c.top1)
            ));
        }
        if let Some(t) = &v.pytorch {
            parts.push(format!(
                "brisk/PyTorch step speed {:.2} ({:.0} vs {:.0} img/s)",
                t.ratio, t.brisk_img_per_s, t.torch_img_per_s
            ));
        }
        out.push(format!("**{}**, {}: {}.", v.name, v.note, parts.join("; ")));
    }
    out
}

/// The reading's accuracy, speed and time-to-accuracy phrases for a variant.
fn accuracy_and_speed(v: &VariantResult, base: &VariantResult) -> Vec<String> {
    let mut parts = Vec::new();
    if let (Some(a), Some(b)) = (v.top1, base.top1) {
        let d = 100.0 * (a - b);
        parts.push(if d.abs() < 1.0 {
            format!("accuracy within a point of the baseline ({d:+.2})")
        } else if d > 0.0 {
            format!("accuracy {d:+.2} points better")
        } else {
            format!("accuracy {d:+.2} points worse")
        });
    }
    if v.kind != Kind::Train {
        return parts;
    }
    if let (Some(a), Some(b)) = (v.img_per_s, base.img_per_s) {
        let r = a / b;
        parts.push(if (r - 1.0).abs() < 0.1 {
            format!("training speed about the same ({r:.2}x img/s)")
        } else if r > 1.0 {
            format!("{r:.2}x the baseline's img/s")
        } else {
            format!("slower: {r:.2}x the baseline's img/s")
        });
    }
    let target = base.top1;
    match (
        target.and_then(|t| v.time_to(t)),
        target.and_then(|t| base.time_to(t)),
    ) {
        (Some(t), Some(tb)) => parts.push(format!(
            "reached the baseline's final accuracy after {t:.0} s ({:.2}x)",
            t / tb
        )),
        _ if target.is_some() => parts.push("did not reach the baseline's final accuracy".into()),
        _ => {}
    }
    parts
}

/// The reading's size, MACs and memory phrases, when they differ from the baseline's.
fn costs(v: &VariantResult, base: &VariantResult) -> Vec<String> {
    let mut parts = Vec::new();
    if let (Some(a), Some(b)) = (v.bytes, base.bytes) {
        let r = a as f64 / b as f64;
        if (r - 1.0).abs() >= 0.05 {
            parts.push(format!("model file {r:.2}x the baseline's"));
        }
    }
    if let (Some(a), Some(b)) = (v.macs, base.macs) {
        let r = a as f64 / b as f64;
        if (r - 1.0).abs() >= 0.05 {
            parts.push(format!("{r:.2}x the MACs"));
        }
    }
    // Peak memory compares training processes only (a quantiser is no training run).
    if let (Kind::Train, Some(a), Some(b)) = (v.kind, v.peak_rss_mib, base.peak_rss_mib) {
        let r = a / b;
        if (r - 1.0).abs() >= 0.1 {
            parts.push(format!("peak memory {r:.2}x"));
        }
    }
    parts
}

fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Experiment `{}`\n\n{}\n",
        report.experiment,
        report.description.trim()
    );
    let _ = writeln!(
        s,
        "- started {} (UTC), {:.1} minutes including cached variants' zero cost\n- brisk revision `{}`\n- machine: {}, {} cores, {:.1} GiB, {}\n- data: `{}`\n",
        report.started,
        report.elapsed_s / 60.0,
        report.git,
        report.machine.cpu,
        report.machine.cores,
        report.machine.memory_gib,
        report.machine.os,
        report.data
    );
    let _ = writeln!(s, "## Results\n\nRatios in brackets are against the baseline.\n");
    let _ = writeln!(s, "| {} |", COLUMNS.join(" | "));
    let _ = writeln!(s, "|{}|", COLUMNS.map(|_| "---").join("|"));
    for r in &table(report) {
        let cells: Vec<String> = r
            .iter()
            .map(|c| c.replace('|', "\\|").replace('\n', " "))
            .collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(s, "\n## Reading\n");
    for line in reading(report) {
        let _ = writeln!(s, "- {line}");
    }
    s.push_str(&torch_section(report));
    let _ = writeln!(
        s,
        "\n## Plots\n\n![accuracy vs wall time](accuracy_vs_time.svg)\n\n![training speed](speed.svg)\n\n![model size](size.svg)\n\n![accuracy](accuracy.svg)\n"
    );
    let _ = writeln!(
        s,
        "## Baseline config\n\n```toml\n{}```\n",
        report.baseline_config
    );
    let _ = writeln!(
        s,
        "Each variant's full config, command output and run folder are in `reports/{}/runs/VARIANT/`; \
         the numbers above are in results.json and results.csv.",
        report.experiment
    );
    s
}

/// The brisk-vs-PyTorch table, when `--with-pytorch` measured any.
fn torch_section(report: &Report) -> String {
    let mut s = String::new();
    let torch: Vec<_> = report
        .variants
        .iter()
        .filter_map(|v| Some((v, v.pytorch.as_ref()?)))
        .collect();
    if torch.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n## brisk and PyTorch, one training step side by side\n\n\
         `brisk bench step` and scripts/torch_reference.py on random data, same model, batch, precision and threads, run one after the other.\n\n\
         | variant | model | batch | precision | brisk img/s | PyTorch img/s | brisk/PyTorch |\n|---|---|---|---|---|---|---|"
    );
    for (v, t) in torch {
        let _ = writeln!(
            s,
            "| {} | {} w{} | {} | {} | {:.1} | {:.1} | {:.2} |",
            v.name, t.arch, t.width, t.batch, t.precision, t.brisk_img_per_s, t.torch_img_per_s, t.ratio
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(report: &Report) -> String {
    let mut s = String::from(
        "variant,kind,ranks,status,top1,top5,best_top1,wall_s,train_s,time_to_baseline_top1_s,img_per_s,data_wait,updates,params,macs,bytes,peak_rss_mib,torch_img_per_s,brisk_over_torch\n",
    );
    let target = report.baseline().and_then(|b| b.top1);
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let u = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    for v in &report.variants {
        let row = [
            csv_field(&v.name),
            v.kind.name().to_string(),
            v.ranks.to_string(),
            v.status.name().to_string(),
            f(v.top1),
            f(v.top5),
            f(v.best_top1),
            f((v.status == Status::Done).then_some(v.wall_s)),
            f(v.train_s),
            f(target.and_then(|t| v.time_to(t))),
            f(v.img_per_s),
            f(v.data_wait),
            u(v.updates),
            u(v.params),
            u(v.macs),
            u(v.bytes),
            f(v.peak_rss_mib),
            f(v.pytorch.as_ref().map(|t| t.torch_img_per_s)),
            f(v.pytorch.as_ref().map(|t| t.ratio)),
        ];
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Markdown emphasis `**x**` as HTML.
fn strong(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in escape(s).split("**").enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<strong>{part}</strong>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn html(report: &Report, dir: &Path) -> Result<String> {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>brisk experiment {0}</title>\
         <style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}\
         td:first-child,td:nth-child(2),th{{text-align:left}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>\n\
         <h1>Experiment <code>{0}</code></h1><p>{1}</p><ul><li>started {2} (UTC), {3:.1} minutes</li>\
         <li>brisk revision <code>{4}</code></li><li>machine: {5}, {6} cores, {7:.1} GiB, {8}</li><li>data: <code>{9}</code></li></ul>\n",
        escape(&report.experiment),
        escape(report.description.trim()),
        report.started,
        report.elapsed_s / 60.0,
        escape(&report.git),
        escape(&report.machine.cpu),
        report.machine.cores,
        report.machine.memory_gib,
        escape(&report.machine.os),
        escape(&report.data)
    );
    s.push_str("<h2>Results</h2><p>Ratios in brackets are against the baseline.</p><table><tr>");
    for h in COLUMNS {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr>\n");
    for r in table(report) {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", escape(&c));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table><h2>Reading</h2><ul>");
    for line in reading(report) {
        let _ = write!(s, "<li>{}</li>", strong(&line));
    }
    s.push_str("</ul><h2>Plots</h2>\n");
    for file in PLOTS {
        let svg = std::fs::read_to_string(dir.join(file)).with_context(|| format!("cannot read {file}"))?;
        let svg = svg.trim_start_matches(|c| c != '<');
        let body = svg
            .strip_prefix("<?xml")
            .map_or(svg, |r| r.split_once("?>").map_or(r, |x| x.1));
        let _ = writeln!(s, "<div>{body}</div>");
    }
    let _ = writeln!(
        s,
        "<h2>Baseline config</h2><pre>{}</pre></body></html>",
        escape(&report.baseline_config)
    );
    Ok(s)
}

const PLOTS: [&str; 4] = ["accuracy_vs_time.svg", "speed.svg", "size.svg", "accuracy.svg"];

/// A bar per item.
fn bars(path: &Path, title: &str, unit: &str, items: &[(String, f64)]) -> Result<()> {
    let root = SVGBackend::new(path, (960, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    if items.is_empty() {
        root.titled(&format!("{title}: no data"), ("sans-serif", 20))?;
        root.present()?;
        return Ok(());
    }
    let top = items.iter().map(|i| i.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..items.len()).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .x_labels(items.len())
        .x_label_style(("sans-serif", 10))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => items.get(*i).map(|x| x.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(items.iter().enumerate().map(|(i, (_, v))| {
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
            Palette99::pick(i).filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        bar
    }))?;
    let label = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(
        items
            .iter()
            .enumerate()
            .map(|(i, (_, v))| Text::new(format_value(*v), (SegmentValue::CenterOf(i), *v), label.clone())),
    )?;
    root.present()?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Test top-1 against wall time, one line per training variant.
fn accuracy_vs_time(path: &Path, report: &Report) -> Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = report
        .variants
        .iter()
        .filter(|v| v.kind == Kind::Train && !v.curve.is_empty())
        .map(|v| {
            (
                v.name.as_str(),
                v.curve.iter().map(|(t, a)| (*t, 100.0 * a)).collect(),
            )
        })
        .collect();
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.05;
    let ymin = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(100.0, f64::min)
        .min(90.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Test top-1 against wall time (training variants)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, (ymin - 2.0).max(0.0)..100.0)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc("test top-1 (%)")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Writes report.md, report.html, results.json, results.csv and the plots into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let done: Vec<&VariantResult> = report
        .variants
        .iter()
        .filter(|v| v.status == Status::Done)
        .collect();
    accuracy_vs_time(&dir.join(PLOTS[0]), report)?;
    let speed: Vec<(String, f64)> = done
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.img_per_s?)))
        .collect();
    bars(
        &dir.join(PLOTS[1]),
        "Training images/s (fine-tuning for pruned and distilled models)",
        "img/s",
        &speed,
    )?;
    let size: Vec<(String, f64)> = done
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.bytes? as f64 / 1e6)))
        .collect();
    bars(&dir.join(PLOTS[2]), "Model file size", "MB", &size)?;
    let acc: Vec<(String, f64)> = done
        .iter()
        .filter_map(|v| Some((v.name.clone(), 100.0 * v.top1?)))
        .collect();
    bars(&dir.join(PLOTS[3]), "Final test top-1", "%", &acc)?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("results.csv"), csv(report))?;
    std::fs::write(dir.join("report.html"), html(report, dir)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, kind: Kind, top1: f64, ips: f64, bytes: u64) -> VariantResult {
        let mut v = VariantResult::new(name, "a change", kind, "h", 1);
        v.wall_s = 100.0;
        v.top1 = Some(top1);
        v.best_top1 = Some(top1);
        v.img_per_s = Some(ips);
        v.bytes = Some(bytes);
        v.params = Some(1000);
        v.macs = Some(5000);
        v.peak_rss_mib = Some(300.0);
        if kind == Kind::Train {
            v.curve = vec![(40.0, top1 - 0.1), (90.0, top1)];
        }
        v
    }

    fn report() -> Report {
        let mut skipped = VariantResult::new("two-ranks", "2 MPI ranks", Kind::Train, "h", 2);
        skipped.skip("MPI is not installed: apt-get install libopenmpi-dev openmpi-bin".into());
        Report {
            experiment: "tiny".into(),
            description: "A tiny experiment.".into(),
            data: "/tmp/data".into(),
            started: "20261128T000000Z".into(),
            elapsed_s: 123.0,
            git: "abc".into(),
            machine: Machine::read(),
            baseline_config: "epochs = 1\n".into(),
            variants: vec![
                variant(BASELINE, Kind::Train, 0.90, 100.0, 4000),
                variant("faster", Kind::Train, 0.905, 150.0, 4000),
                variant("int8", Kind::Quantize, 0.80, 0.0, 1000),
                skipped,
            ],
        }
    }

    #[test]
    fn a_report_has_every_file_and_says_what_it_measured() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let r = report();
        write(&r, dir.path())?;
        for f in ["report.md", "report.html", "results.json", "results.csv"]
            .iter()
            .chain(PLOTS.iter())
        {
            let len = std::fs::metadata(dir.path().join(f))?.len();
            assert!(len > 100, "{f} is nearly empty");
        }
        let md = std::fs::read_to_string(dir.path().join("report.md"))?;
        // Ratios come from the numbers: 150 / 100 img/s, 1000 / 4000 bytes.
        assert!(md.contains("150 (1.50x)"), "{md}");
        assert!(md.contains("(0.25x)"), "{md}");
        assert!(md.contains("1.50x the baseline's img/s"), "{md}");
        assert!(md.contains("accuracy -10.00 points worse"), "{md}");
        assert!(
            md.contains("two-ranks** was skipped: MPI is not installed"),
            "{md}"
        );
        // Time to the baseline's 90%: the faster variant got there at its second eval.
        assert!(md.contains("90 s (1.00x)"), "{md}");
        let html = std::fs::read_to_string(dir.path().join("report.html"))?;
        assert!(html.contains("<svg") && html.contains("<table>"));
        assert!(!html.contains("<?xml"));
        let svg = std::fs::read_to_string(dir.path().join("accuracy_vs_time.svg"))?;
        assert!(svg.contains("faster") && svg.contains("baseline"));
        let csv = std::fs::read_to_string(dir.path().join("results.csv"))?;
        assert_eq!(csv.lines().count(), 5);
        assert!(csv
            .lines()
            .nth(3)
            .is_some_and(|l| l.starts_with("int8,quantize,1,done,0.8,")));
        let back: Report = serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json"))?)?;
        assert_eq!(back.variants.len(), 4);
        assert_eq!(back.variants[3].status, Status::Skipped);
        Ok(())
    }
}
