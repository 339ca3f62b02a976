//! Matrix products in reduced precision, as PyTorch's autocast computes them: operands
//! rounded to bf16 or f16, products summed in f32. On CPUs with AVX512-BF16 the bf16
//! product runs on brisk's own micro-kernel (`vdpbf16ps`: two bf16 products per f32
//! lane per instruction, twice the arithmetic of an f32 FMA); otherwise, and for f16
//! (AVX512-FP16 would accumulate in f16, losing precision), the operands are rounded
//! and the f32 GEMM computes the same sums.

use candle_core::DType;
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::gemm::{matmul, Mat};

/// Rows of A per micro-kernel call.
const MR: usize = 12;
/// Columns of B per micro-kernel call (two 16-lane registers).
const NR: usize = 32;

/// Whether this CPU runs the bf16 micro-kernel (checked once).
pub(crate) fn has_bf16_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dst (m x n) = [dst +] a (m x k) * b (k x n)` with a and b rounded to `dtype` (BF16 or
/// F16; F32 is the plain product) and the products summed in f32.
pub(crate) fn matmul_in(
    dtype: DType,
    dims: (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    match dtype {
        DType::BF16 if has_bf16_kernel() => matmul_bf16(dims, dst, a, b, accumulate, par),
        DType::BF16 | DType::F16 => {
            let (m, n, k) = dims;
            let ra = rounded(a, m, k, dtype);
            let rb = rounded(b, k, n, dtype);
            matmul(dims, dst, Mat::rows(&ra, k), Mat::rows(&rb, n), accumulate, par);
        }
        _ => matmul(dims, dst, a, b, accumulate, par),
    }
}

/// `dst = [dst +] a · b` for row-major `a` (m x k) and `b` (k x n) with the operands
/// rounded to `dtype` (F32, BF16 or F16) and the products summed in f32, on `threads`
/// threads: the products of brisk's convolutions, for benchmarks and small layers.
pub fn matmul_rows(
    dtype: DType,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    if dst.len() < m * n || a.len() < m * k || b.len() < k * n {
        candle_core::bail!("brisk matmul: operands too small for ({m}, {n}, {k})");
    }
    let par = crate::gemm::parallelism(threads);
    matmul_in(
        dtype,
        (m, n, k),
        dst,
        Mat::rows(a, k),
        Mat::rows(b, n),
        accumulate,
        par,
    );
    Ok(())
}

/// A row-major copy of the `rows x cols` matrix `m` with every value rounded to `dtype`.
fn rounded(m: Mat, rows: usize, cols: usize, dtype: DType) -> Vec<f32> {
    let round = |v: f32| match dtype {
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => bf16::from_f32(v).to_f32(),
    };
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        out.extend((0..cols).map(|j| round(m.data[i * m.rs + j * m.cs])));
    }
    out
}

/// Two bf16 values in one 32-bit word, `lo` in the low half: the operand layout of
/// `vdpbf16ps`, which adds `lo_a·lo_b + hi_a·hi_b` into each f32 lane.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16::from_f32(lo).to_bits()) | (u32::from(bf16::from_f32(hi).to_bits()) << 16)
}

/// Packs columns `j0..j0 + width` of the `k`-row matrix `m` as `[k/2][w]` words of
/// (row 2p, row 2p + 1) pairs, zero-padded to `w` columns and an even row count. Only
/// called where the bf16 kernel runs, so the AVX512-BF16 conversions are available.
fn pack_pairs(m: Mat, k: usize, j0: usize, width: usize, w: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    let at = |r: usize, j: usize| {
        if r < k {
            m.data[r * m.rs + (j0 + j) * m.cs]
        } else {
            0.0
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        let full_pairs = k / 2;
        if m.cs == 1 && width == w && w % 16 == 0 {
            // Rows contiguous: convert 16 columns of two rows at a time.
            for p in 0..full_pairs {
                let r0 = &m.data[2 * p * m.rs + j0..][..w];
                let r1 = &m.data[(2 * p + 1) * m.rs + j0..][..w];
                // SAFETY: the bf16 kernel's CPU features are present (the only caller
                // runs after has_bf16_kernel()); the rows hold w values and out w words.
                unsafe { interleave_rows(r0, r1, &mut out[p * w..(p + 1) * w]) };
            }
            for p in full_pairs..kp {
                for j in 0..w {
                    out[p * w + j] = pair(at(2 * p, j), 0.0);
                }
            }
            return;
        }
        if m.rs == 1 && full_pairs >= 16 {
            // Columns contiguous (a transposed operand): each column's pairs are adjacent.
            let blocks = full_pairs / 16;
            let mut words = [0u32; 16];
            for j in 0..w {
                if j >= width {
                    for p in 0..kp {
                        out[p * w + j] = 0;
                    }
                    continue;
                }
                let col = &m.data[(j0 + j) * m.cs..];
                for blk in 0..blocks {
                    // SAFETY: as above; the column holds at least k >= 32 * blocks values.
                    unsafe { convert_pairs(&col[blk * 32..blk * 32 + 32], &mut words) };
                    for (q, &word) in words.iter().enumerate() {
                        out[(blk * 16 + q) * w + j] = word;
                    }
                }
                for p in blocks * 16..kp {
                    out[p * w + j] = pair(at(2 * p, j), at(2 * p + 1, j));
                }
            }
            return;
        }
    }
    for p in 0..kp {
        let row = &mut out[p * w..(p + 1) * w];
        for (j, word) in row.iter_mut().enumerate() {
            *word = if j < width {
                pair(at(2 * p, j), at(2 * p + 1, j))
            } else {
                0
            };
        }
    }
}

/// `out[j] = pair(r0[j], r1[j])` for rows of a multiple of 16 values.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; r0, r1 and out must have equal lengths,
/// a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn interleave_rows(r0: &[f32], r1: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    // SAFETY: every access is 16 values at an offset below the common length.
    unsafe {
        for j in (0..out.len()).step_by(16) {
            let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(r0.as_ptr().add(j))));
            let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(r1.as_ptr().add(j))));
            let words = _mm512_or_si512(
                _mm512_cvtepu16_epi32(lo),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
            );
            _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), words);
        }
    }
}

/// The 16 pair words of 32 consecutive values: word q = (x[2q], x[2q + 1]).
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; `x` must hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_pairs(x: &[f32], out: &mut [u32; 16]) {
    use std::arch::x86_64::*;
    // SAFETY: x holds 32 values and out 16 words.
    unsafe {
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.as_ptr().add(16)), _mm512_loadu_ps(x.as_ptr()));
        _mm512_storeu_si512(
            out.as_mut_ptr().cast(),
            std::mem::transmute::<__m512bh, __m512i>(v),
        );
    }
}

/// `*mut f32` that may cross threads: each thread writes its own columns of `dst`.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint column ranges (one per B panel)
// of a destination borrowed mutably for the whole product.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

fn matmul_bf16(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    // A, transposed so that its k pairs run down the rows: [panel][k/2][MR].
    let a_panels = m.div_ceil(MR);
    let at = Mat {
        data: a.data,
        rs: a.cs,
        cs: a.rs,
    };
    let mut apack = vec![0u32; a_panels * kp * MR];
    for (i, chunk) in apack.chunks_mut(kp * MR).enumerate() {
        let rows = MR.min(m - i * MR);
        pack_pairs(at, k, i * MR, rows, MR, chunk);
    }
    let out = DstPtr(dst.as_mut_ptr());
    let panel = |jp: usize| {
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        let mut bpack = vec![0u32; kp * NR];
        pack_pairs(b, k, j0, cols, NR, &mut bpack);
        for (i, ap) in apack.chunks(kp * MR).enumerate() {
            let rows = MR.min(m - i * MR);
            let out = out;
            // SAFETY: has_bf16_kernel() checked the CPU features; the packed panels hold
            // kp * MR and kp * NR words; the destination block (rows x cols at row i*MR,
            // column j0, row stride n) lies inside dst (m x n), and only this panel
            // writes these columns.
            unsafe {
                kernel(
                    kp,
                    ap.as_ptr(),
                    bpack.as_ptr(),
                    out.0.add(i * MR * n + j0),
                    n,
                    rows,
                    cols,
                    accumulate,
                );
            }
        }
    };
    let panels = n.div_ceil(NR);
    match par {
        Parallelism::Rayon(_) if panels > 1 => (0..panels).into_par_iter().for_each(panel),
        _ => (0..panels).for_each(panel),
    }
}

/// `c (rows x cols, row stride ldc) [+]= A·B` for one MR x NR block from packed panels.
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; `a` must hold `kp * MR` words, `b`
/// `kp * NR`, and `c` must be valid for `rows` rows of `cols` floats at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the CPU features and the extents: p < kp keeps every
    // read inside the packed panels, and the store masks limit every access to the
    // block's `rows` x `cols` floats of c. The transmutes reinterpret 512-bit integer
    // vectors as the same bits typed as 32 bf16 values.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            let ar = a.add(p * MR);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
            }
        }
        let masks = [
            (if cols >= 16 { 0xffff } else { (1u32 << cols) - 1 }) as u16,
            (if cols >= 32 {
                0xffff
            } else if cols > 16 {
                (1u32 << (cols - 16)) - 1
            } else {
                0
            }) as u16,
        ];
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (h, &mask) in masks.iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                let ptr = c.add(r * ldc + h * 16);
                let v = if accumulate {
                    _mm512_add_ps(acc_r[h], _mm512_maskz_loadu_ps(mask, ptr))
                } else {
                    acc_r[h]
                };
                _mm512_mask_storeu_ps(ptr, mask, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: usize, _: usize, _: bool) {
    unreachable!("the bf16 kernel is only selected on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Products of rounded operands, summed in f64: what every path must match to f32
    /// summation error.
    fn check(dtype: DType, m: usize, n: usize, k: usize, a_t: bool, b_t: bool, accumulate: bool) {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1013) as f32) / 317.0 - 1.6)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729 % 997) as f32) / 291.0 - 1.7)
            .collect();
        let round = |v: f32| match dtype {
            DType::F16 => f16::from_f32(v).to_f32() as f64,
            DType::BF16 => bf16::from_f32(v).to_f32() as f64,
            _ => v as f64,
        };
        let av = |i: usize, p: usize| round(if a_t { a[p * m + i] } else { a[i * k + p] });
        let bv = |p: usize, j: usize| round(if b_t { b[j * k + p] } else { b[p * n + j] });
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
        for par in [Parallelism::None, Parallelism::Rayon(2)] {
            let mut dst = vec![0.5f32; m * n];
            matmul_in(dtype, (m, n, k), &mut dst, am, bm, accumulate, par);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 =
                        (0..k).map(|p| av(i, p) * bv(p, j)).sum::<f64>() + if accumulate { 0.5 } else { 0.0 };
                    let scale: f64 = (0..k).map(|p| (av(i, p) * bv(p, j)).abs()).sum::<f64>() + 1.0;
                    let err = (dst[i * n + j] as f64 - want).abs() / scale;
                    assert!(
                        err < 1e-5,
                        "{dtype:?} ({m},{n},{k}) a_t={a_t} b_t={b_t} at ({i},{j}): {} vs {want}",
                        dst[i * n + j]
                    );
                }
            }
        }
    }

    #[test]
    fn reduced_precision_products_match_float64_on_rounded_operands() {
        for dtype in [DType::BF16, DType::F16] {
            for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (13, 33, 9), (25, 70, 48), (12, 32, 2)] {
                for a_t in [false, true] {
                    for b_t in [false, true] {
                        check(dtype, m, n, k, a_t, b_t, false);
                        check(dtype, m, n, k, a_t, b_t, true);
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_differs_from_f32() {
        // Guards the test above against a path that silently computes in f32.
        let a = [1.0f32 + 1.0 / 512.0];
        let b = [1.0f32];
        let mut dst = [0f32];
        matmul_in(
            DType::BF16,
            (1, 1, 1),
            &mut dst,
            Mat::rows(&a, 1),
            Mat::rows(&b, 1),
            false,
            Parallelism::None,
        );
        assert_eq!(dst[0], 1.0);
    }
}
