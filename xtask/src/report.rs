//! An experiment's results and its report: what each variant measured (read from
//! brisk's summary.json, metrics.jsonl and JSON output), then report.md, report.html,
//! results.json, results.csv and SVG plots (plotters).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::experiment::{Kind, Plan, BASELINE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Skipped,
    Failed,
}

/// PyTorch's img/s for a variant's model, batch and precision, beside brisk's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Torch {
    pub arch: String,
    pub width: f64,
    pub batch: usize,
    pub precision: String,
    pub threads: usize,
    pub brisk_img_per_s: f64,
    pub torch_img_per_s: f64,
    /// brisk / PyTorch.
    pub ratio: f64,
}

/// What one variant measured. Absent figures (a skipped variant, a quantised model that
/// was not trained) are `None`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub note: String,
    pub kind: Kind,
    pub hash: String,
    pub ranks: usize,
    pub status: Status,
    /// Why a variant was skipped or failed.
    pub reason: Option<String>,
    /// Wall time of the variant's brisk command (for compression variants: of the
    /// compression step alone, after the baseline).
    pub wall_s: f64,
    /// Training time (without set-up and final writes), when it trained.
    pub train_s: Option<f64>,
    /// The training run's own clock (across resumes).
    #[serde(default)]
    pub elapsed_s: Option<f64>,
    /// Training images/s (all ranks together).
    pub img_per_s: Option<f64>,
    pub data_wait: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub best_top1: Option<f64>,
    pub updates: Option<u64>,
    /// Parameters (non-zero ones for pruned models).
    pub params: Option<u64>,
    pub macs: Option<u64>,
    /// Size of the model file written.
    pub bytes: Option<u64>,
    /// Peak resident memory of one process, MiB.
    pub peak_rss_mib: Option<f64>,
    /// (elapsed seconds, test top-1) at each evaluation.
    pub curve: Vec<(f64, f64)>,
    /// The full training config (training variants).
    pub config: Option<String>,
    pub pytorch: Option<Torch>,
    /// The variant this one is also compared with.
    #[serde(default)]
    pub control: Option<String>,
}

impl VariantResult {
    pub fn new(name: &str, note: &str, kind: Kind, hash: &str, ranks: usize) -> Self {
        VariantResult {
            name: name.into(),
            note: note.into(),
            kind,
            hash: hash.into(),
            ranks,
            status: Status::Done,
            reason: None,
            wall_s: 0.0,
            train_s: None,
            elapsed_s: None,
            img_per_s: None,
            data_wait: None,
            top1: None,
            top5: None,
            best_top1: None,
            updates: None,
            params: None,
            macs: None,
            bytes: None,
            peak_rss_mib: None,
            curve: Vec::new(),
            config: None,
            pytorch: None,
            control: None,
        }
    }

    pub fn skip(&mut self, why: String) {
        self.status = Status::Skipped;
        self.reason = Some(why);
    }

    pub fn fail(&mut self, why: String) {
        self.status = Status::Failed;
        self.reason = Some(why);
    }

    /// The first evaluation at or above `target` top-1: seconds from the start.
    pub fn time_to(&self, target: f64) -> Option<f64> {
        self.curve.iter().find(|(_, a)| *a >= target).map(|(t, _)| *t)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Test-accuracy curve from a run's metrics.jsonl `eval` events.
fn curve(run: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "eval")
        .filter_map(|e| Some((e["elapsed_s"].as_f64()?, e["top1"].as_f64()?)))
        .collect()
}

/// A training run's figures from its summary.json and metrics.jsonl.
fn fill_training(r: &mut VariantResult, run: &Path) -> Result<()> {
    let s = read_json(&run.join("summary.json"))?;
    r.train_s = s["train_s"].as_f64();
    r.elapsed_s = s["elapsed_s"].as_f64();
    r.img_per_s = s["img_per_s"].as_f64();
    r.data_wait = s["data_wait"].as_f64();
    r.top1 = s["top1"].as_f64();
    r.top5 = s["top5"].as_f64();
    r.best_top1 = s["best_top1"].as_f64();
    r.updates = s["updates"].as_u64();
    r.params = s["params"].as_u64();
    r.macs = s["macs"].as_u64();
    r.peak_rss_mib = s["peak_rss_mib"].as_f64();
    r.bytes = std::fs::metadata(run.join("model.safetensors"))
        .ok()
        .map(|m| m.len());
    r.curve = curve(run);
    Ok(())
}

/// Reads what a finished variant measured into `r`.
pub fn fill(
    r: &mut VariantResult,
    plan: &Plan,
    run: &Path,
    stdout: &str,
    peak_mib: Option<f64>,
) -> Result<()> {
    match plan.kind {
        Kind::Train => fill_training(r, run)?,
        Kind::Prune | Kind::Distill | Kind::Quantize => {
            if plan.kind != Kind::Quantize {
                fill_training(r, run)?;
            }
            let line = stdout
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with('{'))
                .context("no JSON result on brisk's output")?;
            let v: serde_json::Value = serde_json::from_str(line)?;
            let after = &v["after"];
            r.top1 = after["top1"].as_f64();
            r.top5 = after["top5"].as_f64();
            r.params = after["params"].as_u64();
            r.macs = after["macs"].as_u64();
            r.bytes = after["bytes"].as_u64();
            if plan.kind == Kind::Quantize {
                r.peak_rss_mib = peak_mib;
            } else {
                r.peak_rss_mib = r.peak_rss_mib.or(peak_mib);
            }
        }
    }
    Ok(())
}

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

/// The table's rows as cells (shared by Markdown and HTML).
fn table(report: &Report) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let head = vec![
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
    let base = report.baseline();
    let target = base.and_then(|b| b.top1);
    let rows = report
        .variants
        .iter()
        .map(|v| {
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
                (s, Some(r)) => format!("{s:?}: {}", r.lines().next().unwrap_or("")).to_lowercase(),
                (s, None) => format!("{s:?}").to_lowercase(),
            };
            let wall = if v.status == Status::Done {
                format!("{:.0}{}", v.wall_s, ratio(Some(v.wall_s), base.map(|b| b.wall_s)))
            } else {
                "–".into()
            };
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
                format!(
                    "{}{}",
                    count(v.params),
                    ratio(to_f(v.params), base.and_then(|b| to_f(b.params)))
                ),
                format!(
                    "{}{}",
                    count(v.macs),
                    ratio(to_f(v.macs), base.and_then(|b| to_f(b.macs)))
                ),
                format!(
                    "{}{}",
                    count(v.bytes),
                    ratio(to_f(v.bytes), base.and_then(|b| to_f(b.bytes)))
                ),
                num(v.peak_rss_mib, 0),
                status,
            ]
        })
        .collect();
    (head, rows)
}

/// The report's reading: one plain sentence per variant against the baseline, with
/// this machine's noise in mind. Generated from the numbers, so it can say "slower".
fn reading(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let Some(base) = report.baseline() else {
        out.push("The baseline did not finish, so nothing can be compared.".into());
        return out;
    };
    let n = report.variants.len();
    out.push(format!(
        "One run per variant on a shared {}-core machine: speed differences under about 10% and \
         accuracy differences under about 1 point are within run-to-run noise here. Time to the \
         baseline's accuracy is measured at the evaluations (once per epoch), so it is coarse.",
        report.machine.cores
    ));
    for v in report.variants.iter().take(n) {
        if v.name == BASELINE {
            continue;
        }
        if v.status != Status::Done {
            out.push(format!(
                "**{}** was {}: {}",
                v.name,
                format!("{:?}", v.status).to_lowercase(),
                v.reason.as_deref().unwrap_or("").lines().next().unwrap_or("")
            ));
            continue;
        }
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
        if v.kind == Kind::Train {
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
            if let (Some(t), Some(tb)) = (
                base.top1.and_then(|t| v.time_to(t)),
                base.top1.and_then(|t| base.time_to(t)),
            ) {
                parts.push(format!(
                    "reached the baseline's final accuracy after {t:.0} s ({:.2}x)",
                    t / tb
                ));
            } else if base.top1.is_some() {
                parts.push("did not reach the baseline's final accuracy".into());
            }
        }
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
        let control = v.control.as_ref().and_then(|c| {
            report
                .variants
                .iter()
                .find(|x| &x.name == c && x.status == Status::Done)
        });
        if let (Some(c), Some(a)) = (control, v.top1) {
            if let Some(b) = c.top1 {
                parts.push(format!(
                    "{:+.2} points against {} ({})",
                    100.0 * (a - b),
                    c.name,
                    pct(c.top1)
                ));
            }
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
    let (head, rows) = table(report);
    let _ = writeln!(s, "## Results\n\nRatios in brackets are against the baseline.\n");
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(
        s,
        "|{}|",
        head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in &rows {
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
    let torch: Vec<&VariantResult> = report.variants.iter().filter(|v| v.pytorch.is_some()).collect();
    if !torch.is_empty() {
        let _ = writeln!(
            s,
            "\n## brisk and PyTorch, one training step side by side\n\n\
             `brisk bench step` and ../shared/reference/torch_train_step.py on random data, same model, batch, precision and threads, run one after the other.\n\n\
             | variant | model | batch | precision | brisk img/s | PyTorch img/s | brisk/PyTorch |\n|---|---|---|---|---|---|---|"
        );
        for v in torch {
            if let Some(t) = &v.pytorch {
                let _ = writeln!(
                    s,
                    "| {} | {} w{} | {} | {} | {:.1} | {:.1} | {:.2} |",
                    v.name,
                    t.arch,
                    t.width,
                    t.batch,
                    t.precision,
                    t.brisk_img_per_s,
                    t.torch_img_per_s,
                    t.ratio
                );
            }
        }
    }
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
            format!("{:?}", v.kind).to_lowercase(),
            v.ranks.to_string(),
            format!("{:?}", v.status).to_lowercase(),
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
    let (head, rows) = table(report);
    s.push_str("<h2>Results</h2><p>Ratios in brackets are against the baseline.</p><table><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr>\n");
    for r in rows {
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

/// Runs a command, returning its stdout or why it failed.
fn output(cmd: &mut Command) -> std::result::Result<String, String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Adds PyTorch's training-step img/s beside brisk's for each distinct (model, batch,
/// precision) of the single-rank fixed-batch training variants.
pub fn add_pytorch(
    results: &mut [VariantResult],
    plans: &[&Plan],
    brisk: &Path,
    classes: usize,
    image: usize,
) -> Result<()> {
    if let Err(why) = output(Command::new("python3").args(["-c", "import torch, torchvision"])) {
        eprintln!("xtask: --with-pytorch: skipped, python3 cannot import torch ({why}); pip install torch torchvision");
        return Ok(());
    }
    let script = crate::root()?.join("../shared/reference/torch_train_step.py");
    if !script.is_file() {
        eprintln!("xtask: --with-pytorch: skipped, {} is missing", script.display());
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut seen: Vec<(String, Torch)> = Vec::new();
    for r in results.iter_mut() {
        let Some(plan) = plans.iter().find(|p| p.name == r.name) else {
            continue;
        };
        let Some(text) = plan.config.as_deref() else {
            continue;
        };
        if plan.kind != Kind::Train || plan.ranks != 1 || r.status != Status::Done {
            continue;
        }
        let config = brisk_train::TrainConfig::from_toml_str(text, &r.name)?;
        let brisk_train::BatchSchedule::Fixed { size: batch } = config.batch else {
            continue;
        };
        let spec = config.model_spec(classes, 3, image)?;
        let arch = spec.arch.name().to_string();
        if !matches!(arch.as_str(), "resnet18" | "seresnet18") {
            continue;
        }
        let precision = config.precision.mode.name().to_string();
        let key = format!("{arch}/{}/{batch}/{precision}", spec.width);
        if let Some((_, t)) = seen.iter().find(|(k, _)| *k == key) {
            r.pytorch = Some(t.clone());
            continue;
        }
        let torch_dtype = if precision == "f32" { "f32" } else { "bf16" };
        let stem = format!("{:?}", spec.stem).to_lowercase();
        let common = [
            "--batch".to_string(),
            batch.to_string(),
            "--threads".into(),
            threads.to_string(),
            "--steps".into(),
            "5".into(),
        ];
        eprintln!("xtask: --with-pytorch: {key}");
        let b = output(
            Command::new(brisk)
                .args(["bench", "step", "--json", "--arch", &arch, "--stem", &stem])
                .args(["--width", &spec.width.to_string(), "--dtype", &precision])
                .args(["--classes", &classes.to_string(), "--image", &image.to_string()])
                .args(&common),
        );
        let t = output(
            Command::new("python3")
                .arg(&script)
                .args([
                    "--arch",
                    &arch,
                    "--stem",
                    &stem,
                    "--width",
                    &spec.width.to_string(),
                ])
                .args(["--dtype", torch_dtype])
                .args(["--classes", &classes.to_string(), "--image", &image.to_string()])
                .args(&common),
        );
        let (Ok(b), Ok(t)) = (b, t) else {
            eprintln!("xtask: --with-pytorch: {key}: a measurement failed; left out");
            continue;
        };
        let brisk_ips = serde_json::from_str::<serde_json::Value>(b.trim())
            .ok()
            .and_then(|v| v["img_per_s"].as_f64());
        let torch_ips = t
            .split("img/s median ")
            .nth(1)
            .and_then(|x| x.split_whitespace().next())
            .and_then(|x| x.parse::<f64>().ok());
        if let (Some(bi), Some(ti)) = (brisk_ips, torch_ips) {
            let torch = Torch {
                arch: arch.clone(),
                width: spec.width,
                batch,
                precision: format!("{precision} (PyTorch {torch_dtype})"),
                threads,
                brisk_img_per_s: bi,
                torch_img_per_s: ti,
                ratio: bi / ti,
            };
            seen.push((key, torch.clone()));
            r.pytorch = Some(torch);
        }
    }
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

    #[test]
    fn figures_are_read_from_a_run_folder() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = dir.path();
        std::fs::write(
            run.join("summary.json"),
            r#"{"top1":0.5,"top5":0.9,"best_top1":0.55,"updates":7,"img_per_s":80.5,"data_wait":0.01,
                "train_s":10.0,"params":1234,"macs":99,"peak_rss_mib":250.0}"#,
        )?;
        std::fs::write(
            run.join("metrics.jsonl"),
            "{\"event\":\"step\",\"elapsed_s\":1.0}\n{\"event\":\"eval\",\"elapsed_s\":5.0,\"top1\":0.4}\n\
             {\"event\":\"eval\",\"elapsed_s\":11.0,\"top1\":0.5}\n",
        )?;
        std::fs::write(run.join("model.safetensors"), [0u8; 64])?;
        let plans = crate::experiment::plan(&toml::from_str(
            "description = \"d\"\n[data]\n[baseline]\n[[variants]]\nname = \"p\"\nkind = \"prune\"\nargs = [\"--sparsity\", \"0.5\"]\n",
        )?)?;
        let mut r = VariantResult::new("baseline", "", Kind::Train, "h", 1);
        fill(&mut r, &plans[0], run, "", None)?;
        assert_eq!(r.curve, vec![(5.0, 0.4), (11.0, 0.5)]);
        assert_eq!((r.updates, r.bytes, r.top1), (Some(7), Some(64), Some(0.5)));
        assert_eq!(r.time_to(0.45), Some(11.0));
        // A pruning variant takes accuracy and size from brisk's JSON line.
        let mut p = VariantResult::new("p", "", Kind::Prune, "h", 1);
        let stdout = "progress\n{\"method\":\"global\",\"before\":{},\"after\":{\"top1\":0.49,\"params\":600,\"macs\":99,\"bytes\":32}}\n";
        fill(&mut p, &plans[1], run, stdout, Some(300.0))?;
        assert_eq!((p.top1, p.params, p.bytes), (Some(0.49), Some(600), Some(32)));
        assert_eq!(p.img_per_s, Some(80.5));
        Ok(())
    }
}
