//! The classifier (a fully connected layer, `y = x · Wᵀ + b` over row-major `[n, fin]`
//! features and a `[fout, fin]` weight, as PyTorch's `Linear`) on cuBLAS: the five
//! column-major GEMMs of its forward and backward pass as pure functions of the sizes
//! ([`DenseGemms`], checked here against a host twin of cuBLAS's sgemm), and
//! [`Classifier`], which runs them on a stream in strict f32 (cuBLAS's default math: no
//! TF32) or TF32 when asked. A machine without cuBLAS gets an error naming it.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};

use crate::conv_plan::F32Math;
use crate::error::{Error, Result};

/// Whether the cuBLAS library loads here.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it could.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// The GEMMs of a `[n, fin] → [n, fout]` dense layer, in cuBLAS's column-major terms: a
/// row-major `[r, c]` matrix is a column-major `c × r` one with leading dimension `c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseGemms {
    pub n: usize,
    pub fin: usize,
    pub fout: usize,
}

const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

#[allow(clippy::too_many_arguments)]
fn cfg(
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    (m, n, k): (c_int, c_int, c_int),
    (lda, ldb, ldc): (c_int, c_int, c_int),
    beta: f32,
) -> GemmConfig<f32> {
    GemmConfig {
        transa,
        transb,
        m,
        n,
        k,
        alpha: 1.0,
        lda,
        ldb,
        beta,
        ldc,
    }
}

impl DenseGemms {
    /// The sizes as cuBLAS's ints, or an error naming the size that does not fit.
    fn ints(&self) -> Result<(c_int, c_int, c_int)> {
        let int = |v: usize| {
            c_int::try_from(v).map_err(|_| Error::Shape(format!("{v} does not fit cuBLAS's 32-bit sizes")))
        };
        for len in [self.n * self.fin, self.n * self.fout, self.fout * self.fin] {
            int(len)?;
        }
        Ok((int(self.n)?, int(self.fin)?, int(self.fout)?))
    }

    /// `y = x · Wᵀ` (a = W, b = x, c = y): `yᵀ = (Wᵀ)ᵀ · xᵀ`.
    pub fn logits(&self) -> Result<GemmConfig<f32>> {
        let (n, fin, fout) = self.ints()?;
        Ok(cfg(T, N, (fout, n, fin), (fin, fin, fout), 0.0))
    }

    /// `y += b` on every row (a = b, b = a vector of n ones, c = y): a rank-1 update.
    pub fn add_bias(&self) -> Result<GemmConfig<f32>> {
        let (n, _, fout) = self.ints()?;
        Ok(cfg(N, N, (fout, n, 1), (fout, 1, fout), 1.0))
    }

    /// `dW = dyᵀ · x` (a = x, b = dy, c = dW): `dWᵀ = xᵀ · dy`.
    pub fn weight_grad(&self) -> Result<GemmConfig<f32>> {
        let (n, fin, fout) = self.ints()?;
        Ok(cfg(N, T, (fin, fout, n), (fin, fout, fin), 0.0))
    }

    /// `db = Σ_rows dy` (a = dy, b = a vector of n ones, c = db).
    pub fn bias_grad(&self) -> Result<GemmConfig<f32>> {
        let (n, _, fout) = self.ints()?;
        Ok(cfg(N, N, (fout, 1, n), (fout, n, fout), 0.0))
    }

    /// `dx = dy · W` (a = W, b = dy, c = dx): `dxᵀ = Wᵀ · dyᵀ`.
    pub fn input_grad(&self) -> Result<GemmConfig<f32>> {
        let (n, fin, fout) = self.ints()?;
        Ok(cfg(N, N, (fin, n, fout), (fin, fout, fin), 0.0))
    }
}

/// The classifier's GEMMs on one stream.
#[derive(Debug)]
pub struct Classifier {
    blas: CudaBlas,
    /// A vector of ones as long as the largest batch so far (the bias's GEMMs).
    ones: CudaSlice<f32>,
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Driver {
        what: format!("cuBLAS {what}"),
        detail: format!("{e:?}"),
    }
}

impl Classifier {
    /// cuBLAS on `stream`, multiplying f32 strictly or on TF32 tensor cores as `math` says.
    pub fn new(stream: Arc<CudaStream>, math: F32Math) -> Result<Classifier> {
        if !cublas_present() {
            return Err(Error::Missing {
                library: "libcublas (cuBLAS for CUDA 13)",
                hint:
                    "install it (the `nvidia-cublas` wheel has it) and put its lib folder on LD_LIBRARY_PATH",
            });
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("creating a handle", e))?;
        let mode = match math {
            F32Math::Strict => cublasMath_t::CUBLAS_DEFAULT_MATH,
            F32Math::Tf32 => cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: the handle is alive (owned by `blas`).
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
            .result()
            .map_err(|e| blas_err("setting the math mode", e))?;
        let ones = stream
            .alloc_zeros::<f32>(0)
            .map_err(|e| blas_err("allocating", e))?;
        Ok(Classifier { blas, ones })
    }

    /// Grows the ones to a batch of `n` when needed (kept between calls).
    fn grow_ones(&mut self, n: usize) -> Result<()> {
        if self.ones.len() < n {
            let stream = self.ones.stream().clone();
            self.ones = stream
                .clone_htod(&vec![1f32; n])
                .map_err(|e| blas_err("copying", e))?;
        }
        Ok(())
    }

    fn check(what: &str, got: [usize; 3], want: [usize; 3]) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "classifier {what}: buffers of {got:?} values, the layer needs {want:?}"
            )))
        }
    }

    /// The logits `y` `[n, fout]` of features `x` `[n, fin]`.
    pub fn forward(
        &mut self,
        g: &DenseGemms,
        (x, w, b): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Self::check(
            "forward",
            [x.len(), w.len(), y.len()],
            [g.n * g.fin, g.fout * g.fin, g.n * g.fout],
        )?;
        Self::check("bias", [b.len(), 0, 0], [g.fout, 0, 0])?;
        let (logits, bias) = (g.logits()?, g.add_bias()?);
        // SAFETY: every buffer holds what its GEMM's sizes and leading dimensions reach
        // (checked above against the layer's sizes, which the configs are made of).
        unsafe { self.blas.gemm(logits, w, x, y) }.map_err(|e| blas_err("logits", e))?;
        self.grow_ones(g.n)?;
        // SAFETY: as above; `ones` holds at least n values.
        unsafe { self.blas.gemm(bias, b, &self.ones, y) }.map_err(|e| blas_err("bias", e))
    }

    /// The gradients `dw` `[fout, fin]`, `db` `[fout]` and `dx` `[n, fin]` from the
    /// logits' gradient `dy`.
    pub fn backward(
        &mut self,
        g: &DenseGemms,
        (x, w, dy): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        (dw, db, dx): (&mut CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<f32>),
    ) -> Result<()> {
        let want = [g.n * g.fin, g.fout * g.fin, g.n * g.fout];
        Self::check("backward", [x.len(), w.len(), dy.len()], want)?;
        Self::check(
            "gradients",
            [dx.len(), dw.len(), db.len()],
            [want[0], want[1], g.fout],
        )?;
        self.grow_ones(g.n)?;
        let ones = &self.ones;
        // SAFETY: as in `forward`: the buffers' lengths were checked against the sizes the
        // configs are made of.
        unsafe {
            self.blas
                .gemm(g.weight_grad()?, x, dy, dw)
                .map_err(|e| blas_err("weight gradient", e))?;
            self.blas
                .gemm(g.bias_grad()?, dy, ones, db)
                .map_err(|e| blas_err("bias gradient", e))?;
            self.blas
                .gemm(g.input_grad()?, w, dy, dx)
                .map_err(|e| blas_err("input gradient", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's sgemm on the host, in f64: `c = α op(a) op(b) + β c`, column-major.
    fn sgemm_twin(c_: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (c_.m as usize, c_.n as usize, c_.k as usize);
        let (lda, ldb, ldc) = (c_.lda as usize, c_.ldb as usize, c_.ldc as usize);
        let at = |i: usize, l: usize| match c_.transa {
            N => a[i + l * lda],
            _ => a[l + i * lda],
        };
        let bt = |l: usize, j: usize| match c_.transb {
            N => b[l + j * ldb],
            _ => b[j + l * ldb],
        };
        for j in 0..n {
            for i in 0..m {
                let s: f64 = (0..k).map(|l| f64::from(at(i, l)) * f64::from(bt(l, j))).sum();
                let old = f64::from(c[i + j * ldc]);
                c[i + j * ldc] = (f64::from(c_.alpha) * s + f64::from(c_.beta) * old) as f32;
            }
        }
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + seed) % 19) as f32 * 0.1 - 0.9)
            .collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Four host vectors.
    type Four = [Vec<f32>; 4];

    /// The layer's inputs `[x, w, b, dy]` for `g`, and `[y, dw, db, dx]` as the host twin
    /// computes them with the five GEMMs (outputs first filled with a value no result has,
    /// so a GEMM that does not write everything shows).
    fn twin_layer(g: &DenseGemms) -> Result<(Four, Four)> {
        let (n, fin, fout) = (g.n, g.fin, g.fout);
        let inputs = [
            values(n * fin, 1),
            values(fout * fin, 2),
            values(fout, 3),
            values(n * fout, 4),
        ];
        let [x, w, b, dy] = &inputs;
        let ones = vec![1f32; n];
        let mut out = [n * fout, fout * fin, fout, n * fin].map(|len| vec![7f32; len]);
        let [y, dw, db, dx] = &mut out;
        sgemm_twin(&g.logits()?, w, x, y);
        sgemm_twin(&g.add_bias()?, b, &ones, y);
        sgemm_twin(&g.weight_grad()?, x, dy, dw);
        sgemm_twin(&g.bias_grad()?, dy, &ones, db);
        sgemm_twin(&g.input_grad()?, w, dy, dx);
        Ok((inputs, out))
    }

    /// The five GEMMs, run by the host twin, compute PyTorch's `Linear` forward and
    /// backward written out row-major in f64.
    #[test]
    fn the_gemms_compute_the_dense_layer() -> Result<()> {
        for (n, fin, fout) in [(3, 5, 2), (7, 16, 10), (1, 4, 4)] {
            let g = DenseGemms { n, fin, fout };
            let ([x, w, b, dy], [y, dw, db, dx]) = twin_layer(&g)?;
            let f = |v: &[f32], i: usize| f64::from(v[i]);
            let want_y: Vec<f64> = (0..n * fout)
                .map(|p| {
                    let (r, o) = (p / fout, p % fout);
                    (0..fin)
                        .map(|i| f(&x, r * fin + i) * f(&w, o * fin + i))
                        .sum::<f64>()
                        + f(&b, o)
                })
                .collect();
            let want_dw: Vec<f64> = (0..fout * fin)
                .map(|p| {
                    (0..n)
                        .map(|r| f(&dy, r * fout + p / fin) * f(&x, r * fin + p % fin))
                        .sum()
                })
                .collect();
            let want_db: Vec<f64> = (0..fout)
                .map(|o| (0..n).map(|r| f(&dy, r * fout + o)).sum())
                .collect();
            let want_dx: Vec<f64> = (0..n * fin)
                .map(|p| {
                    (0..fout)
                        .map(|o| f(&dy, p / fin * fout + o) * f(&w, o * fin + p % fin))
                        .sum()
                })
                .collect();
            close(&y, &want_y, "y");
            close(&dw, &want_dw, "dw");
            close(&db, &want_db, "db");
            close(&dx, &want_dx, "dx");
        }
        Ok(())
    }

    #[test]
    fn sizes_past_cublas_ints_are_errors() {
        let g = DenseGemms {
            n: 1 << 20,
            fin: 1 << 12,
            fout: 10,
        };
        assert!(g.logits().is_err_and(|e| e.to_string().contains("32-bit")));
    }

    /// On a GPU with cuBLAS: the classifier's forward and backward in strict f32 against
    /// the host twin's GEMMs; elsewhere SKIPPED.
    #[test]
    fn the_classifier_on_the_gpu_matches_the_host_twin() -> Result<()> {
        const TEST: &str = "the_classifier_on_the_gpu_matches_the_host_twin";
        let Some(gpu) = crate::launch::test_gpu_with(TEST, "cuBLAS (libcublas)", cublas_present()) else {
            return Ok(());
        };
        let stream = gpu.context().default_stream();
        let dev = |e: cudarc::driver::DriverError| crate::launch::driver("copying", e);
        let mut classifier = Classifier::new(stream.clone(), F32Math::Strict)?;
        let g = DenseGemms {
            n: 33,
            fin: 64,
            fout: 10,
        };
        let ([x, w, b, dy], want) = twin_layer(&g)?;
        let up = |v: &[f32]| stream.clone_htod(v).map_err(dev);
        let (xd, wd, bd, dyd) = (up(&x)?, up(&w)?, up(&b)?, up(&dy)?);
        // Filled with a value no result has, so a GEMM that did not run shows.
        let mut got: Vec<CudaSlice<f32>> = want
            .iter()
            .map(|v| up(&vec![7f32; v.len()]))
            .collect::<Result<_>>()?;
        let [y, dw, db, dx] = &mut got[..] else {
            unreachable!("four buffers")
        };
        classifier.forward(&g, (&xd, &wd, &bd), y)?;
        classifier.backward(&g, (&xd, &wd, &dyd), (dw, db, dx))?;
        for (what, (d, h)) in ["y", "dw", "db", "dx"].iter().zip(got.iter().zip(&want)) {
            let d = stream.clone_dtoh(d).map_err(dev)?;
            let h: Vec<f64> = h.iter().map(|&v| f64::from(v)).collect();
            close(&d, &h, what);
        }
        Ok(())
    }
}
