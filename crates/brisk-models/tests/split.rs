//! In-process data parallelism: a batch split into slices on `SplitEngine` computes the
//! one-slice step (logits, gradients, running statistics) to rounding, and its shared
//! batch-norm statistics are those of two data-parallel ranks with synchronised
//! batch-norm, on candle's graph and on the engine.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;
use brisk_models::{slice_sizes, Engine, ModelSpec, Network, Slices, SplitEngine};
use brisk_ops::BatchNormSync;
use brisk_testkit::randn;
use candle_core::Device;

/// One step's results: logits, gradients by name, running statistics by name.
type Step = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>);

fn spec() -> ModelSpec {
    ModelSpec {
        image_size: 12,
        ..ModelSpec::seresnet18_cifar(10).with_width(0.125)
    }
}

fn batch(n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let s = spec();
    let x = randn(5, 0.5, 1.0, (n, s.in_channels, s.image_size, s.image_size))?;
    let probe = randn(6, 0.0, 1.0, (n, s.classes))?;
    Ok((x.flatten_all()?.to_vec1()?, probe.flatten_all()?.to_vec1()?))
}

fn running(net: &Network) -> Result<Vec<(String, Vec<f32>)>> {
    net.buffer_vars()?
        .into_iter()
        .map(|(name, v)| Ok((name, v.as_tensor().flatten_all()?.to_vec1()?)))
        .collect()
}

/// A training step of `n` images on a `SplitEngine` split as `slices` says, inside a
/// pool of `threads` threads.
fn split_step(slices: Slices, threads: usize, n: usize) -> Result<(Step, usize)> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| {
        let net = Network::new(spec(), 3, &Device::Cpu)?;
        let (x, probe) = batch(n)?;
        let mut engine = SplitEngine::new(&net, slices)?;
        let logits = engine.forward_train(&x, n)?;
        let used = engine.slices_used();
        let mut grads = engine.backward(&probe)?;
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(((logits, grads, running(&net)?), used))
    })
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (tolerance {tol} of {scale})"
        );
    }
}

fn assert_same_step(name: &str, a: &Step, b: &Step) {
    assert_close(&format!("{name}: logits"), &a.0, &b.0, 1e-4);
    assert_eq!(a.1.len(), b.1.len(), "{name}: gradient count");
    for ((na, ga), (nb, gb)) in a.1.iter().zip(&b.1) {
        assert_eq!(na, nb);
        assert_close(&format!("{name}: gradient {na}"), ga, gb, 2e-3);
    }
    assert_same_running(name, &a.2, &b.2);
}

fn assert_same_running(name: &str, a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
    assert_eq!(a.len(), b.len(), "{name}: running statistic count");
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_close(&format!("{name}: running statistic {na}"), va, vb, 1e-5);
    }
}

#[test]
fn a_split_batch_computes_the_one_slice_step() -> Result<()> {
    let (one, used) = split_step(Slices::Count(1), 2, 13)?;
    assert_eq!(used, 1);
    // 13 images over 2 and 3 slices: unequal slices, each weighted by its size.
    for slices in [2, 3] {
        let (split, used) = split_step(Slices::Count(slices), 3, 13)?;
        assert_eq!(used, slices);
        assert_same_step(&format!("{slices} slices"), &one, &split);
    }
    Ok(())
}

#[test]
fn batches_too_small_to_split_run_on_fewer_slices() -> Result<()> {
    assert_eq!(slice_sizes(13, 3), [5, 4, 4]);
    assert_eq!(slice_sizes(7, 2), [7]);
    assert_eq!(slice_sizes(8, 2), [4, 4]);
    assert_eq!(slice_sizes(3, 4), [3]);
    let (_, used) = split_step(Slices::Count(2), 2, 6)?;
    assert_eq!(used, 1);
    Ok(())
}

#[test]
fn auto_splits_a_small_model_and_not_a_large_one() -> Result<()> {
    let (_, used) = split_step(Slices::Auto, 2, 8)?;
    assert_eq!(used, 2, "a width-0.125 net on 12x12 images splits");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    let used = pool.install(|| -> Result<usize> {
        let big = ModelSpec::resnet18_cifar(10);
        let net = Network::new(big.clone(), 3, &Device::Cpu)?;
        let mut engine = SplitEngine::new(&net, Slices::Auto)?;
        let x = randn(1, 0.0, 1.0, (8, 3, 32, 32))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        engine.forward_eval(&x, 8)?;
        Ok(engine.slices_used())
    })?;
    assert_eq!(used, 1, "full-width ResNet-18 on 32x32 images does not split");
    Ok(())
}

/// Two threads summing through a barrier: two ranks of a data-parallel job.
#[derive(Debug)]
struct TwoRanks {
    barrier: Barrier,
    slots: Mutex<[Vec<f64>; 2]>,
}

#[derive(Debug)]
struct Rank(Arc<TwoRanks>, usize);

impl BatchNormSync for Rank {
    fn all_reduce_sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        let Rank(world, rank) = self;
        world
            .slots
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?[*rank] = values.to_vec();
        world.barrier.wait();
        {
            let slots = world
                .slots
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            for (i, v) in values.iter_mut().enumerate() {
                *v = slots[0][i] + slots[1][i];
            }
        }
        world.barrier.wait();
        Ok(())
    }
}

/// Each of two ranks runs a training forward on its half of 16 images, batch-norm
/// synchronised, on the engine or candle's graph: rank 0's running statistics.
fn two_rank_running(on_engine: bool) -> Result<Vec<(String, Vec<f32>)>> {
    let world = Arc::new(TwoRanks {
        barrier: Barrier::new(2),
        slots: Mutex::new([Vec::new(), Vec::new()]),
    });
    let (x, _) = batch(16)?;
    let half = x.len() / 2;
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let world = world.clone();
            let mine = x[rank * half..(rank + 1) * half].to_vec();
            std::thread::spawn(move || -> Result<Vec<(String, Vec<f32>)>> {
                let mut net = Network::new(spec(), 3, &Device::Cpu)?;
                net.set_batch_norm_sync(Some(Arc::new(Rank(world, rank))))?;
                if on_engine {
                    Engine::new(&net)?.forward_train(&mine, 8)?;
                } else {
                    let s = spec();
                    let t = candle_core::Tensor::from_vec(
                        mine,
                        (8, s.in_channels, s.image_size, s.image_size),
                        &Device::Cpu,
                    )?;
                    net.forward_t(&t, true)?;
                }
                running(&net)
            })
        })
        .collect();
    let mut out = Vec::new();
    for r in ranks {
        out.push(r.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    Ok(out.swap_remove(0))
}

#[test]
fn shared_statistics_are_those_of_two_synchronised_ranks() -> Result<()> {
    let (split, _) = split_step(Slices::Count(2), 2, 16)?;
    assert_same_running("graph ranks vs slices", &two_rank_running(false)?, &split.2);
    assert_same_running("engine ranks vs slices", &two_rank_running(true)?, &split.2);
    Ok(())
}
