//! `cargo xtask experiment NAME`: runs an ablation (`experiments/NAME.toml`, read by
//! `plan`) through the `brisk` binary, each variant once per seed, caches finished runs by
//! (config, seed) hash, resumes interrupted ones, and writes a report
//! (`reports/NAME/TIMESTAMP/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use brisk_schema::layout::{CHECKPOINTS_DIR, MODEL_FILE};
use serde::{Deserialize, Serialize};

use crate::machine::{self, Machine};
use crate::plan::{check_repeats, fnv64, load, Kind, Plan, RunPlan, Spec, BASELINE};
use crate::report::Report;
use crate::results::{RunResult, Status, Variant};

/// A run's brisk run folder inside its cache folder.
const RUN_DIR: &str = "run";

/// `cargo xtask experiment`'s options.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "NAME is experiments/NAME.toml (or a path to an experiment file). Each variant runs once per \
seed (--repeats, or `repeats` in the file); each run is kept in reports/NAME/runs/VARIANT/seed-S/ \
and skipped next time while its (config, seed) hash is the same (--force reruns), so raising \
--repeats runs only the new seeds; an interrupted training run resumes from its checkpoint. The report goes to \
reports/NAME/TIMESTAMP/ (report.md, report.html, report.json, report.csv: the same document; results.json, results.csv, runs.csv: the numbers; SVG plots)."
)]
pub struct ExperimentArgs {
    /// The experiment: a name in experiments/ or a path to an experiment file.
    name: Option<String>,
    /// Packed dataset to use instead of the experiment's own.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Run only these variants (the baseline too, when a variant needs it).
    #[arg(long, value_delimiter = ',', value_name = "V1,V2")]
    only: Vec<String>,
    /// Rerun variants even when a cached result matches.
    #[arg(long)]
    force: bool,
    /// Runs per variant, with seeds base, base+1, … (the report's intervals need at least
    /// 2). By default, the experiment file's `repeats` (1 when absent).
    #[arg(long, value_name = "N")]
    repeats: Option<usize>,
    /// Add PyTorch's img/s for the same model, batch and precision, and the brisk/PyTorch
    /// ratio (needs python3 with torch).
    #[arg(long)]
    with_pytorch: bool,
    /// Where reports/ goes. By default, the repository's reports/.
    #[arg(long, value_name = "DIR")]
    reports: Option<PathBuf>,
}

/// The experiments in experiments/.
fn available() -> Vec<String> {
    let Ok(root) = crate::root() else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(root.join("experiments"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let p = e.path();
                    if p.extension()? != "toml" {
                        return None;
                    }
                    Some(p.file_stem()?.to_string_lossy().into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The experiment file NAME names.
fn spec_path(name: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(name);
    if as_path.extension().is_some_and(|e| e == "toml") && as_path.is_file() {
        return Ok(as_path);
    }
    let p = crate::root()?.join("experiments").join(format!("{name}.toml"));
    if !p.is_file() {
        bail!(
            "no experiment `{name}`: {} does not exist (available: {})",
            p.display(),
            available().join(", ")
        );
    }
    Ok(p)
}

/// What the cache keeps for a run: its hash and, once finished, its result.
#[derive(Debug, Serialize, Deserialize)]
pub struct CacheEntry {
    pub hash: String,
    pub result: Option<RunResult>,
}

pub const CACHE_FILE: &str = "variant.json";

/// What to do with a run's folder.
#[derive(Debug, PartialEq, Eq)]
pub enum CacheDecision {
    /// A finished result with the same hash: reuse it.
    Reuse,
    /// A started training run with the same hash and a checkpoint: continue it.
    Resume,
    /// Nothing usable: start afresh (the folder is cleared).
    Fresh,
}

/// Reads a run folder's cache entry and decides.
pub fn decide(dir: &Path, hash: &str, kind: Kind, force: bool) -> CacheDecision {
    let Ok(text) = std::fs::read_to_string(dir.join(CACHE_FILE)) else {
        return CacheDecision::Fresh;
    };
    let Ok(entry) = serde_json::from_str::<CacheEntry>(&text) else {
        return CacheDecision::Fresh;
    };
    if force || entry.hash != hash {
        return CacheDecision::Fresh;
    }
    if entry.result.as_ref().is_some_and(|r| r.status == Status::Done) {
        return CacheDecision::Reuse;
    }
    let has_checkpoint = std::fs::read_dir(dir.join(RUN_DIR).join(CHECKPOINTS_DIR))
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-"))));
    if kind == Kind::Train && has_checkpoint {
        CacheDecision::Resume
    } else {
        CacheDecision::Fresh
    }
}

pub fn write_entry(dir: &Path, entry: &CacheEntry) -> Result<()> {
    brisk_files::write_atomic(
        &dir.join(CACHE_FILE),
        serde_json::to_string_pretty(entry)?.as_bytes(),
    )?;
    Ok(())
}

/// How a measured command ended.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Success,
    Failure,
    /// Stopped by a signal, or brisk's "interrupted, checkpoint written" (130).
    Interrupted,
}

/// Runs a command, measuring wall time and the child's peak resident memory; returns
/// (stdout, stderr, how it ended, wall seconds, peak MiB).
fn measure(cmd: &mut Command) -> Result<(String, String, Exit, f64, Option<f64>)> {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut child = child;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child `pid`, which
    // has not been waited for (Child::wait is not called).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our child.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("cannot wait for {cmd:?}: {}", std::io::Error::last_os_error());
    }
    let wall = start.elapsed().as_secs_f64();
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let exit = if libc::WIFSIGNALED(status) || (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 130) {
        Exit::Interrupted
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Exit::Success
    } else {
        Exit::Failure
    };
    // ru_maxrss is in KiB on Linux. Under mpirun it is the launcher's, not the ranks'.
    let peak = (usage.ru_maxrss > 0).then(|| usage.ru_maxrss as f64 / 1024.0);
    // The child is reaped; dropping the handle neither waits nor kills.
    drop(child);
    Ok((stdout, stderr, exit, wall, peak))
}

/// The last lines of a command's error output.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `mpirun` can run a brisk built with MPI, and why not.
fn mpi_available() -> std::result::Result<(), String> {
    crate::mpi::missing_reason()
}

struct Runner {
    brisk: PathBuf,
    data: PathBuf,
    runs: PathBuf,
    force: bool,
    mpi: std::result::Result<(), String>,
    /// The baseline evaluates with flip test-time augmentation, so the compression
    /// steps measure their models the same way.
    flip: bool,
    /// Also train the baseline's recipe in PyTorch, in each round after the baseline
    /// (`--with-pytorch`).
    torch: bool,
}

impl Runner {
    /// The cache folder of a variant's run with `seed`.
    fn dir(&self, name: &str, seed: u64) -> PathBuf {
        self.runs.join(name).join(format!("seed-{seed}"))
    }

    /// Runs (or reuses) every run of the `plans`, `repeats` seeds each, in rounds: the
    /// k-th run of every variant (the baseline's first, as the compression variants start
    /// from its model), then the (k+1)-th. A machine whose speed drifts over minutes then
    /// slows every variant of a round alike, and comparisons paired by seed cancel it,
    /// instead of one variant's three runs catching a slow spell together.
    fn variants<'a>(&self, plans: impl Iterator<Item = &'a Plan>, repeats: usize) -> Result<Vec<Variant>> {
        let plans: Vec<&Plan> = plans.collect();
        let mut results: Vec<Variant> = plans.iter().map(|p| Variant::new(p)).collect();
        let mut torch: Option<Variant> = None;
        for round in 0..repeats {
            for (i, plan) in plans.iter().enumerate() {
                let Some(seed) = plan.seeds(repeats).nth(round) else {
                    continue;
                };
                let baseline = results
                    .iter()
                    .find(|r| r.name == BASELINE)
                    .and_then(|b| b.runs.iter().find(|r| r.seed == seed))
                    .cloned();
                let run = plan.run(seed)?;
                let result = self.run(plan, &run, baseline.as_ref())?;
                results[i].runs.push(result);
                if self.torch && plan.name == BASELINE {
                    let run = crate::torch_recipe::run(plan, &self.data, &self.runs, seed, self.force)?;
                    torch
                        .get_or_insert_with(|| crate::torch_recipe::variant(plan))
                        .runs
                        .push(run);
                }
            }
        }
        // PyTorch's variant sits after the baseline it reproduces.
        if let Some(t) = torch {
            results.insert(1, t);
        }
        Ok(results)
    }

    /// Runs (or reuses) one run of a variant; `baseline` is the baseline's run with the
    /// same seed (a compression variant's starting model).
    fn run(&self, plan: &Plan, run: &RunPlan, baseline: Option<&RunResult>) -> Result<RunResult> {
        let dir = self.dir(&plan.name, run.seed);
        let label = format!("{} (seed {})", plan.name, run.seed);
        let decision = decide(&dir, &run.hash, plan.kind, self.force);
        if decision == CacheDecision::Reuse {
            if let Some(r) = cached(&dir)? {
                eprintln!("xtask: {label}: cached (config {}), not rerun", run.hash);
                return Ok(r);
            }
        }
        let mut result = RunResult::new(run.seed, &run.hash);
        if let Some(why) = self.cannot_run(plan, baseline) {
            eprintln!("xtask: {label}: skipped: {why}");
            result.skip(why);
            return Ok(result);
        }
        if decision == CacheDecision::Fresh && dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let entry = |result| CacheEntry {
            hash: run.hash.clone(),
            result,
        };
        write_entry(&dir, &entry(None))?;
        let resume = decision == CacheDecision::Resume;
        self.execute(plan, run, &dir, resume, &mut result)?;
        if resume && result.status == Status::Failed {
            // No checkpoint verified (brisk says why in stderr.log): keep the old run for
            // inspection, beside the fresh one, and start again.
            let kept = dir.join(format!("{RUN_DIR}.unresumable-{}", timestamp()));
            std::fs::rename(dir.join(RUN_DIR), &kept)?;
            eprintln!(
                "xtask: {label}: could not resume (old run kept in {}); starting it afresh",
                kept.display()
            );
            result = RunResult::new(run.seed, &run.hash);
            self.execute(plan, run, &dir, false, &mut result)?;
        }
        result.config.clone_from(&run.config);
        result.revision = Some(machine::git_revision());
        write_entry(&dir, &entry(Some(result.clone())))?;
        Ok(result)
    }

    /// Why a variant cannot run here, if it cannot: several ranks without MPI, or a
    /// compression step without a baseline model.
    fn cannot_run(&self, plan: &Plan, baseline: Option<&RunResult>) -> Option<String> {
        if plan.ranks > 1 {
            if let Err(why) = &self.mpi {
                return Some(why.clone());
            }
        }
        let no_model = baseline.is_none_or(|b| b.status != Status::Done);
        (plan.kind != Kind::Train && no_model).then(|| {
            "the baseline's run with this seed did not finish, so there is no model to start from".into()
        })
    }

    /// Runs the brisk command and reads what it measured into `result`.
    fn execute(
        &self,
        plan: &Plan,
        run: &RunPlan,
        dir: &Path,
        resume: bool,
        result: &mut RunResult,
    ) -> Result<()> {
        let run_dir = dir.join(RUN_DIR);
        let mut cmd = self.command(plan, run, dir, &run_dir, resume)?;
        let label = format!("{} (seed {})", plan.name, run.seed);
        let resuming = if resume {
            "resuming from its checkpoint: "
        } else {
            ""
        };
        eprintln!("xtask: {label}: {resuming}{}", describe(&cmd));
        let (stdout, stderr, exit, wall, peak) = measure(&mut cmd)?;
        std::fs::write(dir.join("stderr.log"), &stderr)?;
        std::fs::write(dir.join("stdout.log"), &stdout)?;
        match exit {
            Exit::Interrupted => bail!(
                "{label} was interrupted (its checkpoint is kept): run the same command again to resume the experiment"
            ),
            Exit::Failure => {
                result.fail(format!("`{}` failed:\n{}", describe(&cmd), tail(&stderr, 12)));
                eprintln!("xtask: {label}: FAILED (see {})", dir.join("stderr.log").display());
            }
            Exit::Success => {
                result.wall_s = wall;
                let peak = if plan.ranks > 1 { None } else { peak };
                crate::results::fill(result, plan, &run_dir, &stdout, peak)?;
                if resume {
                    // This command ran only the rest; the run's own clock spans every part.
                    result.wall_s = result.elapsed_s.unwrap_or(wall).max(wall);
                }
                eprintln!(
                    "xtask: {label}: top-1 {:.2}% in {:.0} s",
                    100.0 * result.top1.unwrap_or(f64::NAN),
                    wall
                );
            }
        }
        Ok(())
    }

    /// The brisk command line of a run.
    fn command(
        &self,
        plan: &Plan,
        run: &RunPlan,
        dir: &Path,
        run_dir: &Path,
        resume: bool,
    ) -> Result<Command> {
        let baseline_model = self.dir(BASELINE, run.seed).join(RUN_DIR).join(MODEL_FILE);
        let mut cmd = match plan.ranks {
            1 => Command::new(&self.brisk),
            n => {
                let mut c = Command::new("mpirun");
                c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                    .args(["--oversubscribe", "-np", &n.to_string()])
                    .arg(&self.brisk);
                c
            }
        };
        match plan.kind {
            Kind::Train => {
                if resume {
                    cmd.arg("train")
                        .arg("--resume")
                        .arg(run_dir)
                        .arg("--data")
                        .arg(&self.data);
                } else {
                    let config = dir.join(brisk_schema::layout::CONFIG_FILE);
                    std::fs::write(&config, run.config.as_deref().unwrap_or_default())?;
                    cmd.arg("train")
                        .arg("--config")
                        .arg(&config)
                        .arg("--data")
                        .arg(&self.data)
                        .arg("--out")
                        .arg(run_dir);
                }
                cmd.args(["--quiet", "--json"]);
            }
            Kind::Prune | Kind::Distill | Kind::Quantize => {
                cmd.arg(plan.kind.name());
                if plan.kind == Kind::Distill {
                    cmd.arg("--teacher").arg(&baseline_model);
                    if let Some(text) = &run.config {
                        let config = dir.join(brisk_schema::layout::CONFIG_FILE);
                        std::fs::write(&config, text)?;
                        cmd.arg("--config").arg(&config);
                    }
                } else {
                    cmd.arg("--checkpoint").arg(&baseline_model);
                }
                cmd.arg("--data").arg(&self.data);
                if plan.kind == Kind::Quantize {
                    std::fs::create_dir_all(run_dir)?;
                    cmd.arg("--out").arg(run_dir.join("model-int8.safetensors"));
                } else {
                    cmd.arg("--out").arg(run_dir);
                    cmd.args(["--seed", &run.seed.to_string()]);
                }
                cmd.args(&plan.args).arg("--json");
                if self.flip {
                    cmd.arg("--flip");
                }
            }
        }
        Ok(cmd)
    }
}

/// A finished result from a run folder's cache entry.
fn cached(dir: &Path) -> Result<Option<RunResult>> {
    let entry: CacheEntry = serde_json::from_str(&std::fs::read_to_string(dir.join(CACHE_FILE))?)?;
    Ok(entry.result)
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let root = crate::root().map(|r| r.display().to_string()).unwrap_or_default();
    parts.join(" ").replace(&format!("{root}/"), "")
}

/// The dataset: `--data`, or the experiment's folder (packed first when synthetic).
fn dataset(spec: &Spec, o: &ExperimentArgs, brisk: &Path) -> Result<PathBuf> {
    let root = crate::root()?;
    if let Some(d) = &o.data {
        if !d.join("manifest.json").is_file() {
            bail!(
                "--data {}: no packed dataset there (no manifest.json; make one with `brisk pack`)",
                d.display()
            );
        }
        return Ok(d.clone());
    }
    let Some(path) = &spec.data.path else {
        bail!(
            "this experiment needs --data DIR{}",
            spec.data
                .hint
                .as_ref()
                .map(|h| format!(": {h}"))
                .unwrap_or_default()
        );
    };
    let path = root.join(path);
    // Which synthetic set a folder holds is recorded beside it, so a changed
    // `data.synthetic` repacks instead of silently reusing the old images.
    let marker = path.with_extension("synthetic");
    let wanted = spec.data.synthetic.as_ref().map(|s| {
        format!(
            "train={} test={} size={} seed={}",
            s.train, s.test, s.size, s.seed
        )
    });
    let packed = std::fs::read_to_string(&marker).ok();
    if path.join("manifest.json").is_file() && (wanted.is_none() || packed == wanted) {
        return Ok(path);
    }
    let Some(s) = &spec.data.synthetic else {
        bail!(
            "{} holds no packed dataset; give --data DIR{}",
            path.display(),
            spec.data
                .hint
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        );
    };
    eprintln!(
        "xtask: packing the synthetic set ({} train + {} test images of {}x{}) into {}",
        s.train,
        s.test,
        s.size,
        s.size,
        path.display()
    );
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    let status = Command::new(brisk)
        .args([
            "pack",
            "synthetic",
            "--train",
            &s.train.to_string(),
            "--test",
            &s.test.to_string(),
        ])
        .args(["--size", &s.size.to_string(), "--seed", &s.seed.to_string()])
        .arg("--out")
        .arg(&path)
        .status()?;
    if !status.success() {
        bail!("packing the synthetic set failed ({status})");
    }
    std::fs::write(&marker, wanted.unwrap_or_default())?;
    Ok(path)
}

/// `reports/NAME/TIMESTAMP` name: UTC, sortable.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    timestamp_at(secs)
}

/// The timestamp of `secs` seconds after 1970-01-01T00:00:00Z.
fn timestamp_at(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Which variants `--only` selects (all when empty; the baseline too when a selected
/// compression variant starts from its model). Unknown names are an error.
fn selected(plans: &[Plan], only: &[String]) -> Result<Vec<bool>> {
    for name in only {
        if !plans.iter().any(|p| &p.name == name) {
            let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
            bail!("--only {name}: no such variant (have: {})", names.join(", "));
        }
    }
    let needs_baseline = only.is_empty()
        || only.iter().any(|n| n == BASELINE)
        || plans
            .iter()
            .any(|p| only.contains(&p.name) && p.kind != Kind::Train);
    Ok(plans
        .iter()
        .map(|p| only.is_empty() || only.contains(&p.name) || (p.name == BASELINE && needs_baseline))
        .collect())
}

/// The plans with the dataset made part of each one's identity: its manifest (counts,
/// checksums, statistics) joins the hash. Also the manifest's text.
fn with_data_identity(plans: Vec<Plan>, data: &Path) -> Result<(Vec<Plan>, String)> {
    let manifest_path = data.join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let data_id = fnv64(&[&manifest]);
    let plans = plans
        .into_iter()
        .map(|p| Plan {
            hash: fnv64(&[&p.hash, &data_id]),
            ..p
        })
        .collect();
    Ok((plans, manifest))
}

pub fn run(o: &ExperimentArgs) -> Result<()> {
    let Some(name) = &o.name else {
        bail!(
            "which experiment? {} (cargo xtask experiment --help)",
            available().join(", ")
        );
    };
    let path = spec_path(name)?;
    let name = path
        .file_stem()
        .map_or_else(|| name.clone(), |s| s.to_string_lossy().into_owned());
    let (spec, plans) = load(&path)?;
    let repeats = o.repeats.unwrap_or(spec.repeats);
    check_repeats(repeats).context("--repeats")?;
    let wanted = selected(&plans, &o.only)?;
    let started = Instant::now();
    let mpi = mpi_available();
    let brisk = crate::build_brisk(mpi.is_ok())?;
    let data = dataset(&spec, o, &brisk)?;
    let (plans, manifest) = with_data_identity(plans, &data)?;
    let reports = o
        .reports
        .clone()
        .unwrap_or_else(|| crate::root().map(|r| r.join("reports")).unwrap_or_default());
    let runs = reports.join(&name).join("runs");
    std::fs::create_dir_all(&runs)?;
    if let Some(m) = spec.expected_minutes {
        eprintln!(
            "xtask: experiment {name}: {} variants x {repeats} seed(s), about {m:.0} minutes on a 2-core machine at {} seed(s) (cached runs are skipped)",
            plans.len(),
            spec.repeats
        );
    }
    let runner = Runner {
        brisk: brisk.clone(),
        data: data.clone(),
        runs: runs.clone(),
        force: o.force,
        mpi,
        flip: brisk_schema::TrainConfig::from_toml_str(
            plans[0].config.as_deref().unwrap_or_default(),
            BASELINE,
        )
        .is_ok_and(|c| c.eval.flip),
        torch: o.with_pytorch
            && match crate::compare::torch_missing() {
                None => true,
                Some(why) => {
                    eprintln!("xtask: --with-pytorch: PyTorch's recipe skipped: {why}");
                    false
                }
            },
    };
    let selected = plans.iter().zip(&wanted).filter(|(_, w)| **w).map(|(p, _)| p);
    let mut results = runner.variants(selected, repeats)?;
    if o.with_pytorch {
        let m: serde_json::Value = serde_json::from_str(&manifest)?;
        let classes = m["classes"].as_array().map_or(10, Vec::len);
        let image = m["height"].as_u64().unwrap_or(32) as usize;
        crate::compare::add_pytorch(&mut results, &plans, &brisk, classes, image)?;
    }
    let report = Report {
        experiment: name.clone(),
        description: spec.description.clone(),
        data: data.display().to_string(),
        started: timestamp(),
        elapsed_s: started.elapsed().as_secs_f64(),
        git: machine::git_revision(),
        machine: Machine::read(),
        repeats,
        target: spec.target.clone(),
        baseline_config: plans[0].config.clone().unwrap_or_default(),
        variants: results,
    };
    finish(&report, &reports.join(&name), &runs)
}

/// Writes the report and fails when a variant failed.
fn finish(report: &Report, dir: &Path, runs: &Path) -> Result<()> {
    let out = dir.join(&report.started);
    crate::report::write(report, &out)?;
    eprintln!("xtask: report written to {}", out.join("report.md").display());
    let failed: Vec<&str> = report
        .variants
        .iter()
        .filter(|v| v.status() == Status::Failed)
        .map(|v| v.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "variant(s) {} failed (their errors are in the report and in {}/VARIANT/seed-S/stderr.log)",
            failed.join(", "),
            runs.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_reuses_resumes_or_starts_afresh() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Fresh);
        // Started, no checkpoint yet: fresh.
        write_entry(
            d,
            &CacheEntry {
                hash: "h1".into(),
                result: None,
            },
        )?;
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Fresh);
        // Started with a checkpoint: resume (training only, same hash only).
        std::fs::create_dir_all(d.join(RUN_DIR).join(CHECKPOINTS_DIR).join("step-000000010"))?;
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Resume);
        assert_eq!(decide(d, "h1", Kind::Prune, false), CacheDecision::Fresh);
        assert_eq!(decide(d, "h2", Kind::Train, false), CacheDecision::Fresh);
        // Finished: reuse, unless forced or the config changed.
        let mut r = RunResult::new(0, "h1");
        r.status = Status::Done;
        write_entry(
            d,
            &CacheEntry {
                hash: "h1".into(),
                result: Some(r.clone()),
            },
        )?;
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Reuse);
        assert_eq!(decide(d, "h1", Kind::Train, true), CacheDecision::Fresh);
        assert_eq!(decide(d, "h2", Kind::Train, false), CacheDecision::Fresh);
        // A failed result is not reused.
        r.status = Status::Failed;
        write_entry(
            d,
            &CacheEntry {
                hash: "h1".into(),
                result: Some(r),
            },
        )?;
        assert_ne!(decide(d, "h1", Kind::Train, false), CacheDecision::Reuse);
        // A damaged entry is ignored.
        std::fs::write(d.join(CACHE_FILE), "{")?;
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Fresh);
        Ok(())
    }

    #[test]
    fn timestamps_are_utc_and_sortable() {
        // Dates checked against `date -u -d @SECS`: the epoch, a leap day, the turn of a
        // century that is a leap year, and a time of day.
        assert_eq!(timestamp_at(0), "19700101T000000Z");
        assert_eq!(timestamp_at(951_782_400), "20000229T000000Z");
        assert_eq!(timestamp_at(1_709_210_096), "20240229T123456Z");
        assert_eq!(timestamp_at(1_798_761_599), "20261231T235959Z");
        // Later times sort later as text.
        let mut ts: Vec<String> = [1_798_761_599, 0, 951_782_400, 1_709_210_096]
            .map(timestamp_at)
            .into();
        ts.sort();
        assert_eq!(ts.first().map(String::as_str), Some("19700101T000000Z"));
        assert_eq!(ts.last().map(String::as_str), Some("20261231T235959Z"));
        let t = timestamp();
        assert_eq!(t.len(), 16);
    }
}
