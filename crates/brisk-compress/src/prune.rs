//! `brisk prune` as a library: the four methods (global or per-layer magnitude masks,
//! gradual magnitude pruning, filter pruning), the fine-tuning run that follows, and the
//! files it writes (a dense model, plus a sparse one for the unstructured methods).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use brisk_data::{Dataset, Split};
use brisk_models::{Network, MODEL_FILE};
use brisk_schema::layout::SPARSE_MODEL_FILE;
use brisk_schema::{BatchSchedule, LrShape, TrainConfig};
use brisk_train::Trainer;

use crate::error::{Error, Result};
use crate::filter::{prune_filters, FilterCriterion};
use crate::masks::{GradualPruning, MaskHook, Masks, PruneSchedule, Scope};
use crate::sparse;

/// How a model is pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMethod {
    /// One magnitude threshold over all prunable layers, then fine-tuning.
    Global,
    /// The target sparsity in each prunable layer, then fine-tuning.
    Layer,
    /// Zhu & Gupta's cubic schedule while fine-tuning.
    Gradual,
    /// Block-internal channels removed: a smaller dense model.
    Filter,
}

impl PruneMethod {
    pub const ALL: [PruneMethod; 4] = [
        PruneMethod::Global,
        PruneMethod::Layer,
        PruneMethod::Gradual,
        PruneMethod::Filter,
    ];
    pub const NAMES: [&'static str; 4] = [
        PruneMethod::ALL[0].name(),
        PruneMethod::ALL[1].name(),
        PruneMethod::ALL[2].name(),
        PruneMethod::ALL[3].name(),
    ];

    /// The name `--method` takes.
    pub const fn name(self) -> &'static str {
        match self {
            PruneMethod::Global => "global",
            PruneMethod::Layer => "layer",
            PruneMethod::Gradual => "gradual",
            PruneMethod::Filter => "filter",
        }
    }

    /// Whether the method zeroes weights in place (and writes a sparse file), rather than
    /// making the model smaller.
    pub fn is_unstructured(self) -> bool {
        self != PruneMethod::Filter
    }
}

impl std::str::FromStr for PruneMethod {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        PruneMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "method",
                problem: format!("{s:?} is not one of {}", PruneMethod::NAMES.join(", ")),
            })
    }
}

impl std::fmt::Display for PruneMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The training run of a compression command (fine-tuning a pruned model, training a
/// distilled student): the default training config with a cosine schedule from `lr`,
/// a fixed batch, `epochs` (at least one) and `threads` (`None`: every core).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FineTune {
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub threads: Option<usize>,
    /// Seed of the data order and augmentation (and of a distilled student's weights).
    pub seed: u64,
    /// Flip test-time augmentation in the run's evaluations (`eval.flip`).
    pub flip: bool,
}

impl FineTune {
    /// The training config on the dataset in `data`, writing to `out`.
    pub fn config(&self, data: &Path, out: &Path) -> Result<TrainConfig> {
        let c = TrainConfig {
            data: Some(data.to_path_buf()),
            out: Some(out.to_path_buf()),
            epochs: self.epochs.max(1),
            seed: self.seed,
            threads: self.threads.unwrap_or(0),
            batch: BatchSchedule::Fixed { size: self.batch },
            lr: brisk_schema::LrConfig {
                base: self.lr,
                shape: LrShape::Cosine { min_lr: 0.0 },
                ..Default::default()
            },
            eval: brisk_schema::EvalSettings {
                flip: self.flip,
                ..Default::default()
            },
            ..TrainConfig::default()
        };
        c.validate()?;
        Ok(c)
    }
}

/// Everything `brisk prune` is told.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneOptions {
    pub method: PruneMethod,
    /// Fraction of weights removed (filter: of block-internal channels), in [0, 1).
    pub sparsity: f64,
    /// How filters are ranked (filter pruning).
    pub criterion: FilterCriterion,
    /// Layers left alone (exact tensor names or prefixes); see `masks::default_exclusions`.
    pub exclude: Vec<String>,
    /// Fine-tuning after pruning (gradual: the pruning run itself); 0 epochs skips it.
    pub finetune: FineTune,
}

impl PruneSchedule {
    /// The gradual schedule `brisk prune --method gradual` uses over `total_steps` of
    /// fine-tuning: up to `final_sparsity` over the first two thirds, in ten pruning steps
    /// (or one per step when there are fewer), so the last third fine-tunes at the final
    /// sparsity.
    pub fn spread(total_steps: u64, final_sparsity: f64) -> Self {
        let span = total_steps * 2 / 3;
        let count = 10.min(span).max(1);
        let every = (span / count).max(1);
        PruneSchedule {
            initial: 0.0,
            final_sparsity,
            start: every,
            every,
            count,
        }
    }
}

/// A pruned model ready to fine-tune.
#[derive(Debug)]
pub struct Pruning {
    trainer: Trainer,
    options: PruneOptions,
    out: PathBuf,
}

impl Pruning {
    /// Prunes `net` as `options` say (masks, gradual hook or smaller network) and sets up
    /// its fine-tuning on `data`, writing into `out`.
    pub fn new(net: Network, data: &Arc<Dataset>, out: &Path, options: PruneOptions) -> Result<Self> {
        if !(0.0..1.0).contains(&options.sparsity) {
            return Err(Error::InvalidConfig {
                field: "sparsity",
                problem: format!("must be in [0, 1), got {}", options.sparsity),
            });
        }
        let config = options.finetune.config(data.dir(), out)?;
        let trainer = match options.method {
            PruneMethod::Filter => {
                let (pruned, _) = prune_filters(&net, 1.0 - options.sparsity, options.criterion)?;
                Trainer::with_network(config, pruned)?
            }
            PruneMethod::Gradual => {
                let steps_per_epoch = data.len(Split::Train).div_ceil(options.finetune.batch.max(1)) as u64;
                let total = steps_per_epoch * options.finetune.epochs.max(1) as u64;
                let schedule = PruneSchedule::spread(total, options.sparsity);
                let hook = GradualPruning::new(schedule, Scope::Global, options.exclude.clone())?;
                let mut t = Trainer::with_network(config, net)?;
                t.add_hook(Box::new(hook));
                t
            }
            PruneMethod::Global | PruneMethod::Layer => {
                let scope = match options.method {
                    PruneMethod::Layer => Scope::Layer,
                    _ => Scope::Global,
                };
                let masks = Masks::magnitude(&net, options.sparsity, scope, &options.exclude)?;
                masks.apply()?;
                let mut t = Trainer::with_network(config, net)?;
                t.add_hook(Box::new(MaskHook::new(masks)));
                t
            }
        };
        Ok(Pruning {
            trainer,
            options,
            out: out.to_path_buf(),
        })
    }

    /// The fine-tuning run, to set it up further (quiet, a stop flag).
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// Fine-tunes (unless 0 epochs were asked for) and writes the model: `model.safetensors`
    /// and, for the unstructured methods, `model-sparse.safetensors`. Returns the network
    /// and the file that represents the result (the sparse one when there is one).
    pub fn run(mut self) -> Result<(Network, PathBuf)> {
        if self.options.finetune.epochs > 0 {
            self.trainer.run()?;
        } else {
            std::fs::create_dir_all(&self.out).map_err(|e| Error::io("cannot create", &self.out, e))?;
            self.trainer.network().save(&self.out.join(MODEL_FILE))?;
        }
        let net = self.trainer.into_network();
        let file = if self.options.method.is_unstructured() {
            let path = self.out.join(SPARSE_MODEL_FILE);
            sparse::save(&net, &path)?;
            path
        } else {
            self.out.join(MODEL_FILE)
        };
        Ok((net, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradual_schedule_reaches_its_target_two_thirds_in() {
        let s = PruneSchedule::spread(300, 0.8);
        assert_eq!((s.start, s.every, s.count), (20, 20, 10));
        assert!(s.validate().is_ok());
        assert_eq!(s.sparsity_at(0), 0.0);
        assert!((s.sparsity_at(220) - 0.8).abs() < 1e-12);
        assert!((s.sparsity_at(299) - 0.8).abs() < 1e-12);
        // A run shorter than ten steps prunes at every step it has.
        let s = PruneSchedule::spread(4, 0.5);
        assert_eq!((s.start, s.every, s.count), (1, 1, 2));
        let s = PruneSchedule::spread(1, 0.5);
        assert!(s.validate().is_ok(), "{s:?}");
    }

    #[test]
    fn method_names_round_trip() {
        for m in PruneMethod::ALL {
            assert_eq!(m.name().parse::<PruneMethod>().ok(), Some(m));
        }
        let e = "random".parse::<PruneMethod>().expect_err("unknown").to_string();
        assert!(e.contains("global, layer, gradual, filter"), "{e}");
    }
}
