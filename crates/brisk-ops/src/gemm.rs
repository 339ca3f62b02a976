//! A safe wrapper around the `gemm` crate's f32 matrix product for strided matrices.

use gemm::Parallelism;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix that has `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// How many threads one product may use.
pub(crate) fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) * b (k x n)`, for `dims = (m, n, k)`.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    assert!(a.fits(m, k) && b.fits(k, n), "gemm operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above guarantee that every element gemm reads, at
    // (i * rs + j * cs) for i < rows and j < cols, lies inside its slice, and that the
    // m x n row-major destination lies inside `dst`, which we borrow mutably, so nothing
    // aliases it. Strides fit in isize because the slices' lengths do.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) * b (k x n)` on rayon's pool (one thread
/// for small products, where forking costs more than it saves): the small products of
/// brisk-models' engine (the classifier, squeeze-and-excitation).
pub fn matmul_f32(dims: (usize, usize, usize), dst: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (m, n, k) = dims;
    let par = if m * n * k >= 1 << 18 {
        parallelism(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    matmul(dims, dst, a, b, accumulate, par);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, accumulate: bool) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        let av = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
        let bv = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
        let mut dst = vec![1.0f32; m * n];
        let am = if a_t {
            Mat::transposed(&a, m)
        } else {
            Mat::rows(&a, k)
        };
        let bm = if b_t {
            Mat::transposed(&b, k)
        } else {
            Mat::rows(&b, n)
        };
        matmul((m, n, k), &mut dst, am, bm, accumulate, Parallelism::None);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| av(i, p) as f64 * bv(p, j) as f64).sum::<f64>()
                    + if accumulate { 1.0 } else { 0.0 };
                assert_eq!(dst[i * n + j] as f64, want, "({i},{j}) a_t={a_t} b_t={b_t}");
            }
        }
    }

    #[test]
    fn products_match_float64() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 20, 48)] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    check(m, n, k, a_t, b_t, false);
                    check(m, n, k, a_t, b_t, true);
                }
            }
        }
    }
}
