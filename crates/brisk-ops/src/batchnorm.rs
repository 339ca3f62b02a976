//! Fused batch normalisation (optionally followed by ReLU) for NCHW f32 tensors, with its
//! own backward: one pass for the statistics, one for the output, two for the gradients,
//! each parallel over channels, instead of candle's chain of small allocating ops. This
//! file holds the candle ops; `kernels` the slice kernels they and the engine run,
//! `sync` the cross-rank statistics of synchronised batch-norm.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::elementwise::relu_backward;
use crate::half::{f32_values, storage_of};
use crate::storage::f32_slice;

mod kernels;
mod sync;

pub use kernels::{bn_grad_sums, bn_input_grad, bn_input_grad_in_place, bn_normalize, bn_stats, BnParams};
pub use sync::{combine_batch_stats, combine_grad_sums, BatchNormSync};

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
        let per_channel = kernels::channel_moments(x, n, c, hw);
        let out: Vec<f32> = match &self.sync {
            None => kernels::moments_to_stats(&per_channel, count),
            Some(sync) => sync::synchronised_stats(sync.as_ref(), &per_channel, count)?,
        };
        let rows = out.len() / c;
        Ok((CpuStorage::F32(out), Shape::from((rows, c))))
    }
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
        let (n, c, hw) = nchw(x.1)?;
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
        let p = BnParams {
            n,
            c,
            hw,
            stats: &p[..2 * c],
            affine: &p[2 * c..4 * c],
            eps: self.eps,
        };
        let y = bn_normalize(xs, &p, self.relu, res.as_deref());
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
                Some(sync) => sync::global_grad_sums(sync.as_ref(), x, &sums)?,
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
        let p = BnParams {
            n,
            c,
            hw,
            stats: &params[..2 * c],
            affine: &params[2 * c..4 * c],
            eps: self.0.eps,
        };
        let out = bn_grad_sums(x, dz, &p);
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
        let p = BnParams {
            n,
            c,
            hw,
            stats: &params[..2 * c],
            affine: &params[2 * c..4 * c],
            eps: self.0.eps,
        };
        let dx = bn_input_grad(x, dz, &p, &params[4 * c..6 * c], self.0.batch_stats);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_testkit::{max_rel, rand_uniform, randn};
    use candle_core::{Device, Var};

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
