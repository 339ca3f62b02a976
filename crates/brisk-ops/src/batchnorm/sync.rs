//! Synchronised batch-norm's cross-rank arithmetic: the communicator it needs
//! ([`BatchNormSync`]), the batch statistics over every rank's batch, and the gradient
//! sums the backward pass shares.

use candle_core::{Result, Tensor};

/// Sums per-channel figures over the ranks of a data-parallel job: what synchronised
/// batch-norm needs from a communicator (MPI, NCCL). It is called on the thread running
/// the forward or backward pass, at the same points on every rank.
pub trait BatchNormSync: Send + Sync + std::fmt::Debug {
    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;

    /// Whether anyone else takes part in the sums now (a split batch running on one
    /// slice does not): when not, a batch's own statistics are already the shared ones.
    fn shared(&self) -> bool {
        true
    }
}

/// `[mean(c); biased var(c); total count (c times)]` over every rank's batch, from this
/// rank's [`super::kernels::channel_moments`] over `count` values a channel.
pub(super) fn synchronised_stats(
    sync: &dyn BatchNormSync,
    per_channel: &[(f64, f32, f64)],
    count: f64,
) -> Result<Vec<f32>> {
    let sums: Vec<f64> = per_channel.iter().map(|p| p.0).collect();
    // The squared deviations about this rank's own mean, from those about the f32 mean.
    let m2: Vec<f64> = per_channel
        .iter()
        .map(|&(sum, m, sq)| {
            let shift = sum / count - f64::from(m);
            sq - count * shift * shift
        })
        .collect();
    let (mut out, total) = combine_moments(sync, &sums, &m2, count)?;
    out.extend(std::iter::repeat_n(total as f32, per_channel.len()));
    Ok(out)
}

/// `[mean; biased var]` over every rank's (or slice's) batch and the total count, from
/// this one's batch statistics `stats` `[mean; biased var]` over `count` values a channel.
pub fn combine_batch_stats(sync: &dyn BatchNormSync, stats: &[f32], count: f64) -> Result<(Vec<f32>, f64)> {
    let c = stats.len() / 2;
    let sums: Vec<f64> = stats[..c].iter().map(|&m| f64::from(m) * count).collect();
    let m2: Vec<f64> = stats[c..2 * c].iter().map(|&v| f64::from(v) * count).collect();
    combine_moments(sync, &sums, &m2, count)
}

/// `[mean; biased var]` over every rank's batch and the total count, from this rank's
/// per-channel sums `Σv` and squared deviations about its own mean (M2) over `count`
/// values a channel.
fn combine_moments(
    sync: &dyn BatchNormSync,
    sums: &[f64],
    m2: &[f64],
    count: f64,
) -> Result<(Vec<f32>, f64)> {
    let c = sums.len();
    // Summed over ranks: Σv, M2 and n·μ², from which the spread of the ranks' means is
    // recovered (no Σv² − n·mean² cancellation within a rank); then the total count.
    // var = (ΣM2 + Σ n_r·μ_r² − N·μ²) / N.
    let mut all: Vec<f64> = sums.to_vec();
    all.extend_from_slice(m2);
    all.extend(sums.iter().map(|s| {
        let mu = s / count;
        count * mu * mu
    }));
    all.push(count);
    sync.all_reduce_sum(&mut all)?;
    let total = all[3 * c];
    let means: Vec<f64> = all[..c].iter().map(|s| s / total).collect();
    let mut out: Vec<f32> = means.iter().map(|&m| m as f32).collect();
    out.extend((0..c).map(|k| {
        let between = (all[2 * c + k] - total * means[k] * means[k]).max(0.0);
        ((all[c + k] + between) / total).max(0.0) as f32
    }));
    Ok((out, total))
}

/// Synchronised batch-norm's backward: the gradient sums `[Σdz·x̂; Σdz]` of every rank
/// (or slice), scaled by (this one's `count` / the total count) so that the input
/// gradient, which divides by this one's count, takes means over all of them.
pub fn combine_grad_sums(sync: &dyn BatchNormSync, sums: &[f32], count: f64) -> Result<Vec<f32>> {
    let mut values: Vec<f64> = sums.iter().map(|&v| f64::from(v)).collect();
    values.push(count);
    sync.all_reduce_sum(&mut values)?;
    let scale = count / values[sums.len()];
    Ok(values[..sums.len()].iter().map(|v| (v * scale) as f32).collect())
}

/// [`combine_grad_sums`] of a `[2, c]` tensor, for batch-norm's candle op over `x`.
pub(super) fn global_grad_sums(sync: &dyn BatchNormSync, x: &Tensor, sums: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let local = sums.flatten_all()?.to_vec1::<f32>()?;
    let scaled = combine_grad_sums(sync, &local, (n * h * w) as f64)?;
    Tensor::from_vec(scaled, (2, c), x.device())
}
