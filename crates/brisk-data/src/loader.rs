//! `Loader`: batches of augmented images, assembled by worker threads ahead of the
//! trainer and handed over in order through bounded channels, with their buffers reused.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::augment::Augment;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::manifest::Split;
use crate::sampler::Sampler;

/// How batches are made.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    pub split: Split,
    /// Worker threads; 0 makes batches synchronously in the consumer's thread.
    pub workers: usize,
    /// Batches prepared ahead of the consumer, in all. By default, 4.
    pub prefetch: usize,
    /// Seeds the order and the augmentations.
    pub seed: u64,
    pub shuffle: bool,
    /// Drop the last, smaller batch of an epoch.
    pub drop_last: bool,
    pub rank: usize,
    pub world: usize,
    pub augment: Augment,
}

impl LoaderConfig {
    /// Training defaults for a dataset: shuffled, crop + flip, 2 workers, prefetch 4,
    /// single rank.
    pub fn train(dataset: &Dataset) -> Self {
        let m = dataset.manifest();
        LoaderConfig {
            split: Split::Train,
            workers: 2,
            prefetch: 4,
            seed: 0,
            shuffle: true,
            drop_last: false,
            rank: 0,
            world: 1,
            augment: Augment::train(m.mean.clone(), m.std.clone()),
        }
    }

    /// Evaluation defaults: the test split in order, normalisation only.
    pub fn eval(dataset: &Dataset) -> Self {
        let m = dataset.manifest();
        LoaderConfig {
            split: Split::Test,
            shuffle: false,
            augment: Augment::eval(m.mean.clone(), m.std.clone()),
            ..Self::train(dataset)
        }
    }
}

/// One batch: images `[n, C, H, W]` f32 (normalised) and labels. Its buffers return to
/// the loader's pool when the batch is dropped, so a steady epoch allocates nothing.
#[derive(Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// (C, H, W) of each image.
    pub shape: (usize, usize, usize),
    pub epoch: u64,
    /// Position of the batch in its epoch.
    pub index: usize,
    pool: Option<Sender<Buffers>>,
}

/// The reusable storage of a batch.
type Buffers = (Vec<f32>, Vec<u32>);

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            // A full or closed pool just frees the buffer.
            let _ = pool.try_send((std::mem::take(&mut self.images), std::mem::take(&mut self.labels)));
        }
    }
}

/// Makes batches of one split of a dataset.
#[derive(Debug)]
pub struct Loader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
    sampler: Sampler,
}

/// Everything a worker needs to make batch `b` of an epoch.
#[derive(Debug)]
struct Plan {
    dataset: Arc<Dataset>,
    augment: Augment,
    split: Split,
    indices: Vec<usize>,
    batch_size: usize,
    epoch: u64,
    seed: u64,
}

impl Plan {
    fn batches(&self) -> usize {
        self.indices.len().div_ceil(self.batch_size)
    }

    /// Makes batch `b` in the given (reused) buffers.
    fn make(&self, b: usize, (mut images, mut labels): Buffers, pool: Sender<Buffers>) -> Result<Batch> {
        let m = self.dataset.manifest();
        let dims = (m.height, m.width, m.channels);
        let per = m.image_bytes();
        let idx = &self.indices[b * self.batch_size..((b + 1) * self.batch_size).min(self.indices.len())];
        images.resize(idx.len() * per, 0.0);
        labels.clear();
        for (slot, &i) in idx.iter().enumerate() {
            let (img, label) = self.dataset.get(self.split, i).ok_or_else(|| {
                Error::corrupt(
                    self.dataset.dir(),
                    format!("image {i} of {} is out of range", self.split.name()),
                )
            })?;
            // Each image's random choices come from (seed, epoch, index) alone, so the
            // batch is the same whichever thread makes it.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_a06e_0000_0000);
            rng.set_stream((self.epoch << 40) | i as u64);
            self.augment
                .apply(img, dims, &mut rng, &mut images[slot * per..(slot + 1) * per]);
            labels.push(label);
        }
        Ok(Batch {
            images,
            labels,
            shape: (m.channels, m.height, m.width),
            epoch: self.epoch,
            index: b,
            pool: Some(pool),
        })
    }
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, config: LoaderConfig) -> Result<Self> {
        let m = dataset.manifest();
        if config.augment.mean.len() != m.channels || config.augment.std.len() != m.channels {
            return Err(Error::InvalidConfig {
                field: "augment",
                problem: format!("mean and std need {} channels", m.channels),
            });
        }
        if !config.augment.std.iter().all(|&s| s.is_finite() && s > 0.0) {
            return Err(Error::InvalidConfig {
                field: "augment.std",
                problem: "every std must be positive".into(),
            });
        }
        let sampler = Sampler::new(
            dataset.len(config.split),
            config.seed,
            config.rank,
            config.world,
            config.shuffle,
        )?;
        Ok(Loader {
            dataset,
            config,
            sampler,
        })
    }

    /// Batches of `epoch` at `batch_size` (which may change from epoch to epoch),
    /// starting at batch `start` (to resume mid-epoch). Dropping the iterator stops and
    /// joins its workers.
    pub fn epoch(&self, epoch: u64, batch_size: usize, start: usize) -> Result<Epoch> {
        if batch_size == 0 {
            return Err(Error::InvalidConfig {
                field: "batch_size",
                problem: "must be at least 1".into(),
            });
        }
        let mut indices = self.sampler.epoch_indices(epoch);
        if self.config.drop_last {
            indices.truncate(indices.len() / batch_size * batch_size);
        }
        let plan = Arc::new(Plan {
            dataset: self.dataset.clone(),
            augment: self.config.augment.clone(),
            split: self.config.split,
            indices,
            batch_size,
            epoch,
            seed: self.config.seed,
        });
        Epoch::spawn(plan, start, self.config.workers, self.config.prefetch)
    }

    /// Batches per epoch at `batch_size` for this rank.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        let n = self.sampler.per_rank();
        if self.config.drop_last {
            n / batch_size.max(1)
        } else {
            n.div_ceil(batch_size.max(1))
        }
    }
}

/// The batches of one epoch, in order.
#[derive(Debug)]
pub struct Epoch {
    plan: Arc<Plan>,
    /// The first batch (the resume point): worker w made batches start + w + k·workers.
    start: usize,
    next: usize,
    total: usize,
    channels: Vec<Receiver<Result<Batch>>>,
    threads: Vec<JoinHandle<()>>,
    pool_tx: Sender<Buffers>,
    pool_rx: Receiver<Buffers>,
}

impl Epoch {
    /// Starts `workers` threads (none: synchronous) making the batches of `plan` from
    /// batch `start` on, with about `prefetch` batches ready ahead.
    fn spawn(plan: Arc<Plan>, start: usize, workers: usize, prefetch: usize) -> Result<Self> {
        let total = plan.batches();
        let (pool_tx, pool_rx) = bounded(prefetch.max(1) + workers + 2);
        let mut channels = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        let depth = prefetch.max(1).div_ceil(workers.max(1));
        let plan_dir = plan.dataset.dir().to_path_buf();
        for w in 0..workers {
            let (tx, rx) = bounded::<Result<Batch>>(depth);
            let (plan, pool_tx, pool_rx) = (plan.clone(), pool_tx.clone(), pool_rx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("brisk-loader-{w}"))
                .spawn(move || {
                    // Worker w makes batches start + w, start + w + workers, …; the
                    // consumer reads the channels in turn, so batches arrive in order.
                    for b in (start + w..total).step_by(workers) {
                        let buffers = pool_rx.try_recv().unwrap_or_default();
                        let batch = plan.make(b, buffers, pool_tx.clone());
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return; // the consumer is gone, or it has our error
                        }
                    }
                })
                .map_err(|e| Error::io("cannot start a loader thread for", &plan_dir, e))?;
            channels.push(rx);
            threads.push(handle);
        }
        Ok(Epoch {
            plan,
            start,
            next: start,
            total,
            channels,
            threads,
            pool_tx,
            pool_rx,
        })
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let b = self.next;
        self.next += 1;
        if self.channels.is_empty() {
            let buffers = self.pool_rx.try_recv().unwrap_or_default();
            let batch = self.plan.make(b, buffers, self.pool_tx.clone());
            if batch.is_err() {
                self.next = self.total; // stop after reporting the error, as with workers
            }
            return Some(batch);
        }
        let worker = (b - self.start) % self.channels.len();
        match self.channels[worker].recv() {
            Ok(batch) => {
                if batch.is_err() {
                    self.next = self.total; // stop after reporting the error
                }
                Some(batch)
            }
            Err(_) => {
                self.next = self.total;
                Some(Err(Error::corrupt(
                    self.plan.dataset.dir(),
                    format!("loader worker {worker} stopped before batch {b} (it panicked)"),
                )))
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the channels makes every blocked worker's send fail, so each returns.
        self.channels.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{pack_synthetic, SyntheticConfig};

    #[test]
    fn a_worker_error_reaches_the_consumer() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", std::path::Path::new("."), e))?;
        pack_synthetic(
            dir.path(),
            &SyntheticConfig {
                train: 6,
                test: 0,
                seed: 0,
                size: 8,
            },
            10,
        )?;
        let dataset = Arc::new(Dataset::open(dir.path())?);
        let m = dataset.manifest().clone();
        for workers in [0, 2] {
            // Index 99 does not exist: making the second batch fails.
            let plan = Arc::new(Plan {
                dataset: dataset.clone(),
                augment: Augment::eval(m.mean.clone(), m.std.clone()),
                split: Split::Train,
                indices: vec![0, 1, 99, 2],
                batch_size: 2,
                epoch: 0,
                seed: 0,
            });
            let items: Vec<Result<Batch>> = Epoch::spawn(plan, 0, workers, 2)?.collect();
            assert_eq!(items.len(), 2, "workers={workers}");
            assert!(items[0].is_ok());
            let err = items[1].as_ref().expect_err("second batch fails").to_string();
            assert!(err.contains("image 99"), "{err}");
        }
        Ok(())
    }
}

/// Throughput of a loader: images per second over whole epochs, timed from the request
/// of the first batch to the arrival of the last.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Throughput {
    pub images: usize,
    pub seconds: f64,
    pub img_per_s: f64,
}

impl Loader {
    /// Runs `epochs` epochs at `batch_size`, touching each batch as a trainer would
    /// (reading one value per image), and reports the rate.
    pub fn measure(&self, batch_size: usize, epochs: u64) -> Result<Throughput> {
        let start = std::time::Instant::now();
        let mut images = 0;
        let mut checksum = 0f32;
        for e in 0..epochs {
            for b in self.epoch(e, batch_size, 0)? {
                let b = b?;
                let per = b.shape.0 * b.shape.1 * b.shape.2;
                checksum += b.images.iter().step_by(per.max(1)).sum::<f32>();
                images += b.len();
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(checksum);
        Ok(Throughput {
            images,
            seconds,
            img_per_s: images as f64 / seconds.max(1e-9),
        })
    }
}
