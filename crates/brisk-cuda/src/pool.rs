//! Max-pooling on device buffers (kernel `MAX_POOL` in kernels.rs; the ImageNet stem's
//! 3x3/2 with padding 1): launchers with checked sizes, and `twin`, the backward's
//! gather — each input value summing, in window order, the gradients of the windows
//! whose first maximum it is — written over slices and tested against brisk-ops'
//! scatter, so its index arithmetic is checked without a GPU.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::MAX_POOL;
use crate::launch::{check, driver, grid, DeviceKernels};

/// A max-pool over `planes` NCHW planes of `h`x`w`: a `k`x`k` window moved by `stride`
/// over the input padded by `pad` (with -inf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl PoolShape {
    /// The output's height and width, or an error when the window does not fit or the
    /// padding reaches past half of it.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let side = |n: usize| -> Result<usize> {
            if self.k == 0 || self.stride == 0 || 2 * self.pad > self.k || n + 2 * self.pad < self.k {
                return Err(Error::Shape(format!(
                    "max-pool {self:?}: the window does not fit"
                )));
            }
            Ok((n + 2 * self.pad - self.k) / self.stride + 1)
        };
        Ok((side(self.h)?, side(self.w)?))
    }

    /// The sizes as the kernels take them, in their order: planes, then
    /// [h, w, ho, wo, k, stride, pad].
    fn args(&self) -> Result<(i64, [i32; 7])> {
        let (ho, wo) = self.out_hw()?;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::Shape(format!("max-pool {self:?}: {v} is too large")))
        };
        Ok((
            self.planes as i64,
            [
                int(self.h)?,
                int(self.w)?,
                int(ho)?,
                int(wo)?,
                int(self.k)?,
                int(self.stride)?,
                int(self.pad)?,
            ],
        ))
    }
}

/// The host twins of the kernels' index arithmetic.
pub mod twin {
    use super::PoolShape;

    /// The first maximum of window (oh, ow) in `plane`, as `pool_argmax`.
    pub fn argmax(s: &PoolShape, plane: &[f32], oh: usize, ow: usize) -> usize {
        let (r0, r1) = (
            (oh * s.stride).saturating_sub(s.pad),
            (oh * s.stride + s.k - s.pad).min(s.h),
        );
        let (c0, c1) = (
            (ow * s.stride).saturating_sub(s.pad),
            (ow * s.stride + s.k - s.pad).min(s.w),
        );
        let (mut best, mut at) = (f32::NEG_INFINITY, r0 * s.w + c0);
        for ih in r0..r1 {
            for iw in c0..c1 {
                let v = plane[ih * s.w + iw];
                if v > best || (v.is_nan() && !best.is_nan()) {
                    (best, at) = (v, ih * s.w + iw);
                }
            }
        }
        at
    }

    /// `max_pool_bwd`: each input value gathers the gradients of the windows covering it
    /// whose first maximum it is, in window order.
    pub fn backward(s: &PoolShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (ho, wo) = (
            (s.h + 2 * s.pad - s.k) / s.stride + 1,
            (s.w + 2 * s.pad - s.k) / s.stride + 1,
        );
        let covering = |i: usize, out: usize| {
            // Windows o with o·stride − pad ≤ i < o·stride − pad + k.
            let first = (i + s.pad + 1).saturating_sub(s.k).div_ceil(s.stride);
            first..((i + s.pad) / s.stride).min(out - 1) + 1
        };
        let mut dx = vec![0f32; s.planes * s.h * s.w];
        for (p, d) in dx.chunks_mut(s.h * s.w).enumerate() {
            let plane = &x[p * s.h * s.w..][..s.h * s.w];
            let g = &dy[p * ho * wo..][..ho * wo];
            for (at, v) in d.iter_mut().enumerate() {
                let (ih, iw) = (at / s.w, at % s.w);
                for oh in covering(ih, ho) {
                    for ow in covering(iw, wo) {
                        if argmax(s, plane, oh, ow) == at {
                            *v += g[oh * wo + ow];
                        }
                    }
                }
            }
        }
        dx
    }
}

impl DeviceKernels {
    /// The max-pool of `x` into `y`.
    pub fn max_pool(&self, s: &PoolShape, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        let (planes, sizes) = s.args()?;
        let out = s.planes * (sizes[2] * sizes[3]) as usize;
        check(
            x.len() == s.planes * s.h * s.w && y.len() == out,
            "max_pool_fwd",
            || format!("x {} and y {} values for {s:?}", x.len(), y.len()),
        )?;
        let f = self.function(&MAX_POOL, "max_pool_fwd")?;
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(&planes);
        for v in &sizes {
            launch.arg(v);
        }
        // SAFETY: the arguments match the kernel's parameters; x and y hold the values the
        // shape says (checked); the loop is grid-stride over y.
        unsafe { launch.launch(grid(out)) }.map_err(|e| driver("launching max_pool_fwd", e))?;
        Ok(())
    }

    /// The max-pool's input gradient `dx` from its input `x` and output gradient `dy`.
    pub fn max_pool_backward(
        &self,
        s: &PoolShape,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (planes, sizes) = s.args()?;
        let input = s.planes * s.h * s.w;
        check(
            x.len() == input && dx.len() == input && dy.len() == s.planes * (sizes[2] * sizes[3]) as usize,
            "max_pool_bwd",
            || format!("x {}, dy {}, dx {} values for {s:?}", x.len(), dy.len(), dx.len()),
        )?;
        let f = self.function(&MAX_POOL, "max_pool_bwd")?;
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(dy).arg(dx).arg(&planes);
        for v in &sizes {
            launch.arg(v);
        }
        // SAFETY: as in `max_pool`; the loop is grid-stride over dx.
        unsafe { launch.launch(grid(input)) }.map_err(|e| driver("launching max_pool_bwd", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes: the ImageNet stem's 3x3/2 pad 1 on even and odd maps, a 2x2/2 without
    /// padding, a 3x3/1; values with ties (so "first maximum" matters) and a NaN.
    fn cases() -> Vec<(PoolShape, Vec<f32>, Vec<f32>)> {
        let shapes = [
            PoolShape {
                planes: 3,
                h: 8,
                w: 8,
                k: 3,
                stride: 2,
                pad: 1,
            },
            PoolShape {
                planes: 2,
                h: 7,
                w: 9,
                k: 3,
                stride: 2,
                pad: 1,
            },
            PoolShape {
                planes: 2,
                h: 6,
                w: 6,
                k: 2,
                stride: 2,
                pad: 0,
            },
            PoolShape {
                planes: 1,
                h: 5,
                w: 5,
                k: 3,
                stride: 1,
                pad: 1,
            },
        ];
        shapes
            .into_iter()
            .map(|s| {
                let mut x: Vec<f32> = (0..s.planes * s.h * s.w).map(|i| ((i * 7) % 5) as f32).collect();
                x[4] = f32::NAN;
                let (ho, wo) = s.out_hw().expect("shape");
                let dy = (0..s.planes * ho * wo).map(|i| 0.1 * i as f32 + 0.3).collect();
                (s, x, dy)
            })
            .collect()
    }

    fn brisk_ops_pool(s: &PoolShape) -> brisk_ops::MaxPool {
        brisk_ops::MaxPool {
            k: s.k,
            stride: s.stride,
            padding: s.pad,
        }
    }

    /// The gather (one value at a time, the windows covering it) computes brisk-ops'
    /// scatter (window by window) bit for bit.
    #[test]
    fn the_gathered_backward_is_brisk_ops_scatter() {
        for (s, x, dy) in cases() {
            let want = brisk_ops_pool(&s)
                .backward(&x, &dy, s.planes, (s.h, s.w))
                .expect("brisk-ops");
            let got = twin::backward(&s, &x, &dy);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{s:?}");
        }
    }

    #[test]
    fn windows_that_do_not_fit_are_errors() {
        let s = PoolShape {
            planes: 1,
            h: 2,
            w: 2,
            k: 5,
            stride: 1,
            pad: 1,
        };
        assert!(s.out_hw().is_err_and(|e| e.to_string().contains("does not fit")));
    }

    /// On a GPU, forward and backward against brisk-ops bit for bit; elsewhere SKIPPED.
    #[test]
    fn max_pool_on_the_gpu_matches_brisk_ops() -> Result<()> {
        let Some((gpu, kernels)) = crate::launch::test_kernels("max_pool_on_the_gpu_matches_brisk_ops")
        else {
            return Ok(());
        };
        let stream = gpu.context().default_stream();
        let dev = |e: cudarc::driver::DriverError| driver("copying", e);
        for (s, x, dy) in cases() {
            let pool = brisk_ops_pool(&s);
            let want_y = pool
                .forward(&x, s.planes, (s.h, s.w))
                .map_err(|e| Error::Shape(e.to_string()))?;
            let want_dx = pool
                .backward(&x, &dy, s.planes, (s.h, s.w))
                .map_err(|e| Error::Shape(e.to_string()))?;
            let (xd, dyd) = (
                stream.clone_htod(&x).map_err(dev)?,
                stream.clone_htod(&dy).map_err(dev)?,
            );
            let mut y = stream.alloc_zeros::<f32>(want_y.len()).map_err(dev)?;
            let mut dx = stream.clone_htod(&vec![7f32; x.len()]).map_err(dev)?;
            kernels.max_pool(&s, &xd, &mut y)?;
            kernels.max_pool_backward(&s, &xd, &dyd, &mut dx)?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&stream.clone_dtoh(&y).map_err(dev)?),
                bits(&want_y),
                "forward {s:?}"
            );
            assert_eq!(
                bits(&stream.clone_dtoh(&dx).map_err(dev)?),
                bits(&want_dx),
                "backward {s:?}"
            );
        }
        Ok(())
    }
}
