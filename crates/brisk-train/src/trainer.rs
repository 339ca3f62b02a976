//! `Trainer`: the training loop. Builds the network, optimiser and loaders from a
//! `TrainConfig`, runs epochs of steps through the hooks, evaluates, logs, checkpoints,
//! and resumes exactly where a checkpoint left off.
//!
//! The loop reads top-down: [`Trainer::run`] → `train_epoch` (batches, with the
//! interval's `step` events and mid-epoch checkpoints) → `step` (one batch: forward,
//! loss, hooks, backward, update) → `end_epoch` (the `epoch` event, evaluation, best
//! model, checkpoint, stop). Decisions (is a checkpoint due? an evaluation?) are small
//! functions of their own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use brisk_data::{Augment, Batch, Dataset, Loader, LoaderConfig, Split};
use brisk_models::{Network, MODEL_FILE};
use brisk_schema::events::StepRecord;
use brisk_schema::layout::{BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, LOG_FILE, SUMMARY_FILE};
use brisk_schema::{Event, TrainConfig, TrainSummary};
use candle_core::{Device, Tensor, Var};

use crate::average::WeightAverage;
use crate::checkpoint::{self, Best, Clock, Position, TrainState};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalReport, EvalScope};
use crate::events::{EventLog, Progress};
use crate::hooks::{CrossEntropy, Hook, LossFn, LossScaling, StepAction, StepContext};
use crate::loss::top_k_correct;
use crate::meters::{EpochClock, Meter, RunClock, StepOutcome};
use crate::optim::Optimizer;
use crate::stepper::Stepper;

/// Skipped updates in a row after which a run is declared diverged (a loss scaler that
/// halves its scale 50 times has gone from 2^16 to below 2^-33).
const MAX_CONSECUTIVE_SKIPS: u64 = 50;

/// A training run. Build it with [`Trainer::new`] or [`Trainer::resume`], add hooks,
/// then [`Trainer::run`].
pub struct Trainer {
    config: TrainConfig,
    out: PathBuf,
    data: Arc<Dataset>,
    net: Network,
    params: Vec<(String, Var)>,
    optimizer: Optimizer,
    /// The moving average of the weights that evaluations and saved models use
    /// (`ema.decay` > 0).
    average: Option<WeightAverage>,
    loss: Box<dyn LossFn>,
    /// Runs each batch's forward and backward (the engine or candle's graph); made when
    /// the run starts, once the network's set-up (synchronised batch-norm) is final.
    stepper: Option<Stepper>,
    hooks: Vec<Box<dyn Hook>>,
    /// Hook state read from a checkpoint, applied when the run starts.
    hook_states: BTreeMap<String, serde_json::Value>,
    position: Position,
    clock: Clock,
    best: Option<Best>,
    last_checkpoint: Option<PathBuf>,
    /// Damaged checkpoints a resume passed over (set aside, reported).
    skipped_checkpoints: Vec<checkpoint::Skipped>,
    /// Updates a hook skipped (a loss scaler finding inf/NaN gradients).
    skipped_updates: u64,
    consecutive_skips: u64,
    /// The evaluation after the last epoch trained in this process (reused by the summary).
    last_eval: Option<EvalReport>,
    log: Option<EventLog>,
    rank: Rank,
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
        0 => brisk_ops::default_threads(rank.local_ranks),
        n => n,
    };
    brisk_ops::init_compute(n)?;
    Ok(())
}

/// [`evaluate`] with the evaluation sums reduced across ranks by the hooks.
fn evaluate_with_hooks(
    net: &Network,
    data: &Arc<Dataset>,
    scope: EvalScope,
    ranks: (usize, usize),
    hooks: &mut [Box<dyn Hook>],
) -> Result<EvalReport> {
    let mut reduce = |sums: &mut [f64]| -> Result<()> {
        for h in hooks.iter_mut() {
            h.reduce_sums(sums)?;
        }
        Ok(())
    };
    evaluate(net, data, scope, ranks, &mut reduce)
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

/// The batch size of each epoch and the batches of the whole run.
struct EpochPlan {
    batch_sizes: Vec<usize>,
    total_batches: u64,
}

impl EpochPlan {
    fn new(config: &TrainConfig, loader: &Loader) -> Self {
        let batch_sizes: Vec<usize> = (0..config.epochs).map(|e| config.batch.size(e)).collect();
        let total_batches = batch_sizes
            .iter()
            .map(|&b| loader.batches_per_epoch(b) as u64)
            .sum();
        EpochPlan {
            batch_sizes,
            total_batches,
        }
    }
}

/// The figures of one epoch, handed from `train_epoch` to `end_epoch`.
struct EpochResult {
    epoch: usize,
    batch_size: usize,
    lr: f64,
    meter: Meter,
    wait_s: f64,
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
        if data.is_empty(Split::Train) {
            return Err(Error::InvalidConfig {
                field: "data",
                problem: format!("{} has no training images", data_dir.display()),
            });
        }
        let net = match initial {
            Some(net) => net,
            None => Network::new(
                config.model_spec(m.classes.len(), m.channels, m.height)?,
                config.seed,
                &Device::Cpu,
            )?,
        };
        net.spec()
            .check_fits(m.classes.len(), m.channels, (m.height, m.width), data_dir)
            .map_err(brisk_models::Error::from)?;
        let log = if rank.writes() {
            std::fs::create_dir_all(&out).map_err(|e| Error::io("cannot create output folder", &out, e))?;
            config.write(&out.join(CONFIG_FILE))?;
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
        init_threads(config.threads, rank)?;
        let root = out.join(CHECKPOINTS_DIR);
        // The newest checkpoint that verifies; damaged newer ones are set aside (by the
        // writing rank) and reported, never deleted.
        let (ck, skipped) = checkpoint::read_newest_good(&root, &Device::Cpu, rank.writes())?;
        let data = Arc::new(Dataset::open(required(&config.data, "data", "--data")?)?);
        let log = match rank.writes() {
            true => Some(EventLog::open(&out.join(LOG_FILE), Some(ck.state.log_bytes))?),
            false => None,
        };
        let out = out.to_path_buf();
        let mut trainer = Self::assemble(config, out, data, ck.net, log, ck.state.position, rank)?;
        trainer.optimizer.load_state(&ck.optimizer)?;
        if let Some(a) = &mut trainer.average {
            a.load_state(&ck.optimizer)?;
        }
        trainer.clock = ck.state.clock;
        trainer.best = ck.state.best;
        trainer.hook_states = ck.state.hooks;
        trainer.last_checkpoint = Some(ck.dir);
        trainer.skipped_checkpoints = skipped;
        trainer.resumed = true;
        Ok(trainer)
    }

    fn assemble(
        config: TrainConfig,
        out: PathBuf,
        data: Arc<Dataset>,
        mut net: Network,
        log: Option<EventLog>,
        position: Position,
        rank: Rank,
    ) -> Result<Self> {
        net.set_precision(config.precision.clone())?;
        let params = net.trainable_vars()?;
        let lr = config.lr_schedule().lr(0.0);
        let optimizer = Optimizer::new(&config.optimizer, params.clone(), lr)?;
        let average = match config.ema.enabled() {
            true => Some(WeightAverage::new(&net, config.ema.clone())?),
            false => None,
        };
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
            average,
            loss,
            stepper: None,
            hooks: Vec::new(),
            hook_states: BTreeMap::new(),
            position,
            clock: Clock::default(),
            best: None,
            last_checkpoint: None,
            skipped_checkpoints: Vec::new(),
            skipped_updates: 0,
            consecutive_skips: 0,
            last_eval: None,
            log,
            rank,
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
        self.quiet = quiet || !self.rank.writes();
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The network, with the weights training left it with: after [`Trainer::run`], the
    /// model it saved (the moving average of the weights when `ema` is on).
    pub fn into_network(self) -> Network {
        self.net
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The damaged checkpoints a resume passed over, newest first (set aside as
    /// `step-N.damaged`).
    pub fn skipped_checkpoints(&self) -> &[checkpoint::Skipped] {
        &self.skipped_checkpoints
    }

    /// Appends `event` to the log (rank 0; the other ranks keep none).
    fn event(&mut self, event: Event) -> Result<()> {
        match &mut self.log {
            Some(log) => log.write(&event),
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
            rank: self.rank.rank,
            world: self.rank.world,
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
        self.evaluate_first(None)
    }

    /// Evaluates on the test split's first `limit` images (all when `None`), with the
    /// moving average of the weights when there is one.
    fn evaluate_first(&mut self, limit: Option<usize>) -> Result<EvalReport> {
        self.synchronize()?;
        let scope = EvalScope {
            split: Split::Test,
            batch: self.config.eval.batch,
            limit,
            flip: self.config.eval.flip,
            engine: self.config.engine,
            slices: self.config.slices,
        };
        let (net, data, ranks) = (&self.net, &self.data, (self.rank.rank, self.rank.world));
        let hooks = &mut self.hooks;
        match &mut self.average {
            None => evaluate_with_hooks(net, data, scope, ranks, hooks),
            Some(average) => average.with_average(|| {
                // Each rank's average holds its own running statistics: bring them
                // together as the raw ones were, so every rank evaluates one model.
                for h in hooks.iter_mut() {
                    h.synchronize(net)?;
                }
                evaluate_with_hooks(net, data, scope, ranks, hooks)
            }),
        }
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
        if self.rank.world == 1 {
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
        if !self.rank.writes() {
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
        let mut tensors = self.optimizer.state()?;
        if let Some(a) = &self.average {
            tensors.extend(a.state());
        }
        let dir = checkpoint::write(&root, &self.net, &tensors, &state)
            .map_err(|e| self.with_last_checkpoint(e))?;
        checkpoint::prune(&root, self.config.checkpoint.keep_last)?;
        self.event(Event::Checkpoint {
            step: self.position.step,
            epoch: self.position.epoch,
            path: dir.clone(),
        })?;
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// Writes the model — the moving average of the weights when there is one — to
    /// `path` (rank 0 only), refusing non-finite weights.
    fn save_model(&mut self, path: &Path) -> Result<()> {
        if !self.rank.writes() {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        }
        let (net, step) = (&self.net, self.position.step);
        let save = || -> Result<()> {
            checkpoint::check_finite(net, step)?;
            Ok(net.save(path)?)
        };
        let saved = match &mut self.average {
            Some(average) => average.with_average(save),
            None => save(),
        };
        saved.map_err(|e| self.with_last_checkpoint(e))
    }

    /// Trains to the end of the configured epochs and evaluates; returns the summary.
    pub fn run(&mut self) -> Result<TrainSummary> {
        let clock = RunClock::start(self.clock.elapsed_s);
        self.start_hooks()?;
        let loader = self.train_loader()?;
        let plan = EpochPlan::new(&self.config, &loader);
        self.log_start(&plan)?;
        let mut progress = Progress::new(plan.total_batches, self.position.batches, self.quiet);
        let trained = self.train_epochs(&loader, &plan, &clock, &mut progress);
        progress.finish();
        trained?;
        self.finish(clock.elapsed_s())
    }

    /// Adds the loss scaler the precision needs (last, so it sees gradients already
    /// reduced across ranks and every rank agrees on skipping), then starts every hook
    /// and gives it the state a checkpoint kept.
    fn start_hooks(&mut self) -> Result<()> {
        let has_scaler = self.hooks.iter().any(|h| h.name() == LossScaling::NAME);
        if self.config.precision.needs_loss_scaling() && !has_scaler {
            let scaler = brisk_precision::LossScaler::new(self.config.loss_scaler)?;
            self.hooks.push(Box::new(LossScaling::new(scaler)));
        }
        for h in &mut self.hooks {
            h.on_start(&self.net)?;
            if let Some(state) = self.hook_states.get(h.name()) {
                h.load_state(state)?;
            }
        }
        self.stepper = Some(Stepper::new(
            &self.net,
            self.config.engine,
            brisk_models::Slices::from_config(self.config.slices),
        )?);
        Ok(())
    }

    /// The `start` event of a fresh run, or the `resume` event of a continued one.
    fn log_start(&mut self, plan: &EpochPlan) -> Result<()> {
        let event = if self.resumed {
            let p = &self.position;
            Event::Resume {
                step: p.step,
                epoch: p.epoch,
                batch: p.batch,
                from: self.last_checkpoint.clone(),
                skipped: self
                    .skipped_checkpoints
                    .iter()
                    .map(|s| format!("{}: {}", s.path.display(), s.reason))
                    .collect(),
            }
        } else {
            let spec = self.net.spec().clone();
            Event::Start {
                seed: self.config.seed,
                epochs: self.config.epochs,
                world: self.rank.world,
                threads: brisk_ops::compute_threads(),
                params: spec.param_count(),
                macs: spec.macs(spec.image_size),
                model: spec,
                train_images: self.data.len(Split::Train),
                test_images: self.data.len(Split::Test),
                batches: plan.total_batches,
                step_path: self.stepper.as_ref().map_or("graph", Stepper::path).into(),
            }
        };
        self.event(event)
    }

    fn train_epochs(
        &mut self,
        loader: &Loader,
        plan: &EpochPlan,
        clock: &RunClock,
        progress: &mut Progress,
    ) -> Result<()> {
        while self.position.epoch < self.config.epochs {
            let result = self.train_epoch(loader, plan, clock, progress)?;
            self.end_epoch(result, clock, progress)?;
        }
        Ok(())
    }

    /// Trains the rest of the current epoch; a stop request ends it early with
    /// [`Error::Interrupted`] after a checkpoint.
    fn train_epoch(
        &mut self,
        loader: &Loader,
        plan: &EpochPlan,
        clock: &RunClock,
        progress: &mut Progress,
    ) -> Result<EpochResult> {
        let epoch = self.position.epoch;
        let batch_size = plan.batch_sizes[epoch];
        let per_epoch = loader.batches_per_epoch(batch_size);
        let schedule = self.config.lr_schedule();
        let lr_factor = self.config.batch.lr_factor(epoch, self.config.lr_scaling);
        let (mut meter, mut interval) = (Meter::default(), Meter::default());
        let mut epoch_clock = EpochClock::default();
        let mut lr = 0.0;
        let mut batches = loader.epoch(epoch as u64, batch_size, self.position.batch)?;
        loop {
            let wait_start = Instant::now();
            let Some(batch) = batches.next() else { break };
            let waited = wait_start.elapsed().as_secs_f64();
            meter.waited(waited);
            interval.waited(waited);
            epoch_clock.waited(waited);
            let batch = batch?;
            let progress_epochs = epoch as f64 + batch.index as f64 / per_epoch as f64;
            lr = schedule.lr(progress_epochs) * lr_factor;
            if let Some(m) = schedule.momentum(progress_epochs) {
                self.optimizer.set_momentum(m);
            }
            let outcome = self.step(&batch, lr, progress_epochs)?;
            self.position.batch = batch.index + 1;
            self.position.batches += 1;
            self.position.images += batch.len() as u64;
            drop(batch);
            meter.add(&outcome);
            interval.add(&outcome);
            if self.interval_due(per_epoch) {
                self.log_interval(&interval, (epoch, per_epoch, batch_size, lr), clock, progress)?;
                interval = Meter::default();
            } else {
                progress.update(self.position.batches, "", false);
            }
            if self.probe_due(outcome.applied) {
                epoch_clock.book(&mut self.clock);
                self.probe(epoch, clock)?;
                epoch_clock.restart();
            }
            let stop = self.stop_requested()?;
            if (self.step_checkpoint_due(outcome.applied) || stop) && self.position.batch < per_epoch {
                epoch_clock.book(&mut self.clock);
                self.clock.elapsed_s = clock.elapsed_s();
                self.checkpoint()?;
                if stop {
                    return Err(self.interrupted());
                }
            }
        }
        drop(batches);
        epoch_clock.book(&mut self.clock);
        Ok(EpochResult {
            epoch,
            batch_size,
            lr,
            meter,
            wait_s: epoch_clock.wait_s,
        })
    }

    /// One batch: forward, loss, hooks' loss scaling, backward, hooks' gradient work, and
    /// the optimiser update unless a hook skips it.
    fn step(&mut self, b: &Batch, lr: f64, progress: f64) -> Result<StepOutcome> {
        let dev = Device::Cpu;
        let n = b.len();
        let (c, h, w) = b.shape;
        let x = Tensor::from_slice(&b.images, (n, c, h, w), &dev)?;
        let y = Tensor::from_slice(&b.labels, n, &dev)?;
        self.optimizer.set_learning_rate(lr);
        let stepper = self.stepper.as_mut().ok_or_else(|| Error::State {
            problem: "a step before the run started".into(),
        })?;
        let logits = stepper.forward(&self.net, &x)?;
        let loss = self.loss.loss(&x, &logits, &y)?;
        let loss_value = loss.to_scalar::<f32>()?;
        let correct = top_k_correct(&logits, &y, 1)?;
        let mut scaled = loss;
        for h in &mut self.hooks {
            scaled = h.scale_loss(scaled)?;
        }
        let stepper = self.stepper.as_mut().ok_or_else(|| Error::State {
            problem: "a step before the run started".into(),
        })?;
        let mut grads = stepper.backward(&scaled, &self.params)?;
        let epoch = self.position.epoch;
        let mut action = StepAction::Apply;
        let ctx = StepContext {
            net: &self.net,
            params: &self.params,
            step: self.position.step,
            epoch,
            progress,
        };
        for h in &mut self.hooks {
            if let StepAction::Skip(reason) = h.after_backward(&ctx, &mut grads)? {
                action = StepAction::Skip(reason);
            }
        }
        let applied = match action {
            StepAction::Apply if !loss_value.is_finite() => {
                return Err(Error::NonFiniteLoss {
                    value: loss_value,
                    step: self.position.step,
                    epoch,
                    batch: b.index,
                    checkpoint: self.last_checkpoint.clone(),
                })
            }
            StepAction::Apply => {
                self.optimizer.step(&grads)?;
                drop(grads);
                self.after_update(progress)?;
                true
            }
            StepAction::Skip(reason) => {
                self.skip_update(b.index, reason)?;
                false
            }
        };
        Ok(StepOutcome {
            images: n,
            loss: loss_value,
            correct,
            applied,
        })
    }

    /// Counts an applied update and lets the hooks see it (masks re-applied, say).
    fn after_update(&mut self, progress: f64) -> Result<()> {
        self.consecutive_skips = 0;
        self.position.step += 1;
        let ctx = StepContext {
            net: &self.net,
            params: &self.params,
            step: self.position.step,
            epoch: self.position.epoch,
            progress,
        };
        for h in &mut self.hooks {
            h.after_step(&ctx)?;
        }
        if let Some(a) = &mut self.average {
            a.update(self.position.step - 1)?;
        }
        Ok(())
    }

    /// Records a skipped update; too many in a row is divergence.
    fn skip_update(&mut self, batch: usize, reason: String) -> Result<()> {
        self.skipped_updates += 1;
        self.consecutive_skips += 1;
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
            return Err(Error::TooManySkips {
                count: self.consecutive_skips,
                step: self.position.step,
                reason,
                checkpoint: self.last_checkpoint.clone(),
            });
        }
        self.event(Event::Skip {
            step: self.position.step,
            epoch: self.position.epoch,
            batch,
            reason,
        })
    }

    /// A `step` event is due every `log_every` batches and at the epoch's last batch.
    fn interval_due(&self, per_epoch: usize) -> bool {
        self.position.batches.is_multiple_of(self.config.log_every as u64) || self.position.batch == per_epoch
    }

    /// A probe is due every `eval.probe_every_steps` applied updates.
    fn probe_due(&self, applied: bool) -> bool {
        let every = self.config.eval.probe_every_steps;
        every > 0 && applied && self.position.step.is_multiple_of(every)
    }

    /// Test top-1 on the first `eval.probe_images` test images, logged as a `probe`
    /// event; not counted as training time.
    fn probe(&mut self, epoch: usize, clock: &RunClock) -> Result<()> {
        let report = self.evaluate_first(Some(self.config.eval.probe_images))?;
        self.event(Event::Probe {
            epoch,
            step: self.position.step,
            top1: report.top1,
            n: report.n,
            train_s: self.clock.train_s,
            elapsed_s: clock.elapsed_s(),
        })
    }

    /// A mid-epoch checkpoint is due every `checkpoint.every_steps` applied updates.
    fn step_checkpoint_due(&self, applied: bool) -> bool {
        let every = self.config.checkpoint.every_steps;
        every > 0 && applied && self.position.step.is_multiple_of(every)
    }

    /// An evaluation is due after the last epoch and every `eval.every_epochs`.
    fn eval_due(&self, last: bool) -> bool {
        let every = self.config.eval.every_epochs;
        last || (every > 0 && self.position.epoch.is_multiple_of(every))
    }

    /// An end-of-epoch checkpoint is due after the last epoch, on a stop request and
    /// every `checkpoint.every_epochs`.
    fn epoch_checkpoint_due(&self, last: bool, stop: bool) -> bool {
        let every = self.config.checkpoint.every_epochs;
        last || stop || (every > 0 && self.position.epoch.is_multiple_of(every))
    }

    /// The `step` event and progress line of an interval of batches.
    fn log_interval(
        &mut self,
        interval: &Meter,
        (epoch, per_epoch, batch_size, lr): (usize, usize, usize, f64),
        clock: &RunClock,
        progress: &mut Progress,
    ) -> Result<()> {
        let hooks = self
            .hooks
            .iter()
            .flat_map(|h| h.metrics())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let record = StepRecord {
            step: self.position.step,
            epoch,
            batch: self.position.batch,
            epoch_progress: self.position.batch as f64 / per_epoch as f64,
            batch_size,
            lr,
            loss: interval.loss(),
            top1: interval.top1(),
            img_per_s: interval.img_per_s(),
            data_wait: interval.data_wait(),
            batches: interval.batches,
            elapsed_s: clock.elapsed_s(),
            hooks,
        };
        let message = format!(
            "epoch {}/{} batch {}/{per_epoch} | loss {:.4} top1 {:.1}% | lr {lr:.4} | {:.0} img/s, data wait {:.0}%",
            epoch + 1,
            self.config.epochs,
            record.batch,
            record.loss,
            100.0 * record.top1,
            record.img_per_s,
            100.0 * record.data_wait
        );
        progress.update(self.position.batches, &message, false);
        self.event(Event::Step(record))
    }

    /// After an epoch: its event, the evaluation (and best model) when due, the
    /// checkpoint when due; a stop request ends the run here.
    fn end_epoch(&mut self, r: EpochResult, clock: &RunClock, progress: &mut Progress) -> Result<()> {
        self.position.epoch += 1;
        self.position.batch = 0;
        let epoch_s = r.meter.seconds();
        self.event(Event::Epoch {
            epoch: r.epoch,
            step: self.position.step,
            batch_size: r.batch_size,
            lr: r.lr,
            train_loss: r.meter.loss(),
            train_top1: r.meter.top1(),
            images: r.meter.images as u64,
            batches: r.meter.batches,
            img_per_s: r.meter.img_per_s(),
            data_wait: r.wait_s / epoch_s,
            epoch_s,
            elapsed_s: clock.elapsed_s(),
        })?;
        let last = self.position.epoch == self.config.epochs;
        if self.eval_due(last) {
            self.evaluate_epoch(&r, last, clock, progress)?;
        }
        self.clock.elapsed_s = clock.elapsed_s();
        let stop = self.stop_requested()?;
        if self.epoch_checkpoint_due(last, stop) {
            self.checkpoint()?;
        }
        if stop && !last {
            return Err(self.interrupted());
        }
        Ok(())
    }

    /// Evaluates after an epoch, logs it, and saves the model to `best/` when it improved.
    fn evaluate_epoch(
        &mut self,
        r: &EpochResult,
        last: bool,
        clock: &RunClock,
        progress: &Progress,
    ) -> Result<()> {
        let report = self.evaluate()?;
        let elapsed_s = clock.elapsed_s();
        self.event(Event::Eval {
            epoch: r.epoch,
            step: self.position.step,
            images: self.position.images,
            top1: report.top1,
            top5: report.top5,
            loss: report.loss,
            n: report.n,
            elapsed_s,
            train_s: self.clock.train_s,
        })?;
        progress.line(&format!(
            "epoch {}/{}: train loss {:.4} top1 {:.2}% | test loss {:.4} top1 {:.2}% top5 {:.2}% | {:.0} s",
            r.epoch + 1,
            self.config.epochs,
            r.meter.loss(),
            100.0 * r.meter.top1(),
            report.loss,
            100.0 * report.top1,
            100.0 * report.top5,
            elapsed_s
        ));
        let improved = self.best.as_ref().is_none_or(|b| report.top1 > b.top1);
        if improved {
            self.best = Some(Best {
                top1: report.top1,
                epoch: r.epoch,
                step: self.position.step,
            });
            self.save_model(&self.out.join(BEST_DIR).join(MODEL_FILE))?;
        }
        if last {
            self.last_eval = Some(report);
        }
        Ok(())
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
        let model = self.out.join(MODEL_FILE);
        self.save_model(&model)?;
        // From here on the network holds the model just saved (`into_network`).
        if let Some(mut average) = self.average.take() {
            average.swap()?;
        }
        let summary = self.summary(&report, elapsed_s, model);
        self.event(Event::End(summary.clone()))?;
        if self.rank.writes() {
            summary.write(&self.out.join(SUMMARY_FILE))?;
        }
        Ok(summary)
    }

    fn summary(&self, report: &EvalReport, elapsed_s: f64, model: PathBuf) -> TrainSummary {
        let spec = self.net.spec();
        let best = self.best.clone().unwrap_or(Best {
            top1: report.top1,
            epoch: self.config.epochs - 1,
            step: self.position.step,
        });
        let c = self.clock;
        // Every rank reads an equal share (the sampler pads to a multiple of world).
        let images = self.position.images * self.rank.world as u64;
        TrainSummary {
            top1: report.top1,
            top5: report.top5,
            loss: report.loss,
            n: report.n,
            best_top1: best.top1,
            best_epoch: best.epoch,
            epochs: self.config.epochs,
            updates: self.position.step,
            skipped: self.skipped_updates,
            world: self.rank.world,
            images,
            elapsed_s,
            train_s: c.train_s,
            img_per_s: images as f64 / c.train_s.max(1e-9),
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
        }
    }
}
