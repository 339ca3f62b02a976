//! An experiment's report: the table of every variant against the baseline, the
//! reading generated from the numbers, built as one document (document.rs renders it as
//! report.md, report.html, report.json and report.csv), plus the numbers behind it
//! (results.json, results.csv, runs.csv) and the plotters SVGs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::document::{self, Block, Document, Section};
use crate::machine::Machine;
use crate::plan::{Kind, Target, BASELINE};
use crate::results::{RunResult, Status, Variant};
use crate::stats::{Difference, Estimate, Test, Verdict};

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
    /// Runs per variant asked for (seeds base, base+1, …).
    pub repeats: usize,
    /// The experiment's stated target accuracy (else the baseline's mean final top-1).
    #[serde(default)]
    pub target: Option<Target>,
    pub baseline_config: String,
    pub variants: Vec<Variant>,
}

impl Report {
    /// The baseline, when it finished.
    fn baseline(&self) -> Option<&Variant> {
        self.done(BASELINE)
    }

    /// A finished variant by name.
    fn done(&self, name: &str) -> Option<&Variant> {
        self.variants
            .iter()
            .find(|v| v.name == name && v.status() == Status::Done)
    }

    /// The accuracy every variant's time is measured to: the experiment's target, else
    /// the baseline's mean final top-1.
    fn target(&self) -> Option<f64> {
        match &self.target {
            Some(t) => Some(t.top1),
            None => self.baseline()?.estimate(|r| r.top1).map(|e| e.mean),
        }
    }

    /// The target in words, with how it was chosen.
    fn target_words(&self) -> String {
        match (&self.target, self.target()) {
            (Some(t), _) => format!("{:.1}% test top-1 ({})", 100.0 * t.top1, t.why.trim()),
            (None, Some(t)) => format!(
                "{:.1}% test top-1 (the baseline's mean final top-1: the experiment states no target)",
                100.0 * t
            ),
            (None, None) => "none (the baseline did not finish and the experiment states no target)".into(),
        }
    }
}

/// The headline table's columns: time to the target first.
const HEADLINE: [&str; 5] = [
    "variant",
    "training s to target",
    "runs that reached it",
    "final top-1 %",
    "img/s",
];

/// The headline: each training variant's training time to the target (mean ± 95%
/// interval over the runs that reached it, ratio to the baseline's), then its final
/// top-1 and speed. Shared by Markdown and HTML.
fn headline(report: &Report) -> Vec<Vec<String>> {
    let Some(t) = report.target() else {
        return Vec::new();
    };
    let base_time = report.baseline().and_then(|b| b.time_to(t).0).map(|e| e.mean);
    let base_ips = report.baseline().and_then(|b| mean(b, |r| r.img_per_s));
    report
        .variants
        .iter()
        .filter(|v| v.kind == Kind::Train && v.status() == Status::Done)
        .map(|v| {
            let (e, reached, n) = v.time_to(t);
            let time = match e {
                Some(e) => format!("{}{}", estimate(Some(e), 1.0, 1), ratio(Some(e.mean), base_time)),
                None => "not reached".into(),
            };
            let ips = v.estimate(|r| r.img_per_s);
            vec![
                v.name.clone(),
                time,
                format!("{reached} of {n}"),
                estimate(v.estimate(|r| r.top1), 100.0, 2),
                format!(
                    "{}{}",
                    estimate(ips, 1.0, 0),
                    ratio(ips.map(|e| e.mean), base_ips)
                ),
            ]
        })
        .collect()
}

/// What the headline shows.
fn headline_caption(report: &Report) -> String {
    format!(
        "Target: {}. Training seconds (evaluations and probes excluded) until a run's test top-1 first reached \
         the target, averaged over the runs that reached it, ± the half-width of the 95% interval; in brackets \
         the ratio to the baseline's. Final top-1 and img/s as in the table below.",
        report.target_words()
    )
}

/// A mean with its 95% interval, scaled (100 for percentages).
fn estimate(e: Option<Estimate>, scale: f64, digits: usize) -> String {
    match e {
        None => "–".into(),
        Some(Estimate {
            mean, half: Some(h), ..
        }) => {
            format!("{:.digits$} ± {:.digits$}", scale * mean, scale * h)
        }
        Some(Estimate { mean, .. }) => format!("{:.digits$}", scale * mean),
    }
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!(" ({:.2}x)", v / b),
        _ => String::new(),
    }
}

fn count(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1} k", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

/// The mean of a figure over a variant's finished runs.
fn mean(v: &Variant, figure: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
    v.estimate(figure).map(|e| e.mean)
}

/// The table's columns.
const COLUMNS: [&str; 16] = [
    "variant",
    "change",
    "seeds",
    "top-1 %",
    "Δ top-1 (points)",
    "best top-1 %",
    "wall s",
    "training s to target",
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
    report
        .variants
        .iter()
        .map(|v| row(v, base, report.target()))
        .collect()
}

/// A count with its ratio to the baseline's.
fn counted(v: &Variant, base: Option<&Variant>, figure: fn(&RunResult) -> Option<u64>) -> String {
    let f = |r: &RunResult| figure(r).map(|x| x as f64);
    let a = mean(v, f);
    format!("{}{}", count(a), ratio(a, base.and_then(|b| mean(b, f))))
}

/// A difference in a table cell: `+1.20 ± 0.80 (higher)`.
fn difference_cell(d: &Difference, scale: f64, digits: usize) -> String {
    let m = scale * d.mean;
    match (d.half, d.verdict()) {
        (None, _) => format!("{m:+.digits$} (untested)"),
        (Some(h), Verdict::Higher) => format!("{m:+.digits$} ± {:.digits$} (higher)", scale * h),
        (Some(h), Verdict::Lower) => format!("{m:+.digits$} ± {:.digits$} (lower)", scale * h),
        (Some(h), _) => format!("{m:+.digits$} ± {:.digits$} (not shown)", scale * h),
    }
}

/// One variant's cells, ratios and differences against the baseline `base`.
fn row(v: &Variant, base: Option<&Variant>, target: Option<f64>) -> Vec<String> {
    let top1 = v.estimate(|r| r.top1);
    let delta = match base.and_then(|b| Difference::of(&v.by_seed(|r| r.top1), &b.by_seed(|r| r.top1))) {
        Some(d) if v.name != BASELINE => difference_cell(&d, 100.0, 2),
        _ => "–".into(),
    };
    let tta = match (v.kind, target) {
        (Kind::Train, Some(t)) if v.status() == Status::Done => {
            let (e, reached, n) = v.time_to(t);
            let base_mean = base.and_then(|b| b.time_to(t).0).map(|e| e.mean);
            match e {
                Some(e) => format!(
                    "{}{}{}",
                    estimate(Some(e), 1.0, 0),
                    ratio(Some(e.mean), base_mean),
                    if reached < n {
                        format!(", {reached} of {n} runs")
                    } else {
                        String::new()
                    }
                ),
                None => "not reached".into(),
            }
        }
        (Kind::Train, _) => "–".into(),
        _ => "n/a".into(),
    };
    let status = match (v.status(), v.reason()) {
        (Status::Done, _) => "done".to_string(),
        (s, Some(r)) => format!("{}: {}", s.name(), r.lines().next().unwrap_or("")),
        (s, None) => s.name().to_string(),
    };
    let wall = v.estimate(|r| Some(r.wall_s));
    let base_wall = base.and_then(|b| mean(b, |r| Some(r.wall_s)));
    let ips = v.estimate(|r| r.img_per_s);
    let base_ips = base.and_then(|b| mean(b, |r| r.img_per_s));
    vec![
        v.name.clone(),
        v.note.clone(),
        v.done().count().to_string(),
        estimate(top1, 100.0, 2),
        delta,
        estimate(v.estimate(|r| r.best_top1), 100.0, 2),
        format!(
            "{}{}",
            estimate(wall, 1.0, 0),
            ratio(wall.map(|e| e.mean), base_wall)
        ),
        tta,
        format!(
            "{}{}",
            estimate(ips, 1.0, 0),
            ratio(ips.map(|e| e.mean), base_ips)
        ),
        mean(v, |r| r.data_wait).map_or("–".into(), |w| format!("{:.1}%", 100.0 * w)),
        mean(v, |r| r.updates.map(|u| u as f64)).map_or("–".into(), |u| format!("{u:.0}")),
        counted(v, base, |r| r.params),
        counted(v, base, |r| r.macs),
        counted(v, base, |r| r.bytes),
        estimate(v.estimate(|r| r.peak_rss_mib), 1.0, 0),
        status,
    ]
}

/// How the reading was made: seeds, the interval and test, what time-to-accuracy means.
fn method(report: &Report, base: &Variant) -> String {
    let mut s = if report.repeats < 2 {
        format!(
            "One run per variant on a shared {}-core machine: no interval can be drawn from one run, \
             so no difference below is tested (the differences are as measured, run-to-run noise \
             included); rerun with --repeats 3 or more to test them.",
            report.machine.cores
        )
    } else {
        format!(
            "Each variant ran with {} seeds (the seed sets the initial weights, the data order and the \
             augmentation; compression variant k starts from the baseline's run k); the table's `seeds` \
             column counts the finished runs each figure rests on. Figures are means ± the half-width of \
             a 95% Student-t interval over the seeds. A difference from the baseline (or a control) is \
             tested on runs paired by seed — the 95% t interval of the per-seed differences (the paired \
             t-test), since runs with the same seed share the data order and augmentation (and the initial \
             weights where the networks match) — or with Welch's interval where the seeds do not pair up; \
             it is called real only when that interval excludes zero (the two-sided test at the 5% \
             level); otherwise the reading says no difference was shown, which is not evidence of no \
             difference.",
            report.repeats
        )
    };
    if let (Some(p), Some(n)) = (base.estimate(|r| r.top1), base.done().find_map(|r| r.test_images)) {
        let half = 1.96 * (p.mean * (1.0 - p.mean) / n.max(1) as f64).sqrt();
        let _ = write!(
            s,
            " Every run is scored on the same {n} test images: the intervals cover seed-to-seed variation \
             on them, not how well {n} images stand for the population (about ±{:.1} points, binomial, at \
             the baseline's {:.1}%), which shifts every variant alike.",
            100.0 * half,
            100.0 * p.mean
        );
    }
    let probes = brisk_schema::TrainConfig::from_toml_str(&report.baseline_config, "baseline")
        .ok()
        .map(|c| c.eval)
        .filter(|e| e.probe_every_steps > 0);
    let _ = write!(s, " The target accuracy is {}.", report.target_words());
    match probes {
        Some(e) => {
            let _ = write!(
                s,
                " Time to the target is training time (probes and evaluations excluded) until \
                 the first probe (top-1 on the first {} test images every {} updates) or evaluation at or \
                 above it, averaged over the runs that got there.",
                e.probe_images, e.probe_every_steps
            );
        }
        None => s.push_str(
            " Time to the target is training time until the first evaluation (once per epoch, \
             so coarse) at or above it.",
        ),
    }
    s
}

/// The report's reading: one plain sentence per variant against the baseline (and its
/// control), each difference tested as `method` says. Generated from the numbers.
fn reading(report: &Report) -> Vec<String> {
    let Some(base) = report.baseline() else {
        return vec!["The baseline did not finish, so nothing can be compared.".into()];
    };
    let mut out = vec![method(report, base)];
    for v in report.variants.iter().filter(|v| v.name != BASELINE) {
        if v.status() != Status::Done {
            out.push(format!(
                "**{}** was {}: {}",
                v.name,
                v.status().name(),
                v.reason().unwrap_or("").lines().next().unwrap_or("")
            ));
            continue;
        }
        let mut sentence = format!(
            "**{}**, {} — against the baseline{}: {}",
            v.name,
            v.note,
            basis(v, base),
            accuracy_and_speed(v, base, report.target()).join("; ")
        );
        let costs = costs(v, base);
        if !costs.is_empty() {
            let _ = write!(sentence, "; {}", costs.join("; "));
        }
        if let Some(spread) = wide_spread(v) {
            let _ = write!(sentence, "; {spread}");
        }
        if let Some(c) = v.control.as_deref().and_then(|c| report.done(c)) {
            if let Some(acc) = accuracy(v, c, &c.name) {
                let _ = write!(
                    sentence,
                    ". Against {} ({}){}: {acc}",
                    c.name,
                    c.note,
                    basis(v, c)
                );
            }
        }
        if let Some(t) = &v.pytorch {
            let _ = write!(
                sentence,
                ". brisk/PyTorch step speed {:.2} ({:.0} vs {:.0} img/s)",
                t.ratio, t.brisk_img_per_s, t.torch_img_per_s
            );
        }
        sentence.push('.');
        out.push(sentence);
    }
    out
}

/// Widest 95% half-width of final top-1, in points, that the reading lets pass without
/// showing the seeds behind it.
const WIDE_POINTS: f64 = 5.0;

/// For a variant whose final top-1 interval is wider than [`WIDE_POINTS`], its seeds'
/// accuracies and the one furthest from the others' mean, so the reader sees whether
/// one run or all of them make the width.
fn wide_spread(v: &Variant) -> Option<String> {
    let e = v.estimate(|r| r.top1)?;
    if e.half? * 100.0 <= WIDE_POINTS {
        return None;
    }
    let runs = v.by_seed(|r| r.top1);
    let all: Vec<String> = runs.iter().map(|(_, a)| format!("{:.1}", 100.0 * a)).collect();
    let n = runs.len() as f64;
    let sum: f64 = runs.iter().map(|(_, a)| a).sum();
    // The run furthest from the mean of the others.
    let (seed, top1, rest) = runs
        .iter()
        .map(|&(s, a)| (s, a, (sum - a) / (n - 1.0)))
        .max_by(|x, y| (x.1 - x.2).abs().total_cmp(&(y.1 - y.2).abs()))?;
    Some(format!(
        "its interval is wide (± {:.1} points): its seeds ended at {}%, seed {} ({:.1}%) {:.1} points {} the others' mean",
        100.0 * e.half?,
        all.join(", "),
        seed & !(1 << 63),
        100.0 * top1,
        100.0 * (top1 - rest).abs(),
        if top1 < rest { "below" } else { "above" }
    ))
}

/// Which comparison a sentence makes, for training runs: epochs and updates against
/// `other`'s ("at equal epochs, 2.00x its updates").
fn basis(v: &Variant, other: &Variant) -> String {
    if v.kind != Kind::Train || other.kind != Kind::Train {
        return String::new();
    }
    let epochs = |x: &Variant| mean(x, |r| r.epochs.map(|e| e as f64));
    let updates = |x: &Variant| mean(x, |r| r.updates.map(|u| u as f64));
    let (Some(ea), Some(eb), Some(ua), Some(ub)) = (epochs(v), epochs(other), updates(v), updates(other))
    else {
        return String::new();
    };
    let part = |a: f64, b: f64, what: &str| {
        if (a / b - 1.0).abs() < 0.05 {
            format!("equal {what}")
        } else {
            format!("{:.2}x its {what}", a / b)
        }
    };
    format!(" ({}, {})", part(ea, eb, "epochs"), part(ua, ub, "updates"))
}

/// A difference in words: "+1.20 points (95% CI +0.40 to +2.00, paired by seed)".
fn interval_words(d: &Difference, scale: f64, unit: &str) -> String {
    let m = scale * d.mean;
    let test = match d.test {
        Test::Paired => "paired by seed",
        Test::Welch => "Welch",
    };
    match d.half {
        Some(h) => format!(
            "{m:+.2}{unit} (95% CI {:+.2} to {:+.2}, {test})",
            m - scale * h,
            m + scale * h
        ),
        None => format!("{m:+.2}{unit}"),
    }
}

/// The accuracy phrase against `other` (named `what`).
fn accuracy(v: &Variant, other: &Variant, what: &str) -> Option<String> {
    let d = Difference::of(&v.by_seed(|r| r.top1), &other.by_seed(|r| r.top1))?;
    let words = interval_words(&d, 100.0, " points");
    Some(match d.verdict() {
        Verdict::Higher => format!("accuracy higher than {what}'s, {words}"),
        Verdict::Lower => format!("accuracy lower than {what}'s, {words}"),
        Verdict::Unclear => format!("no accuracy difference from {what} shown, {words}"),
        Verdict::Untested => format!("accuracy {words} (one run: not tested)"),
    })
}

/// The reading's accuracy, speed and time-to-accuracy phrases for a variant.
fn accuracy_and_speed(v: &Variant, base: &Variant, target: Option<f64>) -> Vec<String> {
    let mut parts: Vec<String> = accuracy(v, base, "the baseline").into_iter().collect();
    if v.kind != Kind::Train {
        return parts;
    }
    let speed = Difference::of(&v.by_seed(|r| r.img_per_s), &base.by_seed(|r| r.img_per_s));
    if let (Some(d), Some(a), Some(b)) = (speed, v.estimate(|r| r.img_per_s), base.estimate(|r| r.img_per_s))
    {
        let r = a.mean / b.mean;
        let range = d.half.map_or(String::new(), |h| {
            format!(
                " (95% CI {:.2}x to {:.2}x)",
                1.0 + (d.mean - h) / b.mean,
                1.0 + (d.mean + h) / b.mean
            )
        });
        parts.push(match d.verdict() {
            Verdict::Higher => format!("faster: {r:.2}x the baseline's img/s{range}"),
            Verdict::Lower => format!("slower: {r:.2}x the baseline's img/s{range}"),
            Verdict::Unclear => format!("no speed difference shown: {r:.2}x the baseline's img/s{range}"),
            Verdict::Untested => format!("{r:.2}x the baseline's img/s (one run: not tested)"),
        });
    }
    let Some(t) = target else {
        return parts;
    };
    let (e, reached, n) = v.time_to(t);
    let (eb, _, _) = base.time_to(t);
    let reached_at = |x: &Variant| x.by_seed(|r| r.time_to(t));
    match (e, eb, Difference::of(&reached_at(v), &reached_at(base))) {
        (Some(e), Some(eb), Some(d)) => {
            let verdict = match d.verdict() {
                Verdict::Higher => "later, the interval says",
                Verdict::Lower => "sooner, the interval says",
                Verdict::Unclear => "no difference shown",
                Verdict::Untested => "not tested",
            };
            let some = if reached < n {
                format!(" in {reached} of {n} runs")
            } else {
                String::new()
            };
            parts.push(format!(
                "reached the target{some} after {} s of training ({:.2}x the baseline's time; {verdict})",
                estimate(Some(e), 1.0, 1),
                e.mean / eb.mean
            ));
        }
        (Some(e), None, _) => parts.push(format!(
            "reached the target in {reached} of {n} runs after {} s of training (the baseline did not reach it)",
            estimate(Some(e), 1.0, 1)
        )),
        (None, _, _) => parts.push(format!("did not reach the target in any of its {n} runs")),
        _ => parts.push(format!(
            "reached the target in {reached} of {n} runs after {} s of training (too few runs on one side to compare)",
            estimate(e, 1.0, 1)
        )),
    }
    parts
}

/// The reading's size, MACs and memory phrases, when they differ from the baseline's.
fn costs(v: &Variant, base: &Variant) -> Vec<String> {
    let mut parts = Vec::new();
    let r = |f: fn(&RunResult) -> Option<f64>| Some(mean(v, f)? / mean(base, f)?);
    if let Some(r) = r(|x| x.bytes.map(|b| b as f64)) {
        if (r - 1.0).abs() >= 0.05 {
            parts.push(format!("model file {r:.2}x the baseline's"));
        }
    }
    if let Some(r) = r(|x| x.macs.map(|b| b as f64)) {
        if (r - 1.0).abs() >= 0.05 {
            parts.push(format!("{r:.2}x the MACs"));
        }
    }
    // Peak memory compares training processes only (a quantiser is no training run).
    if let (Kind::Train, Some(r)) = (v.kind, r(|x| x.peak_rss_mib)) {
        if (r - 1.0).abs() >= 0.1 {
            parts.push(format!("peak memory {r:.2}x"));
        }
    }
    parts
}

/// The plots beside every report: file and what it shows.
const PLOTS: [(&str, &str); 4] = [
    (
        "accuracy_vs_time.svg",
        "test top-1 against training time, one curve per run (every seed of every training variant)",
    ),
    (
        "speed.svg",
        "training images/s (fine-tuning for pruned and distilled models), 95% intervals",
    ),
    ("size.svg", "model file size"),
    ("accuracy.svg", "final test top-1, 95% intervals"),
];

/// How many finished runs were measured at another revision than the report's (reused
/// from the cache, or recorded before runs kept theirs), as a clause for the revision
/// line; empty when none.
fn other_revisions(report: &Report) -> String {
    let done: Vec<&RunResult> = report
        .variants
        .iter()
        .flat_map(|v| &v.runs)
        .filter(|r| r.status == Status::Done)
        .collect();
    let other = done
        .iter()
        .filter(|r| r.revision.as_deref() != Some(report.git.as_str()))
        .count();
    if other == 0 {
        return String::new();
    }
    format!(
        "; {other} of {} finished runs were measured at another (or an unrecorded) revision and \
         reused from the cache: their times are that code's (`--force` reruns them)",
        done.len()
    )
}

/// The whole report as one document: every format renders this.
fn document(report: &Report) -> Document {
    let m = &report.machine;
    let mut sections = vec![Section::new(
        "What ran",
        vec![
            Block::paragraph(report.description.trim()),
            Block::List {
                items: vec![
                    format!(
                        "started {} (UTC), {:.1} minutes including cached variants' zero cost",
                        report.started,
                        report.elapsed_s / 60.0
                    ),
                    format!("brisk revision `{}`{}", report.git, other_revisions(report)),
                    format!("machine: {}", m.describe()),
                    format!("data: `{}`", report.data),
                ],
            },
        ],
    )];
    let top = headline(report);
    if !top.is_empty() {
        sections.push(Section::new(
            "Time to accuracy",
            vec![
                Block::paragraph(headline_caption(report)),
                Block::table(&HEADLINE, top),
            ],
        ));
    }
    sections.push(Section::new(
        "Results",
        vec![
            Block::paragraph(results_caption(report)),
            Block::table(&COLUMNS, table(report)),
        ],
    ));
    sections.push(Section::new(
        "Reading",
        vec![Block::List {
            items: reading(report),
        }],
    ));
    sections.extend(torch_section(report));
    sections.push(Section::new(
        "Plots",
        PLOTS
            .iter()
            .map(|(file, caption)| Block::Plot {
                file: file.to_string(),
                caption: caption.to_string(),
            })
            .collect(),
    ));
    sections.push(Section::new(
        "Baseline config",
        vec![
            Block::Code {
                language: "toml".into(),
                text: report.baseline_config.clone(),
            },
            Block::paragraph(format!(
                "Each run's full config, command output and run folder are in `reports/{}/runs/VARIANT/seed-S/`. \
                 This report is also in report.md, report.html, report.json and report.csv (one row per text); \
                 the numbers behind it are in results.json, results.csv (one row per variant) and runs.csv \
                 (one row per run).",
                report.experiment
            )),
        ],
    ));
    Document {
        title: format!("Experiment `{}`", report.experiment),
        sections,
    }
}

/// The brisk-vs-PyTorch step table, when `--with-pytorch` measured any.
fn torch_section(report: &Report) -> Option<Section> {
    let rows: Vec<Vec<String>> = report
        .variants
        .iter()
        .filter_map(|v| {
            let t = v.pytorch.as_ref()?;
            Some(vec![
                v.name.clone(),
                format!("{} w{}", t.arch, t.width),
                t.batch.to_string(),
                t.precision.clone(),
                format!("{:.1}", t.brisk_img_per_s),
                format!("{:.1}", t.torch_img_per_s),
                format!("{:.2}", t.ratio),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| {
        Section::new(
            "brisk and PyTorch, one training step side by side",
            vec![
                Block::paragraph(
                    "`brisk bench step` and scripts/torch_reference.py on random data, same model, batch, \
                     precision and threads, run one after the other.",
                ),
                Block::table(
                    &[
                        "variant",
                        "model",
                        "batch",
                        "precision",
                        "brisk img/s",
                        "PyTorch img/s",
                        "brisk/PyTorch",
                    ],
                    rows,
                ),
            ],
        )
    })
}

/// One row per variant: means and 95% half-widths.
fn csv(report: &Report) -> String {
    let mut s = String::from(
        "variant,kind,ranks,status,seeds,top1,top1_half,delta_top1,delta_top1_half,delta_top1_verdict,best_top1,wall_s,train_s,\
         time_to_baseline_top1_s,reached,img_per_s,img_per_s_half,data_wait,updates,params,macs,bytes,peak_rss_mib,\
         torch_img_per_s,brisk_over_torch\n",
    );
    let target = report.target();
    let base_top1 = report.baseline().map(|b| b.by_seed(|r| r.top1));
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    for v in &report.variants {
        let top1 = v.estimate(|r| r.top1);
        let delta = base_top1
            .as_ref()
            .and_then(|b| Difference::of(&v.by_seed(|r| r.top1), b));
        let (tta, reached, n) = target.map_or((None, 0, 0), |t| v.time_to(t));
        let ips = v.estimate(|r| r.img_per_s);
        let m = |g: fn(&RunResult) -> Option<f64>| f(mean(v, g));
        let row = [
            document::csv_field(&v.name),
            v.kind.name().to_string(),
            v.ranks.to_string(),
            v.status().name().to_string(),
            v.done().count().to_string(),
            f(top1.map(|e| e.mean)),
            f(top1.and_then(|e| e.half)),
            f(delta.map(|d| d.mean)),
            f(delta.and_then(|d| d.half)),
            delta.map_or(String::new(), |d| format!("{:?}", d.verdict()).to_lowercase()),
            m(|r| r.best_top1),
            m(|r| Some(r.wall_s)),
            m(|r| r.train_s),
            f(tta.map(|e| e.mean)),
            format!("{reached}/{n}"),
            f(ips.map(|e| e.mean)),
            f(ips.and_then(|e| e.half)),
            m(|r| r.data_wait),
            m(|r| r.updates.map(|u| u as f64)),
            m(|r| r.params.map(|u| u as f64)),
            m(|r| r.macs.map(|u| u as f64)),
            m(|r| r.bytes.map(|u| u as f64)),
            m(|r| r.peak_rss_mib),
            f(v.pytorch.as_ref().map(|t| t.torch_img_per_s)),
            f(v.pytorch.as_ref().map(|t| t.ratio)),
        ];
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

/// One row per run.
fn runs_csv(report: &Report) -> String {
    let mut s = String::from(
        "variant,seed,status,top1,best_top1,wall_s,train_s,time_to_baseline_top1_s,img_per_s,data_wait,updates,params,macs,bytes,peak_rss_mib\n",
    );
    let target = report.target();
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let u = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    for v in &report.variants {
        for r in &v.runs {
            let row = [
                document::csv_field(&v.name),
                r.seed.to_string(),
                r.status.name().to_string(),
                f(r.top1),
                f(r.best_top1),
                f((r.status == Status::Done).then_some(r.wall_s)),
                f(r.train_s),
                f(target.and_then(|t| r.time_to(t))),
                f(r.img_per_s),
                f(r.data_wait),
                u(r.updates),
                u(r.params),
                u(r.macs),
                u(r.bytes),
                f(r.peak_rss_mib),
            ];
            s.push_str(&row.join(","));
            s.push('\n');
        }
    }
    s
}

/// What the results table shows.
fn results_caption(report: &Report) -> String {
    if report.repeats < 2 {
        "One run per variant. Ratios in brackets are against the baseline.".into()
    } else {
        format!(
            "Means over {} seeds ± the half-width of their 95% interval; Δ top-1 is the difference from the \
             baseline with its 95% interval, runs paired by seed (higher / lower: the interval excludes zero; \
             not shown: it does not). Ratios in brackets are of the means, against the baseline's.",
            report.repeats
        )
    }
}

/// One bar of a bar chart: a name, a mean and the half-width of its interval.
type Bar = (String, f64, Option<f64>);

/// A bar per item, with its 95% interval as a whisker when there is one.
fn bars(path: &Path, title: &str, unit: &str, items: &[Bar]) -> Result<()> {
    let root = SVGBackend::new(path, (960, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    if items.is_empty() {
        root.titled(&format!("{title}: no data"), ("sans-serif", 20))?;
        root.present()?;
        return Ok(());
    }
    let top = items
        .iter()
        .map(|i| i.1 + i.2.unwrap_or(0.0))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
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
    chart.draw_series(items.iter().enumerate().map(|(i, (_, v, _))| {
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
            Palette99::pick(i).filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        bar
    }))?;
    chart.draw_series(items.iter().enumerate().filter_map(|(i, (_, v, half))| {
        let h = (*half)?;
        Some(PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), (v - h).max(0.0)),
                (SegmentValue::CenterOf(i), v + h),
            ],
            BLACK.stroke_width(2),
        ))
    }))?;
    let label = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom));
    chart.draw_series(items.iter().enumerate().map(|(i, (_, v, half))| {
        let text = match half {
            Some(h) => format!("{} ± {}", format_value(*v), format_value(*h)),
            None => format_value(*v),
        };
        Text::new(text, (SegmentValue::CenterOf(i), *v), label.clone())
    }))?;
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

/// (training seconds, top-1 %) points of one run.
type Curve = Vec<(f64, f64)>;

/// Test top-1 (probes and evaluations) against training time, one colour per training
/// variant and one line per seed.
fn accuracy_vs_time(path: &Path, report: &Report) -> Result<()> {
    let series: Vec<(&str, Vec<Curve>)> = report
        .variants
        .iter()
        .filter(|v| v.kind == Kind::Train && v.done().any(|r| !r.curve.is_empty()))
        .map(|v| {
            (
                v.name.as_str(),
                v.done()
                    .map(|r| r.curve.iter().map(|(t, a)| (*t, 100.0 * a)).collect())
                    .collect(),
            )
        })
        .collect();
    let points = || series.iter().flat_map(|s| s.1.iter().flatten());
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = points().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymin = points().map(|p| p.1).fold(100.0, f64::min).min(90.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Test top-1 against training time (training variants, every seed)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, (ymin - 2.0).max(0.0)..100.0)?;
    chart
        .configure_mesh()
        .x_desc("training seconds (evaluations excluded)")
        .y_desc("test top-1 (%)")
        .draw()?;
    for (i, (name, runs)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        for (k, pts) in runs.iter().enumerate() {
            let line = chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
            if k == 0 {
                line.label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 2, color.filled())))?;
        }
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

/// A plot's caption as its title: first letter upper-case.
fn plot_title(caption: &str) -> String {
    let mut c = caption.chars();
    c.next()
        .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
}

/// Writes the report (report.md, report.html, report.json, report.csv), the numbers
/// behind it (results.json, results.csv, runs.csv) and the plots into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let done: Vec<&Variant> = report
        .variants
        .iter()
        .filter(|v| v.status() == Status::Done)
        .collect();
    accuracy_vs_time(&dir.join(PLOTS[0].0), report)?;
    let bar = |scale: f64, figure: fn(&RunResult) -> Option<f64>| -> Vec<Bar> {
        done.iter()
            .filter_map(|v| {
                let e = v.estimate(figure)?;
                Some((v.name.clone(), scale * e.mean, e.half.map(|h| scale * h)))
            })
            .collect()
    };
    let figures: [(&str, Vec<Bar>); 3] = [
        ("img/s", bar(1.0, |r| r.img_per_s)),
        ("MB", bar(1e-6, |r| r.bytes.map(|b| b as f64))),
        ("%", bar(100.0, |r| r.top1)),
    ];
    for ((file, caption), (unit, items)) in PLOTS[1..].iter().zip(figures) {
        bars(&dir.join(file), &plot_title(caption), unit, &items)?;
    }
    let doc = document(report);
    let svg = |file: &str| {
        std::fs::read_to_string(dir.join(file)).with_context(|| format!("cannot read the plot {file}"))
    };
    std::fs::write(dir.join("report.md"), document::markdown(&doc))?;
    std::fs::write(dir.join("report.html"), document::html(&doc, svg)?)?;
    std::fs::write(dir.join("report.json"), document::json(&doc)?)?;
    std::fs::write(dir.join("report.csv"), document::csv(&doc))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("results.csv"), csv(report))?;
    std::fs::write(dir.join("runs.csv"), runs_csv(report))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A variant whose runs (seeds 0, 1, …) reached `top1s`, at `ips` img/s (±1 per
    /// seed), each reaching its final accuracy at 90 s of training.
    fn variant(name: &str, kind: Kind, top1s: &[f64], ips: f64, bytes: u64) -> Variant {
        let runs = top1s
            .iter()
            .enumerate()
            .map(|(k, &top1)| {
                let mut r = RunResult::new(k as u64, "h");
                r.wall_s = 100.0;
                r.top1 = Some(top1);
                r.best_top1 = Some(top1);
                r.img_per_s = Some(ips + k as f64 - 1.0);
                r.bytes = Some(bytes);
                r.params = Some(1000);
                r.macs = Some(5000);
                r.epochs = Some(4);
                r.updates = Some(100);
                r.test_images = Some(1000);
                r.peak_rss_mib = Some(300.0);
                if kind == Kind::Train {
                    r.curve = vec![(40.0, top1 - 0.1), (90.0, top1)];
                }
                r
            })
            .collect();
        Variant {
            name: name.into(),
            note: "a change".into(),
            kind,
            ranks: 1,
            control: None,
            runs,
            pytorch: None,
            unpaired: false,
        }
    }

    fn report(repeats: usize, variants: Vec<Variant>) -> Report {
        Report {
            experiment: "tiny".into(),
            description: "A tiny experiment.".into(),
            data: "/tmp/data".into(),
            started: "20261128T000000Z".into(),
            elapsed_s: 123.0,
            git: "abc".into(),
            machine: Machine::read(),
            repeats,
            target: None,
            baseline_config: "epochs = 1\n".into(),
            variants,
        }
    }

    /// The reading's sentence about `name`.
    fn sentence<'a>(lines: &'a [String], name: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("**{name}**")))
            .map_or("", String::as_str)
    }

    #[test]
    fn a_report_has_every_file_and_says_what_it_measured() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut skipped = variant("two-ranks", Kind::Train, &[0.9], 100.0, 4000);
        skipped.runs[0].skip("MPI is not installed: apt-get install libopenmpi-dev openmpi-bin".into());
        let r = report(
            3,
            vec![
                variant(BASELINE, Kind::Train, &[0.89, 0.90, 0.91], 100.0, 4000),
                variant("faster", Kind::Train, &[0.895, 0.905, 0.915], 150.0, 4000),
                variant("int8", Kind::Quantize, &[0.79, 0.80, 0.81], 0.0, 1000),
                skipped,
            ],
        );
        write(&r, dir.path())?;
        for f in [
            "report.md",
            "report.html",
            "report.json",
            "report.csv",
            "results.json",
            "results.csv",
            "runs.csv",
        ]
        .iter()
        .chain(PLOTS.iter().map(|p| &p.0))
        {
            let len = std::fs::metadata(dir.path().join(f))?.len();
            assert!(len > 100, "{f} is nearly empty");
        }
        let md = std::fs::read_to_string(dir.path().join("report.md"))?;
        // Means and intervals come from the numbers: img/s 149, 150, 151 → 150 ± 2.48
        // (t(0.975, 2) = 4.303, sd 1); 1000 / 4000 bytes.
        assert!(md.contains("150 ± 2 (1.50x)"), "{md}");
        assert!(md.contains("(0.25x)"), "{md}");
        assert!(md.contains("faster: 1.50x the baseline's img/s"), "{md}");
        assert!(
            md.contains("accuracy lower than the baseline's, -10.00 points"),
            "{md}"
        );
        assert!(
            md.contains("two-ranks** was skipped: MPI is not installed"),
            "{md}"
        );
        assert!(md.contains("Each variant ran with 3 seeds"), "{md}");
        // Time to the baseline's 90%: every run got there at its second point.
        assert!(md.contains("90 ± 0 (1.00x)"), "{md}");
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
            .is_some_and(|l| l.starts_with("int8,quantize,1,done,3,0.8")));
        let runs = std::fs::read_to_string(dir.path().join("runs.csv"))?;
        assert_eq!(runs.lines().count(), 1 + 3 + 3 + 3 + 1);
        let back: Report = serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json"))?)?;
        assert_eq!(back.variants.len(), 4);
        assert_eq!(back.variants[3].status(), Status::Skipped);
        Ok(())
    }

    /// The check: one fixture, every format, every section — headings, each
    /// table's first header and last row, the reading, the plots, the PyTorch table,
    /// the machine and the revision.
    #[test]
    fn every_format_renders_every_section_of_the_report() -> Result<()> {
        let mut fast = variant("faster", Kind::Train, &[0.895, 0.905, 0.915], 150.0, 4000);
        fast.pytorch = Some(crate::results::Torch {
            arch: "resnet18-cifar".into(),
            width: 0.125,
            batch: 64,
            precision: "f32".into(),
            threads: 2,
            brisk_img_per_s: 1234.5,
            torch_img_per_s: 1111.1,
            ratio: 1.11,
        });
        let mut r = report(
            3,
            vec![
                variant(BASELINE, Kind::Train, &[0.89, 0.90, 0.91], 100.0, 4000),
                fast,
                variant("int8", Kind::Quantize, &[0.79, 0.80, 0.81], 0.0, 1000),
            ],
        );
        r.target = Some(Target {
            top1: 0.85,
            why: "stated for the test".into(),
        });
        r.git = "0123abcd".into();
        // Every run but one measured at the report's revision.
        for v in &mut r.variants {
            for run in &mut v.runs {
                run.revision = Some("0123abcd".into());
            }
        }
        r.variants[0].runs[0].revision = Some("fedc9876".into());
        let doc = document(&r);
        let headings: Vec<&str> = doc.sections.iter().map(|s| s.heading.as_str()).collect();
        assert_eq!(
            headings,
            [
                "What ran",
                "Time to accuracy",
                "Results",
                "Reading",
                "brisk and PyTorch, one training step side by side",
                "Plots",
                "Baseline config"
            ]
        );
        let dir = tempfile::tempdir()?;
        write(&r, dir.path())?;
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f));
        let formats = [
            ("report.md", read("report.md")?),
            ("report.html", read("report.html")?),
            ("report.csv", read("report.csv")?),
            ("report.json", read("report.json")?),
        ];
        // Texts as every format writes them (no markup, quotes or commas inside).
        let mut texts: Vec<String> = headings.iter().map(|h| h.to_string()).collect();
        texts.extend(
            [
                "0123abcd",
                "1 of 9 finished runs were measured at another (or an unrecorded) revision",
                "faster: 1.50x the baseline",
                "1234.5",
                "PyTorch img/s",
                "training s to target",
                "peak RSS MiB",
                "int8",
                "accuracy_vs_time.svg",
                "epochs = 1",
                "stated for the test",
            ]
            .map(String::from),
        );
        texts.push(r.machine.cpu.replace(['"', ','], ""));
        for (file, text) in &formats {
            for t in &texts {
                assert!(text.contains(t.as_str()), "{file} lacks {t:?}");
            }
        }
        // The HTML holds the plots themselves, the JSON is the document.
        assert_eq!(formats[1].1.matches("<svg").count(), PLOTS.len());
        let json: serde_json::Value = serde_json::from_str(&formats[3].1)?;
        assert_eq!(json["sections"].as_array().map(Vec::len), Some(headings.len()));
        Ok(())
    }

    #[test]
    fn the_headline_gives_time_to_the_stated_target_first() -> Result<()> {
        // Curves reach top1 - 0.1 at 40 s and top1 at 90 s: with a target of 0.85 the
        // baseline (0.89..0.91) gets there at 90 s, "quick" (0.96..0.98) at 40 s, "slow"
        // (0.80) never; the unpaired PyTorch variant is compared by Welch's interval.
        let mut torch = variant("pytorch", Kind::Train, &[0.95, 0.96, 0.97], 80.0, 4000);
        torch.unpaired = true;
        let mut r = report(
            3,
            vec![
                variant(BASELINE, Kind::Train, &[0.89, 0.90, 0.91], 100.0, 4000),
                torch,
                variant("quick", Kind::Train, &[0.96, 0.97, 0.98], 100.0, 4000),
                variant("slow", Kind::Train, &[0.80, 0.80, 0.80], 100.0, 4000),
                variant("int8", Kind::Quantize, &[0.79, 0.80, 0.81], 0.0, 1000),
            ],
        );
        r.target = Some(Target {
            top1: 0.85,
            why: "stated for the test".into(),
        });
        let rows = headline(&r);
        let names: Vec<&str> = rows.iter().map(|row| row[0].as_str()).collect();
        assert_eq!(
            names,
            [BASELINE, "pytorch", "quick", "slow"],
            "training variants only"
        );
        assert_eq!(rows[0][1], "90.0 ± 0.0 (1.00x)");
        assert_eq!(rows[2][1], "40.0 ± 0.0 (0.44x)");
        assert_eq!(
            (rows[3][1].as_str(), rows[3][2].as_str()),
            ("not reached", "0 of 3")
        );
        let md = document::markdown(&document(&r));
        let (first, results) = (md.find("## Time to accuracy"), md.find("## Results"));
        assert!(
            first.is_some() && first < results,
            "the headline comes first:\n{md}"
        );
        assert!(
            md.contains("Target: 85.0% test top-1 (stated for the test)"),
            "{md}"
        );
        assert!(
            md.contains("did not reach the target in any of its 3 runs"),
            "{md}"
        );
        let lines = reading(&r);
        let torch_line = lines
            .iter()
            .find(|l| l.starts_with("**pytorch**"))
            .expect("a pytorch sentence");
        assert!(
            torch_line.contains("Welch"),
            "PyTorch's runs pair with no brisk run: {torch_line}"
        );
        let dir = tempfile::tempdir()?;
        write(&r, dir.path())?;
        let html = std::fs::read_to_string(dir.path().join("report.html"))?;
        assert!(html.contains("<h2>Time to accuracy</h2>") && html.contains("not reached"));
        Ok(())
    }

    #[test]
    fn a_wide_interval_names_the_seed_that_makes_it() {
        let wide = variant("wide", Kind::Train, &[0.80, 0.81, 0.60], 100.0, 4000);
        let words = wide_spread(&wide).expect("an interval of ± 29 points is wide");
        assert!(
            words.contains("80.0, 81.0, 60.0%") && words.contains("seed 2 (60.0%) 20.5 points below"),
            "{words}"
        );
        let narrow = variant("narrow", Kind::Train, &[0.80, 0.81, 0.82], 100.0, 4000);
        assert_eq!(wide_spread(&narrow), None);
    }

    /// The check: a variant of known different accuracy is called different, one
    /// drawn from the baseline's own distribution is not, and one run tests nothing.
    #[test]
    fn the_reading_calls_real_differences_and_only_those() {
        // Five seeds each: the baseline around 70%, "better" around 78% (the same spread),
        // "same" around 70% with other draws, "worse" around 66%.
        let base = [0.701, 0.713, 0.694, 0.708, 0.699];
        let r = report(
            5,
            vec![
                variant(BASELINE, Kind::Train, &base, 100.0, 4000),
                variant(
                    "better",
                    Kind::Train,
                    &[0.772, 0.789, 0.781, 0.775, 0.786],
                    100.0,
                    4000,
                ),
                variant(
                    "same",
                    Kind::Train,
                    &[0.706, 0.692, 0.710, 0.703, 0.697],
                    100.0,
                    4000,
                ),
                variant(
                    "worse",
                    Kind::Train,
                    &[0.655, 0.668, 0.661, 0.649, 0.664],
                    100.0,
                    4000,
                ),
            ],
        );
        let lines = reading(&r);
        assert!(
            lines[0].contains("paired t-test"),
            "the test is stated: {}",
            lines[0]
        );
        assert!(lines[0].contains("1000 test images"), "{}", lines[0]);
        let better = sentence(&lines, "better");
        assert!(
            better.contains("accuracy higher than the baseline's, +7.76 points"),
            "{better}"
        );
        let same = sentence(&lines, "same");
        assert!(
            same.contains("no accuracy difference from the baseline shown"),
            "{same}"
        );
        let worse = sentence(&lines, "worse");
        assert!(worse.contains("accuracy lower than the baseline's"), "{worse}");
        // Equal img/s (the same per-seed values) is no speed difference.
        assert!(same.contains("no speed difference shown: 1.00x"), "{same}");
        // The table marks the same verdicts.
        let rows = table(&r);
        assert!(rows[1][4].ends_with("(higher)"), "{:?}", rows[1]);
        assert!(rows[2][4].ends_with("(not shown)"), "{:?}", rows[2]);
        assert!(rows[3][4].ends_with("(lower)"), "{:?}", rows[3]);
        // With one run each, nothing is tested, whatever the difference.
        let one = report(
            1,
            vec![
                variant(BASELINE, Kind::Train, &base[..1], 100.0, 4000),
                variant("better", Kind::Train, &[0.772], 100.0, 4000),
            ],
        );
        let lines = reading(&one);
        assert!(lines[0].contains("no difference below is tested"), "{}", lines[0]);
        assert!(sentence(&lines, "better").contains("(one run: not tested)"));
    }

    #[test]
    fn a_control_comparison_names_its_basis() {
        // A growing-batch-like variant: twice the baseline's updates, equal to its
        // control's; better than the baseline, not shown against the control.
        let mut grow = variant("grow", Kind::Train, &[0.80, 0.81, 0.79], 100.0, 4000);
        grow.control = Some("small-batch".into());
        let mut small = variant("small-batch", Kind::Train, &[0.805, 0.795, 0.80], 90.0, 4000);
        for r in grow.runs.iter_mut().chain(small.runs.iter_mut()) {
            r.updates = Some(200);
        }
        let r = report(
            3,
            vec![
                variant(BASELINE, Kind::Train, &[0.70, 0.71, 0.69], 100.0, 4000),
                grow,
                small,
            ],
        );
        let lines = reading(&r);
        let s = sentence(&lines, "grow");
        assert!(
            s.contains("against the baseline (equal epochs, 2.00x its updates): accuracy higher"),
            "{s}"
        );
        assert!(
            s.contains(
                "Against small-batch (a change) (equal epochs, equal updates): no accuracy difference"
            ),
            "{s}"
        );
    }
}
