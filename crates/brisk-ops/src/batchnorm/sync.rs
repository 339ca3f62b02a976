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
}

/// `[mean(c); biased var(c); total count (c times)]` over every rank's batch, from this
/// rank's [`super::kernels::channel_moments`] over `count` values a channel.
pub(super) fn synchronised_stats(
    sync: &dyn BatchNormSync,
    per_channel: &[(f64, f32, f64)],
    count: f64,
) -> Result<Vec<f32>> {
    let c = per_channel.len();
    // Per channel, summed over ranks: Σv, the squared deviations about each rank's own
    // mean (M2, accurate: no Σv² − n·mean² cancellation), and n·mean², from which the
    // spread of the ranks' means is recovered; then the total count.
    // var = (ΣM2 + Σ n_r·μ_r² − N·μ²) / N.
    let local_means: Vec<f64> = per_channel.iter().map(|p| p.0 / count).collect();
    let mut sums: Vec<f64> = per_channel.iter().map(|p| p.0).collect();
    sums.extend(per_channel.iter().zip(&local_means).map(|(&(_, m, sq), mu)| {
        let shift = mu - f64::from(m);
        sq - count * shift * shift
    }));
    sums.extend(local_means.iter().map(|mu| count * mu * mu));
    sums.push(count);
    sync.all_reduce_sum(&mut sums)?;
    let total = sums[3 * c];
    let means: Vec<f64> = sums[..c].iter().map(|s| s / total).collect();
    let mut out: Vec<f32> = means.iter().map(|&m| m as f32).collect();
    out.extend((0..c).map(|k| {
        let between = (sums[2 * c + k] - total * means[k] * means[k]).max(0.0);
        ((sums[c + k] + between) / total).max(0.0) as f32
    }));
    out.extend(std::iter::repeat_n(total as f32, c));
    Ok(out)
}

/// Synchronised batch-norm's backward: the gradient sums of every rank, scaled by
/// (this rank's count / the total count) so that `InputGrad`, which divides by this
/// rank's count, takes means over all ranks.
pub(super) fn global_grad_sums(sync: &dyn BatchNormSync, x: &Tensor, sums: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let local = (n * h * w) as f64;
    let mut values: Vec<f64> = sums
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    values.push(local);
    sync.all_reduce_sum(&mut values)?;
    let scale = local / values[2 * c];
    let scaled: Vec<f32> = values[..2 * c].iter().map(|v| (v * scale) as f32).collect();
    Tensor::from_vec(scaled, (2, c), x.device())
}
