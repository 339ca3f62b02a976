//! The seam between the executor and a device: [`Backend`], the operations a training
//! step is made of, on buffers the backend owns, and [`CpuBackend`], brisk-ops' CPU
//! kernels behind it. A new device implements `Backend`; the executor (engine.rs), the
//! model plan, the parameters and checkpoints stay as they are.

use brisk_ops::{
    add_assign, bn_grad_sums, bn_input_grad_in_place, bn_normalize, bn_stats, conv_forward, conv_input_grad,
    conv_weight_grad, matmul_f32, par_build, relu_backward, BnParams, ConvShape, Mat, MaxPool, Products,
};
use brisk_precision::Dtype;
use brisk_spec::PoolPlan;
use rayon::prelude::*;

use crate::error::Result;

/// Batch-norm's per-channel operands on a backend: the layout of `x` `[n, c, hw]`, the
/// statistics `[mean; var]`, the affine parameters `[γ; β]` and ε.
#[derive(Debug)]
pub struct BnArgs<'a, B> {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub stats: &'a B,
    pub affine: &'a B,
    pub eps: f64,
}

/// The operations of a ResNet training step, in f32, on buffers of the backend's own
/// (`Buf`: host memory, device memory). Activations are NCHW; `planes` is N·C and `hw`
/// the pixels of one plane. Shapes are checked by the executor before it calls.
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// A buffer of f32 values where the backend computes.
    type Buf: std::fmt::Debug + Default + Clone + Send + Sync;

    /// A short name for messages ("cpu").
    fn name(&self) -> &'static str;
    /// A buffer holding `values` (the host vector itself where the backend computes on
    /// the host).
    fn upload(&self, values: Vec<f32>) -> Result<Self::Buf>;
    /// A copy of a buffer's values on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// A buffer's values on the host, consuming it (no copy where it is on the host).
    fn download_owned(&self, buf: Self::Buf) -> Result<Vec<f32>>;

    /// Convolution `x` ⊛ `w` (no bias); `products` says whether the operands are bf16
    /// values the backend may multiply in bf16 (a half layer of mixed-bf16).
    fn conv_forward(
        &self,
        g: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        products: Products,
    ) -> Result<Self::Buf>;
    /// The convolution's input gradient from its output gradient `dy`.
    fn conv_input_grad(
        &self,
        g: &ConvShape,
        dy: &Self::Buf,
        w: &Self::Buf,
        products: Products,
    ) -> Result<Self::Buf>;
    /// The convolution's weight gradient.
    fn conv_weight_grad(
        &self,
        g: &ConvShape,
        x: &Self::Buf,
        dy: &Self::Buf,
        products: Products,
    ) -> Result<Self::Buf>;

    /// `[mean(c); biased var(c)]` of `x` `[n, c, hw]`.
    fn bn_stats(&self, x: &Self::Buf, nchw: (usize, usize, usize)) -> Result<Self::Buf>;
    /// `relu?(γ (x − mean) / sqrt(var + ε) + β + residual?)`.
    fn bn_normalize(
        &self,
        x: &Self::Buf,
        p: &BnArgs<Self::Buf>,
        relu: bool,
        residual: Option<&Self::Buf>,
    ) -> Result<Self::Buf>;
    /// Batch-norm's gradient sums from `dz` (the gradient of its affine output):
    /// `[Σ dz·x̂; Σ dz]` per channel, which are also `[dγ; dβ]`.
    fn bn_grad_sums(&self, x: &Self::Buf, dz: &Self::Buf, p: &BnArgs<Self::Buf>) -> Result<Self::Buf>;
    /// Batch-norm's training backward: `dz` becomes the input's gradient, its means
    /// taken from `sums` (this batch's [`Backend::bn_grad_sums`], or every slice's and
    /// rank's with synchronised statistics).
    fn bn_input_grad(
        &self,
        x: &Self::Buf,
        dz: &mut Self::Buf,
        p: &BnArgs<Self::Buf>,
        sums: &Self::Buf,
    ) -> Result<()>;

    /// `dy` zeroed where `y` is not positive (ReLU's backward).
    fn relu_backward(&self, y: &Self::Buf, dy: &mut Self::Buf) -> Result<()>;
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// Every value rounded to the nearest value of the half format `to` (kept at the
    /// buffer's own precision): an activation or gradient a half-precision layer stores.
    fn round_half(&self, x: &mut Self::Buf, to: Dtype) -> Result<()>;
    /// `dst = max(0, dst + src)`: a block's residual sum and ReLU.
    fn add_relu(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `max(0, v)` in place.
    fn relu(&self, x: &mut Self::Buf) -> Result<()>;
    /// `1 / (1 + e^-v)` in place.
    fn sigmoid(&self, x: &mut Self::Buf) -> Result<()>;
    /// `d` kept where `h` is positive, zero elsewhere, as a new buffer.
    fn relu_mask(&self, d: &Self::Buf, h: &Self::Buf) -> Result<Self::Buf>;

    /// Max-pooling of `planes` planes of `h`x`w`.
    fn max_pool(
        &self,
        pool: &PoolPlan,
        x: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
    ) -> Result<Self::Buf>;
    /// Max-pooling's input gradient.
    fn max_pool_backward(
        &self,
        pool: &PoolPlan,
        x: &Self::Buf,
        dy: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
    ) -> Result<Self::Buf>;
    /// The mean of each plane: `planes` values.
    fn global_average(&self, x: &Self::Buf, planes: usize, hw: usize) -> Result<Self::Buf>;
    /// The mean's gradient: each plane's value spread over its `hw` inputs.
    fn spread_average(&self, d: &Self::Buf, planes: usize, hw: usize) -> Result<Self::Buf>;

    /// `x` `[n, fin]` · `w`ᵀ (`w` `[fout, fin]`) + `b`.
    fn dense(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        dims: (usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// The dense layer's gradients from `dout` `[n, fout]`: (input, weight, bias).
    fn dense_backward(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dims: (usize, usize, usize),
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;

    /// Each plane of `y` times its gate value (squeeze-and-excitation's scale).
    fn scale_planes(&self, y: &Self::Buf, gate: &Self::Buf, hw: usize) -> Result<Self::Buf>;
    /// The gate's pre-sigmoid gradient from the output gradient `dz` of
    /// [`Backend::scale_planes`]: `Σ_hw dz·y · g (1 − g)` per plane.
    fn gate_grad(&self, dz: &Self::Buf, y: &Self::Buf, gate: &Self::Buf, hw: usize) -> Result<Self::Buf>;
    /// The input gradient of squeeze-and-excitation from `dz`: `dz · g` plus the pooled
    /// gradient spread over each plane.
    fn scale_planes_backward(
        &self,
        dz: &Self::Buf,
        gate: &Self::Buf,
        dpooled: &Self::Buf,
        hw: usize,
    ) -> Result<Self::Buf>;
}

/// brisk-ops' CPU kernels, on host vectors.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// Slices as brisk-ops' batch-norm parameters.
fn bn_params<'a>(p: &'a BnArgs<Vec<f32>>) -> BnParams<'a> {
    BnParams {
        n: p.n,
        c: p.c,
        hw: p.hw,
        stats: p.stats,
        affine: p.affine,
        eps: p.eps,
    }
}

fn max_pool_of(p: &PoolPlan) -> MaxPool {
    MaxPool {
        k: p.kernel,
        stride: p.stride,
        padding: p.padding,
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        Ok(values)
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn download_owned(&self, buf: Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf)
    }

    fn conv_forward(
        &self,
        g: &ConvShape,
        x: &Vec<f32>,
        w: &Vec<f32>,
        products: Products,
    ) -> Result<Vec<f32>> {
        Ok(conv_forward(g, x, w, products))
    }

    fn conv_input_grad(
        &self,
        g: &ConvShape,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        products: Products,
    ) -> Result<Vec<f32>> {
        Ok(conv_input_grad(g, dy, w, products))
    }

    fn conv_weight_grad(
        &self,
        g: &ConvShape,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        products: Products,
    ) -> Result<Vec<f32>> {
        Ok(conv_weight_grad(g, x, dy, products))
    }

    fn bn_stats(&self, x: &Vec<f32>, (n, c, hw): (usize, usize, usize)) -> Result<Vec<f32>> {
        Ok(bn_stats(x, n, c, hw))
    }

    fn bn_normalize(
        &self,
        x: &Vec<f32>,
        p: &BnArgs<Vec<f32>>,
        relu: bool,
        residual: Option<&Vec<f32>>,
    ) -> Result<Vec<f32>> {
        Ok(bn_normalize(x, &bn_params(p), relu, residual.map(Vec::as_slice)))
    }

    fn bn_grad_sums(&self, x: &Vec<f32>, dz: &Vec<f32>, p: &BnArgs<Vec<f32>>) -> Result<Vec<f32>> {
        Ok(bn_grad_sums(x, dz, &bn_params(p)))
    }

    fn bn_input_grad(
        &self,
        x: &Vec<f32>,
        dz: &mut Vec<f32>,
        p: &BnArgs<Vec<f32>>,
        sums: &Vec<f32>,
    ) -> Result<()> {
        bn_input_grad_in_place(x, dz, &bn_params(p), sums, true);
        Ok(())
    }

    fn relu_backward(&self, y: &Vec<f32>, dy: &mut Vec<f32>) -> Result<()> {
        relu_backward(y, dy);
        Ok(())
    }

    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        add_assign(dst, src);
        Ok(())
    }

    fn round_half(&self, x: &mut Vec<f32>, to: Dtype) -> Result<()> {
        match to {
            Dtype::Bf16 => brisk_ops::round_to_bf16(x),
            Dtype::F16 => brisk_ops::round_to_f16(x),
            Dtype::F32 => {}
        }
        Ok(())
    }

    fn add_relu(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        dst.iter_mut().zip(src).for_each(|(a, b)| *a = (*a + b).max(0.0));
        Ok(())
    }

    fn relu(&self, x: &mut Vec<f32>) -> Result<()> {
        x.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(())
    }

    fn sigmoid(&self, x: &mut Vec<f32>) -> Result<()> {
        x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        Ok(())
    }

    fn relu_mask(&self, d: &Vec<f32>, h: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(d.iter()
            .zip(h)
            .map(|(d, h)| if *h > 0.0 { *d } else { 0.0 })
            .collect())
    }

    fn max_pool(&self, pool: &PoolPlan, x: &Vec<f32>, planes: usize, hw: (usize, usize)) -> Result<Vec<f32>> {
        Ok(max_pool_of(pool).forward(x, planes, hw)?)
    }

    fn max_pool_backward(
        &self,
        pool: &PoolPlan,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        planes: usize,
        hw: (usize, usize),
    ) -> Result<Vec<f32>> {
        Ok(max_pool_of(pool).backward(x, dy, planes, hw)?)
    }

    fn global_average(&self, x: &Vec<f32>, planes: usize, hw: usize) -> Result<Vec<f32>> {
        let inv = 1.0 / hw as f32;
        Ok(x[..planes * hw]
            .par_chunks(hw)
            .map(|plane| plane.iter().sum::<f32>() * inv)
            .collect())
    }

    fn spread_average(&self, d: &Vec<f32>, planes: usize, hw: usize) -> Result<Vec<f32>> {
        let inv = 1.0 / hw as f32;
        Ok(par_build(planes * hw, hw, |i, plane| plane.fill(d[i] * inv)))
    }

    fn dense(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        (n, fin, fout): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut out: Vec<f32> = (0..n).flat_map(|_| b.iter().copied()).collect();
        matmul_f32(
            (n, fout, fin),
            &mut out,
            Mat::rows(x, fin),
            Mat::transposed(w, fin),
            true,
        );
        Ok(out)
    }

    fn dense_backward(
        &self,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        (n, fin, fout): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let mut dw = vec![0f32; fout * fin];
        matmul_f32(
            (fout, fin, n),
            &mut dw,
            Mat::transposed(dout, fout),
            Mat::rows(x, fin),
            false,
        );
        let mut db = vec![0f32; fout];
        for row in dout.chunks(fout) {
            db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
        let mut dx = vec![0f32; n * fin];
        matmul_f32(
            (n, fin, fout),
            &mut dx,
            Mat::rows(dout, fout),
            Mat::rows(w, fin),
            false,
        );
        Ok((dx, dw, db))
    }

    fn scale_planes(&self, y: &Vec<f32>, gate: &Vec<f32>, hw: usize) -> Result<Vec<f32>> {
        Ok(par_build(gate.len() * hw, hw, |i, plane| {
            for (o, &x) in plane.iter_mut().zip(&y[i * hw..]) {
                *o = x * gate[i];
            }
        }))
    }

    fn gate_grad(&self, dz: &Vec<f32>, y: &Vec<f32>, gate: &Vec<f32>, hw: usize) -> Result<Vec<f32>> {
        let planes = gate.len();
        // out = y · g: dg = Σ_hw dz · y; then through the sigmoid.
        let dgate: Vec<f32> = dz[..planes * hw]
            .par_chunks(hw)
            .zip(y.par_chunks(hw))
            .map(|(dplane, yplane)| dplane.iter().zip(yplane).map(|(d, y)| d * y).sum())
            .collect();
        Ok(dgate.iter().zip(gate).map(|(d, g)| d * g * (1.0 - g)).collect())
    }

    fn scale_planes_backward(
        &self,
        dz: &Vec<f32>,
        gate: &Vec<f32>,
        dpooled: &Vec<f32>,
        hw: usize,
    ) -> Result<Vec<f32>> {
        let inv = 1.0 / hw as f32;
        Ok(par_build(gate.len() * hw, hw, |i, dplane| {
            let (g, spread) = (gate[i], dpooled[i] * inv);
            for (d, &z) in dplane.iter_mut().zip(&dz[i * hw..]) {
                *d = z * g + spread;
            }
        }))
    }
}
