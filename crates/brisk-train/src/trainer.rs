//! `Trainer`: the training loop. Builds the network, optimiser and loaders from a
//! `TrainConfig`, runs epochs of steps through the hooks, evaluates, logs, checkpoints,
//! and resumes exactly where a checkpoint left off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use brisk_data::{Augment, Dataset, Loader, LoaderConfig, Split};
use brisk_models::{write_atomic, Network};
use candle_core::{Device, Tensor, Var};
use serde::Serialize;
use serde_json::json;

use crate::checkpoint::{self, Best, Clock, Position, TrainState, MODEL_FILE};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalReport};
use crate::events::{EventLog, Progress};
use crate::hooks::{CrossEntropy, Hook, LossFn, LossScaling, StepAction, StepContext};
use crate::loss::top_k_correct;
use crate::optim::Optimizer;

/// Files in a run's output folder.
pub const CONFIG_FILE: &str = "config.toml";
pub const LOG_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const BEST_DIR: &str = "best";

/// Skipped updates in a row after which a run is declared diverged (a loss scaler that
/// halves its scale 50 times has gone from 2^16 to below 2^-33).
const MAX_CONSECUTIVE_SKIPS: u64 = 50;

/// What a finished run reports (also written as `summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    /// Test images evaluated.
    pub n: u64,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub epochs: usize,
    /// Optimiser updates applied.
    pub updates: u64,
    /// Batches whose update a hook skipped.
    pub skipped: u64,
    /// Ranks that trained (1: a single process).
    pub world: usize,
    /// Training images read, by all ranks together.
    pub images: u64,
    pub elapsed_s: f64,
    pub train_s: f64,
    /// Training images per second of training time, all ranks together.
    pub img_per_s: f64,
    /// Fraction of training time spent waiting for data.
    pub data_wait: f64,
    pub params: usize,
    pub macs: u64,
    pub checkpoint_bytes: u64,
    pub peak_rss_mib: Option<f64>,
    /// The hooks' figures at the end (e.g. `allreduce_s_total`, `loss_scale`).
    pub hook_metrics: BTreeMap<String, f64>,
    /// The final model.
    pub model: PathBuf,
}

/// A training run. Build it with [`Trainer::new`] or [`Trainer::resume`], add hooks,
/// then [`Trainer::run`].
pub struct Trainer {
    config: TrainConfig,
    out: PathBuf,
    data: Arc<Dataset>,
    net: Network,
    params: Vec<(String, Var)>,
    optimizer: Optimizer,
    loss: Box<dyn LossFn>,
    hooks: Vec<Box<dyn Hook>>,
    /// Hook state read from a checkpoint, applied when the run starts.
    hook_states: BTreeMap<String, serde_json::Value>,
    position: Position,
    clock: Clock,
    best: Option<Best>,
    last_checkpoint: Option<PathBuf>,
    skipped: u64,
    /// The evaluation after the last epoch trained in this process (reused by the summary).
    last_eval: Option<EvalReport>,
    log: Option<EventLog>,
    rank: usize,
    world: usize,
    stop: Option<Arc<AtomicBool>>,
    quiet: bool,
    resumed: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("out", &self.out)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

fn required<'a>(value: &'a Option<PathBuf>, field: &'static str, flag: &str) -> Result<&'a PathBuf> {
    value.as_ref().ok_or_else(|| Error::InvalidConfig {
        field,
        problem: format!("no folder given: set `{field}` in the config or pass {flag}"),
    })
}

/// Sets up the compute threads (0: the host's cores shared by the ranks on it).
fn init_threads(threads: usize, rank: Rank) -> Result<()> {
    let n = match threads {
        0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / rank.local_ranks.max(1)).max(1),
        n => n,
    };
    brisk_ops::init_compute(n)?;
    Ok(())
}

/// Which process of a data-parallel job this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    /// Ranks on this host (this one included): with `threads = 0` they share its cores.
    pub local_ranks: usize,
}

impl Rank {
    /// The only process of a single-process run.
    pub const SINGLE: Rank = Rank {
        rank: 0,
        world: 1,
        local_ranks: 1,
    };

    /// Rank 0 writes the log, checkpoints, progress and the final model.
    pub fn writes(&self) -> bool {
        self.rank == 0
    }
}

impl Trainer {
    /// A fresh run of `config` (which must name `data` and `out`). The output folder may
    /// exist but must not hold checkpoints of another run (resume those instead).
    pub fn new(config: TrainConfig) -> Result<Self> {
        Self::start(config, None, Rank::SINGLE)
    }

    /// A fresh run of `config` as one rank of a data-parallel job: it trains on its share
    /// of each epoch, and only rank 0 writes files and progress. The gradient all-reduce
    /// comes as a hook (brisk-dist).
    pub fn new_as(config: TrainConfig, rank: Rank) -> Result<Self> {
        Self::start(config, None, rank)
    }

    /// A fresh run of `config` that starts from `net`'s weights and architecture instead
    /// of the config's model (fine-tuning a pruned or distilled network, say).
    pub fn with_network(config: TrainConfig, net: Network) -> Result<Self> {
        Self::start(config, Some(net), Rank::SINGLE)
    }

    fn start(config: TrainConfig, initial: Option<Network>, rank: Rank) -> Result<Self> {
        config.validate()?;
        let out = required(&config.out, "out", "--out")?.clone();
        let data_dir = required(&config.data, "data", "--data")?;
        if !checkpoint::list(&out.join(CHECKPOINTS_DIR))?.is_empty() {
            return Err(Error::InvalidConfig {
                field: "out",
                problem: format!(
                    "{} already holds checkpoints of a run: continue it with --resume {0}, or choose another folder",
                    out.display()
                ),
            });
        }
        init_threads(config.threads, rank)?;
        let data = Arc::new(Dataset::open(data_dir)?);
        let m = data.manifest();
        if m.height != m.width {
            return Err(Error::InvalidConfig {
                field: "data",
                problem: format!(
                    "images are {}x{}; brisk's models need square images",
                    m.height, m.width
                ),
            });
        }
        if data.is_empty(Split::Train) {
            return Err(Error::InvalidConfig {
                field: "data",
                problem: format!("{} has no training images", data_dir.display()),
            });
        }
        let net = match initial {
            Some(net) => {
                let spec = net.spec();
                if spec.classes != m.classes.len() || spec.in_channels != m.channels {
                    return Err(Error::InvalidConfig {
                        field: "data",
                        problem: format!(
                            "the model has {} classes and {} input channels, {} has {} and {}",
                            spec.classes,
                            spec.in_channels,
                            data_dir.display(),
                            m.classes.len(),
                            m.channels
                        ),
                    });
                }
                net
            }
            None => Network::new(
                config.model_spec(m.classes.len(), m.channels, m.height)?,
                config.seed,
                &Device::Cpu,
            )?,
        };
        let log = if rank.writes() {
            std::fs::create_dir_all(&out).map_err(|e| Error::io("cannot create output folder", &out, e))?;
            write_atomic(&out.join(CONFIG_FILE), config.to_toml()?.as_bytes())?;
            Some(EventLog::open(&out.join(LOG_FILE), None)?)
        } else {
            None
        };
        Self::assemble(config, out, data, net, log, Position::default(), rank)
    }

    /// Continues the run in `out` from its newest checkpoint, with the config it was
    /// started with; `data` replaces the dataset folder (if it moved).
    pub fn resume(out: &Path, data: Option<PathBuf>) -> Result<Self> {
        Self::resume_as(out, data, Rank::SINGLE)
    }

    /// [`Trainer::resume`] as one rank of a data-parallel job: every rank reads the
    /// checkpoint (the output folder must be visible to all of them).
    pub fn resume_as(out: &Path, data: Option<PathBuf>, rank: Rank) -> Result<Self> {
        let mut config = TrainConfig::from_file(&out.join(CONFIG_FILE))?;
        if data.is_some() {
            config.data = data;
        }
        config.out = Some(out.to_path_buf());
        config.validate()?;
        let root = out.join(CHECKPOINTS_DIR);
        let (_, dir) = checkpoint::list(&root)?.pop().ok_or_else(|| Error::State {
            problem: format!(
                "{} holds no checkpoint to resume from; start the run again without --resume",
                root.display()
            ),
        })?;
        init_threads(config.threads, rank)?;
        let data = Arc::new(Dataset::open(required(&config.data, "data", "--data")?)?);
        let ck = checkpoint::read(&dir, &Device::Cpu)?;
        let log = match rank.writes() {
            true => Some(EventLog::open(&out.join(LOG_FILE), Some(ck.state.log_bytes))?),
            false => None,
        };
        let mut trainer = Self::assemble(
            config,
            out.to_path_buf(),
            data,
            ck.net,
            log,
            ck.state.position,
            rank,
        )?;
        trainer.optimizer.load_state(&ck.optimizer)?;
        trainer.clock = ck.state.clock;
        trainer.best = ck.state.best;
        trainer.hook_states = ck.state.hooks;
        trainer.last_checkpoint = Some(dir);
        trainer.resumed = true;
        Ok(trainer)
    }

    fn assemble(
        config: TrainConfig,
        out: PathBuf,
        data: Arc<Dataset>,
        net: Network,
        log: Option<EventLog>,
        position: Position,
        rank: Rank,
    ) -> Result<Self> {
        let mut net = net;
        net.set_precision(config.precision.clone())?;
        let params = net.trainable_vars()?;
        let lr = config.lr_schedule().lr(0.0);
        let optimizer = config.optimizer.build(params.clone(), lr)?;
        let loss = Box::new(CrossEntropy {
            smoothing: config.label_smoothing,
        });
        Ok(Trainer {
            config,
            out,
            data,
            net,
            params,
            optimizer,
            loss,
            hooks: Vec::new(),
            hook_states: BTreeMap::new(),
            position,
            clock: Clock::default(),
            best: None,
            last_checkpoint: None,
            skipped: 0,
            last_eval: None,
            log,
            rank: rank.rank,
            world: rank.world,
            stop: None,
            quiet: !rank.writes(),
            resumed: false,
        })
    }

    /// Adds a hook; hooks run in the order added.
    pub fn add_hook(&mut self, hook: Box<dyn Hook>) {
        self.hooks.push(hook);
    }

    /// Replaces the training loss (by default, cross-entropy with the config's smoothing).
    pub fn set_loss(&mut self, loss: Box<dyn LossFn>) {
        self.loss = loss;
    }

    /// Synchronised batch-norm across ranks (see `Network::set_batch_norm_sync`).
    pub fn set_batch_norm_sync(&mut self, sync: Option<Arc<dyn brisk_ops::BatchNormSync>>) -> Result<()> {
        Ok(self.net.set_batch_norm_sync(sync)?)
    }

    /// When `flag` becomes true (Ctrl-C), the run writes a checkpoint after the current
    /// batch and stops with [`Error::Interrupted`].
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// No progress display (the event log is still written).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet || self.rank != 0;
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn position(&self) -> &Position {
        &self.position
    }

    fn event(&mut self, kind: &str, fields: serde_json::Value) -> Result<()> {
        match &mut self.log {
            Some(log) => log.write(kind, fields),
            None => Ok(()),
        }
    }

    fn train_loader(&self) -> Result<Loader> {
        let m = self.data.manifest();
        let s = &self.config.loader;
        let config = LoaderConfig {
            split: Split::Train,
            workers: s.workers,
            prefetch: s.prefetch,
            seed: self.config.seed,
            shuffle: true,
            drop_last: false,
            rank: self.rank,
            world: self.world,
            augment: Augment {
                crop_padding: s.crop_padding,
                flip: s.flip,
                cutout: s.cutout,
                ..Augment::train(m.mean.clone(), m.std.clone())
            },
        };
        Ok(Loader::new(self.data.clone(), config)?)
    }

    /// Evaluates the network on the test split (across ranks through the hooks).
    pub fn evaluate(&mut self) -> Result<EvalReport> {
        self.synchronize()?;
        let hooks = &mut self.hooks;
        let mut reduce = |sums: &mut [f64]| -> Result<()> {
            for h in hooks.iter_mut() {
                h.reduce_sums(sums)?;
            }
            Ok(())
        };
        evaluate(
            &self.net,
            &self.data,
            Split::Test,
            self.config.eval.batch,
            (self.rank, self.world),
            &mut reduce,
        )
    }

    /// Lets every hook bring the ranks' state together (running statistics); every rank
    /// calls it at the same points: before evaluating and before a checkpoint.
    fn synchronize(&mut self) -> Result<()> {
        for h in &mut self.hooks {
            h.synchronize(&self.net)?;
        }
        Ok(())
    }

    /// Whether any rank was asked to stop (Ctrl-C), agreed by all ranks so that they stop
    /// after the same batch.
    fn stop_requested(&mut self) -> Result<bool> {
        let mine = self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        if self.world == 1 {
            return Ok(mine);
        }
        let mut flag = [f64::from(u8::from(mine))];
        for h in &mut self.hooks {
            h.reduce_sums(&mut flag)?;
        }
        Ok(flag[0] > 0.0)
    }

    /// Writes a checkpoint (rank 0 only; every rank calls it) and keeps the newest
    /// `keep_last`.
    fn checkpoint(&mut self) -> Result<()> {
        self.synchronize()?;
        if self.rank != 0 {
            return Ok(());
        }
        let log_bytes = match &mut self.log {
            Some(log) => log.sync()?,
            None => 0,
        };
        let mut state = TrainState::new(self.position.clone(), self.clock, self.best.clone(), log_bytes);
        for h in &self.hooks {
            state.hooks.insert(h.name().to_string(), h.state()?);
        }
        let root = self.out.join(CHECKPOINTS_DIR);
        let dir = checkpoint::write(&root, &self.net, &self.optimizer.state()?, &state)
            .map_err(|e| self.with_last_checkpoint(e))?;
        checkpoint::prune(&root, self.config.checkpoint.keep_last)?;
        self.event(
            "checkpoint",
            json!({"step": self.position.step, "epoch": self.position.epoch, "path": dir}),
        )?;
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// Trains to the end of the configured epochs and evaluates; returns the summary.
    pub fn run(&mut self) -> Result<TrainSummary> {
        let run_start = Instant::now();
        let elapsed_before = self.clock.elapsed_s;
        if self.config.precision.needs_loss_scaling() && !self.hooks.iter().any(|h| h.name() == "loss_scaler")
        {
            // Last, so it sees gradients already reduced across ranks: every rank then
            // agrees on skipping.
            let scaler = brisk_precision::LossScaler::new(self.config.loss_scaler)?;
            self.hooks.push(Box::new(LossScaling::new(scaler)));
        }
        for h in &mut self.hooks {
            h.on_start(&self.net)?;
            if let Some(state) = self.hook_states.get(h.name()) {
                h.load_state(state)?;
            }
        }
        let loader = self.train_loader()?;
        let epochs = self.config.epochs;
        let batch_sizes: Vec<usize> = (0..epochs).map(|e| self.config.batch.size(e)).collect();
        let total_batches: u64 = batch_sizes
            .iter()
            .map(|&b| loader.batches_per_epoch(b) as u64)
            .sum();
        let spec = self.net.spec().clone();
        if self.resumed {
            let p = self.position.clone();
            let from = self.last_checkpoint.clone();
            self.event(
                "resume",
                json!({"step": p.step, "epoch": p.epoch, "batch": p.batch, "from": from}),
            )?;
        } else {
            let fields = json!({
                "seed": self.config.seed, "epochs": epochs, "world": self.world,
                "threads": rayon_threads(), "model": spec, "params": spec.param_count(),
                "macs": spec.macs(spec.image_size), "train_images": self.data.len(Split::Train),
                "test_images": self.data.len(Split::Test), "batches": total_batches,
            });
            self.event("start", fields)?;
        }
        let mut progress = Progress::new(total_batches, self.position.batches, self.quiet);
        let schedule = self.config.lr_schedule();
        let dev = Device::Cpu;
        let log_every = self.config.log_every as u64;
        let mut consecutive_skips = 0u64;

        while self.position.epoch < epochs {
            let epoch = self.position.epoch;
            let batch_size = batch_sizes[epoch];
            let per_epoch = loader.batches_per_epoch(batch_size);
            let lr_factor = self.config.batch.lr_factor(epoch, self.config.lr_scaling);
            let epoch_start = Instant::now();
            // Training time not yet added to the clock starts at `timer`.
            let mut timer = epoch_start;
            let mut epoch_wait = 0.0;
            let (mut wait_s, mut loss_sum, mut correct, mut seen, mut batches) =
                (0.0, 0.0, 0usize, 0usize, 0usize);
            // Interval figures for `step` events.
            let (mut iv_start, mut iv_images, mut iv_wait, mut iv_loss, mut iv_correct, mut iv_batches) =
                (Instant::now(), 0usize, 0.0, 0.0, 0usize, 0usize);
            let mut lr = 0.0;
            let mut batches_iter = loader.epoch(epoch as u64, batch_size, self.position.batch)?;
            loop {
                let wait_start = Instant::now();
                let Some(batch) = batches_iter.next() else { break };
                let waited = wait_start.elapsed().as_secs_f64();
                wait_s += waited;
                iv_wait += waited;
                let b = batch?;
                let n = b.len();
                let (c, h, w) = b.shape;
                let x = Tensor::from_slice(&b.images, (n, c, h, w), &dev)?;
                let y = Tensor::from_slice(&b.labels, n, &dev)?;
                let progress_epochs = epoch as f64 + b.index as f64 / per_epoch as f64;
                lr = schedule.lr(progress_epochs) * lr_factor;
                self.optimizer.set_learning_rate(lr);

                let logits = self.net.forward_t(&x, true)?;
                let loss = self.loss.loss(&x, &logits, &y)?;
                let loss_value = loss.to_scalar::<f32>()?;
                let batch_correct = top_k_correct(&logits, &y, 1)?;
                let mut scaled = loss;
                for h in &mut self.hooks {
                    scaled = h.scale_loss(scaled)?;
                }
                let mut grads = scaled.backward()?;
                let ctx = StepContext {
                    net: &self.net,
                    params: &self.params,
                    step: self.position.step,
                    epoch,
                    progress: progress_epochs,
                };
                let mut action = StepAction::Apply;
                for h in &mut self.hooks {
                    if let StepAction::Skip(reason) = h.after_backward(&ctx, &mut grads)? {
                        action = StepAction::Skip(reason);
                    }
                }
                if !loss_value.is_finite() && action == StepAction::Apply {
                    progress.finish();
                    return Err(Error::NonFiniteLoss {
                        value: loss_value,
                        step: self.position.step,
                        epoch,
                        batch: b.index,
                        checkpoint: self.last_checkpoint.clone(),
                    });
                }
                match &action {
                    StepAction::Apply => {
                        consecutive_skips = 0;
                        self.optimizer.step(&grads)?;
                        drop(grads);
                        self.position.step += 1;
                        let ctx = StepContext {
                            net: &self.net,
                            params: &self.params,
                            step: self.position.step,
                            epoch,
                            progress: progress_epochs,
                        };
                        for h in &mut self.hooks {
                            h.after_step(&ctx)?;
                        }
                    }
                    StepAction::Skip(reason) => {
                        self.skipped += 1;
                        consecutive_skips += 1;
                        if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                            progress.finish();
                            return Err(Error::TooManySkips {
                                count: consecutive_skips,
                                step: self.position.step,
                                reason: reason.clone(),
                                checkpoint: self.last_checkpoint.clone(),
                            });
                        }
                        let reason = reason.clone();
                        let step = self.position.step;
                        self.event(
                            "skip",
                            json!({"step": step, "epoch": epoch, "batch": b.index, "reason": reason}),
                        )?;
                    }
                }
                self.position.batch = b.index + 1;
                self.position.batches += 1;
                self.position.images += n as u64;
                drop(b);
                if action == StepAction::Apply && loss_value.is_finite() {
                    loss_sum += f64::from(loss_value) * n as f64;
                    iv_loss += f64::from(loss_value) * n as f64;
                    correct += batch_correct;
                    iv_correct += batch_correct;
                    seen += n;
                    iv_images += n;
                }
                batches += 1;
                iv_batches += 1;

                if self.position.batches.is_multiple_of(log_every) || self.position.batch == per_epoch {
                    let span = iv_start.elapsed().as_secs_f64().max(1e-9);
                    let mut fields = json!({
                        "step": self.position.step, "epoch": epoch, "batch": self.position.batch,
                        "epoch_progress": self.position.batch as f64 / per_epoch as f64,
                        "batch_size": batch_size, "lr": lr,
                        "loss": iv_loss / iv_images.max(1) as f64,
                        "top1": iv_correct as f64 / iv_images.max(1) as f64,
                        "img_per_s": iv_images as f64 / span, "data_wait": iv_wait / span,
                        "batches": iv_batches,
                        "elapsed_s": elapsed_before + run_start.elapsed().as_secs_f64(),
                    });
                    for h in &self.hooks {
                        for (k, v) in h.metrics() {
                            fields[k] = json!(v);
                        }
                    }
                    self.event("step", fields)?;
                    let message = format!(
                        "epoch {}/{epochs} batch {}/{per_epoch} | loss {:.4} top1 {:.1}% | lr {lr:.4} | {:.0} img/s, data wait {:.0}%",
                        epoch + 1,
                        self.position.batch,
                        iv_loss / iv_images.max(1) as f64,
                        100.0 * iv_correct as f64 / iv_images.max(1) as f64,
                        iv_images as f64 / span,
                        100.0 * iv_wait / span
                    );
                    progress.update(self.position.batches, &message, false);
                    (iv_start, iv_images, iv_wait, iv_loss, iv_correct, iv_batches) =
                        (Instant::now(), 0, 0.0, 0.0, 0, 0);
                } else {
                    progress.update(self.position.batches, "", false);
                }

                let every_steps = self.config.checkpoint.every_steps;
                let stop = self.stop_requested()?;
                let due = every_steps > 0
                    && action == StepAction::Apply
                    && self.position.step.is_multiple_of(every_steps);
                if (due || stop) && self.position.batch < per_epoch {
                    self.clock.train_s += timer.elapsed().as_secs_f64();
                    self.clock.wait_s += wait_s;
                    epoch_wait += wait_s;
                    self.clock.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
                    (timer, wait_s) = (Instant::now(), 0.0);
                    self.checkpoint()?;
                    if stop {
                        progress.finish();
                        return Err(self.interrupted());
                    }
                }
            }
            drop(batches_iter);
            self.clock.train_s += timer.elapsed().as_secs_f64();
            self.clock.wait_s += wait_s;
            epoch_wait += wait_s;
            self.position.epoch += 1;
            self.position.batch = 0;
            let epoch_s = epoch_start.elapsed().as_secs_f64();
            let train_loss = loss_sum / seen.max(1) as f64;
            let train_top1 = correct as f64 / seen.max(1) as f64;
            self.event(
                "epoch",
                json!({
                    "epoch": epoch, "step": self.position.step, "batch_size": batch_size, "lr": lr,
                    "train_loss": train_loss, "train_top1": train_top1, "images": seen,
                    "batches": batches, "img_per_s": seen as f64 / epoch_s.max(1e-9),
                    "data_wait": epoch_wait / epoch_s.max(1e-9), "epoch_s": epoch_s,
                    "elapsed_s": elapsed_before + run_start.elapsed().as_secs_f64(),
                }),
            )?;
            let last = self.position.epoch == epochs;
            let every = self.config.eval.every_epochs;
            if last || (every > 0 && self.position.epoch.is_multiple_of(every)) {
                let report = self.evaluate()?;
                let elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
                self.event(
                    "eval",
                    json!({
                        "epoch": epoch, "step": self.position.step, "images": self.position.images,
                        "top1": report.top1, "top5": report.top5, "loss": report.loss, "n": report.n,
                        "elapsed_s": elapsed_s,
                    }),
                )?;
                progress.line(&format!(
                    "epoch {}/{epochs}: train loss {train_loss:.4} top1 {:.2}% | test loss {:.4} top1 {:.2}% top5 {:.2}% | {:.0} s",
                    epoch + 1,
                    100.0 * train_top1,
                    report.loss,
                    100.0 * report.top1,
                    100.0 * report.top5,
                    elapsed_s
                ));
                let improved = self.best.as_ref().is_none_or(|b| report.top1 > b.top1);
                if last {
                    self.last_eval = Some(report.clone());
                }
                if improved {
                    self.best = Some(Best {
                        top1: report.top1,
                        epoch,
                        step: self.position.step,
                    });
                    if self.rank == 0 {
                        checkpoint::check_finite(&self.net, self.position.step)
                            .map_err(|e| self.with_last_checkpoint(e))?;
                        let dir = self.out.join(BEST_DIR);
                        std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
                        self.net.save(&dir.join(MODEL_FILE))?;
                    }
                }
            }
            let every = self.config.checkpoint.every_epochs;
            self.clock.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
            let stop = self.stop_requested()?;
            if last || stop || (every > 0 && self.position.epoch.is_multiple_of(every)) {
                self.checkpoint()?;
            }
            if stop && !last {
                progress.finish();
                return Err(self.interrupted());
            }
        }
        progress.finish();
        self.finish(elapsed_before + run_start.elapsed().as_secs_f64())
    }

    /// Names the last good checkpoint in a non-finite-weights error.
    fn with_last_checkpoint(&self, e: Error) -> Error {
        match e {
            Error::NonFiniteWeights { name, step, .. } => Error::NonFiniteWeights {
                name,
                step,
                checkpoint: self.last_checkpoint.clone(),
            },
            e => e,
        }
    }

    fn interrupted(&self) -> Error {
        Error::Interrupted {
            step: self.position.step,
            checkpoint: self.last_checkpoint.clone().unwrap_or_default(),
        }
    }

    /// The final evaluation, model and summary.
    fn finish(&mut self, elapsed_s: f64) -> Result<TrainSummary> {
        let report = match self.last_eval.take() {
            Some(r) => r,
            None => self.evaluate()?,
        };
        let spec = self.net.spec().clone();
        let model = self.out.join(MODEL_FILE);
        if self.rank == 0 {
            checkpoint::check_finite(&self.net, self.position.step)
                .map_err(|e| self.with_last_checkpoint(e))?;
            self.net.save(&model)?;
        }
        let best = self.best.clone().unwrap_or(Best {
            top1: report.top1,
            epoch: self.config.epochs - 1,
            step: self.position.step,
        });
        let c = self.clock;
        let summary = TrainSummary {
            top1: report.top1,
            top5: report.top5,
            loss: report.loss,
            n: report.n,
            best_top1: best.top1,
            best_epoch: best.epoch,
            epochs: self.config.epochs,
            updates: self.position.step,
            skipped: self.skipped,
            world: self.world,
            // Every rank reads an equal share (the sampler pads to a multiple of world).
            images: self.position.images * self.world as u64,
            elapsed_s,
            train_s: c.train_s,
            img_per_s: (self.position.images * self.world as u64) as f64 / c.train_s.max(1e-9),
            data_wait: c.wait_s / c.train_s.max(1e-9),
            params: spec.param_count(),
            macs: spec.macs(spec.image_size),
            checkpoint_bytes: spec.checkpoint_bytes(),
            peak_rss_mib: crate::bench::peak_rss_mib(),
            hook_metrics: self
                .hooks
                .iter()
                .flat_map(|h| h.metrics())
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            model,
        };
        let value = serde_json::to_value(&summary).map_err(|e| Error::State {
            problem: format!("cannot serialise the summary: {e}"),
        })?;
        self.event("end", value.clone())?;
        if self.rank == 0 {
            let text = serde_json::to_string_pretty(&value).map_err(|e| Error::State {
                problem: e.to_string(),
            })?;
            write_atomic(&self.out.join(SUMMARY_FILE), text.as_bytes())?;
        }
        Ok(summary)
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}
