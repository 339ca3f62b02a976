//! `SplitEngine`: in-process data parallelism for the engine. Each batch is split into
//! slices run side by side, one executor and one compute pool per slice; batch-norm
//! statistics are shared across the slices the way synchronised batch-norm shares them
//! across MPI ranks, and the slices' gradients are summed.
//!
//! Why: at narrow widths and on small images each operation is too small to split across
//! cores (waking the pool, packing and scheduling cost more than they save), so a core
//! does better running whole operations on part of the batch. Two MPI ranks on one 2-core
//! host ran 1.2-1.3x the img/s of one process with two threads; this does the same inside
//! one process, at the cost of one barrier per batch-norm.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use brisk_ops::BatchNormSync;
use brisk_spec::ModelSpec;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::network::Network;
use crate::op_times::OpTimes;

/// The fewest images a slice gets: a batch too small to give each slice this many runs
/// on fewer slices.
pub const MIN_SLICE: usize = 4;

/// Forward multiply-adds per image below which [`SplitEngine`] splits the batch by
/// default: measured in docs/kernels.md, splitting paid below and cost above it.
pub const AUTO_SPLIT_MACS: u64 = 40_000_000;

/// How many slices a batch is split into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slices {
    /// One per compute thread when the model is small on the batch's images
    /// ([`AUTO_SPLIT_MACS`]), else one.
    Auto,
    /// This many (at most one per compute thread).
    Count(usize),
}

impl Slices {
    /// `0` is [`Slices::Auto`], as in the config's `slices`.
    pub fn from_config(n: usize) -> Self {
        match n {
            0 => Slices::Auto,
            n => Slices::Count(n),
        }
    }

    /// The most slices a batch may be split into with `threads` compute threads.
    fn most(self, threads: usize) -> usize {
        match self {
            Slices::Count(n) => n.clamp(1, threads.max(1)),
            Slices::Auto => threads.max(1),
        }
    }

    /// The slices for a batch of `side`x`side` images, of at most `most`.
    fn for_images(self, spec: &ModelSpec, side: usize, most: usize) -> usize {
        match self {
            Slices::Auto if spec.macs(side) >= AUTO_SPLIT_MACS => 1,
            _ => most,
        }
    }
}

/// The engine over slices of each batch.
#[derive(Debug)]
pub struct SplitEngine {
    slices: Vec<Slice>,
    split: Slices,
    spec: ModelSpec,
    group: Arc<Group>,
    /// Images per slice of the batch in flight (forward to backward).
    sizes: Vec<usize>,
    /// The slices the last batch ran on.
    last: usize,
}

#[derive(Debug)]
struct Slice {
    engine: Engine,
    /// Its share of the compute threads (`None` when there is one slice). A batch run
    /// on one slice runs on the caller's pool.
    pool: Option<rayon::ThreadPool>,
}

impl SplitEngine {
    /// An engine for `net` splitting each batch as `split` says, the slices sharing out
    /// the caller's pool's threads. A network whose batch-norm is synchronised across MPI
    /// ranks runs on one slice.
    pub fn new(net: &Network, split: Slices) -> Result<Self> {
        let threads = rayon::current_num_threads();
        let count = match net.has_batch_norm_sync() {
            true => 1,
            false => split.most(threads),
        };
        let group = Arc::new(Group::new(count));
        let slices = (0..count)
            .map(|rank| {
                if count == 1 {
                    return Ok(Slice {
                        engine: Engine::new(net)?,
                        pool: None,
                    });
                }
                let sync = Arc::new(SliceSync {
                    group: group.clone(),
                    rank,
                });
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads((threads / count).max(1))
                    .thread_name(move |i| format!("brisk-slice-{rank}-{i}"))
                    .build()
                    .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("slice pool: {e}"))))?;
                Ok(Slice {
                    engine: Engine::new(net)?.in_slice(sync, rank == 0),
                    pool: Some(pool),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SplitEngine {
            slices,
            split,
            spec: net.spec().clone(),
            group,
            sizes: Vec::new(),
            last: 1,
        })
    }

    /// The slices the last batch ran on.
    pub fn slices_used(&self) -> usize {
        self.last
    }

    /// The first slice's per-op wall times (every slice runs the same ops on its part).
    pub fn op_times(&self) -> &OpTimes {
        self.slices[0].engine.op_times()
    }

    /// The training-mode logits `[n, classes]` of `images` `[n, C, H, W]` (see
    /// [`Engine::forward_train`]), the batch-norm statistics over the whole batch.
    pub fn forward_train(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.forward(images, n, true)
    }

    /// The evaluation-mode logits of `images` (running statistics).
    pub fn forward_eval(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.forward(images, n, false)
    }

    fn forward(&mut self, images: &[f32], n: usize, train: bool) -> Result<Vec<f32>> {
        let per_image = images.len() / n.max(1);
        let side = ((per_image / self.spec.in_channels.max(1)) as f64).sqrt().round() as usize;
        let sizes = slice_sizes(n, self.split.for_images(&self.spec, side, self.slices.len()));
        let mut parts = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for &size in &sizes {
            parts.push(&images[start * per_image..(start + size) * per_image]);
            start += size;
        }
        let logits = self.run(&sizes, |engine, i| match train {
            true => engine.forward_train(parts[i], sizes[i]),
            false => engine.forward_eval(parts[i], sizes[i]),
        })?;
        self.last = sizes.len();
        self.sizes = if train { sizes } else { Vec::new() };
        Ok(logits.concat())
    }

    /// The gradients of every trainable variable from the logits' gradient of the last
    /// training forward (see [`Engine::backward`]): the slices' gradients summed.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<Vec<(String, Vec<f32>)>> {
        let sizes = std::mem::take(&mut self.sizes);
        let n: usize = sizes.iter().sum();
        if sizes.is_empty() || !dlogits.len().is_multiple_of(n) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "brisk's engine: {} logit gradients for a batch of {n}",
                dlogits.len()
            ))));
        }
        let classes = dlogits.len() / n;
        let starts: Vec<usize> = sizes
            .iter()
            .scan(0, |s, &k| Some(std::mem::replace(s, *s + k)))
            .collect();
        let mut parts = self
            .run(&sizes, |engine, i| {
                let from = starts[i] * classes;
                engine.backward(&dlogits[from..from + sizes[i] * classes])
            })?
            .into_iter();
        let mut total = parts.next().unwrap_or_default();
        for part in parts {
            for ((name, sum), (other, g)) in total.iter_mut().zip(part) {
                if *name != other {
                    return Err(Error::Candle(candle_core::Error::Msg(format!(
                        "brisk's engine: slices computed gradients in different orders ({name} and {other})"
                    ))));
                }
                brisk_ops::add_assign(sum, &g);
            }
        }
        Ok(total)
    }

    /// Runs `work` as slice `i` for each of the first `sizes.len()` slices, side by side,
    /// each on its own pool; a slice that fails releases the others from their barriers.
    fn run<T: Send>(
        &mut self,
        sizes: &[usize],
        work: impl Fn(&mut Engine, usize) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let active = sizes.len();
        self.group.start(active);
        let group = &self.group;
        let work = &work;
        let run_one = |i: usize, slice: &mut Slice| -> Result<T> {
            let mut release = Release { group, done: false };
            let out = match (&slice.pool, active) {
                (Some(pool), 2..) => pool.install(|| work(&mut slice.engine, i)),
                _ => work(&mut slice.engine, i),
            };
            release.done = out.is_ok();
            out
        };
        let mut results: Vec<Result<T>> = std::thread::scope(|scope| {
            let mut slices = self.slices[..active].iter_mut().enumerate();
            let first = slices.next();
            let handles: Vec<_> = slices.map(|(i, s)| scope.spawn(move || run_one(i, s))).collect();
            let mut results = vec![match first {
                Some((i, s)) => run_one(i, s),
                None => Err(no_slices()),
            }];
            for h in handles {
                results.push(h.join().unwrap_or_else(|_| Err(panicked())));
            }
            results
        });
        // The first failure that is not another slice's release.
        if let Some(i) = results.iter().position(|r| matches!(r, Err(e) if !is_release(e))) {
            return Err(results.swap_remove(i).err().unwrap_or_else(panicked));
        }
        results.into_iter().collect()
    }
}

/// Images per slice: `n` split as evenly as possible over at most `slices` slices of at
/// least [`MIN_SLICE`] images (one slice when `n` is smaller).
pub fn slice_sizes(n: usize, slices: usize) -> Vec<usize> {
    let k = (n / MIN_SLICE).clamp(1, slices.max(1));
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

fn no_slices() -> Error {
    Error::Candle(candle_core::Error::Msg("brisk's engine has no slices".into()))
}

fn panicked() -> Error {
    Error::Candle(candle_core::Error::Msg(
        "a slice of brisk's engine panicked".into(),
    ))
}

const RELEASED: &str = "released: another slice of the batch failed";

fn is_release(e: &Error) -> bool {
    matches!(e, Error::Candle(candle_core::Error::Msg(m)) if m == RELEASED)
}

/// Releases the group's waiting slices when dropped before its slice is done (the slice
/// failed or panicked).
struct Release<'a> {
    group: &'a Group,
    done: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.group.release();
        }
    }
}

/// The slices' meeting point: an all-reduce over the slices of one batch.
#[derive(Debug)]
struct Group {
    state: Mutex<Round>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct Round {
    parties: usize,
    arrived: usize,
    generation: u64,
    released: bool,
    slots: Vec<Vec<f64>>,
    sum: Vec<f64>,
}

impl Group {
    fn new(slices: usize) -> Self {
        Group {
            state: Mutex::new(Round {
                slots: vec![Vec::new(); slices],
                ..Round::default()
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A panicking slice releases the group before unwinding past it: the state stays
        // consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new batch over `parties` slices.
    fn start(&self, parties: usize) {
        let mut r = self.lock();
        r.parties = parties;
        r.arrived = 0;
        r.released = false;
    }

    fn release(&self) {
        self.lock().released = true;
        self.turn.notify_all();
    }

    /// Sums `values` over the slices, in slice order (so every slice gets the same bits).
    fn all_reduce_sum(&self, rank: usize, values: &mut [f64]) -> candle_core::Result<()> {
        let mut r = self.lock();
        if r.released {
            return Err(candle_core::Error::Msg(RELEASED.into()));
        }
        r.slots[rank].clear();
        r.slots[rank].extend_from_slice(values);
        r.arrived += 1;
        if r.arrived == r.parties {
            let parties = r.parties;
            let mut sum = std::mem::take(&mut r.sum);
            sum.clear();
            sum.resize(values.len(), 0.0);
            for slot in &r.slots[..parties] {
                if slot.len() != sum.len() {
                    drop(r);
                    self.release();
                    return Err(candle_core::Error::Msg(
                        "the slices of a batch reduced buffers of different lengths".into(),
                    ));
                }
                for (s, v) in sum.iter_mut().zip(slot) {
                    *s += v;
                }
            }
            r.sum = sum;
            r.arrived = 0;
            r.generation += 1;
            self.turn.notify_all();
        } else {
            let generation = r.generation;
            r = self
                .turn
                .wait_while(r, |r| r.generation == generation && !r.released)
                .unwrap_or_else(|p| p.into_inner());
            if r.generation == generation {
                return Err(candle_core::Error::Msg(RELEASED.into()));
            }
        }
        values.copy_from_slice(&r.sum);
        Ok(())
    }
}

/// One slice's handle on the group: batch-norm's synchronisation within the process.
#[derive(Debug)]
struct SliceSync {
    group: Arc<Group>,
    rank: usize,
}

impl BatchNormSync for SliceSync {
    fn all_reduce_sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        self.group.all_reduce_sum(self.rank, values)
    }

    fn shared(&self) -> bool {
        self.group.lock().parties > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slice_gets_the_same_sum_in_slice_order() -> anyhow::Result<()> {
        let group = Arc::new(Group::new(3));
        group.start(3);
        let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = &group;
                    s.spawn(move || {
                        let mut v = vec![rank as f64 + 0.1, 1e16, -1e16];
                        group.all_reduce_sum(rank, &mut v).map(|()| v)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a slice panicked"))?
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<_>>()
        })?;
        let expected = [0.1 + 1.1 + 2.1, 3e16, -3e16];
        for s in &sums {
            assert_eq!(s.as_slice(), expected, "{sums:?}");
        }
        Ok(())
    }

    #[test]
    fn a_released_group_frees_its_waiting_slice() {
        let group = Arc::new(Group::new(2));
        group.start(2);
        let waiting = {
            let group = group.clone();
            std::thread::spawn(move || group.all_reduce_sum(0, &mut [1.0]))
        };
        // Whether the other slice is already waiting or arrives after the release, it
        // gets an error instead of waiting for a partner that failed.
        group.release();
        let result = waiting.join().expect("the waiting slice");
        assert!(
            matches!(&result, Err(candle_core::Error::Msg(m)) if m == RELEASED),
            "{result:?}"
        );
        // The next batch starts afresh.
        group.start(1);
        assert!(group.all_reduce_sum(0, &mut [2.0]).is_ok());
    }
}
