//! `cargo xtask experiment NAME`: runs an ablation (`experiments/NAME.toml`: a dataset, a
//! baseline training config, variants as overrides or compression steps) through the
//! `brisk` binary, caches finished variants by config hash, resumes interrupted ones,
//! and writes a report (`reports/NAME/TIMESTAMP/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use brisk_train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::report::{self, Machine, Report, VariantResult};

pub const USAGE: &str = "\
Usage: cargo xtask experiment NAME [--data DIR] [--only V1,V2] [--force] [--with-pytorch]

NAME is experiments/NAME.toml (or a path to an experiment file). Each variant's run is
kept in reports/NAME/runs/VARIANT/ and skipped next time while its config hash is the
same (--force reruns); an interrupted training run resumes from its checkpoint. The
report goes to reports/NAME/TIMESTAMP/ (report.md, report.html, results.json,
results.csv, SVG plots).
  --data DIR       packed dataset to use instead of the experiment's own
  --only V1,V2     run only these variants (the baseline too, when a variant needs it)
  --force          rerun variants even when a cached result matches
  --with-pytorch   add PyTorch's img/s for the same model, batch and precision, and
                   the brisk/PyTorch ratio (needs python3 with torch and torchvision)
  --reports DIR    where reports/ goes (default: the repository's reports/)
";

/// The experiment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// One paragraph: what the experiment asks.
    pub description: String,
    /// Expected run time on the 2-core development machine, for the user's information.
    #[serde(default)]
    pub expected_minutes: Option<f64>,
    pub data: DataSpec,
    /// A brisk training config (docs/training.md); `data` and `out` are set per run.
    pub baseline: toml::Table,
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
}

/// Where the dataset comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A packed dataset folder (relative to the repository root); `--data` replaces it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Pack brisk's synthetic set at `path` when it is absent.
    #[serde(default)]
    pub synthetic: Option<Synthetic>,
    /// Said when neither --data nor a packable path is available.
    #[serde(default)]
    pub hint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Synthetic {
    pub train: usize,
    pub test: usize,
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_size() -> usize {
    32
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A training run: the baseline config with `set` applied.
    #[default]
    Train,
    /// `brisk prune` of the baseline's model, with `args`.
    Prune,
    /// `brisk distill` from the baseline's model as teacher, with `args`.
    Distill,
    /// `brisk quantize` of the baseline's model.
    Quantize,
}

/// One variant: a change to the baseline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// What the variant changes, in words (shown in the report).
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub kind: Kind,
    /// Config overrides (dotted keys, TOML values), for training variants.
    #[serde(default)]
    pub set: toml::Table,
    /// MPI ranks (training variants; > 1 needs OpenMPI and a brisk built with `mpi`).
    #[serde(default = "one")]
    pub ranks: usize,
    /// Extra flags for `brisk prune` / `brisk distill` / `brisk quantize`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Another variant this one is also compared with in the reading (a distilled
    /// student against the same student trained alone, say).
    #[serde(default)]
    pub control: Option<String>,
}

fn one() -> usize {
    1
}

/// A variant ready to run: its resolved config and its cache key.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub note: String,
    pub kind: Kind,
    pub ranks: usize,
    /// The full training config (train variants) as TOML, without data/out.
    pub config: Option<String>,
    pub args: Vec<String>,
    pub control: Option<String>,
    pub hash: String,
}

/// The name of the implicit first variant.
pub const BASELINE: &str = "baseline";

/// Reads and checks an experiment file: unique names, every override valid against
/// brisk's config (errors name the variant and the field).
pub fn load(path: &Path) -> Result<(Spec, Vec<Plan>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec: Spec = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let plans = plan(&spec).with_context(|| format!("{}", path.display()))?;
    Ok((spec, plans))
}

/// FNV-1a, 64 bits: a stable hash for cache keys (std's hasher may change between
/// Rust versions).
pub fn fnv64(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The variants in run order (baseline first), with resolved configs and hashes.
pub fn plan(spec: &Spec) -> Result<Vec<Plan>> {
    let base_text = toml::to_string(&spec.baseline)?;
    let base = TrainConfig::from_toml_str(&base_text, "baseline").context("[baseline]")?;
    for forbidden in ["data", "out"] {
        if spec.baseline.contains_key(forbidden) {
            bail!("[baseline] must not set `{forbidden}`: the experiment sets it for each run");
        }
    }
    let base_config = base.to_toml()?;
    let base_hash = fnv64(&["train", &base_config, "1"]);
    let mut plans = vec![Plan {
        name: BASELINE.into(),
        note: "the baseline config".into(),
        kind: Kind::Train,
        ranks: 1,
        config: Some(base_config),
        args: Vec::new(),
        control: None,
        hash: base_hash.clone(),
    }];
    for v in &spec.variants {
        let ok_name = !v.name.is_empty()
            && v.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok_name {
            bail!(
                "variant name {:?}: use letters, digits, '-', '_' and '.' only (it names a folder)",
                v.name
            );
        }
        if plans.iter().any(|p| p.name == v.name) {
            bail!(
                "variant name {:?} is used twice (or is the reserved `baseline`)",
                v.name
            );
        }
        if v.ranks == 0 {
            bail!("variant {}: ranks must be at least 1", v.name);
        }
        let (config, hash) = match v.kind {
            Kind::Train => {
                if !v.args.is_empty() {
                    bail!(
                        "variant {}: `args` is for prune/distill/quantize; a training variant uses `set`",
                        v.name
                    );
                }
                let mut c = base.clone();
                for (key, value) in &v.set {
                    if key == "data" || key == "out" {
                        bail!("variant {}: `{key}` is set by the experiment", v.name);
                    }
                    c = c
                        .with_override(key, &value.to_string())
                        .with_context(|| format!("variant {}", v.name))?;
                }
                c.validate().with_context(|| format!("variant {}", v.name))?;
                let text = c.to_toml()?;
                let hash = fnv64(&["train", &text, &v.ranks.to_string()]);
                (Some(text), hash)
            }
            kind => {
                if !v.set.is_empty() || v.ranks != 1 {
                    bail!(
                        "variant {}: `set` and `ranks` are for training variants; {kind:?} takes `args`",
                        v.name
                    );
                }
                let kind_name = format!("{kind:?}");
                let mut parts = vec![kind_name.as_str(), base_hash.as_str()];
                parts.extend(v.args.iter().map(String::as_str));
                (None, fnv64(&parts))
            }
        };
        plans.push(Plan {
            name: v.name.clone(),
            note: v.note.clone(),
            kind: v.kind,
            ranks: v.ranks,
            config,
            args: v.args.clone(),
            control: v.control.clone(),
            hash,
        });
    }
    for p in &plans {
        if let Some(c) = &p.control {
            if c == &p.name || !plans.iter().any(|q| &q.name == c) {
                bail!(
                    "variant {}: control {c:?} is not another variant of this experiment",
                    p.name
                );
            }
        }
    }
    Ok(plans)
}

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    name: String,
    data: Option<PathBuf>,
    only: Vec<String>,
    force: bool,
    with_pytorch: bool,
    reports: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n\n{USAGE}"));
        match a.as_str() {
            "--data" => o.data = Some(PathBuf::from(value()?)),
            "--only" => o.only = value()?.split(',').map(|s| s.trim().to_string()).collect(),
            "--reports" => o.reports = Some(PathBuf::from(value()?)),
            "--force" => o.force = true,
            "--with-pytorch" => o.with_pytorch = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            flag if flag.starts_with('-') => bail!("unknown flag `{flag}`\n\n{USAGE}"),
            name if o.name.is_empty() => o.name = name.to_string(),
            extra => bail!("unexpected argument `{extra}`\n\n{USAGE}"),
        }
    }
    if o.name.is_empty() {
        bail!("which experiment? {}\n\n{USAGE}", available().join(", "));
    }
    Ok(o)
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

/// What the cache keeps for a variant: its hash and, once finished, its result.
#[derive(Debug, Serialize, Deserialize)]
pub struct CacheEntry {
    pub hash: String,
    pub result: Option<VariantResult>,
}

pub const CACHE_FILE: &str = "variant.json";

/// What to do with a variant's run folder.
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
    if entry
        .result
        .as_ref()
        .is_some_and(|r| r.status == report::Status::Done)
    {
        return CacheDecision::Reuse;
    }
    let has_checkpoint = std::fs::read_dir(dir.join("run/checkpoints"))
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-"))));
    if kind == Kind::Train && has_checkpoint {
        CacheDecision::Resume
    } else {
        CacheDecision::Fresh
    }
}

fn write_entry(dir: &Path, entry: &CacheEntry) -> Result<()> {
    let path = dir.join(CACHE_FILE);
    let tmp = dir.join(format!("{CACHE_FILE}.partial"));
    std::fs::write(&tmp, serde_json::to_string_pretty(entry)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
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

struct Runner<'a> {
    brisk: PathBuf,
    data: PathBuf,
    runs: PathBuf,
    force: bool,
    mpi: std::result::Result<(), String>,
    plans: &'a [Plan],
}

impl Runner<'_> {
    fn dir(&self, name: &str) -> PathBuf {
        self.runs.join(name)
    }

    /// Runs (or reuses) one variant.
    fn variant(&self, plan: &Plan, baseline: Option<&VariantResult>) -> Result<VariantResult> {
        let dir = self.dir(&plan.name);
        let decision = decide(&dir, &plan.hash, plan.kind, self.force);
        if decision == CacheDecision::Reuse {
            let entry: CacheEntry = serde_json::from_str(&std::fs::read_to_string(dir.join(CACHE_FILE))?)?;
            if let Some(mut r) = entry.result {
                // The note and control are presentation: take the file's current ones.
                r.note = plan.note.clone();
                r.control = plan.control.clone();
                eprintln!("xtask: {}: cached (config {}), not rerun", plan.name, plan.hash);
                return Ok(r);
            }
        }
        let mut result = VariantResult::new(&plan.name, &plan.note, plan.kind, &plan.hash, plan.ranks);
        result.control = plan.control.clone();
        if plan.ranks > 1 {
            if let Err(why) = &self.mpi {
                eprintln!("xtask: {}: skipped: {why}", plan.name);
                result.skip(why.clone());
                return Ok(result);
            }
        }
        if plan.kind != Kind::Train && baseline.is_none_or(|b| b.status != report::Status::Done) {
            result.skip("the baseline did not finish, so there is no model to start from".into());
            return Ok(result);
        }
        if decision == CacheDecision::Fresh && dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        write_entry(
            &dir,
            &CacheEntry {
                hash: plan.hash.clone(),
                result: None,
            },
        )?;
        let run = dir.join("run");
        let mut cmd = self.command(plan, &dir, &run, decision == CacheDecision::Resume)?;
        eprintln!(
            "xtask: {}: {}{}",
            plan.name,
            if decision == CacheDecision::Resume {
                "resuming from its checkpoint: "
            } else {
                ""
            },
            describe(&cmd)
        );
        let resumed = decision == CacheDecision::Resume;
        let (stdout, stderr, exit, wall, peak) = measure(&mut cmd)?;
        std::fs::write(dir.join("stderr.log"), &stderr)?;
        std::fs::write(dir.join("stdout.log"), &stdout)?;
        if exit == Exit::Interrupted {
            bail!(
                "{} was interrupted (its checkpoint is kept): run the same command again to resume the experiment",
                plan.name
            );
        }
        if exit == Exit::Failure {
            result.fail(format!("`{}` failed:\n{}", describe(&cmd), tail(&stderr, 12)));
            eprintln!(
                "xtask: {}: FAILED (see {})",
                plan.name,
                dir.join("stderr.log").display()
            );
        } else {
            result.wall_s = wall;
            let peak = if plan.ranks > 1 { None } else { peak };
            report::fill(&mut result, plan, &run, &stdout, peak)?;
            if resumed {
                // This command ran only the rest; the run's own clock spans every part.
                result.wall_s = result.elapsed_s.unwrap_or(wall).max(wall);
            }
            eprintln!(
                "xtask: {}: top-1 {:.2}% in {:.0} s",
                plan.name,
                100.0 * result.top1.unwrap_or(f64::NAN),
                wall
            );
        }
        if let Some(c) = &plan.config {
            result.config = Some(c.clone());
        }
        write_entry(
            &dir,
            &CacheEntry {
                hash: plan.hash.clone(),
                result: Some(result.clone()),
            },
        )?;
        Ok(result)
    }

    /// The brisk command line of a variant.
    fn command(&self, plan: &Plan, dir: &Path, run: &Path, resume: bool) -> Result<Command> {
        let baseline_model = self.dir(BASELINE).join("run/model.safetensors");
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
                        .arg(run)
                        .arg("--data")
                        .arg(&self.data);
                } else {
                    let config = dir.join("config.toml");
                    std::fs::write(&config, plan.config.as_deref().unwrap_or_default())?;
                    cmd.arg("train")
                        .arg("--config")
                        .arg(&config)
                        .arg("--data")
                        .arg(&self.data)
                        .arg("--out")
                        .arg(run);
                }
                cmd.args(["--quiet", "--json"]);
            }
            Kind::Prune | Kind::Distill | Kind::Quantize => {
                let sub = match plan.kind {
                    Kind::Prune => "prune",
                    Kind::Distill => "distill",
                    _ => "quantize",
                };
                cmd.arg(sub);
                if plan.kind == Kind::Distill {
                    cmd.arg("--teacher").arg(&baseline_model);
                } else {
                    cmd.arg("--checkpoint").arg(&baseline_model);
                }
                cmd.arg("--data").arg(&self.data);
                if plan.kind == Kind::Quantize {
                    std::fs::create_dir_all(run)?;
                    cmd.arg("--out").arg(run.join("model-int8.safetensors"));
                } else {
                    cmd.arg("--out").arg(run);
                }
                cmd.args(&plan.args).arg("--json");
            }
        }
        Ok(cmd)
    }
}

fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let root = crate::root().map(|r| r.display().to_string()).unwrap_or_default();
    parts.join(" ").replace(&format!("{root}/"), "")
}

/// The dataset: `--data`, or the experiment's folder (packed first when synthetic).
fn dataset(spec: &Spec, o: &Options, brisk: &Path) -> Result<PathBuf> {
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

/// Builds the release `brisk` (with MPI when it is installed) and returns its path.
fn build_brisk(mpi: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--release", "-p", "brisk-cli"];
    if mpi {
        args.extend(["--features", "mpi"]);
    }
    crate::cargo(&args)?;
    Ok(crate::root()?.join("target/release/brisk"))
}

/// `reports/NAME/TIMESTAMP` name: UTC, sortable.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
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

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let path = spec_path(&o.name)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| o.name.clone());
    let (spec, plans) = load(&path)?;
    for only in &o.only {
        if !plans.iter().any(|p| &p.name == only) {
            bail!(
                "--only {only}: no such variant (have: {})",
                plans
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let started = Instant::now();
    let mpi = mpi_available();
    let brisk = build_brisk(mpi.is_ok())?;
    let data = dataset(&spec, &o, &brisk)?;
    // The dataset is part of every variant's identity: its manifest (counts, checksums,
    // statistics) joins the hash.
    let manifest = std::fs::read_to_string(data.join("manifest.json"))
        .with_context(|| format!("cannot read {}", data.join("manifest.json").display()))?;
    let data_id = fnv64(&[&manifest]);
    let plans: Vec<Plan> = plans
        .into_iter()
        .map(|p| Plan {
            hash: fnv64(&[&p.hash, &data_id]),
            ..p
        })
        .collect();
    let root = crate::root()?;
    let reports = o.reports.clone().unwrap_or_else(|| root.join("reports"));
    let runs = reports.join(&name).join("runs");
    std::fs::create_dir_all(&runs)?;
    if let Some(m) = spec.expected_minutes {
        eprintln!(
            "xtask: experiment {name}: {} variants, about {m:.0} minutes on a 2-core machine (cached variants are skipped)",
            plans.len()
        );
    }
    let runner = Runner {
        brisk: brisk.clone(),
        data: data.clone(),
        runs: runs.clone(),
        force: o.force,
        mpi,
        plans: &plans,
    };
    let needs_baseline = o.only.is_empty()
        || o.only.iter().any(|n| n == BASELINE)
        || runner
            .plans
            .iter()
            .any(|p| o.only.contains(&p.name) && p.kind != Kind::Train);
    let mut results: Vec<VariantResult> = Vec::new();
    for plan in runner.plans {
        let wanted =
            o.only.is_empty() || o.only.contains(&plan.name) || (plan.name == BASELINE && needs_baseline);
        if !wanted {
            continue;
        }
        let baseline = results.iter().find(|r| r.name == BASELINE);
        let r = runner.variant(plan, baseline)?;
        results.push(r);
    }
    if o.with_pytorch {
        let manifest: serde_json::Value = serde_json::from_str(&manifest)?;
        let classes = manifest["classes"].as_array().map_or(10, Vec::len);
        let image = manifest["height"].as_u64().unwrap_or(32) as usize;
        let plans: Vec<&Plan> = runner.plans.iter().collect();
        crate::report::add_pytorch(&mut results, &plans, &brisk, classes, image)?;
    }
    let machine = Machine::read();
    let report = Report {
        experiment: name.clone(),
        description: spec.description.clone(),
        data: data.display().to_string(),
        started: timestamp(),
        elapsed_s: started.elapsed().as_secs_f64(),
        git: report::git_revision(),
        machine,
        baseline_config: plans[0].config.clone().unwrap_or_default(),
        variants: results,
    };
    let out = reports.join(&name).join(&report.started);
    report::write(&report, &out)?;
    eprintln!("xtask: report written to {}", out.join("report.md").display());
    let failed: Vec<&str> = report
        .variants
        .iter()
        .filter(|v| v.status == report::Status::Failed)
        .map(|v| v.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "variant(s) {} failed (their errors are in the report and in {}/VARIANT/stderr.log)",
            failed.join(", "),
            runs.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<Spec> {
        Ok(toml::from_str(text)?)
    }

    fn good() -> String {
        "description = \"test\"\n[data]\npath = \"x\"\n[baseline]\nepochs = 2\nmodel = { width = 0.25 }\n\
         [[variants]]\nname = \"bf16\"\nset = { \"precision.mode\" = \"mixed-bf16\" }\n\
         [[variants]]\nname = \"int8\"\nkind = \"quantize\"\n"
            .to_string()
    }

    #[test]
    fn variants_resolve_against_the_baseline_with_stable_hashes() -> Result<()> {
        let s = spec(&good())?;
        let plans = plan(&s)?;
        assert_eq!(plans.len(), 3);
        assert_eq!(plans[0].name, BASELINE);
        assert!(plans[1]
            .config
            .as_deref()
            .is_some_and(|c| c.contains("mixed-bf16")));
        assert!(plans[1]
            .config
            .as_deref()
            .is_some_and(|c| c.contains("epochs = 2")));
        assert_eq!(plans[2].kind, Kind::Quantize);
        // Same file, same hashes; any change to the baseline changes every hash.
        let again = plan(&spec(&good())?)?;
        assert!(plans.iter().zip(&again).all(|(a, b)| a.hash == b.hash));
        let changed = plan(&spec(&good().replace("epochs = 2", "epochs = 3"))?)?;
        assert!(plans.iter().zip(&changed).all(|(a, b)| a.hash != b.hash));
        assert_ne!(plans[0].hash, plans[1].hash);
        Ok(())
    }

    #[test]
    fn bad_experiments_are_explained() -> Result<()> {
        let cases = [
            (good().replace("mixed-bf16", "f64"), "bf16"),
            (
                good().replace("\"precision.mode\"", "\"precision.colour\""),
                "bf16",
            ),
            (
                good().replace("name = \"bf16\"", "name = \"baseline\""),
                "used twice",
            ),
            (good().replace("name = \"int8\"", "name = \"a b\""), "letters"),
            (good().replace("epochs = 2", "epochs = 0"), "epochs"),
            (
                good() + "[[variants]]\nname = \"p\"\nkind = \"prune\"\nranks = 2\n",
                "args",
            ),
            (
                good() + "[[variants]]\nname = \"t\"\nset = { out = \"x\" }\n",
                "set by the experiment",
            ),
            (
                good() + "[[variants]]\nname = \"k\"\nkind = \"distill\"\ncontrol = \"nope\"\n",
                "control",
            ),
        ];
        for (text, want) in cases {
            let e = plan(&spec(&text)?).expect_err("must fail");
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{msg:?} should mention {want:?}");
        }
        // Unknown top-level keys and kinds are refused by the parser.
        assert!(spec(&(good() + "colour = 1\n")).is_err());
        assert!(spec(&good().replace("\"quantize\"", "\"shrink\"")).is_err());
        Ok(())
    }

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
        std::fs::create_dir_all(d.join("run/checkpoints/step-000000010"))?;
        assert_eq!(decide(d, "h1", Kind::Train, false), CacheDecision::Resume);
        assert_eq!(decide(d, "h1", Kind::Prune, false), CacheDecision::Fresh);
        assert_eq!(decide(d, "h2", Kind::Train, false), CacheDecision::Fresh);
        // Finished: reuse, unless forced or the config changed.
        let mut r = VariantResult::new("v", "", Kind::Train, "h1", 1);
        r.status = report::Status::Done;
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
        r.status = report::Status::Failed;
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
    fn the_shipped_experiments_parse() -> Result<()> {
        let dir = crate::root()?.join("experiments");
        let mut n = 0;
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let (_, plans) = load(&p)?;
                assert!(plans.len() > 1, "{}", p.display());
                n += 1;
            }
        }
        assert!(n >= 2);
        Ok(())
    }

    #[test]
    fn timestamps_are_utc_and_sortable() {
        let t = timestamp();
        assert_eq!(t.len(), 16);
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[8] == b'T');
    }
}
