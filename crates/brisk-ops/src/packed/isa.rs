//! Which instructions brisk's kernels run on: the vector width of the f32 kernels (AVX2 or
//! AVX-512), and how convolutions marked bf16 multiply (f32 products, AVX512-BF16 dot
//! products or AMX tiles). Detected once per process from CPUID, so a run and its
//! resumption compute alike; `BRISK_ISA` caps it for tests and side-by-side comparisons.

use super::bf16::Path;

/// The vector instructions the f32 kernels (the packed convolution's micro-kernel, the
/// direct weight gradient, the image packing) run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// AVX2 and FMA: 8-lane vectors, sixteen registers (the 8 x 32 tile in four 4 x 16
    /// passes).
    Avx2,
    /// AVX-512F: 16-lane vectors, 32 registers (the whole 8 x 32 tile at once).
    Avx512,
}

impl Simd {
    /// Whether this CPU has the instructions (what the kernels' safety rests on).
    pub(crate) fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static HAS: std::sync::OnceLock<[bool; 2]> = std::sync::OnceLock::new();
            let [avx2, avx512] = *HAS.get_or_init(|| {
                [
                    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                    std::arch::is_x86_feature_detected!("avx512f"),
                ]
            });
            match self {
                Simd::Avx2 => avx2,
                Simd::Avx512 => avx512,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// The vector instructions the f32 kernels run on here, `None` where the CPU has neither
/// (the convolutions then run as im2col + the `gemm` crate): AVX-512F where the CPU has
/// it, unless `BRISK_ISA=avx2`; else AVX2 with FMA.
pub(crate) fn simd() -> Option<Simd> {
    static CHOSEN: std::sync::OnceLock<Option<Simd>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let capped = forced().as_deref() == Some(AVX2);
        [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|s| !(capped && *s == Simd::Avx512))
            .find(|s| s.supported())
    })
}

/// How convolutions marked bf16 multiply here, `None` for f32 products: on AMX tiles where
/// the CPU has them; with `vdpbf16ps` on AMD CPUs with AVX512-BF16
/// ([`super::bf16::supported`]), where it retires at twice the multiply-adds of f32 FMAs
/// (on the Intel Xeons measured it ran at half their rate, docs/kernels.md, so Intel CPUs
/// without AMX keep f32 products). `BRISK_ISA` forces a path ([`ISA_CHOICES`]; f32
/// products where the CPU lacks the one forced: the brisk command refuses that case).
pub(crate) fn bf16_path() -> Option<Path> {
    static CHOSEN: std::sync::OnceLock<Option<Path>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let amx = || super::amx::supported().then_some(Path::Tiles(super::amx::Unit::Amx));
        let dot = || super::bf16::supported().then_some(Path::Dot);
        match forced().as_deref() {
            Some(AVX2 | AVX512) => None,
            Some(DOT_PRODUCTS) => dot(),
            Some(TILES) => amx(),
            _ => amx().or_else(|| dot().filter(|_| is_amd())),
        }
    })
}

/// The `BRISK_ISA` value, if set.
fn forced() -> Option<String> {
    std::env::var("BRISK_ISA").ok()
}

const AVX2: &str = "avx2";
const AVX512: &str = "avx512";
const DOT_PRODUCTS: &str = "avx512-bf16";
const TILES: &str = "amx";

/// The values `BRISK_ISA` may take, each with what it forces; the brisk command refuses
/// any other value.
pub const ISA_CHOICES: [(&str, &str); 4] = [
    (
        AVX2,
        "AVX2 kernels with f32 products everywhere, even where the CPU has AVX-512",
    ),
    (AVX512, "AVX-512 kernels with f32 products everywhere"),
    (
        DOT_PRODUCTS,
        "bf16 dot products (vdpbf16ps) where the CPU has AVX512-BF16",
    ),
    (TILES, "bf16 tiles (tdpbf16ps) where the CPU has AMX"),
];

/// Whether this CPU has what the `BRISK_ISA` value `isa` forces; false for a value not in
/// [`ISA_CHOICES`].
pub fn isa_supported(isa: &str) -> bool {
    match isa {
        AVX2 => Simd::Avx2.supported(),
        AVX512 => Simd::Avx512.supported(),
        DOT_PRODUCTS => super::bf16::supported(),
        TILES => super::amx::supported(),
        _ => false,
    }
}

/// The `BRISK_ISA` name of how this process multiplies bf16 convolution operands
/// ([`bf16_path`]; for f32 products, the vector width of [`simd`], or `scalar` where the
/// CPU has no vector kernels): what a benchmark should report beside its figures.
pub fn half_products() -> &'static str {
    match (bf16_path(), simd()) {
        (Some(Path::Dot), _) => DOT_PRODUCTS,
        (Some(Path::Tiles(_)), _) => TILES,
        (None, Some(Simd::Avx512)) => AVX512,
        (None, Some(Simd::Avx2)) => AVX2,
        (None, None) => "scalar",
    }
}

/// Whether the CPU's vendor string (CPUID leaf 0) is AMD's.
#[cfg(not(target_arch = "x86_64"))]
fn is_amd() -> bool {
    false
}

/// Whether the CPU's vendor string (CPUID leaf 0) is AMD's.
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD"
}
