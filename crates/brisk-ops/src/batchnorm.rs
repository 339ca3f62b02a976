//! Fused batch normalisation (optionally followed by ReLU) for NCHW f32 tensors, with its
//! own backward: one pass for the statistics, one for the output, two for the gradients,
//! each parallel over channels, instead of candle's chain of small allocating ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fill::par_build;
use crate::half::{f32_values, storage_of};
use crate::storage::f32_slice;

/// Sums per-channel figures over the ranks of a data-parallel job: what synchronised
/// batch-norm needs from a communicator (MPI, NCCL). It is called on the thread running
/// the forward or backward pass, at the same points on every rank.
pub trait BatchNormSync: Send + Sync + std::fmt::Debug {
    /// Element-wise sum over all ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
}

/// Output of [`batch_norm`].
#[derive(Debug)]
pub struct BatchNormOutput {
    /// The normalised tensor (with the residual added and ReLU applied, if asked).
    pub y: Tensor,
    /// `[2, C]`: the mean and biased variance used (the batch's in training, no gradient
    /// attached), from which the caller updates its running statistics.
    pub stats: Tensor,
    /// Values per channel the training statistics were taken over (N·H·W, summed over
    /// the ranks with synchronised batch-norm): the unbiased variance's denominator.
    pub count: usize,
}

/// What follows the normalisation in the same pass.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Added after the affine transform (a ResNet block's shortcut), same shape as x,
    /// in any of f32, bf16, f16.
    pub residual: Option<&'a Tensor>,
    /// max(0, ·) last.
    pub relu: bool,
    /// The output's dtype: f32, or bf16/f16 for half-precision layers that follow (the
    /// output is rounded once, and the tensor kept for backward takes half the memory).
    pub out: DType,
    /// Synchronised batch-norm (training only): the batch statistics and the gradient's
    /// per-channel means are taken over every rank's batch, as if one process had seen
    /// them all; the weight and bias gradients stay this rank's own (the gradient
    /// all-reduce averages them).
    pub sync: Option<&'a Arc<dyn BatchNormSync>>,
}

impl Default for Epilogue<'_> {
    /// No residual, no ReLU, f32 output.
    fn default() -> Self {
        Epilogue {
            residual: None,
            relu: false,
            out: DType::F32,
            sync: None,
        }
    }
}

/// Batch-norm with PyTorch's semantics over `[N, C, H, W]`, then the epilogue:
/// `y = relu?(γ (x − mean) / sqrt(var + eps) + β + residual?)`. With `stats = None`
/// (training) the batch's mean and biased variance normalise, and the gradient flows
/// through them; with `stats = Some([2, C])` (evaluation: running mean and variance) they
/// are constants.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: Option<&Tensor>,
    eps: f64,
    epilogue: Epilogue,
) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let (n, _, h, w) = x.dims4()?;
    let mut count = n * h * w;
    let (batch_stats, stats) = match stats {
        Some(s) => (false, s.detach().contiguous()?),
        None => {
            let s = x.detach().apply_op1_no_bwd(&Stats {
                sync: epilogue.sync.cloned(),
            })?;
            if epilogue.sync.is_some() {
                // The synchronised statistics carry a third row: the total count.
                count = s.get(2)?.get(0)?.to_scalar::<f32>()?.round() as usize;
                (true, s.narrow(0, 0, 2)?.contiguous()?)
            } else {
                (true, s)
            }
        }
    };
    // [mean; var; weight; bias]: one [4, C] input carries every per-channel constant.
    let params = Tensor::cat(&[&stats, &Tensor::stack(&[weight, bias], 0)?], 0)?;
    if !matches!(epilogue.out, DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "brisk batch-norm: output dtype must be f32, bf16 or f16, got {:?}",
            epilogue.out
        );
    }
    let op = Normalize {
        eps,
        relu: epilogue.relu,
        batch_stats,
        out: epilogue.out,
        sync: epilogue.sync.filter(|_| batch_stats).cloned(),
    };
    let y = match epilogue.residual {
        None => x.apply_op2(&params, op)?,
        Some(r) => x.apply_op3(&params, &r.contiguous()?, op)?,
    };
    Ok(BatchNormOutput { y, stats, count })
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    f32_slice(s, l, "batch-norm", what)
}

/// (N, C, H*W) of a 4-D layout.
fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    if n * h * w == 0 {
        candle_core::bail!("brisk batch-norm: empty input {:?}", l.dims());
    }
    Ok((n, c, h * w))
}

/// The N contiguous `H*W` segments of channel `ch`.
fn channel_segments(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    ch: usize,
) -> impl Iterator<Item = &[f32]> + '_ {
    (0..n).map(move |i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// `Σ f(v)` over `s` in 16 independent f32 lanes, so the compiler can vectorise it.
#[inline]
fn lane_sum(s: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = s.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// x → [2, C]: per-channel mean and biased variance, accumulated in f64 (two passes);
/// with `sync`, over every rank's batch.
#[derive(Debug)]
struct Stats {
    sync: Option<Arc<dyn BatchNormSync>>,
}

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "brisk-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l)?;
        let x = f32_data(s, l, "input")?;
        let count = (n * hw) as f64;
        let per_channel = channel_moments(x, n, c, hw);
        let out: Vec<f32> = match &self.sync {
            None => moments_to_stats(&per_channel, count),
            Some(sync) => {
                // Per channel, summed over ranks: Σv, the squared deviations about each
                // rank's own mean (M2, accurate: no Σv² − n·mean² cancellation), and
                // n·mean², from which the spread of the ranks' means is recovered; then
                // the total count. var = (ΣM2 + Σ n_r·μ_r² − N·μ²) / N.
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
                out
            }
        };
        let rows = out.len() / c;
        Ok((CpuStorage::F32(out), Shape::from((rows, c))))
    }
}

/// Per channel of `x` `[n, c, hw]`: the sum, the (f32) mean m, and the sum of squares
/// about m — sums in 16 f32 lanes within a plane (vectorised), f64 across planes.
fn channel_moments(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f32, f64)> {
    let count = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = channel_segments(x, n, c, hw, ch)
                .map(|s| lane_sum(s, |v| v) as f64)
                .sum();
            let m = (sum / count) as f32;
            let sq: f64 = channel_segments(x, n, c, hw, ch)
                .map(|s| lane_sum(s, |v| (v - m) * (v - m)) as f64)
                .sum();
            (sum, m, sq)
        })
        .collect()
}

/// `[mean(c); biased var(c)]` from [`channel_moments`] over `count` values a channel.
fn moments_to_stats(per_channel: &[(f64, f32, f64)], count: f64) -> Vec<f32> {
    let mut out: Vec<f32> = per_channel.iter().map(|p| p.1).collect();
    out.extend(per_channel.iter().map(|p| (p.2 / count) as f32));
    out
}

/// Per-channel mean and biased variance of `x` `[n, c, hw]` (f32 slices): `[mean(c);
/// var(c)]`, as batch-norm's training statistics.
pub fn bn_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    moments_to_stats(&channel_moments(x, n, c, hw), (n * hw) as f64)
}

/// `relu?(γ (x − mean) / sqrt(var + eps) + β + residual?)` over `x` `[n, c, hw]`, with
/// `stats` = `[mean; var]` and `affine` = `[γ; β]` (each `c` long).
#[allow(clippy::too_many_arguments)]
pub fn bn_normalize(
    x: &[f32],
    c: usize,
    hw: usize,
    stats: &[f32],
    affine: &[f32],
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let ch = channels(stats, affine, c, eps);
    par_build(x.len(), hw, |i, yo| {
        let xi = &x[i * hw..][..yo.len()];
        let p = &ch[i % c];
        let scale = p.gamma * p.inv_std;
        let shift = p.beta - p.mean * scale;
        let act = |v: f32| if relu { v.max(0.0) } else { v };
        match residual {
            Some(r) => {
                for ((o, &v), &rv) in yo.iter_mut().zip(xi).zip(&r[i * hw..(i + 1) * hw]) {
                    *o = act(v * scale + shift + rv);
                }
            }
            None => {
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = act(v * scale + shift);
                }
            }
        }
    })
}

/// ReLU's backward over f32 slices, in place: `dy` is kept where the output `y` is
/// positive and zeroed elsewhere (no new buffer: the engine owns its gradients).
pub fn relu_backward(y: &[f32], dy: &mut [f32]) {
    assert_eq!(y.len(), dy.len(), "relu_backward: lengths differ");
    dy.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| {
            // A select, not a branch: the signs are random, and the select vectorises.
            for (g, &y) in g.iter_mut().zip(y) {
                *g = if y > 0.0 { *g } else { 0.0 };
            }
        });
}

/// `dst += src`, element by element, in parallel: where a residual block's two branch
/// gradients meet.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

/// Batch-norm's weight and bias gradients from the gradient `dz` reaching its affine
/// output: `[Σ dz·x̂ (c); Σ dz (c)]` over `x` `[n, c, hw]`, f64 accumulation.
pub fn bn_grad_sums(
    x: &[f32],
    dz: &[f32],
    (n, c, hw): (usize, usize, usize),
    stats: &[f32],
    eps: f64,
) -> Vec<f32> {
    let ones = vec![1f32; 2 * c];
    let ch = channels(stats, &ones, c, eps);
    let sums: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|k| {
            let p = &ch[k];
            let (mut dg, mut db) = (0f64, 0f64);
            for (xs, gs) in channel_segments(x, n, c, hw, k).zip(channel_segments(dz, n, c, hw, k)) {
                // 16 independent lanes, so the compiler can vectorise.
                let (mut la, mut lb) = ([0f32; 16], [0f32; 16]);
                let (xc, gc) = (xs.chunks_exact(16), gs.chunks_exact(16));
                let (mut a, mut b) = (0f32, 0f32);
                for (&v, &g) in xc.remainder().iter().zip(gc.remainder()) {
                    a += g * (v - p.mean);
                    b += g;
                }
                for (xk, gk) in xc.zip(gc) {
                    for i in 0..16 {
                        la[i] += gk[i] * (xk[i] - p.mean);
                        lb[i] += gk[i];
                    }
                }
                dg += ((a + la.iter().sum::<f32>()) * p.inv_std) as f64;
                db += (b + lb.iter().sum::<f32>()) as f64;
            }
            (dg as f32, db as f32)
        })
        .collect();
    let mut out: Vec<f32> = sums.iter().map(|s| s.0).collect();
    out.extend(sums.iter().map(|s| s.1));
    out
}

/// Batch-norm's input gradient from `dz` (the gradient reaching its affine output):
/// training (`batch_stats`) `γ σ⁻¹ (dz − mean(dz) − x̂ · mean(dz · x̂))`, where the means
/// come from `sums` = [`bn_grad_sums`] over `count` values a channel; evaluation `γ σ⁻¹ dz`.
/// A new buffer; [`bn_input_grad_in_place`] writes over `dz` instead.
#[allow(clippy::too_many_arguments)]
pub fn bn_input_grad(
    x: &[f32],
    dz: &[f32],
    (c, hw): (usize, usize),
    stats: &[f32],
    affine: &[f32],
    sums: &[f32],
    count: usize,
    eps: f64,
    batch_stats: bool,
) -> Vec<f32> {
    let mut g = dz.to_vec();
    bn_input_grad_in_place(x, &mut g, (c, hw), stats, affine, sums, count, eps, batch_stats);
    g
}

/// [`bn_input_grad`] written over its input: `g` holds `dz` on entry and the input
/// gradient on return (no buffer to allocate and zero; each value is read once and
/// written once).
#[allow(clippy::too_many_arguments)]
pub fn bn_input_grad_in_place(
    x: &[f32],
    g: &mut [f32],
    (c, hw): (usize, usize),
    stats: &[f32],
    affine: &[f32],
    sums: &[f32],
    count: usize,
    eps: f64,
    batch_stats: bool,
) {
    assert_eq!(
        x.len(),
        g.len(),
        "bn_input_grad: input and gradient lengths differ"
    );
    let ch = channels(stats, affine, c, eps);
    let (dgamma, dbeta) = (&sums[..c], &sums[c..2 * c]);
    let m = count as f32;
    g.par_chunks_mut(hw).enumerate().for_each(|(i, gs)| {
        let k = i % c;
        let p = &ch[k];
        let xs = &x[i * hw..(i + 1) * hw];
        let a = p.gamma * p.inv_std;
        let (mean_dz, mean_dzx) = if batch_stats {
            (dbeta[k] / m, dgamma[k] / m)
        } else {
            (0.0, 0.0)
        };
        for (g, &v) in gs.iter_mut().zip(xs) {
            let xh = (v - p.mean) * p.inv_std;
            *g = a * (*g - mean_dz - xh * mean_dzx);
        }
    });
}

/// Per-channel constants of the normalisation: y = x * scale + shift.
struct Channel {
    mean: f32,
    inv_std: f32,
    gamma: f32,
    beta: f32,
}

fn channels(stats: &[f32], affine: &[f32], c: usize, eps: f64) -> Vec<Channel> {
    (0..c)
        .map(|ch| Channel {
            mean: stats[ch],
            inv_std: (1.0 / (stats[c + ch] as f64 + eps).sqrt()) as f32,
            gamma: affine[ch],
            beta: affine[c + ch],
        })
        .collect()
}

/// (x, [mean; var; weight; bias], residual?) → y.
#[derive(Clone, Debug)]
struct Normalize {
    eps: f64,
    relu: bool,
    /// The statistics are the batch's own (training): the gradient flows through them.
    batch_stats: bool,
    /// The output's dtype.
    out: DType,
    /// Synchronised batch-norm (training only): see [`Epilogue::sync`].
    sync: Option<Arc<dyn BatchNormSync>>,
}

impl Normalize {
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        params: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = nchw(x.1)?;
        if params.1.dims() != [4, c] {
            candle_core::bail!(
                "brisk batch-norm: per-channel parameters {:?} must be [4, {c}]",
                params.1.dims()
            );
        }
        let xs = f32_data(x.0, x.1, "input")?;
        let p = f32_data(params.0, params.1, "parameters")?;
        let res = match residual {
            Some((s, l)) if l.dims() == x.1.dims() => Some(f32_values(s, l, "batch-norm", "residual")?),
            Some((_, l)) => candle_core::bail!(
                "brisk batch-norm: residual {:?} differs from input {:?}",
                l.dims(),
                x.1.dims()
            ),
            None => None,
        };
        let y = bn_normalize(
            xs,
            c,
            hw,
            &p[..2 * c],
            &p[2 * c..4 * c],
            self.eps,
            self.relu,
            res.as_deref(),
        );
        Ok((storage_of(y, self.out)?, x.1.shape().clone()))
    }

    /// Gradients for (x, params, residual) from the output `res` and its gradient.
    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        // The gradient reaching the sum (affine output + residual): dy where ReLU let
        // the output through. It is also the residual's gradient.
        let dz = if self.relu {
            res.apply_op2_no_bwd(grad, &ReluMask)?
        } else {
            grad.to_dtype(DType::F32)?.contiguous()?
        };
        // [2, C]: sum(dz · x̂) and sum(dz): the weight and bias gradients.
        let sums = x.apply_op3_no_bwd(&dz, params, &GradSums(self.clone()))?;
        let dx = if x.track_op() {
            let means_from = match &self.sync {
                None => sums.clone(),
                Some(sync) => global_grad_sums(sync.as_ref(), x, &sums)?,
            };
            let all = Tensor::cat(&[params, &means_from], 0)?;
            Some(x.apply_op3_no_bwd(&dz, &all, &InputGrad(self.clone()))?)
        } else {
            None
        };
        let dparams = Tensor::cat(&[&sums.zeros_like()?, &sums], 0)?;
        Ok((dx, dparams, dz))
    }
}

/// Synchronised batch-norm's backward: the gradient sums of every rank, scaled by
/// (this rank's count / the total count) so that `InputGrad`, which divides by this
/// rank's count, takes means over all ranks.
fn global_grad_sums(sync: &dyn BatchNormSync, x: &Tensor, sums: &Tensor) -> Result<Tensor> {
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

impl CustomOp2 for Normalize {
    fn name(&self) -> &'static str {
        "brisk-bn-normalize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, _) = Normalize::bwd(self, x, params, res, grad)?;
        Ok((dx, Some(dparams)))
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "brisk-bn-normalize-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, dz) = Normalize::bwd(self, x, params, res, grad)?;
        let dresidual = dz.to_dtype(residual.dtype())?;
        Ok((dx, Some(dparams), Some(dresidual)))
    }
}

/// (output, dy) → dy where the output is positive, else 0: ReLU's backward.
#[derive(Debug)]
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "brisk-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_values(s1, l1, "relu mask", "output")?;
        let dy = f32_values(s2, l2, "relu mask", "gradient")?;
        if y.len() != dy.len() {
            candle_core::bail!(
                "brisk relu mask: output {:?} and gradient {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let mut dx = dy.into_owned();
        relu_backward(&y, &mut dx);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The inputs both gradient passes read: x, dz and the per-channel rows.
struct GradInputs<'a> {
    n: usize,
    c: usize,
    hw: usize,
    x: &'a [f32],
    dz: &'a [f32],
    params: &'a [f32],
}

impl<'a> GradInputs<'a> {
    /// Checks x, dz and a params tensor of at least `rows` per-channel rows (mean, var,
    /// gamma, beta, …).
    fn new(
        x: (&'a CpuStorage, &Layout),
        dz: (&'a CpuStorage, &Layout),
        params: (&'a CpuStorage, &Layout),
        rows: usize,
    ) -> Result<Self> {
        let (n, c, hw) = nchw(x.1)?;
        let (xs, dzs, ps) = (
            f32_data(x.0, x.1, "input")?,
            f32_data(dz.0, dz.1, "gradient")?,
            f32_data(params.0, params.1, "params")?,
        );
        if ps.len() < rows * c || dzs.len() != xs.len() {
            candle_core::bail!(
                "brisk batch-norm grad: params {:?} or gradient {:?} do not fit input {:?}",
                params.1.dims(),
                dz.1.dims(),
                x.1.dims()
            );
        }
        Ok(GradInputs {
            n,
            c,
            hw,
            x: xs,
            dz: dzs,
            params: ps,
        })
    }
}

/// (x, dz, [mean; var; gamma; beta]) → [2, C] = (sum dz·x̂, sum dz), f64 accumulation.
#[derive(Clone, Debug)]
struct GradSums(Normalize);

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "brisk-bn-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInputs {
            n,
            c,
            hw,
            x,
            dz,
            params,
            ..
        } = GradInputs::new((s1, l1), (s2, l2), (s3, l3), 4)?;
        let out = bn_grad_sums(x, dz, (n, c, hw), &params[..2 * c], self.0.eps);
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// (x, dz, [mean; var; gamma; beta; dgamma; dbeta]) → dx.
#[derive(Clone, Debug)]
struct InputGrad(Normalize);

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "brisk-bn-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInputs {
            n,
            c,
            hw,
            x,
            dz,
            params,
        } = GradInputs::new((s1, l1), (s2, l2), (s3, l3), 6)?;
        let dx = bn_input_grad(
            x,
            dz,
            (c, hw),
            &params[..2 * c],
            &params[2 * c..4 * c],
            &params[4 * c..6 * c],
            n * hw,
            self.0.eps,
            self.0.batch_stats,
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_testkit::{max_rel, rand_uniform, randn};
    use candle_core::{Device, Var};

    #[test]
    fn add_assign_adds_every_element_across_chunk_boundaries() {
        let len = 3 * (1 << 14) + 123;
        let a: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.5).collect();
        let b: Vec<f32> = (0..len).map(|i| (i % 31) as f32 - 15.0).collect();
        let mut sum = a.clone();
        add_assign(&mut sum, &b);
        for i in 0..len {
            assert_eq!(sum[i], a[i] + b[i], "element {i}");
        }
    }

    /// candle's reference batch-norm (+residual, +ReLU) built from elementary ops.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stats: Option<&Tensor>, e: Epilogue) -> Result<Tensor> {
        let c = w.dim(0)?;
        let (mean, var) = match stats {
            None => {
                let mean = x.mean_keepdim((0, 2, 3))?;
                let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
                (mean, var)
            }
            Some(s) => (s.get(0)?.reshape((1, c, 1, 1))?, s.get(1)?.reshape((1, c, 1, 1))?),
        };
        let y = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w.reshape((1, c, 1, 1))?)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
        let y = match e.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if e.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn check(shape: (usize, usize, usize, usize), relu: bool, residual: bool, eval: bool) -> Result<()> {
        let (_, c, _, _) = shape;
        let x = Var::from_tensor(&(randn(1, 0.0, 2.0, shape)? + 0.5)?)?;
        let w = Var::from_tensor(&(rand_uniform(2, 0.5, 1.5, c)?))?;
        let b = Var::from_tensor(&randn(3, 0.0, 0.3, c)?)?;
        let running = Tensor::stack(&[randn(4, 0.0, 0.5, c)?, rand_uniform(5, 0.5, 2.0, c)?], 0)?;
        let stats = eval.then_some(&running);
        let r = Var::from_tensor(&randn(6, 0.0, 1.0, shape)?)?;
        let e = Epilogue {
            residual: residual.then_some(r.as_tensor()),
            relu,
            out: candle_core::DType::F32,
            sync: None,
        };
        let ours = batch_norm(&x, &w, &b, stats, 1e-5, e)?;
        let theirs = reference(&x, &w, &b, stats, e)?;
        assert!(
            max_rel(&ours.y, &theirs)? < 1e-5,
            "forward {shape:?} {e:?} eval={eval}"
        );
        if !eval {
            let mean = x.mean((0, 2, 3))?;
            assert!(max_rel(&ours.stats.get(0)?, &mean)? < 1e-5);
        }
        let probe = randn(7, 0.0, 1.0, shape)?;
        let g1 = (ours.y * &probe)?.sum_all()?.backward()?;
        let g2 = (theirs * &probe)?.sum_all()?.backward()?;
        let mut vars = vec![(&x, "input"), (&w, "weight"), (&b, "bias")];
        if residual {
            vars.push((&r, "residual"));
        }
        for (v, what) in vars {
            let err = max_rel(g1.get(v).expect("ours"), g2.get(v).expect("reference"))?;
            assert!(err < 1e-4, "{what} gradient {shape:?} {e:?} eval={eval}: {err:e}");
        }
        Ok(())
    }

    #[test]
    fn matches_candle_reference_in_every_mode() -> Result<()> {
        for shape in [(4, 3, 5, 7), (1, 5, 4, 4), (7, 2, 1, 1), (2, 16, 8, 8)] {
            for relu in [false, true] {
                for residual in [false, true] {
                    for eval in [false, true] {
                        check(shape, relu, residual, eval)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A half-precision output is the f32 output rounded, and with a gradient already in
    /// half precision the gradients equal the f32 path's for that (rounded) gradient.
    #[test]
    fn half_outputs_are_the_f32_results_rounded() -> Result<()> {
        use candle_core::DType;
        let shape = (3, 4, 5, 5);
        for out in [DType::BF16, DType::F16] {
            let x = Var::from_tensor(&randn(8, 0.0, 2.0, shape)?)?;
            let w = Var::from_tensor(&rand_uniform(9, 0.5, 1.5, 4)?)?;
            let b = Var::from_tensor(&randn(10, 0.0, 0.3, 4)?)?;
            let r32 = randn(11, 0.0, 1.0, shape)?.to_dtype(out)?.to_dtype(DType::F32)?;
            let rh = Var::from_tensor(&r32.to_dtype(out)?)?;
            let r32 = Var::from_tensor(&r32)?;
            let probe = randn(12, 0.0, 1.0, shape)?.to_dtype(out)?;
            let half = batch_norm(
                &x,
                &w,
                &b,
                None,
                1e-5,
                Epilogue {
                    residual: Some(&rh),
                    relu: true,
                    out,
                    sync: None,
                },
            )?;
            let full = batch_norm(
                &x,
                &w,
                &b,
                None,
                1e-5,
                Epilogue {
                    residual: Some(&r32),
                    relu: true,
                    out: DType::F32,
                    sync: None,
                },
            )?;
            assert_eq!(half.y.dtype(), out);
            let want = full
                .y
                .to_dtype(out)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(
                half.y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                want,
                "{out:?} forward"
            );
            // The gradient reaching y arrives in y's dtype, through a half product.
            let gh = (half.y * &probe)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            let gf = (full.y * probe.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
            for (v, what) in [(&x, "input"), (&w, "weight"), (&b, "bias")] {
                let err = max_rel(gh.get(v).expect("half"), gf.get(v).expect("f32"))?;
                assert!(err < 1e-6, "{out:?} {what} gradient: {err:e}");
            }
            let dr = gh.get(&rh).expect("residual gradient");
            assert_eq!(dr.dtype(), out);
            assert!(max_rel(&dr.to_dtype(DType::F32)?, gf.get(&r32).expect("f32 residual"))? < 1e-2);
        }
        Ok(())
    }

    /// Two in-process "ranks" (threads) summing through shared slots.
    #[derive(Debug)]
    struct TwoThreads {
        rank: usize,
        barrier: Arc<std::sync::Barrier>,
        slots: Arc<std::sync::Mutex<[Vec<f64>; 2]>>,
    }

    impl BatchNormSync for TwoThreads {
        fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
            self.slots.lock().expect("slots")[self.rank] = values.to_vec();
            self.barrier.wait();
            let all = self.slots.lock().expect("slots").clone();
            self.barrier.wait();
            for (i, v) in values.iter_mut().enumerate() {
                *v = all[0][i] + all[1][i];
            }
            Ok(())
        }
    }

    /// Synchronised batch-norm over two halves of a batch gives each half what one
    /// batch-norm over the whole batch gives it: the same output and input gradient, and
    /// weight/bias gradients that add up to the whole batch's.
    #[test]
    fn synchronised_halves_equal_the_whole_batch() -> Result<()> {
        let (n, c) = (6, 5);
        // A large mean against a small spread, as the variance's summation must survive.
        let x = (randn(13, 0.0, 1.0, (n, c, 4, 3))? * 0.5)?.affine(1.0, 3.0)?;
        let w = rand_uniform(14, 0.5, 1.5, c)?;
        let b = randn(15, 0.0, 0.3, c)?;
        let r = randn(16, 0.0, 1.0, (n, c, 4, 3))?;
        let probe = randn(17, 0.0, 1.0, (n, c, 4, 3))?;
        let run =
            |x: &Tensor, r: &Tensor, probe: &Tensor, sync: Option<Arc<dyn BatchNormSync>>| -> Result<_> {
                let (xv, wv, bv) = (Var::from_tensor(x)?, Var::from_tensor(&w)?, Var::from_tensor(&b)?);
                let e = Epilogue {
                    residual: Some(r),
                    relu: true,
                    out: candle_core::DType::F32,
                    sync: sync.as_ref(),
                };
                let out = batch_norm(&xv, &wv, &bv, None, 1e-5, e)?;
                let g = (&out.y * probe)?.sum_all()?.backward()?;
                let grads: Vec<Tensor> = [&xv, &wv, &bv]
                    .iter()
                    .map(|v| g.get(v).expect("gradient").clone())
                    .collect();
                Ok((out.y, out.stats, out.count, grads))
            };
        let (y, stats, count, grads) = run(&x, &r, &probe, None)?;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let slots = Arc::new(std::sync::Mutex::new([Vec::new(), Vec::new()]));
        let halves: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let sync: Arc<dyn BatchNormSync> = Arc::new(TwoThreads {
                        rank,
                        barrier: barrier.clone(),
                        slots: slots.clone(),
                    });
                    let part = |t: &Tensor| t.narrow(0, rank * n / 2, n / 2);
                    let (x, r, probe) = (part(&x), part(&r), part(&probe));
                    s.spawn(move || run(&x?, &r?, &probe?, Some(sync)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        });
        let halves = halves.into_iter().collect::<Result<Vec<_>>>()?;
        for (rank, (hy, hstats, hcount, hgrads)) in halves.iter().enumerate() {
            let part = |t: &Tensor| t.narrow(0, rank * n / 2, n / 2);
            assert_eq!(*hcount, count, "rank {rank} count");
            assert!(max_rel(hy, &part(&y)?)? < 1e-5, "rank {rank} output");
            assert!(max_rel(hstats, &stats)? < 1e-5, "rank {rank} statistics");
            assert!(
                max_rel(&hgrads[0], &part(&grads[0])?)? < 1e-4,
                "rank {rank} input gradient"
            );
        }
        for (i, what) in [(1, "weight"), (2, "bias")] {
            let sum = (&halves[0].3[i] + &halves[1].3[i])?;
            assert!(max_rel(&sum, &grads[i])? < 1e-5, "{what} gradient");
        }
        Ok(())
    }

    #[test]
    fn f16_input_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 2, 2), candle_core::DType::F16, &dev).expect("x");
        let w = Tensor::ones(3, candle_core::DType::F16, &dev).expect("w");
        assert!(batch_norm(&x, &w, &w, None, 1e-5, Epilogue::default()).is_err());
    }
}
