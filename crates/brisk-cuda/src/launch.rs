//! Running brisk's kernels on a `Gpu`: each kernel loaded once per device, and launch
//! functions taking device buffers (`CudaSlice`) with the sizes checked before launch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::kernels::{compile, Kernel, GLOBAL_AVG_POOL, SE_GATE, SGD_UPDATE, SOFTMAX_XENT};

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// The kernels loaded on one device, by entry point.
#[derive(Debug)]
pub struct DeviceKernels {
    gpu: Arc<Gpu>,
    arch: &'static str,
    loaded: Mutex<HashMap<&'static str, CudaFunction>>,
}

pub(crate) fn driver(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Driver {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// An error unless `ok`, naming the kernel and what does not fit.
pub(crate) fn check(ok: bool, kernel: &str, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(driver(kernel, what()))
    }
}

/// Blocks of `BLOCK` threads covering `n` items (grid-stride kernels cap it).
pub(crate) fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (n as u64).div_ceil(u64::from(BLOCK)).clamp(1, 65_535) as u32,
            1,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// SGD's settings for one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaledSgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    /// Multiplies the gradients first (1 / the loss scale, or 1).
    pub grad_scale: f32,
}

impl DeviceKernels {
    /// brisk's kernels for `gpu`, compiled for its architecture ([`Gpu::arch`]) on first
    /// use.
    pub fn new(gpu: Arc<Gpu>) -> Result<DeviceKernels> {
        Ok(DeviceKernels {
            arch: gpu.arch()?,
            gpu,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The device's default stream, which every launch uses.
    pub(crate) fn stream(&self) -> Arc<cudarc::driver::CudaStream> {
        self.gpu.context().default_stream()
    }

    /// Entry point `entry` of `kernel`, loaded once.
    pub(crate) fn function(&self, kernel: &'static Kernel, entry: &'static str) -> Result<CudaFunction> {
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| driver("loading a kernel", "a thread panicked while loading"))?;
        if let Some(f) = loaded.get(entry) {
            return Ok(f.clone());
        }
        let compiled = compile(kernel, self.arch)?;
        let module = self
            .gpu
            .context()
            .load_module(compiled.image())
            .map_err(|e| driver(&format!("loading {}", kernel.name), e))?;
        let f = module
            .load_function(entry)
            .map_err(|e| driver(&format!("finding {entry}"), e))?;
        loaded.insert(entry, f.clone());
        Ok(f)
    }

    /// One SGD update of the flat buffers `w` (weights), `m` (momentum, zero at first)
    /// from `g` (gradients); `decays[i]` is 1 where weight decay applies.
    pub fn sgd_update(
        &self,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        decays: &CudaSlice<u8>,
        step: ScaledSgdStep,
    ) -> Result<()> {
        let n = w.len();
        if g.len() != n || m.len() != n || decays.len() != n {
            return Err(driver(
                "sgd_update",
                format!(
                    "buffer lengths differ: w {n}, g {}, m {}, decays {}",
                    g.len(),
                    m.len(),
                    decays.len()
                ),
            ));
        }
        let f = self.function(&SGD_UPDATE, "sgd_update")?;
        let stream = self.gpu.context().default_stream();
        let (n64, nesterov) = (n as i64, i32::from(step.nesterov));
        let cfg = grid(n);
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(w)
            .arg(g)
            .arg(m)
            .arg(decays)
            .arg(&n64)
            .arg(&step.lr)
            .arg(&step.momentum)
            .arg(&step.weight_decay)
            .arg(&nesterov)
            .arg(&step.grad_scale);
        // SAFETY: the arguments match sgd_update's parameters in order and type (three
        // float buffers and a byte buffer of n values, checked above; long long n; floats;
        // int); the grid-stride loop stays below n.
        unsafe { launch.launch(cfg) }.map_err(|e| driver("launching sgd_update", e))?;
        Ok(())
    }

    /// Softmax cross-entropy of `logits` (n × classes) against `labels` with label
    /// smoothing: per-sample losses, the logits' gradient scaled by 1/n, and top-1/top-5
    /// hits per sample.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_xent(
        &self,
        logits: &CudaSlice<f32>,
        labels: &CudaSlice<i32>,
        classes: usize,
        smoothing: f32,
        loss: &mut CudaSlice<f32>,
        dlogits: &mut CudaSlice<f32>,
        top1: &mut CudaSlice<i32>,
        top5: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let n = labels.len();
        let sizes_ok = logits.len() == n * classes
            && dlogits.len() == n * classes
            && loss.len() == n
            && top1.len() == n
            && top5.len() == n;
        if !sizes_ok || n == 0 || classes == 0 {
            return Err(driver(
                "softmax_xent",
                format!("buffer lengths do not fit {n} samples of {classes} classes"),
            ));
        }
        let f = self.function(&SOFTMAX_XENT, "softmax_xent")?;
        let stream = self.gpu.context().default_stream();
        let (n32, c32, inv) = (n as i32, classes as i32, 1.0 / n as f32);
        let cfg = grid(n);
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(logits)
            .arg(labels)
            .arg(&n32)
            .arg(&c32)
            .arg(&smoothing)
            .arg(&inv)
            .arg(loss)
            .arg(dlogits)
            .arg(top1)
            .arg(top5);
        // SAFETY: the arguments match softmax_xent's parameters in order and type, the
        // buffers hold n × classes / n values (checked above), one thread per sample.
        unsafe { launch.launch(cfg) }.map_err(|e| driver("launching softmax_xent", e))?;
        Ok(())
    }

    /// Global average pooling of `x` (nc planes of hw values) into `y` (nc values).
    pub fn global_avg_pool(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, hw: usize) -> Result<()> {
        let nc = y.len();
        check(x.len() == nc * hw && hw > 0, "global_avg_pool_fwd", || {
            format!("x {} != {nc} x {hw}", x.len())
        })?;
        let f = self.function(&GLOBAL_AVG_POOL, "global_avg_pool_fwd")?;
        let stream = self.gpu.context().default_stream();
        let (nc32, hw32) = (nc as i32, hw as i32);
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(&nc32).arg(&hw32);
        // SAFETY: (x, y, nc, hw) match the kernel's parameters; x holds nc·hw values and y
        // nc (checked); one thread per plane.
        unsafe { launch.launch(grid(nc)) }.map_err(|e| driver("launching global_avg_pool_fwd", e))?;
        Ok(())
    }

    /// The gradient of global average pooling: `dx` (nc·hw) from `dy` (nc).
    pub fn global_avg_pool_backward(
        &self,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        hw: usize,
    ) -> Result<()> {
        let nc = dy.len();
        check(dx.len() == nc * hw && hw > 0, "global_avg_pool_bwd", || {
            format!("dx {} != {nc} x {hw}", dx.len())
        })?;
        let f = self.function(&GLOBAL_AVG_POOL, "global_avg_pool_bwd")?;
        let stream = self.gpu.context().default_stream();
        let (nc32, hw32) = (nc as i32, hw as i32);
        let mut launch = stream.launch_builder(&f);
        launch.arg(dy).arg(dx).arg(&nc32).arg(&hw32);
        // SAFETY: (dy, dx, nc, hw) match the kernel's parameters and sizes (checked); the
        // grid-stride loop stays below nc·hw.
        unsafe { launch.launch(grid(nc * hw)) }.map_err(|e| driver("launching global_avg_pool_bwd", e))?;
        Ok(())
    }

    /// The SE gate y = x · s (`s` one value per plane of `hw` values).
    pub fn se_gate(
        &self,
        x: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        hw: usize,
    ) -> Result<()> {
        let nc = s.len();
        check(
            x.len() == nc * hw && y.len() == x.len() && hw > 0,
            "se_gate_fwd",
            || format!("x {}, y {} for {nc} x {hw}", x.len(), y.len()),
        )?;
        let f = self.function(&SE_GATE, "se_gate_fwd")?;
        let stream = self.gpu.context().default_stream();
        let (nc32, hw32) = (nc as i32, hw as i32);
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(s).arg(y).arg(&nc32).arg(&hw32);
        // SAFETY: (x, s, y, nc, hw) match the kernel's parameters and sizes (checked).
        unsafe { launch.launch(grid(nc * hw)) }.map_err(|e| driver("launching se_gate_fwd", e))?;
        Ok(())
    }

    /// The SE gate's gradients: `dx` = dy · s and `ds` = Σ dy · x over each plane.
    pub fn se_gate_backward(
        &self,
        (x, s, dy): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        dx: &mut CudaSlice<f32>,
        ds: &mut CudaSlice<f32>,
        hw: usize,
    ) -> Result<()> {
        let nc = s.len();
        let ok = x.len() == nc * hw && dy.len() == x.len() && dx.len() == x.len() && ds.len() == nc && hw > 0;
        check(ok, "se_gate_bwd", || {
            format!("buffers do not fit {nc} planes of {hw}")
        })?;
        let f = self.function(&SE_GATE, "se_gate_bwd")?;
        let stream = self.gpu.context().default_stream();
        let (nc32, hw32) = (nc as i32, hw as i32);
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(s).arg(dy).arg(dx).arg(ds).arg(&nc32).arg(&hw32);
        // SAFETY: (x, s, dy, dx, ds, nc, hw) match the kernel's parameters and sizes
        // (checked); one thread per plane.
        unsafe { launch.launch(grid(nc)) }.map_err(|e| driver("launching se_gate_bwd", e))?;
        Ok(())
    }
}

#[cfg(test)]
/// The GPU and its kernels, or `None` after recording why this machine cannot run them.
pub(crate) fn test_kernels(test: &str) -> Option<(Arc<Gpu>, DeviceKernels)> {
    let why = if !crate::device::driver_present() {
        "no NVIDIA driver (libcuda) on this machine"
    } else if !crate::kernels::nvrtc_present() {
        "no NVRTC (libnvrtc) on the library path"
    } else {
        match Gpu::open(0) {
            Ok(gpu) => {
                let gpu = Arc::new(gpu);
                match DeviceKernels::new(gpu.clone()) {
                    Ok(kernels) => return Some((gpu, kernels)),
                    Err(_) => "a CUDA device of an architecture brisk does not compile for",
                }
            }
            Err(_) => "no CUDA device",
        }
    };
    brisk_hosts::skipped(&format!("brisk_cuda::{test}"), why);
    None
}

/// [`test_kernels`]'s GPU for a test that also needs `library` (`present`: whether it
/// loads); `None`, the test recorded as SKIPPED with the reason, where either is missing.
#[cfg(test)]
pub(crate) fn test_gpu_with(test: &str, library: &str, present: bool) -> Option<Arc<Gpu>> {
    let (gpu, _) = test_kernels(test)?;
    if !present {
        brisk_hosts::skipped(
            &format!("brisk_cuda::{test}"),
            &format!("no {library} on the library path"),
        );
        return None;
    }
    Some(gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_on_the_gpu_matches_pytorchs_rule_in_f64() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let Some((gpu, k)) = test_kernels("sgd_on_the_gpu_matches_pytorchs_rule_in_f64") else {
            return Ok(());
        };
        let n = 1000;
        let w0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 96.0).collect();
        let decays: Vec<u8> = (0..n).map(|i| u8::from(i % 3 != 0)).collect();
        let step = ScaledSgdStep {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
            grad_scale: 0.5,
        };
        let s = gpu.context().default_stream();
        let (mut w, gd, mut m, dd) = (
            s.clone_htod(&w0)?,
            s.clone_htod(&g)?,
            s.alloc_zeros::<f32>(n)?,
            s.clone_htod(&decays)?,
        );
        // Two steps, so the momentum buffer is used.
        k.sgd_update(&mut w, &gd, &mut m, &dd, step)?;
        k.sgd_update(&mut w, &gd, &mut m, &dd, step)?;
        let got = s.clone_dtoh(&w)?;
        for i in 0..n {
            let (mut wi, mut mi) = (f64::from(w0[i]), 0.0f64);
            for _ in 0..2 {
                let mut d = f64::from(g[i]) * 0.5;
                if decays[i] == 1 {
                    d += 5e-4 * wi;
                }
                mi = 0.9 * mi + d;
                wi -= 0.1 * (d + 0.9 * mi);
            }
            assert!(
                (f64::from(got[i]) - wi).abs() <= 1e-6 * wi.abs().max(1.0),
                "value {i}: {} vs {wi}",
                got[i]
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_cross_entropy_on_the_gpu_matches_f64() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let Some((gpu, k)) = test_kernels("softmax_cross_entropy_on_the_gpu_matches_f64") else {
            return Ok(());
        };
        let (n, c, eps) = (37usize, 10usize, 0.1f64);
        let logits: Vec<f32> = (0..n * c).map(|i| ((i * 31 % 43) as f32 - 21.0) / 7.0).collect();
        let labels: Vec<i32> = (0..n).map(|i| (i * 7 % c) as i32).collect();
        let s = gpu.context().default_stream();
        let (ld, yd) = (s.clone_htod(&logits)?, s.clone_htod(&labels)?);
        let (mut loss, mut dl) = (s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n * c)?);
        let (mut t1, mut t5) = (s.alloc_zeros::<i32>(n)?, s.alloc_zeros::<i32>(n)?);
        k.softmax_xent(&ld, &yd, c, eps as f32, &mut loss, &mut dl, &mut t1, &mut t5)?;
        let (loss, dl, t1, t5) = (
            s.clone_dtoh(&loss)?,
            s.clone_dtoh(&dl)?,
            s.clone_dtoh(&t1)?,
            s.clone_dtoh(&t5)?,
        );
        for i in 0..n {
            let z: Vec<f64> = logits[i * c..][..c].iter().map(|&v| f64::from(v)).collect();
            let y = labels[i] as usize;
            let mx = z.iter().copied().fold(f64::MIN, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            let t = |j: usize| {
                if j == y {
                    1.0 - eps + eps / c as f64
                } else {
                    eps / c as f64
                }
            };
            let want: f64 = -(0..c).map(|j| t(j) * (z[j] - lse)).sum::<f64>();
            assert!(
                (f64::from(loss[i]) - want).abs() < 1e-5,
                "sample {i}: {} vs {want}",
                loss[i]
            );
            for j in 0..c {
                let dw = ((z[j] - lse).exp() - t(j)) / n as f64;
                assert!(
                    (f64::from(dl[i * c + j]) - dw).abs() < 1e-6,
                    "sample {i} class {j}"
                );
            }
            let above = z.iter().filter(|&&v| v > z[y]).count();
            assert_eq!((t1[i] == 1, t5[i] == 1), (above < 1, above < 5), "sample {i}");
        }
        Ok(())
    }

    #[test]
    fn pooling_and_the_se_gate_on_the_gpu_match_f64() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let Some((gpu, k)) = test_kernels("pooling_and_the_se_gate_on_the_gpu_match_f64") else {
            return Ok(());
        };
        let (nc, hw) = (3 * 16, 49);
        let x: Vec<f32> = (0..nc * hw)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) / 15.0)
            .collect();
        let sc: Vec<f32> = (0..nc).map(|i| (i % 7) as f32 / 7.0).collect();
        let dy: Vec<f32> = (0..nc * hw)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) / 11.0)
            .collect();
        let st = gpu.context().default_stream();
        let (xd, sd, dyd) = (st.clone_htod(&x)?, st.clone_htod(&sc)?, st.clone_htod(&dy)?);
        let mut pooled = st.alloc_zeros::<f32>(nc)?;
        k.global_avg_pool(&xd, &mut pooled, hw)?;
        let mut dpool = st.alloc_zeros::<f32>(nc * hw)?;
        k.global_avg_pool_backward(&st.clone_htod(&sc)?, &mut dpool, hw)?;
        let mut gated = st.alloc_zeros::<f32>(nc * hw)?;
        k.se_gate(&xd, &sd, &mut gated, hw)?;
        let (mut dx, mut ds) = (st.alloc_zeros::<f32>(nc * hw)?, st.alloc_zeros::<f32>(nc)?);
        k.se_gate_backward((&xd, &sd, &dyd), &mut dx, &mut ds, hw)?;
        let (pooled, dpool) = (st.clone_dtoh(&pooled)?, st.clone_dtoh(&dpool)?);
        let (gated, dx, ds) = (st.clone_dtoh(&gated)?, st.clone_dtoh(&dx)?, st.clone_dtoh(&ds)?);
        for p in 0..nc {
            let plane = &x[p * hw..][..hw];
            let mean = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64;
            assert!((f64::from(pooled[p]) - mean).abs() < 1e-6, "pool {p}");
            let dsum: f64 = (0..hw)
                .map(|j| f64::from(dy[p * hw + j]) * f64::from(x[p * hw + j]))
                .sum();
            assert!(
                (f64::from(ds[p]) - dsum).abs() < 1e-4,
                "ds {p}: {} vs {dsum}",
                ds[p]
            );
            for j in 0..hw {
                let i = p * hw + j;
                assert!(
                    (f64::from(dpool[i]) - f64::from(sc[p]) / hw as f64).abs() < 1e-7,
                    "dpool {i}"
                );
                assert!(
                    (f64::from(gated[i]) - f64::from(x[i]) * f64::from(sc[p])).abs() < 1e-6,
                    "gate {i}"
                );
                assert!(
                    (f64::from(dx[i]) - f64::from(dy[i]) * f64::from(sc[p])).abs() < 1e-6,
                    "dx {i}"
                );
            }
        }
        // Buffers that do not fit are refused before any launch.
        assert!(k
            .global_avg_pool(&xd, &mut st.alloc_zeros::<f32>(nc + 1)?, hw)
            .is_err());
        Ok(())
    }
}
