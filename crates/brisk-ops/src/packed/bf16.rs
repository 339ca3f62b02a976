//! bf16 products for the packed convolution: AVX512-BF16's `vdpbf16ps`, which multiplies
//! 16 pairs of bf16 values and adds each pair's two products to an f32 lane — twice the
//! multiply-adds of an f32 FMA per instruction (2.0–2.3x the f32 FMA rate measured on an
//! AMD EPYC; half of it on the Intel Xeons measured, which [`super::isa::bf16_path`] leaves
//! to f32 or to AMX tiles, [`super::amx`], which read the same pairs).
//!
//! Operands are stored as pairs of reduction rows: one `u32` holds row `2k`'s bf16 value
//! in its low half and row `2k + 1`'s in its high half (0 past the last row). The weight
//! is converted once per call from its f32 packing; each image micro-panel once per
//! reduction block, then multiplied by every weight panel.

use super::{ImagePanel, KC, MR, NR};

/// How convolutions marked bf16 multiply their bf16 operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// AVX512-BF16's `vdpbf16ps` on an 8 x 32 block of vector registers ([`kernel`]).
    Dot,
    /// AMX tiles (`tdpbf16ps`) on a 32 x 32 block ([`super::amx`]).
    Tiles(super::amx::Unit),
}

/// Whether this CPU has the instructions the `vdpbf16ps` kernels use: AVX-512F, -BW, -VL
/// and AVX512-BF16 (what their safety rests on; [`super::isa::bf16_path`] decides whether
/// they pay).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The bits of `v` rounded to bf16 (to nearest, ties to even).
fn bits(v: f32) -> u32 {
    u32::from(half::bf16::from_f32(v).to_bits())
}

/// Rows `2k` and `2k + 1` as one pair.
pub(super) fn pair(even: f32, odd: f32) -> u32 {
    bits(even) | (bits(odd) << 16)
}

/// Pairs of a weight in the f32 packing of [`super::PackedWeight`] (`data`, `blocks` row
/// blocks of MR, `kdim` reduction rows): for each reduction block of KC rows, for each row
/// block, `kc.div_ceil(2)` groups of MR pairs. KC is even, so reduction block `kc0`
/// starts at pair `kc0 / 2 * blocks * MR`.
pub(super) fn weight_pairs(data: &[f32], blocks: usize, kdim: usize) -> Vec<u32> {
    let total: usize = (0..kdim)
        .step_by(KC)
        .map(|kc0| KC.min(kdim - kc0).div_ceil(2) * blocks * MR)
        .sum();
    let mut out = vec![0u32; total];
    let mut at = 0;
    for kc0 in (0..kdim).step_by(KC) {
        let kc = KC.min(kdim - kc0);
        for b in 0..blocks {
            let panel = &data[kc0 * blocks * MR + b * kc * MR..][..kc * MR];
            let dst = &mut out[at..][..kc.div_ceil(2) * MR];
            panel_pairs(panel, kc, dst);
            at += dst.len();
        }
    }
    out
}

/// One panel of `kc` groups of MR floats as `kc.div_ceil(2)` groups of MR pairs.
fn panel_pairs(panel: &[f32], kc: usize, dst: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if supported() {
        done = kc / 2;
        // SAFETY: AVX512-BF16/BW/VL were detected; the function reads panel[..done * 2 *
        // MR] and writes dst[..done * MR], both inside.
        unsafe { panel_pairs_avx512(&panel[..done * 2 * MR], dst.as_mut_ptr()) };
    }
    for kp in done..kc.div_ceil(2) {
        for i in 0..MR {
            let odd = if 2 * kp + 1 < kc {
                panel[(2 * kp + 1) * MR + i]
            } else {
                0.0
            };
            dst[kp * MR + i] = pair(panel[2 * kp * MR + i], odd);
        }
    }
}

// A pair of reduction rows of a weight panel is one 16-float vector.
const _: () = assert!(MR == 8);

/// # Safety
/// The CPU must have AVX512-BF16, AVX512-BW and AVX512-VL; `src.len()` a multiple of 16;
/// `out` must point to `src.len() / 2` writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn panel_pairs_avx512(src: &[f32], out: *mut u32) {
    use std::arch::x86_64::*;
    // Rows 2k (lanes 0..8) and 2k + 1 (8..16) interleaved: lane 2i = row 2k's i, 2i + 1
    // = row 2k + 1's i.
    let mut order = [0i16; 16];
    for (j, o) in order.iter_mut().enumerate() {
        *o = (j / 2 + (j % 2) * 8) as i16;
    }
    // SAFETY: the caller's contract bounds every read and write; `order` holds 16 i16.
    unsafe {
        let order = _mm256_loadu_si256(order.as_ptr().cast());
        for (t, chunk) in src.chunks_exact(16).enumerate() {
            let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(chunk.as_ptr())));
            _mm256_storeu_si256(out.add(8 * t).cast(), _mm256_permutexvar_epi16(order, v));
        }
    }
}

/// Reduction rows `kc0..kc0 + kc` of row block `b` in [`weight_pairs`]' layout.
pub(super) fn weight_panel(pairs: &[u32], blocks: usize, b: usize, kc0: usize, kc: usize) -> &[u32] {
    let kcp = kc.div_ceil(2);
    &pairs[kc0 / 2 * blocks * MR + b * kcp * MR..][..kcp * MR]
}

/// Pairs of reduction rows per image micro-panel at most.
pub(super) const PANEL_PAIRS: usize = KC / 2 * NR;

/// `out[kp * NR + j]` = the pair (row `2kp`, row `2kp + 1`) of column `j` of `b`'s first
/// `kc` rows (row `kc` counts as 0).
pub(super) fn image_pairs(b: &impl ImagePanel, kc: usize, out: &mut [u32]) {
    assert!(b.holds(kc) && out.len() >= kc.div_ceil(2) * NR);
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: AVX512-BF16 and AVX512-BW were detected; `b` holds rows 0..kc (two
        // halves of 16 floats each) and `out` kc.div_ceil(2) rows of NR, as asserted.
        unsafe { image_pairs_avx512(b, kc, out.as_mut_ptr()) };
        return;
    }
    for kp in 0..kc.div_ceil(2) {
        for j in 0..NR {
            let at = |k: usize| -> f32 {
                if k >= kc {
                    return 0.0;
                }
                // SAFETY: k < kc: `b` holds row k, 16 floats from each half's start.
                unsafe { *b.halves(k)[j / 16].add(j % 16) }
            };
            out[kp * NR + j] = pair(at(2 * kp), at(2 * kp + 1));
        }
    }
}

/// # Safety
/// The CPU must have AVX512-BF16 and AVX512-BW; `b` must hold `kc` rows and `out` point
/// to `kc.div_ceil(2) * NR` writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn image_pairs_avx512(b: &impl ImagePanel, kc: usize, out: *mut u32) {
    use std::arch::x86_64::*;
    // `_mm512_cvtne2ps_pbh(hi, lo)` puts lo's 16 values in lanes 0..16 and hi's in
    // 16..32; this interleaves them: lane 2j = lo[j], lane 2j + 1 = hi[j].
    let mut order = [0i16; 32];
    for (j, o) in order.iter_mut().enumerate() {
        *o = (j / 2 + (j % 2) * 16) as i16;
    }
    // SAFETY: the caller's contract bounds every read (rows < kc of `b`) and write
    // (kc.div_ceil(2) * NR values of `out`); `order` holds 32 i16.
    unsafe {
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for kp in 0..kc.div_ceil(2) {
            let even = b.halves(2 * kp);
            let odd = (2 * kp + 1 < kc).then(|| b.halves(2 * kp + 1));
            for (h, &even) in even.iter().enumerate() {
                let lo = _mm512_loadu_ps(even);
                let hi = odd.map_or(_mm512_setzero_ps(), |o| _mm512_loadu_ps(o[h]));
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let pairs = _mm512_permutexvar_epi16(order, both);
                _mm512_storeu_si512(out.add(kp * NR + 16 * h).cast(), pairs);
            }
        }
    }
}

/// Where the broadcast operand's pair (reduction pair `kp`, row `i`) lies in its slice:
/// at `i * row + kp * step`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Strides {
    pub row: usize,
    pub step: usize,
}

/// [`weight_pairs`]' panels: `kcp` groups of MR pairs.
pub(super) const PANEL: Strides = Strides { row: 1, step: MR };

/// `c[i][j] (+)= Σ_kp a(kp, i) · b[kp][j]` over pairs, for an MR x NR tile: `a` as
/// `strides` say, `b` `kcp` rows of NR pairs, `c` MR rows `ldc` apart. Runs only where
/// [`supported`] (the caller checks).
pub(super) fn kernel(
    kcp: usize,
    (a, strides): (&[u32], Strides),
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(supported(), "bf16 products on a CPU without AVX512-BF16");
    let last = (MR - 1) * strides.row + kcp.saturating_sub(1) * strides.step;
    assert!(a.len() > last && b.len() >= kcp * NR && c.len() >= (MR - 1) * ldc + NR);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 was detected (asserted); the assert above bounds every access.
    unsafe {
        kernel_avx512(
            kcp,
            (a.as_ptr(), strides),
            b.as_ptr(),
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    };
}

/// # Safety
/// The CPU must have AVX512-BF16; `a` must hold every pair `strides` reach for `kcp`
/// pairs of MR rows, `b` `kcp * NR` values, and `c` MR rows of NR floats `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_avx512(
    kcp: usize,
    (a, strides): (*const u32, Strides),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for kp in 0..kcp {
        // SAFETY: kp < kcp: row kp of b (NR pairs) and pair kp of each of a's MR rows are
        // in bounds; the transmutes reinterpret 512 bits as 32 bf16 values.
        unsafe {
            let row = b.add(kp * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(16).cast()));
            let ak = a.add(kp * strides.step);
            for (i, r) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ak.add(i * strides.row) as i32));
                r[0] = _mm512_dpbf16_ps(r[0], ai, b0);
                r[1] = _mm512_dpbf16_ps(r[1], ai, b1);
            }
        }
    }
    super::store_tile!(acc, c, ldc, accumulate);
}

/// `src` as bf16 pairs in order: `out[t]` = (src[2t], src[2t + 1]), 0 past the end of
/// `src`; `out` holds `src.len().div_ceil(2)` values.
pub(super) fn row_pairs(src: &[f32], out: &mut [u32]) {
    assert_eq!(out.len(), src.len().div_ceil(2));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if supported() {
        done = src.len() / 32 * 32;
        // SAFETY: AVX512-BF16 was detected; the function reads src[..done] and writes
        // out[..done / 2], both inside.
        unsafe { row_pairs_avx512(&src[..done], out.as_mut_ptr()) };
    }
    for (t, o) in out.iter_mut().enumerate().skip(done / 2) {
        *o = pair(src[2 * t], src.get(2 * t + 1).copied().unwrap_or(0.0));
    }
}

/// # Safety
/// The CPU must have AVX512-BF16; `src.len()` a multiple of 32; `out` must point to
/// `src.len() / 2` writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn row_pairs_avx512(src: &[f32], out: *mut u32) {
    use std::arch::x86_64::*;
    for (t, chunk) in src.chunks_exact(32).enumerate() {
        // SAFETY: `chunk` holds 32 floats; out[16 t .. 16 t + 16] lies inside `out` by
        // the contract. `_mm512_cvtne2ps_pbh(hi, lo)` keeps the 32 values in order.
        unsafe {
            let lo = _mm512_loadu_ps(chunk.as_ptr());
            let hi = _mm512_loadu_ps(chunk.as_ptr().add(16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(16 * t).cast(), v);
        }
    }
}

thread_local! {
    /// [`weight_grad_t`]'s image operand as pairs, kept for the next call.
    static COLUMNS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A convolution's weight gradient, transposed, in bf16 products on `path`: `acc` `[rows,
/// cols]` += `col` `[rows, len]` · `dy` `[cols, len]`ᵀ (`col` the im2col matrix of `len`
/// positions, `dy` the output gradient of those positions, both holding bf16 values).
/// `col`'s rows are converted to pairs once and read in place as the row operand (a row
/// `lda` pairs long: padded with zeros to whole tiles for AMX); `dy`'s are packed as the
/// column one, NR columns and a reduction block at a time.
pub(crate) fn weight_grad_t(path: Path, col: &[f32], dy: &[f32], len: usize, acc: &mut [f32]) {
    let (rows, cols) = (col.len() / len.max(1), dy.len() / len.max(1));
    assert!(rows * len == col.len() && cols * len == dy.len() && acc.len() == rows * cols);
    let kpt = len.div_ceil(2);
    let (block, lda) = match path {
        Path::Dot => (MR, kpt),
        Path::Tiles(_) => (super::amx::ROWS, kpt.next_multiple_of(super::amx::PAIRS)),
    };
    COLUMNS.with(|spare| {
        let mut pairs = spare.borrow_mut();
        // Every row below `rows` is written next (its pairs, then zeros to `lda`); those
        // past it (to a whole block) are zero.
        pairs.resize(rows.div_ceil(block) * block * lda, 0);
        pairs[rows * lda..].fill(0);
        for (src, dst) in col.chunks_exact(len).zip(pairs.chunks_exact_mut(lda)) {
            row_pairs(src, &mut dst[..kpt]);
            dst[kpt..].fill(0);
        }
        let mut panel = vec![0u32; KC / 2 * NR];
        let mut dy_row = vec![0u32; KC / 2];
        let mut tile = vec![0f32; block * NR];
        for j0 in (0..cols).step_by(NR) {
            let nj = NR.min(cols - j0);
            for kc0 in (0..lda).step_by(KC / 2) {
                let kcp = (KC / 2).min(lda - kc0);
                // panel[kp][j] = dy's pair kc0 + kp of column j0 + j (0 past the end).
                panel[..kcp * NR].fill(0);
                let (lo, hi) = (2 * kc0, (2 * (kc0 + kcp)).min(len));
                let have = (hi - lo).div_ceil(2);
                for j in 0..nj {
                    let src = &dy[(j0 + j) * len..][..len];
                    row_pairs(&src[lo..hi], &mut dy_row[..have]);
                    for (kp, &v) in dy_row[..have].iter().enumerate() {
                        panel[kp * NR + j] = v;
                    }
                }
                for i0 in (0..rows).step_by(block) {
                    let a = &pairs[i0 * lda + kc0..];
                    match path {
                        Path::Dot => {
                            let strides = Strides { row: lda, step: 1 };
                            kernel(kcp, (a, strides), &panel, &mut tile, NR, false)
                        }
                        Path::Tiles(unit) => {
                            super::amx::kernel(unit, kcp, (a, lda), &panel, &mut tile, NR, false)
                        }
                    }
                    for (i, trow) in tile.chunks_exact(NR).enumerate().take(rows - i0) {
                        let dst = &mut acc[(i0 + i) * cols + j0..][..nj];
                        dst.iter_mut().zip(trow).for_each(|(d, t)| *d += t);
                    }
                }
            }
        }
    });
}
