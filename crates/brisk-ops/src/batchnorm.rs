//! Fused batch normalisation (optionally followed by ReLU) for NCHW f32 tensors, with its
//! own backward: one pass for the statistics, one for the output, two for the gradients,
//! each parallel over channels, instead of candle's chain of small allocating ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Output of [`batch_norm`] in training mode.
#[derive(Debug)]
pub struct BatchNormOutput {
    /// The normalised (and possibly rectified) tensor.
    pub y: Tensor,
    /// `[2, C]`: the batch mean and the biased batch variance (no gradient attached),
    /// from which the caller updates its running statistics.
    pub stats: Tensor,
}

/// Batch-norm with PyTorch's semantics over `[N, C, H, W]`. With `stats = None` (training)
/// the batch's mean and biased variance normalise, and the gradient flows through them;
/// with `stats = Some([2, C])` (evaluation: running mean and variance) they are constants.
/// `relu` applies max(0, ·) to the result in the same pass.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: Option<&Tensor>,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let (batch_stats, stats) = match stats {
        Some(s) => (false, s.detach().contiguous()?),
        None => (true, x.detach().apply_op1_no_bwd(&Stats)?),
    };
    let affine = Tensor::stack(&[weight, bias], 0)?;
    let y = x.apply_op3(&stats, &affine, Normalize { eps, relu, batch_stats })?;
    Ok(BatchNormOutput { y, stats })
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("brisk batch-norm: {what} must be f32, got {:?}", s.dtype());
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("brisk batch-norm: {what} must be contiguous");
    };
    Ok(&d[a..b])
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
fn channel_segments<'a>(x: &'a [f32], n: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &'a [f32]> {
    (0..n).map(move |i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// x → [2, C]: per-channel mean and biased variance, accumulated in f64 (two passes).
#[derive(Debug)]
struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "brisk-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l)?;
        let x = f32_data(s, l, "input")?;
        let count = (n * hw) as f64;
        let per_channel: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let sum: f64 = channel_segments(x, n, c, hw, ch).map(|s| s.iter().map(|&v| v as f64).sum::<f64>()).sum();
                let mean = sum / count;
                let sq: f64 = channel_segments(x, n, c, hw, ch)
                    .map(|s| s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
                    .sum();
                (mean as f32, (sq / count) as f32)
            })
            .collect();
        let mut out: Vec<f32> = per_channel.iter().map(|p| p.0).collect();
        out.extend(per_channel.iter().map(|p| p.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
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

/// (x, stats [2, C], affine [2, C] = weight; bias) → y.
#[derive(Clone, Copy, Debug)]
struct Normalize {
    eps: f64,
    relu: bool,
    /// The statistics are the batch's own (training): the gradient flows through them.
    batch_stats: bool,
}

impl Normalize {
    fn check_params(&self, c: usize, l2: &Layout, l3: &Layout) -> Result<()> {
        if l2.dims() != [2, c] || l3.dims() != [2, c] {
            candle_core::bail!("brisk batch-norm: statistics {:?} and affine {:?} must be [2, {c}]", l2.dims(), l3.dims());
        }
        Ok(())
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "brisk-bn-normalize"
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
        let (_, c, hw) = nchw(l1)?;
        self.check_params(c, l2, l3)?;
        let x = f32_data(s1, l1, "input")?;
        let ch = channels(f32_data(s2, l2, "statistics")?, f32_data(s3, l3, "affine")?, c, self.eps);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(i, (yo, xi))| {
            let p = &ch[i % c];
            let scale = p.gamma * p.inv_std;
            let shift = p.beta - p.mean * scale;
            if self.relu {
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = (v * scale + shift).max(0.0);
                }
            } else {
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = v * scale + shift;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        stats: &Tensor,
        affine: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let params = Tensor::cat(&[stats, affine], 0)?;
        // [2, C]: sum(dy * x_hat) and sum(dy), which are also the weight and bias gradients.
        let sums = x.apply_op3_no_bwd(&grad, &params, &GradSums(*self))?;
        let dx = if x.track_op() {
            let all = Tensor::cat(&[&params, &sums], 0)?;
            Some(x.apply_op3_no_bwd(&grad, &all, &InputGrad(*self))?)
        } else {
            None
        };
        Ok((dx, None, Some(sums)))
    }
}

/// The gradient reaching the affine output: dy, zeroed where ReLU cut the output.
#[inline]
fn masked(dy: f32, x_hat: f32, p: &Channel, relu: bool) -> f32 {
    if relu && x_hat * p.gamma + p.beta <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// (x, dy, [mean; var; gamma; beta]) → [2, C] = (sum dy·x̂, sum dy), f64 accumulation.
#[derive(Clone, Copy, Debug)]
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
        let (n, c, hw) = nchw(l1)?;
        let (x, dy, params) = (f32_data(s1, l1, "input")?, f32_data(s2, l2, "gradient")?, f32_data(s3, l3, "params")?);
        if params.len() < 4 * c {
            candle_core::bail!("brisk batch-norm grad: params {:?} too small", l3.dims());
        }
        let ch = channels(&params[..2 * c], &params[2 * c..4 * c], c, self.0.eps);
        let relu = self.0.relu;
        let sums: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|k| {
                let p = &ch[k];
                let (mut dg, mut db) = (0f64, 0f64);
                for (xs, gs) in channel_segments(x, n, c, hw, k).zip(channel_segments(dy, n, c, hw, k)) {
                    let (mut a, mut b) = (0f32, 0f32);
                    for (&v, &g) in xs.iter().zip(gs) {
                        let xh = (v - p.mean) * p.inv_std;
                        let g = masked(g, xh, p, relu);
                        a += g * xh;
                        b += g;
                    }
                    dg += a as f64;
                    db += b as f64;
                }
                (dg as f32, db as f32)
            })
            .collect();
        let mut out: Vec<f32> = sums.iter().map(|s| s.0).collect();
        out.extend(sums.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// (x, dy, [mean; var; gamma; beta; dgamma; dbeta]) → dx.
#[derive(Clone, Copy, Debug)]
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
        let (n, c, hw) = nchw(l1)?;
        let (x, dy, params) = (f32_data(s1, l1, "input")?, f32_data(s2, l2, "gradient")?, f32_data(s3, l3, "params")?);
        if params.len() < 6 * c {
            candle_core::bail!("brisk batch-norm grad: params {:?} too small", l3.dims());
        }
        let ch = channels(&params[..2 * c], &params[2 * c..4 * c], c, self.0.eps);
        let (dgamma, dbeta) = (&params[4 * c..5 * c], &params[5 * c..6 * c]);
        let m = (n * hw) as f32;
        let (relu, batch_stats) = (self.0.relu, self.0.batch_stats);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
            let k = i % c;
            let p = &ch[k];
            let xs = &x[i * hw..(i + 1) * hw];
            let gs = &dy[i * hw..(i + 1) * hw];
            let a = p.gamma * p.inv_std;
            // Training: dx = γ σ⁻¹ (dy − mean(dy) − x̂ · mean(dy · x̂)); evaluation: γ σ⁻¹ dy.
            let (mean_dy, mean_dyx) = if batch_stats { (dbeta[k] / m, dgamma[k] / m) } else { (0.0, 0.0) };
            for ((o, &v), &g) in out.iter_mut().zip(xs).zip(gs) {
                let xh = (v - p.mean) * p.inv_std;
                let g = masked(g, xh, p, relu);
                *o = a * (g - mean_dy - xh * mean_dyx);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// candle's reference batch-norm (+ReLU) built from elementary ops.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stats: Option<&Tensor>, relu: bool) -> Result<Tensor> {
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
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>()).expect("diff");
        let s = b.abs().and_then(|t| t.max_all()?.to_scalar::<f32>()).expect("scale");
        d / s.max(1e-6)
    }

    fn check(shape: (usize, usize, usize, usize), relu: bool, eval: bool) -> Result<()> {
        let dev = Device::Cpu;
        let (_, c, _, _) = shape;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&(Tensor::rand(0.5f32, 1.5, c, &dev)?))?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev)?)?;
        let running = Tensor::stack(&[Tensor::randn(0f32, 0.5, c, &dev)?, Tensor::rand(0.5f32, 2.0, c, &dev)?], 0)?;
        let stats = eval.then_some(&running);
        let ours = batch_norm(&x, &w, &b, stats, 1e-5, relu)?;
        let theirs = reference(&x, &w, &b, stats, relu)?;
        assert!(max_rel(&ours.y, &theirs) < 1e-5, "forward {shape:?} relu={relu} eval={eval}");
        if !eval {
            let mean = x.mean((0, 2, 3))?;
            assert!(max_rel(&ours.stats.get(0)?, &mean) < 1e-5);
        }
        let r = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let g1 = (ours.y * &r)?.sum_all()?.backward()?;
        let g2 = (theirs * &r)?.sum_all()?.backward()?;
        for (v, what) in [(&x, "input"), (&w, "weight"), (&b, "bias")] {
            let err = max_rel(g1.get(v).expect("ours"), g2.get(v).expect("reference"));
            assert!(err < 1e-4, "{what} gradient {shape:?} relu={relu} eval={eval}: {err:e}");
        }
        Ok(())
    }

    #[test]
    fn matches_candle_reference_in_every_mode() -> Result<()> {
        for shape in [(4, 3, 5, 7), (1, 5, 4, 4), (7, 2, 1, 1), (2, 16, 8, 8)] {
            for relu in [false, true] {
                for eval in [false, true] {
                    check(shape, relu, eval)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn f16_input_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 2, 2), candle_core::DType::F16, &dev).expect("x");
        let w = Tensor::ones(3, candle_core::DType::F16, &dev).expect("w");
        assert!(batch_norm(&x, &w, &w, None, 1e-5, false).is_err());
    }
}
