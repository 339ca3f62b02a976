//! Half-precision storage and rounding for brisk's kernels. Half-precision layers keep
//! their activations as bf16 or f16 tensors (half the memory) and compute as autocast
//! does: operands rounded to the half format, products summed in f32.
//!
//! Products: f32 GEMMs on the rounded operands, except where bf16 dot products pay —
//! on the Intel Xeons measured `vdpbf16ps` retired at half the rate of f32 FMAs, on AMD
//! EPYCs at twice it, so there the packed convolutions multiply bf16 pairs
//! (packed/bf16.rs, docs/kernels.md). The products of rounded values are exact in f32,
//! so the results are those of a bf16 GEMM with f32 accumulation either way. The conversions
//! use AVX512-BF16 (`vcvtneps2bf16`) and AVX-512 F16C (`vcvtps2ph`) when the CPU has
//! them (detected at run time), elsewhere branch-free bit arithmetic that the compiler
//! vectorises (for AVX2 where the CPU has it).

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};
use half::{bf16, f16};

/// The contiguous values `layout` selects, as f32 (borrowed when already f32).
pub(crate) fn f32_values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<Cow<'a, [f32]>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("brisk {op}: {what} must be contiguous");
    };
    Ok(match storage {
        CpuStorage::F32(d) => Cow::Borrowed(&d[a..b]),
        CpuStorage::BF16(d) => {
            let mut out = vec![0f32; b - a];
            bf16_to_f32(&d[a..b], &mut out);
            Cow::Owned(out)
        }
        CpuStorage::F16(d) => {
            let mut out = vec![0f32; b - a];
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&d[a..b], &mut out);
            Cow::Owned(out)
        }
        s => candle_core::bail!("brisk {op}: {what} must be f32, bf16 or f16, got {:?}", s.dtype()),
    })
}

/// f32 values stored as `dtype` (F32, BF16 or F16), rounding to nearest even.
pub(crate) fn storage_of(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            f32_to_bf16(&values, &mut out);
            CpuStorage::BF16(out)
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; values.len()];
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(out.as_mut_slice(), &values);
            CpuStorage::F16(out)
        }
        d => candle_core::bail!("brisk: cannot store activations as {d:?}"),
    })
}

/// Widens bf16 values to f32 (exact: a 16-bit shift).
fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    // A plain shift of the bits, which the compiler vectorises.
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// Rounds f32 values to bf16 (nearest even).
fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the features were detected on this CPU; the slices have equal lengths.
        unsafe { f32_to_bf16_avx512(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { f32_to_bf16_avx2(src, dst) };
        return;
    }
    f32_to_bf16_portable(src, dst);
}

/// `v` rounded to the nearest bf16 (ties to even; a NaN stays a quiet NaN) as f32 bits,
/// the low 16 bits clear: what `half::bf16::from_f32` computes, without its branches, so
/// that loops of it vectorise.
#[inline(always)]
fn bf16_rounded_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let nan = b & 0x7fff_ffff > 0x7f80_0000;
    (if nan { b | 0x0040_0000 } else { rounded }) & 0xffff_0000
}

#[inline(always)]
fn f32_to_bf16_portable(src: &[f32], dst: &mut [bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits((bf16_rounded_bits(s) >> 16) as u16);
    }
}

/// [`f32_to_bf16_portable`] compiled for AVX2 (the loop vectorises to 8 values at a time).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [bf16]) {
    f32_to_bf16_portable(src, dst);
}

#[inline(always)]
fn round_bf16_portable(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = f32::from_bits(bf16_rounded_bits(*v));
    }
}

/// [`round_bf16_portable`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_bf16_avx2(values: &mut [f32]) {
    round_bf16_portable(values);
}

/// # Safety
/// The CPU must have AVX512F and AVX512-BF16; `dst` must be as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [bf16]) {
    use std::arch::x86_64::*;
    let n = src.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 <= n <= both lengths; 16 bf16 are 32 bytes.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i).cast(),
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
    }
    for (d, &s) in dst[n..].iter_mut().zip(&src[n..]) {
        *d = half::bf16::from_f32(s);
    }
}

/// Rounds every value to the nearest bf16 (in place, kept as f32): what storing it as
/// bf16 and reading it back gives.
pub fn round_to_bf16(values: &mut [f32]) {
    round_to(DType::BF16, values);
}

/// Rounds every value to the nearest f16 (in place, kept as f32; beyond f16's range,
/// ±inf).
pub fn round_to_f16(values: &mut [f32]) {
    round_to(DType::F16, values);
}

/// Rounds every value to the nearest `dtype` value (in place, kept as f32); F32 leaves
/// them as they are. In parallel, in chunks of 16K values.
pub(crate) fn round_to(dtype: DType, values: &mut [f32]) {
    use rayon::prelude::*;
    values
        .par_chunks_mut(1 << 14)
        .for_each(|chunk| round_chunk(dtype, chunk));
}

/// [`round_to`] on one thread.
fn round_chunk(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            #[cfg(target_arch = "x86_64")]
            if has_avx512_bf16() {
                // SAFETY: the features were detected on this CPU.
                unsafe { round_bf16_avx512(values) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected on this CPU.
                unsafe { round_bf16_avx2(values) };
                return;
            }
            round_bf16_portable(values);
        }
        DType::F16 => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                unsafe { round_f16_avx512(values) };
                return;
            }
            for v in values.iter_mut() {
                *v = f16::from_f32(*v).to_f32();
            }
        }
        _ => {}
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// # Safety
/// The CPU must have AVX512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_bf16_avx512(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly 16 floats; the conversion rounds to nearest
        // even, and widening bf16 to f32 is a 16-bit shift.
        unsafe {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(c.as_ptr())));
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_ps(c.as_mut_ptr(), _mm512_castsi512_ps(w));
        }
    }
    for v in chunks.into_remainder() {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

/// # Safety
/// The CPU must have AVX512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_f16_avx512(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly 16 floats; rounding mode: nearest even.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(
                c.as_ptr(),
            ));
            _mm512_storeu_ps(c.as_mut_ptr(), _mm512_cvtph_ps(h));
        }
    }
    for v in chunks.into_remainder() {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_half_crate_everywhere() {
        // Ties, subnormals, overflow, infinities and NaN, in a vector-sized run and a tail.
        let mut values: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 1.37e-3 + 1.0 / 1024.0)
            .collect();
        values.extend([
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            65520.0,
            1e6,
            -1e-8,
            6e-8,
            f32::INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            3.0e38,
        ]);
        for dtype in [DType::BF16, DType::F16] {
            let mut got = values.clone();
            round_to(dtype, &mut got);
            for (&v, &g) in values.iter().zip(&got) {
                let want = match dtype {
                    DType::BF16 => bf16::from_f32(v).to_f32(),
                    _ => f16::from_f32(v).to_f32(),
                };
                assert!(
                    want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()),
                    "{dtype:?}: {v} rounds to {g}, want {want}"
                );
            }
        }
    }

    /// Every bf16 rounding loop (the one `round_to` picks is checked above) against the
    /// half crate, bit for bit, NaN payloads and signs included.
    #[test]
    fn every_bf16_rounding_loop_matches_the_half_crate() {
        let mut values: Vec<f32> = (0..4099u32)
            .map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9)))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            -(1.0 + 3.0 / 256.0),
            f32::MAX,
            f32::MIN,
        ]);
        values.extend([0x7f80_0001u32, 0xffc0_1234, 0x7fff_ffff, 0xff80_0000].map(f32::from_bits));
        let want: Vec<u16> = values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let check = |name: &str, got: Vec<u16>| {
            for ((v, w), g) in values.iter().zip(&want).zip(&got) {
                assert_eq!(w, g, "{name}: {v} ({:#x})", v.to_bits());
            }
        };
        let mut rounded = values.clone();
        round_bf16_portable(&mut rounded);
        check(
            "round, portable",
            rounded.iter().map(|v| (v.to_bits() >> 16) as u16).collect(),
        );
        let mut stored = vec![bf16::ZERO; values.len()];
        f32_to_bf16_portable(&values, &mut stored);
        check("store, portable", stored.iter().map(|h| h.to_bits()).collect());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut rounded = values.clone();
            // SAFETY: AVX2 was detected.
            unsafe { round_bf16_avx2(&mut rounded) };
            check(
                "round, avx2",
                rounded.iter().map(|v| (v.to_bits() >> 16) as u16).collect(),
            );
            // SAFETY: AVX2 was detected; equal lengths.
            unsafe { f32_to_bf16_avx2(&values, &mut stored) };
            check("store, avx2", stored.iter().map(|h| h.to_bits()).collect());
        } else {
            brisk_hosts::skipped(
                "brisk_ops::every_bf16_rounding_loop_matches_the_half_crate (avx2)",
                "this CPU lacks AVX2",
            );
        }
    }

    #[test]
    fn storage_round_trips() -> Result<()> {
        // A vector-sized run and a tail, with values that need rounding.
        let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.3719 + 1e-3).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let s = storage_of(values.clone(), dtype)?;
            let layout = Layout::contiguous(values.len());
            let back = f32_values(&s, &layout, "test", "x")?;
            let mut want = values.clone();
            round_to(dtype, &mut want);
            assert_eq!(back.as_ref(), want.as_slice(), "{dtype:?}");
        }
        Ok(())
    }
}
