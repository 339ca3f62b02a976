//! Batch-norm over NHWC activations on the GPU: the statistics, the normalisation with its
//! residual-add and ReLU epilogue fused, the gradient sums and the input gradient (their
//! NVRTC source is kernels.rs's `BATCH_NORM`); a Rust twin of each kernel (the same index arithmetic and summation
//! order, on the host) that the tests check against brisk-ops' NCHW kernels, and the GPU
//! tests check the kernels against; and their launchers on [`DeviceKernels`].
//!
//! Layout: `x` is `[m, c]`, m = n·h·w rows with the channels contiguous (NHWC). Sums over
//! the rows run in chunks of [`ROWS`] rows, one thread per (chunk, channel), so threads of
//! neighbouring channels read neighbouring addresses; `bn_reduce` then adds the
//! `[chunks, width]` table of partial sums in double, one thread per column. The
//! arithmetic is brisk-ops' (`brisk_ops::bn_stats` and friends): the f32 mean, the squares
//! about it, 1/σ computed in double.

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};

use crate::error::Result;
use crate::kernels::BATCH_NORM;
use crate::launch::{check, driver, grid, DeviceKernels};

/// Rows a thread sums (one chunk of a channel).
pub const ROWS: usize = 256;

/// The kernels' host twins: the same index arithmetic and order of summation, so a
/// kernel's result can be checked against its twin and the twin against brisk-ops.
pub mod twin {
    use super::ROWS;

    fn chunks(m: usize) -> usize {
        m.div_ceil(ROWS)
    }

    /// 1/σ as the kernels compute it (in double, rounded to f32).
    fn inv_std(var: f32, eps: f64) -> f32 {
        (1.0 / (var as f64 + eps).sqrt()) as f32
    }

    /// `bn_sum_partials` (`f` = identity) and `bn_sq_partials` (`f` = squares about the
    /// mean): `[chunks, c]`.
    fn partials(x: &[f32], c: usize, f: impl Fn(usize, f32) -> f32) -> Vec<f32> {
        let m = x.len() / c;
        let mut part = vec![0f32; chunks(m) * c];
        for (i, p) in part.iter_mut().enumerate() {
            let (k, ch) = (i / c, i % c);
            *p = (k * ROWS..((k + 1) * ROWS).min(m)).fold(0f32, |s, r| s + f(ch, x[r * c + ch]));
        }
        part
    }

    /// `bn_reduce`: each column of the `[chunks, width]` table summed in double, scaled.
    pub fn reduce(part: &[f32], width: usize, scale: f64) -> Vec<f32> {
        (0..width)
            .map(|j| {
                let s = part.chunks_exact(width).fold(0f64, |s, row| s + row[j] as f64);
                (s * scale) as f32
            })
            .collect()
    }

    /// `[mean(c); biased var(c)]` of `x` `[m, c]`: sums, reduce, squares, reduce.
    pub fn stats(x: &[f32], c: usize) -> Vec<f32> {
        let m = x.len() / c;
        let mut stats = reduce(&partials(x, c, |_, v| v), c, 1.0 / m as f64);
        let mean = stats.clone();
        let sq = partials(x, c, |ch, v| (v - mean[ch]) * (v - mean[ch]));
        stats.extend(reduce(&sq, c, 1.0 / m as f64));
        stats
    }

    /// `bn_normalize_nhwc`: `relu?(γ (x − mean) / σ + β + residual?)`.
    pub fn normalize(
        x: &[f32],
        stats: &[f32],
        affine: &[f32],
        residual: Option<&[f32]>,
        c: usize,
        eps: f64,
        relu: bool,
    ) -> Vec<f32> {
        (0..x.len())
            .map(|i| {
                let ch = i % c;
                let scale = affine[ch] * inv_std(stats[c + ch], eps);
                let shift = affine[c + ch] - stats[ch] * scale;
                let v = x[i] * scale + shift + residual.map_or(0.0, |r| r[i]);
                if relu {
                    v.max(0.0)
                } else {
                    v
                }
            })
            .collect()
    }

    /// `bn_grad_partials` then `bn_reduce`: `[Σ dz·x̂ (c); Σ dz (c)]`.
    pub fn grad_sums(x: &[f32], dz: &[f32], stats: &[f32], c: usize, eps: f64) -> Vec<f32> {
        let m = x.len() / c;
        let mut part = vec![0f32; chunks(m) * 2 * c];
        for k in 0..chunks(m) {
            for ch in 0..c {
                let (mut a, mut b) = (0f32, 0f32);
                for r in k * ROWS..((k + 1) * ROWS).min(m) {
                    let g = dz[r * c + ch];
                    a += g * (x[r * c + ch] - stats[ch]);
                    b += g;
                }
                part[k * 2 * c + ch] = a * inv_std(stats[c + ch], eps);
                part[k * 2 * c + c + ch] = b;
            }
        }
        reduce(&part, 2 * c, 1.0)
    }

    /// `bn_input_grad_nhwc`: `g` (holding dz) becomes `γ σ⁻¹ (dz − mean(dz) − x̂ ·
    /// mean(dz·x̂))`, the means from `sums` over the m rows.
    pub fn input_grad(
        x: &[f32],
        g: &mut [f32],
        stats: &[f32],
        affine: &[f32],
        sums: &[f32],
        c: usize,
        eps: f64,
    ) {
        let count = (x.len() / c) as f32;
        for (i, g) in g.iter_mut().enumerate() {
            let ch = i % c;
            let inv_std = inv_std(stats[c + ch], eps);
            let a = affine[ch] * inv_std;
            let (mean_dz, mean_dzx) = (sums[c + ch] / count, sums[ch] / count);
            let xh = (x[i] - stats[ch]) * inv_std;
            *g = a * (*g - mean_dz - xh * mean_dzx);
        }
    }
}

/// The shape of a batch-norm call: `[m, c]` values, checked against each buffer.
#[derive(Clone, Copy, Debug)]
pub struct NhwcShape {
    /// Rows: n·h·w.
    pub m: usize,
    /// Channels.
    pub c: usize,
}

impl NhwcShape {
    fn total(&self) -> usize {
        self.m * self.c
    }

    fn chunks(&self) -> usize {
        self.m.div_ceil(ROWS)
    }

    /// An error naming `kernel` unless every `(name, length, expected)` fits and m, c > 0.
    fn check(&self, kernel: &str, buffers: &[(&str, usize, usize)]) -> Result<()> {
        check(self.m > 0 && self.c > 0, kernel, || {
            format!("empty shape {self:?}")
        })?;
        for &(name, len, want) in buffers {
            check(len == want, kernel, || {
                format!("{name} holds {len} values, the shape {self:?} needs {want}")
            })?;
        }
        Ok(())
    }
}

/// What batch-norm's kernels read besides their data, as brisk-ops' `BnParams`: the
/// shape, the statistics `[mean; var]` and the affine parameters `[γ; β]` on the device
/// (each 2·c long), and ε.
#[derive(Clone, Copy, Debug)]
pub struct BnDevice<'a> {
    pub shape: NhwcShape,
    pub stats: &'a CudaSlice<f32>,
    pub affine: &'a CudaSlice<f32>,
    pub eps: f64,
}

impl BnDevice<'_> {
    /// An error naming `kernel` unless the statistics and affine parameters hold 2·c
    /// values and each `(name, length)` of `data` holds m·c.
    fn check(&self, kernel: &str, data: &[(&str, usize)]) -> Result<()> {
        let (t, c2) = (self.shape.total(), 2 * self.shape.c);
        let mut buffers = vec![("stats", self.stats.len(), c2), ("affine", self.affine.len(), c2)];
        buffers.extend(data.iter().map(|&(name, len)| (name, len, t)));
        self.shape.check(kernel, &buffers)
    }
}

impl DeviceKernels {
    /// A `[chunks, width]` table for a partial-sum kernel of shape `s` to fill.
    fn partials(&self, s: NhwcShape, width: usize, kernel: &str) -> Result<CudaSlice<f32>> {
        self.stream()
            .alloc_zeros::<f32>(s.chunks() * width)
            .map_err(|e| driver(kernel, e))
    }

    /// Launches a partial-sum kernel already given its arguments, over (chunk, channel).
    fn launch_partials(&self, launch: &mut LaunchArgs, s: NhwcShape, kernel: &str) -> Result<()> {
        // SAFETY: every caller pushes the arguments of its partial-sum kernel in order and
        // type, with buffers checked against `s` and a table from `partials`; each thread
        // of the chunks × c grid writes only its own entries of the table.
        unsafe { launch.launch(grid(s.chunks() * s.c)) }.map_err(|e| driver(kernel, e))?;
        Ok(())
    }

    /// `out[offset + j] = scale · Σ_k part[k, j]` for the `[chunks, width]` table `part`.
    fn reduce_into(
        &self,
        part: &CudaSlice<f32>,
        s: NhwcShape,
        width: usize,
        scale: f64,
        out: &mut CudaSlice<f32>,
        offset: usize,
    ) -> Result<()> {
        check(offset + width <= out.len(), "bn_reduce", || {
            format!("{} values cannot take {width} at {offset}", out.len())
        })?;
        let f = self.function(&BATCH_NORM, "bn_reduce")?;
        let (chunks, width32, offset32) = (s.chunks() as i64, width as i32, offset as i32);
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(part)
            .arg(&chunks)
            .arg(&width32)
            .arg(&scale)
            .arg(out)
            .arg(&offset32);
        // SAFETY: bn_reduce's arguments in order and type; `part` is [chunks, width] (from
        // `partials`) and `out` holds offset + width values (checked).
        unsafe { launch.launch(grid(width)) }.map_err(|e| driver("bn_reduce", e))?;
        Ok(())
    }

    /// Batch-norm's training statistics of `x` `[m, c]`: `stats` becomes `[mean; var]`.
    pub fn bn_stats(&self, x: &CudaSlice<f32>, s: NhwcShape, stats: &mut CudaSlice<f32>) -> Result<()> {
        s.check(
            "bn_stats",
            &[("x", x.len(), s.total()), ("stats", stats.len(), 2 * s.c)],
        )?;
        let (m, c, rows, scale) = (s.m as i64, s.c as i32, ROWS as i32, 1.0 / s.m as f64);
        let stream = self.stream();
        let mut part = self.partials(s, s.c, "bn_stats")?;
        let f = self.function(&BATCH_NORM, "bn_sum_partials")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(x).arg(&m).arg(&c).arg(&rows).arg(&mut part);
        self.launch_partials(&mut launch, s, "bn_sum_partials")?;
        self.reduce_into(&part, s, s.c, scale, stats, 0)?;
        // The squares about the means just written (read from a copy: `stats` is written
        // again below).
        let means = stream.clone_dtod(stats).map_err(|e| driver("bn_stats", e))?;
        let f = self.function(&BATCH_NORM, "bn_sq_partials")?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(&means)
            .arg(&m)
            .arg(&c)
            .arg(&rows)
            .arg(&mut part);
        self.launch_partials(&mut launch, s, "bn_sq_partials")?;
        self.reduce_into(&part, s, s.c, scale, stats, s.c)
    }

    /// `y = relu?(γ (x − mean) / sqrt(var + ε) + β + residual?)` over `x`.
    pub fn bn_normalize(
        &self,
        x: &CudaSlice<f32>,
        p: &BnDevice,
        residual: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
        relu: bool,
    ) -> Result<()> {
        let t = p.shape.total();
        p.check(
            "bn_normalize_nhwc",
            &[
                ("x", x.len()),
                ("y", y.len()),
                ("residual", residual.map_or(t, CudaSlice::len)),
            ],
        )?;
        let f = self.function(&BATCH_NORM, "bn_normalize_nhwc")?;
        let (has_residual, total, c, relu) = (
            i32::from(residual.is_some()),
            t as i64,
            p.shape.c as i32,
            i32::from(relu),
        );
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(p.stats)
            .arg(p.affine)
            .arg(residual.unwrap_or(x))
            .arg(&has_residual)
            .arg(y)
            .arg(&total)
            .arg(&c)
            .arg(&p.eps)
            .arg(&relu);
        // SAFETY: the arguments of bn_normalize_nhwc in order and type, buffers checked
        // above (the residual is read only when has_residual); grid-stride below total.
        unsafe { launch.launch(grid(t)) }.map_err(|e| driver("bn_normalize_nhwc", e))?;
        Ok(())
    }

    /// Batch-norm's gradient sums `[Σ dz·x̂; Σ dz]` (also `[dγ; dβ]`) into `sums`
    /// (`p.affine` is not read).
    pub fn bn_grad_sums(
        &self,
        x: &CudaSlice<f32>,
        dz: &CudaSlice<f32>,
        p: &BnDevice,
        sums: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = p.shape;
        p.check("bn_grad_sums", &[("x", x.len()), ("dz", dz.len())])?;
        check(sums.len() == 2 * s.c, "bn_grad_sums", || {
            format!("sums holds {} values, not 2 × {} channels", sums.len(), s.c)
        })?;
        let (m, c, rows) = (s.m as i64, s.c as i32, ROWS as i32);
        let stream = self.stream();
        let mut part = self.partials(s, 2 * s.c, "bn_grad_sums")?;
        let f = self.function(&BATCH_NORM, "bn_grad_partials")?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(dz)
            .arg(p.stats)
            .arg(&m)
            .arg(&c)
            .arg(&rows)
            .arg(&p.eps)
            .arg(&mut part);
        self.launch_partials(&mut launch, s, "bn_grad_partials")?;
        self.reduce_into(&part, s, 2 * s.c, 1.0, sums, 0)
    }

    /// Batch-norm's training input gradient, written over `g` (which holds dz), the
    /// means taken from `sums` ([`DeviceKernels::bn_grad_sums`], or every rank's).
    pub fn bn_input_grad(
        &self,
        x: &CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        p: &BnDevice,
        sums: &CudaSlice<f32>,
    ) -> Result<()> {
        let s = p.shape;
        p.check("bn_input_grad_nhwc", &[("x", x.len()), ("g", g.len())])?;
        check(sums.len() == 2 * s.c, "bn_input_grad_nhwc", || {
            format!("sums holds {} values, not 2 × {} channels", sums.len(), s.c)
        })?;
        let f = self.function(&BATCH_NORM, "bn_input_grad_nhwc")?;
        let (total, c, count) = (s.total() as i64, s.c as i32, s.m as f32);
        let stream = self.stream();
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(x)
            .arg(g)
            .arg(p.stats)
            .arg(p.affine)
            .arg(sums)
            .arg(&total)
            .arg(&c)
            .arg(&count)
            .arg(&p.eps);
        // SAFETY: the arguments of bn_input_grad_nhwc in order and type, buffers checked
        // above; grid-stride below total.
        unsafe { launch.launch(grid(s.total())) }.map_err(|e| driver("bn_input_grad_nhwc", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-2, 2) with a per-channel offset, so means are not zero.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0 + (i % 7) as f32 * 0.3
            })
            .collect()
    }

    /// `[n, c, hw]` → `[n·hw, c]`.
    fn to_nhwc(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..hw {
                    y[(i * hw + p) * c + ch] = x[(i * c + ch) * hw + p];
                }
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} against {y}"
            );
        }
    }

    /// The twins against brisk-ops' NCHW kernels on the same values, over shapes with a
    /// partial last chunk, one row, one channel and several chunks.
    #[test]
    fn the_nhwc_twins_compute_what_brisk_ops_computes() {
        let eps = 1e-5;
        for (n, c, hw) in [(2, 3, 25), (1, 1, 1), (4, 16, 64), (3, 5, 200), (1, 64, 1)] {
            let len = n * c * hw;
            let (x, dz, res) = (values(len, 1), values(len, 2), values(len, 3));
            let affine: Vec<f32> = values(2 * c, 4).iter().map(|v| v * 0.5 + 1.0).collect();
            let (xh, dzh, resh) = (
                to_nhwc(&x, n, c, hw),
                to_nhwc(&dz, n, c, hw),
                to_nhwc(&res, n, c, hw),
            );
            let stats = brisk_ops::bn_stats(&x, n, c, hw);
            let twin_stats = twin::stats(&xh, c);
            close(&twin_stats, &stats, 1e-5, "stats");
            let p = brisk_ops::BnParams {
                n,
                c,
                hw,
                stats: &stats,
                affine: &affine,
                eps,
            };
            for (relu, residual) in [(false, None), (true, Some(&res)), (true, None)] {
                let want = brisk_ops::bn_normalize(&x, &p, relu, residual.map(Vec::as_slice));
                let got = twin::normalize(
                    &xh,
                    &stats,
                    &affine,
                    residual.map(|_| resh.as_slice()),
                    c,
                    eps,
                    relu,
                );
                close(&got, &to_nhwc(&want, n, c, hw), 1e-6, "normalize");
            }
            let sums = brisk_ops::bn_grad_sums(&x, &dz, &p);
            close(
                &twin::grad_sums(&xh, &dzh, &stats, c, eps),
                &sums,
                1e-4,
                "grad sums",
            );
            let mut want = dz.clone();
            brisk_ops::bn_input_grad_in_place(&x, &mut want, &p, &sums, true);
            let mut got = dzh.clone();
            twin::input_grad(&xh, &mut got, &stats, &affine, &sums, c, eps);
            close(&got, &to_nhwc(&want, n, c, hw), 1e-5, "input grad");
        }
    }

    /// The twin's layout is not NCHW's: fed NCHW values, its statistics are wrong (the
    /// check above would catch a twin that ignored the layout).
    #[test]
    fn the_twin_reads_channels_as_the_fastest_index() {
        let (n, c, hw) = (2, 4, 9);
        let x = values(n * c * hw, 5);
        let want = brisk_ops::bn_stats(&x, n, c, hw);
        let wrong = twin::stats(&x, c);
        assert!(want.iter().zip(&wrong).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    /// On a GPU, every kernel against its twin; elsewhere SKIPPED.
    #[test]
    fn batch_norm_on_the_gpu_matches_its_twin() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let Some((gpu, k)) = crate::launch::test_kernels("batch_norm_on_the_gpu_matches_its_twin") else {
            return Ok(());
        };
        let eps = 1e-5;
        let st = gpu.context().default_stream();
        for (m, c) in [(50, 3), (1, 1), (1024, 64), (600, 5)] {
            let s = NhwcShape { m, c };
            let (x, dz, res) = (values(m * c, 1), values(m * c, 2), values(m * c, 3));
            let affine: Vec<f32> = values(2 * c, 4).iter().map(|v| v * 0.5 + 1.0).collect();
            let (xd, dzd, rd, ad) = (
                st.clone_htod(&x)?,
                st.clone_htod(&dz)?,
                st.clone_htod(&res)?,
                st.clone_htod(&affine)?,
            );
            let mut stats = st.alloc_zeros::<f32>(2 * c)?;
            k.bn_stats(&xd, s, &mut stats)?;
            let stats_host = st.clone_dtoh(&stats)?;
            close(&stats_host, &twin::stats(&x, c), 1e-5, "stats");
            let p = BnDevice {
                shape: s,
                stats: &stats,
                affine: &ad,
                eps,
            };
            let mut y = st.alloc_zeros::<f32>(m * c)?;
            k.bn_normalize(&xd, &p, Some(&rd), &mut y, true)?;
            let want = twin::normalize(&x, &stats_host, &affine, Some(&res), c, eps, true);
            close(&st.clone_dtoh(&y)?, &want, 1e-5, "normalize");
            let mut sums = st.alloc_zeros::<f32>(2 * c)?;
            k.bn_grad_sums(&xd, &dzd, &p, &mut sums)?;
            let sums_host = st.clone_dtoh(&sums)?;
            close(
                &sums_host,
                &twin::grad_sums(&x, &dz, &stats_host, c, eps),
                1e-4,
                "grad sums",
            );
            let mut g = st.clone_htod(&dz)?;
            k.bn_input_grad(&xd, &mut g, &p, &sums)?;
            let mut want = dz.clone();
            twin::input_grad(&x, &mut want, &stats_host, &affine, &sums_host, c, eps);
            close(&st.clone_dtoh(&g)?, &want, 1e-4, "input grad");
        }
        // A buffer of the wrong size is an error naming the kernel and the buffer.
        let e = k
            .bn_stats(
                &st.alloc_zeros::<f32>(10)?,
                NhwcShape { m: 3, c: 3 },
                &mut st.alloc_zeros::<f32>(6)?,
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bn_stats") && e.contains("x holds 10"), "{e}");
        Ok(())
    }
}
