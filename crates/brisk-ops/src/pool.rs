//! Max-pooling with padding (the ImageNet stem's 3x3 stride-2 pool) as a candle custom op
//! with its own backward, which candle lacks when the window is larger than the stride.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::storage::f32_slice;

/// Max-pools `x` `[N, C, H, W]` (f32) over `k`x`k` windows with the given stride and
/// padding; padded positions never win (PyTorch's -inf padding). Differentiable: the
/// gradient goes to the first maximum of each window.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if k == 0 || stride == 0 || 2 * padding > k {
        candle_core::bail!("brisk max_pool2d: need k >= 1, stride >= 1 and padding <= k / 2 (k {k}, stride {stride}, padding {padding})");
    }
    x.contiguous()?.apply_op1(MaxPool { k, stride, padding })
}

/// A `k`x`k` max-pool window moved by `stride` over an input padded by `padding`.
#[derive(Clone, Copy, Debug)]
pub struct MaxPool {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool {
    /// The output size along an axis of `size`.
    pub fn out_size(&self, size: usize) -> Result<usize> {
        if size + 2 * self.padding < self.k {
            candle_core::bail!(
                "brisk max_pool2d: input size {size} is smaller than the {}x{} window",
                self.k,
                self.k
            );
        }
        Ok((size + 2 * self.padding - self.k) / self.stride + 1)
    }

    /// The input index (within one plane) of the first maximum of window (oh, ow).
    fn argmax(&self, plane: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> usize {
        let rows = (oh * self.stride).saturating_sub(self.padding)
            ..(oh * self.stride + self.k - self.padding).min(h);
        let cols = (ow * self.stride).saturating_sub(self.padding)
            ..(ow * self.stride + self.k - self.padding).min(w);
        let mut best = (f32::NEG_INFINITY, rows.start * w + cols.start);
        for ih in rows {
            for iw in cols.clone() {
                let v = plane[ih * w + iw];
                // NaN propagates as in PyTorch: it wins over any number.
                if v > best.0 || v.is_nan() && !best.0.is_nan() {
                    best = (v, ih * w + iw);
                }
            }
        }
        best.1
    }
}

fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    f32_slice(s, l, "max_pool2d", "input")
}

impl MaxPool {
    /// Max-pools the `planes` planes of `h`x`w` in `x` (f32 slices).
    pub fn forward(&self, x: &[f32], planes: usize, (h, w): (usize, usize)) -> Result<Vec<f32>> {
        let (ho, wo) = (self.out_size(h)?, self.out_size(w)?);
        let mut out = vec![0f32; planes * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(p, o)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for oh in 0..ho {
                for ow in 0..wo {
                    o[oh * wo + ow] = plane[self.argmax(plane, h, w, oh, ow)];
                }
            }
        });
        Ok(out)
    }

    /// The input gradient of [`MaxPool::forward`] from the output gradient `dy`: each
    /// window's gradient goes to its first maximum.
    pub fn backward(&self, x: &[f32], dy: &[f32], planes: usize, (h, w): (usize, usize)) -> Result<Vec<f32>> {
        let (ho, wo) = (self.out_size(h)?, self.out_size(w)?);
        let mut dx = vec![0f32; planes * h * w];
        dx.par_chunks_mut(h * w).enumerate().for_each(|(p, d)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for oh in 0..ho {
                for ow in 0..wo {
                    d[self.argmax(plane, h, w, oh, ow)] += dy[p * ho * wo + oh * wo + ow];
                }
            }
        });
        Ok(dx)
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "brisk-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (self.out_size(h)?, self.out_size(w)?);
        let out = self.forward(f32_contiguous(s, l)?, n * c, (h, w))?;
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad(*self))?,
        ))
    }
}

/// (input, output gradient) → input gradient.
#[derive(Clone, Copy, Debug)]
struct MaxPoolGrad(MaxPool);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "brisk-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let (ho, wo) = (self.0.out_size(h)?, self.0.out_size(w)?);
        if l2.dims() != [n, c, ho, wo] {
            candle_core::bail!(
                "brisk max_pool2d grad: gradient {:?} does not fit input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let (x, dy) = (f32_contiguous(s1, l1)?, f32_contiguous(s2, l2)?);
        let dx = self.0.backward(x, dy, n * c, (h, w))?;
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_testkit::randn;
    use candle_core::{Var, D};

    #[test]
    fn matches_candle_forward_and_a_hand_computed_backward() -> Result<()> {
        // Without padding and with window == stride candle has the forward. Its backward
        // divides the gradient by the window size (a bug in candle 0.11), so the expected
        // gradient is computed here by hand: each output's gradient lands on its maximum.
        let (n, c, h, w) = (2, 3, 8, 6);
        let x = Var::from_tensor(&randn(1, 0.0, 1.0, (n, c, h, w))?)?;
        let ours = max_pool2d(&x, 2, 2, 0)?;
        let reference = x.max_pool2d(2)?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            reference.flatten_all()?.to_vec1::<f32>()?
        );
        let r = randn(2, 0.0, 1.0, ours.dims())?;
        let grads = (ours * &r)?.sum_all()?.backward()?;
        let got = grads.get(&x).expect("grad").flatten_all()?.to_vec1::<f32>()?;
        let (xv, rv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            r.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut want = vec![0f32; xv.len()];
        let (ho, wo) = (h / 2, w / 2);
        for p in 0..n * c {
            for oh in 0..ho {
                for ow in 0..wo {
                    let cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .map(|(a, b)| p * h * w + (2 * oh + a) * w + 2 * ow + b);
                    let best = cells
                        .into_iter()
                        .fold(cells[0], |m, i| if xv[i] > xv[m] { i } else { m });
                    want[best] += rv[p * ho * wo + oh * wo + ow];
                }
            }
        }
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn padded_stem_pool_matches_negative_infinity_padding() -> Result<()> {
        // 3x3 stride 2 padding 1 on negative inputs: -inf padding means the border never wins.
        let x = (randn(3, 0.0, 1.0, (1, 2, 7, 7))?.abs()? * -1.0)?;
        let ours = max_pool2d(&x, 3, 2, 1)?;
        let padded = x.pad_with_same(D::Minus2, 1, 1)?.pad_with_same(D::Minus1, 1, 1)?;
        let reference = padded.max_pool2d_with_stride(3, 2)?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            reference.flatten_all()?.to_vec1::<f32>()?
        );
        // Each output's gradient lands on one input: the gradient sums to the output count.
        let xv = Var::from_tensor(&x)?;
        let g = max_pool2d(&xv, 3, 2, 1)?.sum_all()?.backward()?;
        let total = g.get(&xv).expect("grad").sum_all()?.to_scalar::<f32>()?;
        assert_eq!(total, (2 * 4 * 4) as f32);
        Ok(())
    }
}
