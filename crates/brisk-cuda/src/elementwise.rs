//! Element-wise passes on device buffers (the kernels in kernels.rs, `ELEMENTWISE`): ReLU,
//! sigmoid and rounding to bf16/f16 in place; add, add-then-ReLU and ReLU's backward into
//! a destination. Each operation also has a host `twin`, the rule the kernel follows
//! written over a slice, which brisk's CPU kernels are checked against here and the
//! device against on a GPU.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::error::Result;
use crate::kernels::ELEMENTWISE;
use crate::launch::{check, driver, grid, DeviceKernels};

/// An in-place operation, as `ew_unary`'s `op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Relu = 0,
    Sigmoid = 1,
    RoundBf16 = 2,
    RoundF16 = 3,
}

/// `dst op= src`, as `ew_binary`'s `op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add = 0,
    AddRelu = 1,
    /// `dst` zeroed where `src` (the ReLU's output) is not positive.
    ReluBackward = 2,
}

impl Unary {
    /// The kernel's rule on the host.
    pub fn twin(self, v: f32) -> f32 {
        match self {
            Unary::Relu => v.max(0.0),
            Unary::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Unary::RoundBf16 => half::bf16::from_f32(v).to_f32(),
            Unary::RoundF16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

impl Binary {
    /// The kernel's rule on the host.
    pub fn twin(self, d: f32, s: f32) -> f32 {
        match self {
            Binary::Add => d + s,
            Binary::AddRelu => (d + s).max(0.0),
            Binary::ReluBackward => {
                if s > 0.0 {
                    d
                } else {
                    0.0
                }
            }
        }
    }
}

impl DeviceKernels {
    /// `op` on every value of `x`, in place.
    pub fn unary(&self, op: Unary, x: &mut CudaSlice<f32>) -> Result<()> {
        let f = self.function(&ELEMENTWISE, "ew_unary")?;
        let (n, code) = (x.len() as i64, op as i32);
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(&n).arg(&code);
        // SAFETY: (x, n, op) match the kernel's parameters; x holds n values; the loop is
        // grid-stride over n.
        unsafe { launch.launch(grid(n as usize)) }.map_err(|e| driver("launching ew_unary", e))?;
        Ok(())
    }

    /// `dst op= src`, value by value.
    pub fn binary(&self, op: Binary, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        check(dst.len() == src.len(), "ew_binary", || {
            format!("dst {} values, src {}", dst.len(), src.len())
        })?;
        let f = self.function(&ELEMENTWISE, "ew_binary")?;
        let (n, code) = (dst.len() as i64, op as i32);
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(dst).arg(src).arg(&n).arg(&code);
        // SAFETY: (dst, src, n, op) match the kernel's parameters; both hold n values
        // (checked); the loop is grid-stride over n.
        unsafe { launch.launch(grid(n as usize)) }.map_err(|e| driver("launching ew_binary", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// Values around every edge the rules have: zero of both signs, ties of the half
    /// formats, their overflow and subnormals, large negatives for the sigmoid.
    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 0.0137).collect();
        v.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0, // a bf16 tie
            1.0 + 3.0 / 256.0,
            1.0 + 1.0 / 2048.0, // an f16 tie
            70000.0,            // past f16's largest
            1e-6,               // an f16 subnormal
            -88.0,
            88.0,
        ]);
        v
    }

    /// The twins are brisk's CPU rules: the backend's ReLU and sigmoid, brisk-ops'
    /// half rounding and ReLU backward.
    #[test]
    fn the_twins_are_the_cpu_kernels_rules() {
        let v = values();
        let mut bf = v.clone();
        brisk_ops::round_to_bf16(&mut bf);
        let mut f16 = v.clone();
        brisk_ops::round_to_f16(&mut f16);
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(Unary::RoundBf16.twin(x).to_bits(), bf[i].to_bits(), "bf16 of {x}");
            assert_eq!(Unary::RoundF16.twin(x).to_bits(), f16[i].to_bits(), "f16 of {x}");
            assert_eq!(Unary::Relu.twin(x), x.max(0.0));
        }
        let (d, s) = (v.clone(), v.iter().rev().copied().collect::<Vec<_>>());
        let mut masked = d.clone();
        brisk_ops::relu_backward(&s, &mut masked);
        let mut summed = d.clone();
        brisk_ops::add_assign(&mut summed, &s);
        for i in 0..d.len() {
            assert_eq!(Binary::ReluBackward.twin(d[i], s[i]), masked[i]);
            assert_eq!(Binary::Add.twin(d[i], s[i]), summed[i]);
        }
    }

    /// On a GPU, every operation against its twin (bitwise for ReLU, the adds and the
    /// rounding; the sigmoid to 2 ulps, `expf` against Rust's `exp`); elsewhere SKIPPED.
    #[test]
    fn elementwise_on_the_gpu_matches_the_twins() -> Result<()> {
        let Some((gpu, kernels)) = crate::launch::test_kernels("elementwise_on_the_gpu_matches_the_twins")
        else {
            return Ok(());
        };
        let stream = gpu.context().default_stream();
        let dev = |e: cudarc::driver::DriverError| driver("copying", e);
        let v = values();
        for op in [Unary::Relu, Unary::Sigmoid, Unary::RoundBf16, Unary::RoundF16] {
            let mut x = stream.clone_htod(&v).map_err(dev)?;
            kernels.unary(op, &mut x)?;
            let got = stream.clone_dtoh(&x).map_err(dev)?;
            for (g, &x) in got.iter().zip(&v) {
                let want = op.twin(x);
                let ulps = (g.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(
                    ulps <= i64::from(op == Unary::Sigmoid) * 2,
                    "{op:?}({x}): {g} vs {want}"
                );
            }
        }
        let s: Vec<f32> = v.iter().rev().copied().collect();
        let src = stream.clone_htod(&s).map_err(dev)?;
        for op in [Binary::Add, Binary::AddRelu, Binary::ReluBackward] {
            let mut dst = stream.clone_htod(&v).map_err(dev)?;
            kernels.binary(op, &mut dst, &src)?;
            let got = stream.clone_dtoh(&dst).map_err(dev)?;
            for ((g, &d), &s) in got.iter().zip(&v).zip(&s) {
                assert_eq!(g.to_bits(), op.twin(d, s).to_bits(), "{op:?}({d}, {s})");
            }
        }
        let mut short = stream.clone_htod(&v[..3]).map_err(dev)?;
        assert!(matches!(
            kernels.binary(Binary::Add, &mut short, &src),
            Err(Error::Driver { .. })
        ));
        Ok(())
    }
}
