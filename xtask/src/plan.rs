//! An experiment file (`experiments/NAME.toml`: a dataset, a baseline training config,
//! variants as overrides or compression steps) and the plan made from it: each variant's
//! resolved config and cache key, checked against brisk's config types.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use brisk_schema::TrainConfig;
use serde::{Deserialize, Serialize};

/// The experiment file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// One paragraph: what the experiment asks.
    pub description: String,
    /// Expected run time on the 2-core development machine, for the user's information.
    #[serde(default)]
    pub expected_minutes: Option<f64>,
    /// Runs per variant, each with its own seed (the baseline config's seed, +1, +2, …);
    /// `--repeats` overrides it. By default, 1.
    #[serde(default = "one")]
    pub repeats: usize,
    /// The accuracy every training variant's time is measured to. By default, the
    /// baseline's mean final top-1.
    #[serde(default)]
    pub target: Option<Target>,
    pub data: DataSpec,
    /// A brisk training config (docs/training.md); `data` and `out` are set per run.
    pub baseline: toml::Table,
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
}

/// The test top-1 the report's headline measures time to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A fraction in (0, 1).
    pub top1: f64,
    /// How it was chosen, in a sentence (the report quotes it).
    pub why: String,
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
    /// Config overrides (dotted keys, TOML values), for training variants and a distilled
    /// student's training.
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

impl Kind {
    /// The lowercase name (the experiment file's and the report's), which is also the
    /// `brisk` subcommand of a compression variant.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Train => "train",
            Kind::Prune => "prune",
            Kind::Distill => "distill",
            Kind::Quantize => "quantize",
        }
    }

    /// The name a compression variant's cache key starts with (as earlier reports
    /// hashed it, so their cached variants stay valid).
    fn hash_name(self) -> &'static str {
        match self {
            Kind::Train => "Train",
            Kind::Prune => "Prune",
            Kind::Distill => "Distill",
            Kind::Quantize => "Quantize",
        }
    }
}

/// A variant ready to run: its resolved config and its cache key.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub note: String,
    pub kind: Kind,
    pub ranks: usize,
    /// The full training config (train and distill variants) as TOML, without data/out.
    pub config: Option<String>,
    pub args: Vec<String>,
    pub control: Option<String>,
    /// The first run's seed (the training config's; the baseline's for compression
    /// variants, whose run k starts from the baseline's run k).
    pub seed: u64,
    pub hash: String,
}

/// One run of a variant: its seed, its training config with that seed, its cache key.
#[derive(Debug)]
pub struct RunPlan {
    pub seed: u64,
    pub config: Option<String>,
    pub hash: String,
}

impl Plan {
    /// The seeds of `repeats` runs.
    pub fn seeds(&self, repeats: usize) -> impl Iterator<Item = u64> + '_ {
        (0..repeats as u64).map(|k| self.seed + k)
    }

    /// The run with `seed`: the config with its seed replaced, and a cache key joining
    /// the variant's and the seed.
    pub fn run(&self, seed: u64) -> Result<RunPlan> {
        let config = match &self.config {
            Some(text) => {
                let mut c = TrainConfig::from_toml_str(text, &self.name)?;
                c.seed = seed;
                Some(c.to_toml()?)
            }
            None => None,
        };
        Ok(RunPlan {
            seed,
            config,
            hash: fnv64(&[&self.hash, "seed", &seed.to_string()]),
        })
    }
}

/// Most runs per variant an experiment may ask for.
pub const MAX_REPEATS: usize = 100;

/// Checks a repeat count.
pub fn check_repeats(n: usize) -> Result<()> {
    if n == 0 || n > MAX_REPEATS {
        bail!("repeats = {n}: give 1 to {MAX_REPEATS} runs per variant");
    }
    Ok(())
}

/// The name of the implicit first variant.
pub const BASELINE: &str = "baseline";

/// Reads and checks an experiment file: unique names, every override valid against
/// brisk's config (errors name the variant and the field).
pub fn load(path: &Path) -> Result<(Spec, Vec<Plan>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec: Spec = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let plans = plan(&spec).with_context(|| format!("{}", path.display()))?;
    check_repeats(spec.repeats).with_context(|| format!("{}", path.display()))?;
    if let Some(t) = &spec.target {
        if !(t.top1 > 0.0 && t.top1 < 1.0) {
            bail!(
                "{}: target.top1 = {} must be a fraction in (0, 1)",
                path.display(),
                t.top1
            );
        }
    }
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
    for forbidden in ["data", "out"] {
        if spec.baseline.contains_key(forbidden) {
            bail!("[baseline] must not set `{forbidden}`: the experiment sets it for each run");
        }
    }
    let base_text = toml::to_string(&spec.baseline)?;
    let base = TrainConfig::from_toml_str(&base_text, "baseline").context("[baseline]")?;
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
        seed: base.seed,
        hash: base_hash.clone(),
    }];
    for v in &spec.variants {
        check_name(v, &plans)?;
        let (config, hash, seed) = match v.kind {
            Kind::Train => training_variant(v, &base)?,
            kind => {
                let (config, hash) = compression_variant(v, kind, &base, &base_hash)?;
                (config, hash, base.seed)
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
            seed,
            hash,
        });
    }
    check_controls(&plans)?;
    Ok(plans)
}

/// A variant's name names a folder and must be unique.
fn check_name(v: &VariantSpec, plans: &[Plan]) -> Result<()> {
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
    Ok(())
}

/// A training variant: the baseline with `set` applied, checked; its TOML, hash and seed.
fn training_variant(v: &VariantSpec, base: &TrainConfig) -> Result<(Option<String>, String, u64)> {
    if !v.args.is_empty() {
        bail!(
            "variant {}: `args` is for prune/distill/quantize; a training variant uses `set`",
            v.name
        );
    }
    let c = with_set(v, base)?;
    let text = c.to_toml()?;
    let hash = fnv64(&["train", &text, &v.ranks.to_string()]);
    Ok((Some(text), hash, c.seed))
}

/// The baseline with the variant's `set` applied, checked.
fn with_set(v: &VariantSpec, base: &TrainConfig) -> Result<TrainConfig> {
    let mut c = base.clone();
    for (key, value) in &v.set {
        if key == "data" || key == "out" {
            bail!("variant {}: `{key}` is set by the experiment", v.name);
        }
        c.set(key, value.clone())
            .with_context(|| format!("variant {}", v.name))?;
    }
    c.validate().with_context(|| format!("variant {}", v.name))?;
    Ok(c)
}

/// A compression variant: its hash joins the baseline's (its starting model), its args and,
/// for a distilled student, its training config (the baseline with `set` applied: the
/// student trains as the same student trained alone would).
fn compression_variant(
    v: &VariantSpec,
    kind: Kind,
    base: &TrainConfig,
    base_hash: &str,
) -> Result<(Option<String>, String)> {
    if v.ranks != 1 || (!v.set.is_empty() && kind != Kind::Distill) {
        bail!(
            "variant {}: `ranks` is for training variants and `set` for training and distill variants; {} takes `args`",
            v.name,
            kind.name()
        );
    }
    if v.args.iter().any(|a| a == "--seed" || a.starts_with("--seed=")) {
        bail!(
            "variant {}: `--seed` is set by the experiment (run k starts from the baseline's run k, with its seed)",
            v.name
        );
    }
    let config = match kind {
        Kind::Distill => {
            if v.args
                .iter()
                .any(|a| a == "--config" || a.starts_with("--config="))
            {
                bail!(
                    "variant {}: `--config` is set by the experiment (the baseline with `set` applied)",
                    v.name
                );
            }
            Some(with_set(v, base)?.to_toml()?)
        }
        _ => None,
    };
    let mut parts = vec![kind.hash_name(), base_hash];
    parts.extend(config.as_deref());
    parts.extend(v.args.iter().map(String::as_str));
    let hash = fnv64(&parts);
    Ok((config, hash))
}

/// Every `control` names another variant.
fn check_controls(plans: &[Plan]) -> Result<()> {
    for p in plans {
        if let Some(c) = &p.control {
            if c == &p.name || !plans.iter().any(|q| &q.name == c) {
                bail!(
                    "variant {}: control {c:?} is not another variant of this experiment",
                    p.name
                );
            }
        }
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
    fn each_seed_is_its_own_run_with_its_own_cache_key() -> Result<()> {
        let s = spec(&good().replace("epochs = 2", "epochs = 2\nseed = 10"))?;
        assert_eq!(s.repeats, 1);
        let plans = plan(&s)?;
        let seeds: Vec<u64> = plans[1].seeds(3).collect();
        assert_eq!(seeds, vec![10, 11, 12]);
        // A compression variant counts from the baseline's seed (run k uses its model k).
        assert_eq!(plans[2].seeds(2).collect::<Vec<_>>(), vec![10, 11]);
        let runs: Vec<RunPlan> = seeds.iter().map(|&k| plans[1].run(k)).collect::<Result<_>>()?;
        for r in &runs {
            let c = TrainConfig::from_toml_str(r.config.as_deref().unwrap_or_default(), "run")?;
            assert_eq!(c.seed, r.seed);
            assert_eq!(
                c.precision,
                TrainConfig::from_toml_str(plans[1].config.as_deref().unwrap_or_default(), "v")?.precision
            );
        }
        // Keys differ by seed and are stable; raising the repeats keeps the first keys.
        assert_ne!(runs[0].hash, runs[1].hash);
        assert_eq!(runs[2].hash, plans[1].run(12)?.hash);
        assert!(plans[2].run(10)?.config.is_none());
        // `repeats` in the file, checked.
        let five = spec(&format!("repeats = 5\n{}", good()))?;
        assert_eq!(five.repeats, 5);
        assert!(check_repeats(0).is_err() && check_repeats(MAX_REPEATS + 1).is_err());
        Ok(())
    }

    #[test]
    fn a_distilled_student_trains_with_the_baseline_config_and_its_set() -> Result<()> {
        let with = |set: &str| -> Result<Vec<Plan>> {
            plan(&spec(
                &(good() + "[[variants]]\nname = \"d\"\nkind = \"distill\"\n" + set),
            )?)
        };
        let plans = with("set = { \"model.width\" = 0.125 }\n")?;
        let run = plans[3].run(7)?;
        let c = TrainConfig::from_toml_str(run.config.as_deref().unwrap_or_default(), "d")?;
        assert_eq!((c.epochs, c.model.width, c.seed), (2, Some(0.125), 7));
        // The student's config is part of the cache key; a quantized model has none.
        assert_ne!(
            plans[3].hash,
            with("set = { \"model.width\" = 0.0625 }\n")?[3].hash
        );
        assert_ne!(plans[3].hash, with("")?[3].hash);
        assert!(plans[2].config.is_none());
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
            (
                good() + "[[variants]]\nname = \"s\"\nkind = \"prune\"\nargs = [\"--seed\", \"3\"]\n",
                "set by the experiment",
            ),
            (
                good() + "[[variants]]\nname = \"p\"\nkind = \"prune\"\nset = { epochs = 1 }\n",
                "takes `args`",
            ),
            (
                good() + "[[variants]]\nname = \"d\"\nkind = \"distill\"\nargs = [\"--config\", \"x\"]\n",
                "set by the experiment",
            ),
            (
                good() + "[[variants]]\nname = \"d\"\nkind = \"distill\"\nset = { \"model.colour\" = 1 }\n",
                "variant d",
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

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: std::env::var("BRISK_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200),
            failure_persistence: None,
            ..Default::default()
        })]

        /// The fuzz campaign's experiment files: the shipped quick experiment with bytes
        /// flipped, cut or overwritten reads as a plan or an error, never a panic.
        #[test]
        fn damaged_experiment_files_are_errors_or_plans(
            at in proptest::prelude::any::<usize>(),
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..8),
            cut in proptest::prelude::any::<bool>(),
        ) {
            let path = crate::root().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?
                .join("experiments/quick.toml");
            let mut text = std::fs::read(&path).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let at = at % text.len();
            if cut {
                text.truncate(at);
            } else {
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(x) = text.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            let dir = tempfile::tempdir().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let damaged = dir.path().join("damaged.toml");
            std::fs::write(&damaged, &text).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            // An error or a plan; a panic fails the case.
            let _ = load(&damaged);
        }
    }
}
