//! `TrainConfig`: every setting of a training run, read from TOML and changed by dotted
//! keys (`set("optimizer.momentum", value)`; the command line's flags and `--set`, and
//! the experiment runner's variants, all go through it), and the optimisers' settings.

use std::path::{Path, PathBuf};

use brisk_precision::{PrecisionPolicy, ScalerConfig};
use brisk_spec::ModelSpec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedule::{BatchSchedule, LrScaling, LrSchedule, LrShape};

/// Everything a training run needs. Every field has a default, so a config file names
/// only what it changes; unknown fields are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Packed dataset folder (`brisk pack …`). No default: required to train.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Output folder: config, metrics.jsonl, checkpoints, final model. No default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// Seeds the initial weights, the sample order and the augmentations. By default, 0.
    pub seed: u64,
    /// Passes over the training split. By default, 30.
    pub epochs: usize,
    /// Compute threads; 0 uses every core (shared between the ranks on a host in a
    /// distributed run). By default, 0.
    pub threads: usize,
    /// Where the run computes: "cpu", or "cuda" / "cuda:N" (GPU N). By default, the CPU.
    #[serde(skip_serializing_if = "DeviceChoice::is_cpu")]
    pub device: DeviceChoice,
    /// Label smoothing ε of the cross-entropy, in [0, 1). By default, 0.
    pub label_smoothing: f64,
    /// Steps between `step` events in metrics.jsonl and plain progress lines. By default, 50.
    pub log_every: usize,
    /// Run each step on brisk's engine (no autograd graph) when the network allows it:
    /// f32, brisk's CPU kernels, per-rank batch statistics; false keeps candle's graph.
    /// Both compute the same step to rounding. By default, true.
    pub engine: bool,
    /// Splits each batch on the engine into this many slices run side by side, one share
    /// of the compute threads each, batch-norm statistics shared across them (in-process
    /// data parallelism: the same step to rounding); 0 splits into one slice per thread
    /// when the model is small for its images, where that pays. By default, 0.
    pub slices: usize,
    pub model: ModelChoice,
    /// An exponential moving average of the weights, evaluated and saved in their place.
    /// By default, off.
    pub ema: EmaSettings,
    /// Which layers compute in half precision (`mode`: f32, bf16, f16, mixed-bf16,
    /// mixed-f16; `overrides`: layer name → dtype). By default, f32.
    pub precision: PrecisionPolicy,
    /// The dynamic loss scaler used when any layer computes in f16. By default,
    /// PyTorch GradScaler's settings.
    pub loss_scaler: ScalerConfig,
    /// Batch size by epoch. By default, fixed at 128.
    pub batch: BatchSchedule,
    /// Whether the learning rate follows a growing batch. By default, held.
    pub lr_scaling: LrScaling,
    pub optimizer: OptimizerConfig,
    pub lr: LrConfig,
    pub loader: LoaderSettings,
    pub eval: EvalSettings,
    pub checkpoint: CheckpointSettings,
    /// Data-parallel settings, used when the run has several ranks (`mpirun`).
    pub distributed: DistributedSettings,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: None,
            out: None,
            seed: 0,
            epochs: 30,
            threads: 0,
            device: DeviceChoice::Cpu,
            label_smoothing: 0.0,
            log_every: 50,
            engine: true,
            slices: 0,
            model: ModelChoice::default(),
            ema: EmaSettings::default(),
            precision: PrecisionPolicy::default(),
            loss_scaler: ScalerConfig::default(),
            batch: BatchSchedule::Fixed { size: 128 },
            lr_scaling: LrScaling::Hold,
            optimizer: OptimizerConfig::default(),
            lr: LrConfig::default(),
            loader: LoaderSettings::default(),
            eval: EvalSettings::default(),
            checkpoint: CheckpointSettings::default(),
            distributed: DistributedSettings::default(),
        }
    }
}

/// Where a run computes: the CPU, or CUDA device N ("cuda" is device 0). Written and read
/// as its name: "cpu", "cuda", "cuda:1".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn is_cpu(&self) -> bool {
        *self == DeviceChoice::Cpu
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let ordinal = match s.strip_prefix("cuda") {
            _ if s == "cpu" => return Ok(DeviceChoice::Cpu),
            Some("") => Some(0),
            Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()),
            None => None,
        };
        ordinal
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| Error::InvalidConfig {
                field: "device",
                problem: format!("{s:?} is not a device: give \"cpu\", \"cuda\" or \"cuda:N\""),
            })
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

/// Which network to train. The dataset sets its classes, input channels and image size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelChoice {
    /// A preset name as `brisk models` lists them. By default, "resnet18-cifar".
    pub preset: String,
    /// A ModelSpec file (.json or .toml) used instead of the preset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_file: Option<PathBuf>,
    /// Width multiplier; by default the preset's or the file's own (1 for presets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<f64>,
    /// Squeeze-and-excitation reduction ratio r (hidden width max(1, C / r)); by default
    /// the preset's or the file's own (16). A narrow SE net needs a smaller r for its
    /// units to keep real channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub se_ratio: Option<usize>,
    /// Start each residual block as the identity: the scale (γ) of its last batch-norm
    /// initialised to 0 (Goyal et al. 2017, §5.1). The checkpoint stays a plain
    /// torchvision state dict. By default the preset's or the file's own (false for
    /// presets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_init_residual: Option<bool>,
}

impl Default for ModelChoice {
    fn default() -> Self {
        ModelChoice {
            preset: "resnet18-cifar".into(),
            spec_file: None,
            width: None,
            se_ratio: None,
            zero_init_residual: None,
        }
    }
}

/// Which optimiser, with its settings (fields not used by the chosen kind are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// "sgd" or "adamw". By default, "sgd".
    pub kind: OptimizerKind,
    /// SGD momentum. By default, 0.9.
    pub momentum: f64,
    /// SGD Nesterov momentum. By default, true.
    pub nesterov: bool,
    /// Weight decay (coupled L2 for SGD, decoupled for AdamW). By default, 5e-4.
    pub weight_decay: f64,
    /// Apply weight decay to batch-norm and bias parameters too. By default, false.
    pub decay_norm_and_bias: bool,
    /// AdamW β1, β2 and ε. By default, 0.9, 0.999, 1e-8.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// The optimisers brisk has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    #[serde(rename = "adamw")]
    AdamW,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            decay_norm_and_bias: false,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 2] = [OptimizerKind::Sgd, OptimizerKind::AdamW];
    pub const NAMES: [&'static str; 2] = [OptimizerKind::Sgd.name(), OptimizerKind::AdamW.name()];

    pub const fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::AdamW => "adamw",
        }
    }
}

impl std::str::FromStr for OptimizerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        OptimizerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "optimizer.kind",
                problem: format!("{s:?} is not one of {}", OptimizerKind::NAMES.join(", ")),
            })
    }
}

impl OptimizerConfig {
    /// The SGD settings at learning rate `lr`.
    pub fn sgd(&self, lr: f64) -> SgdConfig {
        SgdConfig {
            lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
        }
    }

    /// The AdamW settings at learning rate `lr`.
    pub fn adamw(&self, lr: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Checks the settings of the chosen kind at learning rate `lr`.
    pub fn validate(&self, lr: f64) -> Result<()> {
        match self.kind {
            OptimizerKind::Sgd => self.sgd(lr).validate(),
            OptimizerKind::AdamW => self.adamw(lr).validate(),
        }
    }
}

/// Settings of stochastic gradient descent, as `torch.optim.SGD` (without dampening).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor; 0 disables the velocity buffer.
    pub momentum: f64,
    /// Nesterov momentum (needs momentum > 0).
    pub nesterov: bool,
    /// L2 penalty added to the gradient (coupled weight decay, as PyTorch's SGD).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// lr 0.1, momentum 0.9, no Nesterov, weight decay 5e-4: the usual CIFAR recipe.
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        }
    }
}

impl SgdConfig {
    /// Checks the numbers; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem: String| Err(Error::InvalidConfig { field, problem });
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("must be a non-negative number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("must be in [0, 1), got {}", self.momentum));
        }
        if self.nesterov && self.momentum == 0.0 {
            return bad("nesterov", "needs a momentum above 0".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("must be a non-negative number, got {}", self.weight_decay),
            );
        }
        Ok(())
    }
}

/// Settings of AdamW (Loshchilov & Hutter), as `torch.optim.AdamW`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: `w ← w − lr · weight_decay · w` before the Adam step.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks the numbers; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let checks = [
            ("lr", c.lr.is_finite() && c.lr >= 0.0),
            ("beta1", (0.0..1.0).contains(&c.beta1)),
            ("beta2", (0.0..1.0).contains(&c.beta2)),
            ("eps", c.eps.is_finite() && c.eps > 0.0),
            (
                "weight_decay",
                c.weight_decay.is_finite() && c.weight_decay >= 0.0,
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((field, _)) => Err(Error::InvalidConfig {
                field,
                problem: format!("out of range in {c:?}"),
            }),
            None => Ok(()),
        }
    }
}

/// The learning-rate schedule (its length is the run's `epochs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrConfig {
    /// Peak (or constant) learning rate. By default, 0.1.
    pub base: f64,
    /// By default, one-cycle (`{ kind = "one_cycle" }`, PyTorch's defaults).
    pub shape: LrShape,
    /// Epochs of linear warm-up. By default, 0.
    pub warmup_epochs: f64,
}

impl Default for LrConfig {
    fn default() -> Self {
        LrConfig {
            base: 0.1,
            shape: LrShape::OneCycle {
                pct_start: 0.3,
                div: 25.0,
                final_div: 1e4,
                momentum: None,
            },
            warmup_epochs: 0.0,
        }
    }
}

/// How the training batches are made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderSettings {
    /// Worker threads making batches; 0 makes them in the training thread. By default, 2.
    pub workers: usize,
    /// Batches made ahead. By default, 4.
    pub prefetch: usize,
    /// Random-crop padding in pixels; 0 disables cropping. By default, 4.
    pub crop_padding: usize,
    /// Random horizontal flips. By default, true.
    pub flip: bool,
    /// Cutout square side; 0 disables it. By default, 0.
    pub cutout: usize,
}

impl Default for LoaderSettings {
    fn default() -> Self {
        LoaderSettings {
            workers: 2,
            prefetch: 4,
            crop_padding: 4,
            flip: true,
            cutout: 0,
        }
    }
}

/// The exponential moving average (EMA) of the weights: after every update,
/// `average ← d·average + (1 − d)·weights` over every tensor of the model (batch-norm
/// running statistics too), with `d = min(decay, (1 + t) / (10 + t))` at update `t` so
/// that the average does not linger on the initial weights in a short run. Evaluations,
/// probes, `best/` and the final model use the average; checkpoints keep both, so a
/// resume is exact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaSettings {
    /// The decay d in [0, 1); 0 turns the average off. By default, 0.
    pub decay: f64,
}

impl Default for EmaSettings {
    fn default() -> Self {
        EmaSettings { decay: 0.0 }
    }
}

impl EmaSettings {
    /// Whether an average is kept.
    pub fn enabled(&self) -> bool {
        self.decay > 0.0
    }

    /// The decay applied at update `t` (0-based): the configured one, lowered early on.
    pub fn decay_at(&self, t: u64) -> f64 {
        self.decay.min((1.0 + t as f64) / (10.0 + t as f64))
    }
}

/// When and how the test split is evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    /// Evaluate every this many epochs (and always after the last); 0: only at the end.
    /// By default, 1.
    pub every_epochs: usize,
    /// Images per evaluation batch. By default, 256.
    pub batch: usize,
    /// Also measure test top-1 every this many updates on the first `probe_images` test
    /// images (`probe` events: accuracy against training time at a finer grain than
    /// epochs); 0: never. By default, 0.
    pub probe_every_steps: u64,
    /// Test images a probe evaluates (the first ones, the same every time). By default,
    /// 512.
    pub probe_images: usize,
    /// Test-time augmentation: each test image is also classified mirrored left to
    /// right and the two logits averaged (evaluations and probes; twice the forward
    /// work). By default, false.
    pub flip: bool,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            every_epochs: 1,
            batch: 256,
            probe_every_steps: 0,
            probe_images: 512,
            flip: false,
        }
    }
}

/// How the ranks of a data-parallel run work together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedSettings {
    /// Batch-norm statistics over every rank's batch (synchronised batch-norm) instead of
    /// each rank's own, as Horovod and DDP do by default. By default, false.
    pub sync_batch_norm: bool,
    /// Gradients are packed into all-reduce buffers of at most this many MiB (tensor
    /// fusion). By default, 64 (Horovod's).
    pub fusion_mib: usize,
}

impl Default for DistributedSettings {
    fn default() -> Self {
        DistributedSettings {
            sync_batch_norm: false,
            fusion_mib: 64,
        }
    }
}

/// When checkpoints are written and how many are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSettings {
    /// Write one at the end of every this many epochs; 0: none at epoch ends. By default, 1.
    pub every_epochs: usize,
    /// Also write one every this many optimiser updates; 0: never. By default, 0.
    pub every_steps: u64,
    /// How many recent checkpoints to keep (the best model is kept apart). By default, 2.
    pub keep_last: usize,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        CheckpointSettings {
            every_epochs: 1,
            every_steps: 0,
            keep_last: 2,
        }
    }
}

/// Turns serde_path_to_error's error into ours, naming the source and the field.
fn parse_error<E: std::fmt::Display>(source_name: &str, e: serde_path_to_error::Error<E>) -> Error {
    Error::ConfigParse {
        source_name: source_name.to_string(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    }
}

impl TrainConfig {
    /// Parses TOML text; `source_name` (a file name) is used in errors.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self> {
        let de = toml::Deserializer::new(text);
        let config: TrainConfig =
            serde_path_to_error::deserialize(de).map_err(|e| parse_error(source_name, e))?;
        Ok(config)
    }

    /// Reads a TOML file: a user's, or a run's `config.toml`, whose checksum line must
    /// then match (an edited run config is an error, not a silently different run).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read config", path, e))?;
        let (body, _) = brisk_files::checksum::toml_checked(&text, path)?;
        Self::from_toml_str(body, &path.display().to_string())
    }

    /// Writes the config as a run's `config.toml`: TOML with a checksum line, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = brisk_files::checksum::toml_with_checksum(&self.to_toml()?);
        Ok(brisk_files::write_atomic(path, text.as_bytes())?)
    }

    /// The config as TOML text (what `config.toml` in the output folder holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::ConfigParse {
            source_name: "config".into(),
            field: String::new(),
            message: format!("cannot write the config as TOML: {e}"),
        })
    }

    /// Sets `key` (dotted, e.g. `optimizer.momentum` or `batch`) to `value`, checked
    /// against the config's types: an unknown key or a value of the wrong kind is an
    /// error naming the key. The one way flags, `--set` and experiment variants change a
    /// config. (`validate` checks ranges afterwards.)
    pub fn set(&mut self, key: &str, value: toml::Value) -> Result<()> {
        let bad = |message: String| Error::ConfigParse {
            source_name: "override".into(),
            field: key.to_string(),
            message,
        };
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("the key must be dotted names, like optimizer.momentum".into()));
        }
        let mut root = toml::Value::try_from(&*self).map_err(|e| bad(e.to_string()))?;
        let mut node = &mut root;
        for part in &parts[..parts.len() - 1] {
            let table = node
                .as_table_mut()
                .ok_or_else(|| bad(format!("`{part}` is inside a value that is not a table")))?;
            node = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
        let table = node
            .as_table_mut()
            .ok_or_else(|| bad("the parent of this key is not a table".into()))?;
        table.insert(parts[parts.len() - 1].to_string(), value);
        *self = serde_path_to_error::deserialize(root).map_err(|e| Error::ConfigParse {
            source_name: format!("override {key}"),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        Ok(())
    }

    /// [`TrainConfig::set`] from text, as `--set KEY=VALUE` gives it: a TOML value (`0.9`,
    /// `true`, `"adamw"`, `{ kind = "cosine" }`), or else a plain string, so that
    /// `optimizer.kind=adamw` works.
    pub fn set_text(&mut self, key: &str, value: &str) -> Result<()> {
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        self.set(key, parsed)
    }

    /// Checks every setting; errors name the field and the allowed values.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, problem: String| Err(Error::InvalidConfig { field, problem });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.distributed.fusion_mib == 0 {
            return bad("distributed.fusion_mib", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            );
        }
        if self.log_every == 0 {
            return bad("log_every", "must be at least 1".into());
        }
        if let Some(w) = self.model.width {
            if !(w.is_finite() && w > 0.0) {
                return bad("model.width", format!("must be a positive number, got {w}"));
            }
        }
        if self.model.spec_file.is_none() && ModelSpec::preset_named(&self.model.preset).is_none() {
            let names: Vec<&str> = ModelSpec::presets().iter().map(|(n, _)| *n).collect();
            return bad(
                "model.preset",
                format!(
                    "unknown preset {:?}; one of {}",
                    self.model.preset,
                    names.join(", ")
                ),
            );
        }
        if self.eval.batch == 0 {
            return bad("eval.batch", "must be at least 1".into());
        }
        if self.eval.probe_every_steps > 0 && self.eval.probe_images == 0 {
            return bad(
                "eval.probe_images",
                "must be at least 1 when probes are on".into(),
            );
        }
        if !(0.0..1.0).contains(&self.ema.decay) {
            return bad("ema.decay", format!("must be in [0, 1), got {}", self.ema.decay));
        }
        if self.model.se_ratio == Some(0) {
            return bad("model.se_ratio", "must be at least 1".into());
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last", "must be at least 1".into());
        }
        self.batch.validate()?;
        self.lr_schedule().validate()?;
        self.precision.validate()?;
        brisk_precision::LossScaler::new(self.loss_scaler)?;
        self.optimizer.validate(self.lr.base)?;
        Ok(())
    }

    /// The learning-rate schedule over this run's epochs.
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            base_lr: self.lr.base,
            shape: self.lr.shape.clone(),
            warmup_epochs: self.lr.warmup_epochs,
            epochs: self.epochs as f64,
        }
    }

    /// The model spec: the preset or spec file, at the configured width, with classes,
    /// input channels and image size from the dataset.
    pub fn model_spec(&self, classes: usize, in_channels: usize, image_size: usize) -> Result<ModelSpec> {
        let mut spec = match &self.model.spec_file {
            Some(path) => ModelSpec::from_file(path)?,
            None => ModelSpec::preset_named(&self.model.preset).ok_or_else(|| Error::InvalidConfig {
                field: "model.preset",
                problem: format!("unknown preset {:?}", self.model.preset),
            })?,
        };
        if let Some(w) = self.model.width {
            spec = spec.with_width(w);
        }
        if let Some(r) = self.model.se_ratio {
            spec.se_ratio = r;
        }
        if let Some(z) = self.model.zero_init_residual {
            spec.zero_init_residual = z;
        }
        spec.classes = classes;
        spec.in_channels = in_channels;
        spec.image_size = image_size;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_error(text: &str, field: &str) {
        let e = TrainConfig::from_toml_str(text, "test.toml")
            .and_then(|c| c.validate().map(|()| c))
            .expect_err("must be rejected")
            .to_string();
        assert!(e.contains(field), "{e} should name {field}");
    }

    #[test]
    fn devices_read_and_write_by_name_and_the_cpu_is_left_out_of_the_file() -> Result<()> {
        for (text, want) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            let c = TrainConfig::from_toml_str(&format!("device = \"{text}\"\n"), "t")?;
            assert_eq!(c.device, want);
            assert_eq!(TrainConfig::from_toml_str(&c.to_toml()?, "again")?.device, want);
        }
        assert!(!TrainConfig::default().to_toml()?.contains("device"));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda1", "CPU"] {
            check_error(&format!("device = \"{bad}\"\n"), "device");
        }
        Ok(())
    }

    #[test]
    fn a_file_names_only_what_it_changes() -> Result<()> {
        let c = TrainConfig::from_toml_str(
            "epochs = 4\n[model]\nwidth = 0.25\n[batch]\nkind = \"geometric\"\nstart = 32\nfactor = 2\nevery = 1\nmax = 256\n",
            "t",
        )?;
        c.validate()?;
        assert_eq!(c.epochs, 4);
        assert_eq!(c.model.width, Some(0.25));
        assert_eq!(c.batch.size(3), 256);
        assert_eq!(c.optimizer, OptimizerConfig::default());
        // What is written reads back the same.
        assert_eq!(TrainConfig::from_toml_str(&c.to_toml()?, "round trip")?, c);
        Ok(())
    }

    #[test]
    fn overrides_replace_single_fields() -> Result<()> {
        let mut c = TrainConfig::default();
        c.set_text("optimizer.kind", "adamw")?;
        c.set_text("optimizer.momentum", "0.5")?;
        c.set_text("batch.size", "1")?;
        c.set_text("lr.shape", "{ kind = \"cosine\" }")?;
        c.set("data", toml::Value::String("/tmp/x".into()))?;
        c.set("lr.base", toml::Value::Float(0.25))?;
        assert_eq!(c.optimizer.kind, OptimizerKind::AdamW);
        assert_eq!(c.optimizer.momentum, 0.5);
        assert_eq!(c.batch, BatchSchedule::Fixed { size: 1 });
        assert_eq!(c.lr.shape, LrShape::Cosine { min_lr: 0.0 });
        assert_eq!(c.data.as_deref(), Some(Path::new("/tmp/x")));
        assert_eq!(c.lr.base, 0.25);
        c.validate()?;
        let before = c.clone();
        let e = c
            .set_text("optimizer.moment", "0.5")
            .expect_err("unknown field")
            .to_string();
        assert!(e.contains("optimizer") && e.contains("moment"), "{e}");
        let e = c
            .set_text("epochs", "many")
            .expect_err("not a number")
            .to_string();
        assert!(e.contains("epochs"), "{e}");
        let e = c.set_text("lr..base", "1").expect_err("empty part").to_string();
        assert!(e.contains("dotted"), "{e}");
        assert_eq!(c, before, "a refused change leaves the config as it was");
        Ok(())
    }

    #[test]
    fn the_documented_examples_are_valid() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))? {
            let path = entry.map_err(|e| Error::io("cannot list", &dir, e))?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                TrainConfig::from_file(&path)?.validate()?;
                checked += 1;
            }
        }
        assert!(checked >= 2, "examples missing from {}", dir.display());
        Ok(())
    }

    #[test]
    fn bad_configs_name_the_field() {
        check_error("epochs = 0", "epochs");
        check_error("epoch = 3", "epoch");
        check_error("label_smoothing = 1.5", "label_smoothing");
        check_error("[ema]\ndecay = 1.0", "ema.decay");
        check_error("[model]\npreset = \"vgg\"", "model.preset");
        check_error("[model]\nwidth = -1.0", "model.width");
        check_error("[optimizer]\nkind = \"lbfgs\"", "optimizer.kind");
        check_error("[optimizer]\nmomentum = 1.0", "momentum");
        check_error("[batch]\nkind = \"fixed\"\nsize = 0", "batch");
        check_error("[lr]\nbase = -0.1", "lr");
        check_error("[checkpoint]\nkeep_last = 0", "keep_last");
        check_error(
            "[lr.shape]\nkind = \"step\"\nmilestones = [1.0]\ngamma = 0.0",
            "gamma",
        );
    }
}
