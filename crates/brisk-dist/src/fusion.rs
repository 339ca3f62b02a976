//! Tensor fusion (Horovod's): many tensors averaged across ranks in a few large
//! all-reduces — consecutive tensors packed into buffers of at most `fusion_bytes`, a
//! larger tensor alone. The gradient hook and `brisk bench allreduce` both use it, so the
//! benchmark times exactly what training does.

use std::time::Instant;

use brisk_spec::ModelSpec;
use serde::Serialize;

use crate::comm::Communicator;
use crate::error::{Error, Result};

/// Averages every tensor in `tensors` (flat f32 values) across the ranks of `comm` in
/// fused buffers of at most `fusion_bytes`; returns how many all-reduces it made. Every
/// rank must pass tensors of the same sizes in the same order.
pub fn all_reduce_mean_fused(
    comm: &dyn Communicator,
    tensors: &mut [Vec<f32>],
    fusion_bytes: usize,
) -> Result<usize> {
    let cap = (fusion_bytes / 4).max(1);
    let inv = 1.0 / comm.world() as f32;
    let mut bucket: Vec<f32> = Vec::new();
    let (mut start, mut buffers) = (0, 0);
    while start < tensors.len() {
        // The tensors from `start` that fit in one buffer (at least one).
        let mut end = start + 1;
        let mut len = tensors[start].len();
        while end < tensors.len() && len + tensors[end].len() <= cap {
            len += tensors[end].len();
            end += 1;
        }
        bucket.clear();
        for t in &tensors[start..end] {
            bucket.extend_from_slice(t);
        }
        comm.all_reduce_sum(&mut bucket)?;
        let mut offset = 0;
        for t in &mut tensors[start..end] {
            for (d, s) in t.iter_mut().zip(&bucket[offset..]) {
                *d = s * inv;
            }
            offset += t.len();
        }
        buffers += 1;
        start = end;
    }
    Ok(buffers)
}

/// What `brisk bench allreduce` measured (rank 0's view).
#[derive(Clone, Debug, Serialize)]
pub struct AllReduceReport {
    pub model: String,
    pub width: f64,
    /// Gradient values averaged per step.
    pub gradients: usize,
    pub bytes: usize,
    pub world: usize,
    pub backend: String,
    pub fusion_mib: usize,
    /// All-reduces per step.
    pub buffers: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Bytes averaged per second.
    pub algorithm_gb_per_s: f64,
    /// Bus bandwidth as NCCL's tests define it: 2(w−1)/w of the buffer crosses each link.
    pub bus_gb_per_s: f64,
}

/// Times the gradient averaging of one training step of `spec`'s model (its trainable
/// tensors, in the tensor table's order) over `comm`: `rounds` timed steps after two
/// untimed ones, each started together (a barrier).
pub fn bench_all_reduce(
    comm: &dyn Communicator,
    spec: &ModelSpec,
    (model, backend): (&str, &str),
    fusion_mib: usize,
    rounds: usize,
) -> Result<AllReduceReport> {
    if rounds == 0 || fusion_mib == 0 {
        return Err(Error::Setting {
            problem: "the rounds and the fusion size must be at least 1".into(),
        });
    }
    let mut tensors: Vec<Vec<f32>> = spec
        .tensors()
        .iter()
        .filter(|t| !t.role.is_buffer())
        .map(|t| (0..t.numel()).map(|i| (i % 97) as f32 * 1e-3).collect())
        .collect();
    let fusion_bytes = fusion_mib << 20;
    let mut times = Vec::with_capacity(rounds);
    let mut buffers = 0;
    for round in 0..rounds + 2 {
        comm.barrier()?;
        let start = Instant::now();
        buffers = all_reduce_mean_fused(comm, &mut tensors, fusion_bytes)?;
        if round >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let world = comm.world();
    let gradients: usize = tensors.iter().map(Vec::len).sum();
    let bytes = gradients * 4;
    Ok(AllReduceReport {
        model: model.to_string(),
        width: spec.width,
        gradients,
        bytes,
        world,
        backend: backend.to_string(),
        fusion_mib,
        buffers,
        median_ms: median * 1e3,
        min_ms: times[0] * 1e3,
        max_ms: times[times.len() - 1] * 1e3,
        algorithm_gb_per_s: bytes as f64 / median / 1e9,
        bus_gb_per_s: bytes as f64 * 2.0 * (world as f64 - 1.0) / world as f64 / median / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Local;
    use crate::testing::run_ranks;

    #[test]
    fn buffers_pack_consecutive_tensors_up_to_the_cap() -> anyhow::Result<()> {
        // Sizes 3, 3, 5, 1 with room for 6 values: [3, 3], [5, 1]; a tensor over the
        // cap goes alone.
        let mut t = vec![vec![1.0; 3], vec![2.0; 3], vec![3.0; 5], vec![4.0; 1]];
        assert_eq!(all_reduce_mean_fused(&Local, &mut t, 24)?, 2);
        assert_eq!(all_reduce_mean_fused(&Local, &mut t, 4)?, 4);
        assert_eq!(all_reduce_mean_fused(&Local, &mut t, 1 << 20)?, 1);
        assert_eq!(t[2], vec![3.0; 5], "one rank: the mean is the value");
        Ok(())
    }

    #[test]
    fn two_ranks_average_every_value_in_any_fusion() -> anyhow::Result<()> {
        for fusion in [8, 24, 1 << 20] {
            let results = run_ranks(2, move |comm| {
                let r = comm.rank() as f32;
                let mut t = vec![vec![r; 3], vec![10.0 * r; 5], vec![r + 1.0; 2]];
                all_reduce_mean_fused(comm.as_ref(), &mut t, fusion)?;
                Ok(t)
            })?;
            assert_eq!(results[0], results[1]);
            assert_eq!(
                results[0],
                vec![vec![0.5; 3], vec![5.0; 5], vec![1.5; 2]],
                "fusion {fusion}"
            );
        }
        Ok(())
    }

    #[test]
    fn the_benchmark_reduces_a_models_gradients() -> anyhow::Result<()> {
        let spec = ModelSpec::resnet18_cifar(10).with_width(0.125);
        let r = bench_all_reduce(&Local, &spec, ("resnet18-cifar", "local"), 1, 3)?;
        assert_eq!(r.gradients, spec.param_count());
        assert!(
            r.buffers >= 1 && r.min_ms <= r.median_ms && r.median_ms <= r.max_ms,
            "{r:?}"
        );
        assert!(bench_all_reduce(&Local, &spec, ("m", "local"), 1, 0).is_err());
        Ok(())
    }
}
