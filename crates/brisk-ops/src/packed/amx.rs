//! bf16 products on Intel's Advanced Matrix Extensions: `tdpbf16ps` multiplies a 16-row
//! tile of bf16 pairs by a 16 x 16 tile of pairs into a 16 x 16 f32 tile — 16 x 16 x 32
//! multiply-adds in one instruction. The kernel holds a 32 x 32 block of output (four f32
//! tiles) and walks the reduction 16 pairs (32 rows) at a time.
//!
//! Operands are the pairs of [`super::bf16`] (one `u32` holds reduction rows `2k` and `2k +
//! 1`, the even one in its low half): the image operand as its NR-wide micro-panels (row
//! `kp`, column `j`), read as two 16-column tiles with a 128-byte stride; the weight as
//! rows of pairs ([`weight_tiles`]), 32 rows per block, each row's pairs contiguous and
//! padded with zeros to whole tiles.
//!
//! Linux grants the tile state to a process on request ([`supported`] asks once); each
//! thread loads the tile configuration once, before its first kernel. On CPUs without
//! AMX the tests run the same drivers on [`Unit::Model`], a scalar model of the
//! instruction as Intel's reference describes it, which checks every layout and index;
//! only the assembly itself needs an AMX CPU (its test is recorded SKIPPED elsewhere).

use rayon::prelude::*;

use super::{KC, MR, NR};

/// Output rows per kernel call: two 16-row tiles.
pub(crate) const ROWS: usize = 32;
/// Reduction pairs per tile row (64 bytes).
pub(crate) const PAIRS: usize = 16;

// Whole reduction blocks are whole tiles; a block of ROWS is whole 8-row panels.
const _: () = assert!((KC / 2).is_multiple_of(PAIRS) && ROWS.is_multiple_of(MR) && NR == 2 * PAIRS);

/// What multiplies the tiles: the CPU's AMX unit, or (tests only) a scalar model of
/// `tdpbf16ps`, which runs anywhere and checks the drivers' layouts on CPUs without AMX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    Amx,
    #[cfg(test)]
    Model,
}

/// Whether this CPU runs AMX bf16 tiles and the kernel granted this process the tile
/// state (CPUID leaf 7: AMX-TILE and AMX-BF16; `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, asked once: without it the first tile instruction faults).
pub(crate) fn supported() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| cpu_has_amx() && tile_state_granted())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// CPUID leaf 7, sub-leaf 0: EDX bit 22 (AMX-BF16) and bit 24 (AMX-TILE).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state; true when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn tile_state_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request only changes which extended states the process may use; it
    // reads and writes none of our memory.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Reduction pairs a block of `kc` reduction rows occupies: whole tiles.
pub(crate) fn pairs_of(kc: usize) -> usize {
    kc.div_ceil(2).next_multiple_of(PAIRS)
}

/// A weight in the f32 packing of [`super::PackedWeight`] (`data`: `rows` rows in blocks of
/// MR, `kdim` reduction rows) as tiles: for each reduction block of KC rows, the rows
/// (rounded up to ROWS, zero past `rows`) one after another, each as [`pairs_of`]`(kc)`
/// pairs (zero past the last row). Reduction blocks are converted in parallel.
pub(crate) fn weight_tiles(data: &[f32], rows: usize, kdim: usize) -> Vec<u32> {
    let (blocks, padded) = (rows.div_ceil(MR), rows.next_multiple_of(ROWS));
    let total: usize = (0..kdim)
        .step_by(KC)
        .map(|kc0| padded * pairs_of(KC.min(kdim - kc0)))
        .sum();
    let mut out = vec![0u32; total];
    out.par_chunks_mut((padded * KC / 2).max(1))
        .enumerate()
        .for_each(|(kb, block)| {
            let kc0 = kb * KC;
            let (kc, kcp) = (KC.min(kdim - kc0), block.len() / padded);
            for (row, dst) in block.chunks_exact_mut(kcp).take(rows).enumerate() {
                let panel = &data[kc0 * blocks * MR + row / MR * kc * MR..][..kc * MR];
                let at = |k: usize| if k < kc { panel[k * MR + row % MR] } else { 0.0 };
                for (kp, d) in dst[..kc.div_ceil(2)].iter_mut().enumerate() {
                    *d = super::bf16::pair(at(2 * kp), at(2 * kp + 1));
                }
            }
        });
    out
}

/// Rows `32 rb .. 32 rb + 32` of reduction block `kc0..kc0 + kc` in [`weight_tiles`]'
/// layout (`rows` the weight's), with its row stride in pairs.
pub(crate) fn weight_panel(tiles: &[u32], rows: usize, rb: usize, kc0: usize, kc: usize) -> (&[u32], usize) {
    let (padded, kcp) = (rows.next_multiple_of(ROWS), pairs_of(kc));
    let start = kc0 / KC * padded * (KC / 2) + rb * ROWS * kcp;
    (&tiles[start..][..ROWS * kcp], kcp)
}

/// `c[i][j] (+)= Σ_kp a[i][kp] · b[kp][j]` over bf16 pairs for a ROWS x NR block: `a`
/// ROWS rows `lda` pairs apart, `b` `kcp` rows of NR pairs, `c` ROWS rows `ldc` apart;
/// `kcp` a positive multiple of [`PAIRS`].
pub(crate) fn kernel(
    unit: Unit,
    kcp: usize,
    (a, lda): (&[u32], usize),
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(kcp > 0 && kcp.is_multiple_of(PAIRS) && lda >= kcp);
    assert!(a.len() >= (ROWS - 1) * lda + kcp && b.len() >= kcp * NR && c.len() >= (ROWS - 1) * ldc + NR);
    match unit {
        Unit::Amx => {
            assert!(supported(), "AMX tiles on a CPU without them");
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX was detected and granted (asserted); the asserts above bound every
            // tile load and store: ROWS rows of kcp pairs at stride lda in `a`, kcp rows of
            // NR pairs in `b`, ROWS rows of NR floats at stride ldc in `c`.
            unsafe {
                kernel_amx(
                    kcp,
                    (a.as_ptr(), lda),
                    b.as_ptr(),
                    c.as_mut_ptr(),
                    ldc,
                    accumulate,
                )
            };
        }
        #[cfg(test)]
        Unit::Model => model::kernel(kcp, (a, lda), b, c, ldc, accumulate),
    }
}

thread_local! {
    /// Whether this thread has loaded the tile configuration.
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The tile configuration every kernel uses: palette 1, tiles 0–7 each 16 rows of 64
/// bytes (tmm0–3 the f32 accumulators, tmm4–5 the weight's rows, tmm6–7 the image's
/// columns).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// # Safety
/// AMX must be supported and granted ([`supported`]); `a` must hold ROWS rows of `kcp`
/// pairs `lda` apart, `b` `kcp` rows of NR pairs, and `c` ROWS rows of NR floats `ldc`
/// apart; `kcp` a positive multiple of [`PAIRS`].
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_amx(
    kcp: usize,
    (a, lda): (*const u32, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    if !CONFIGURED.get() {
        let config = TileConfig::new();
        // SAFETY: AMX is granted (the caller's contract); the configuration is a valid
        // palette-1 layout of 64 bytes, read only.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        CONFIGURED.set(true);
    }
    // SAFETY: the caller's contract bounds every access: tmm0–3 load and store c's 32 x 32
    // floats (rows ldc * 4 bytes apart), tmm4–5 read rows 0–15 and 16–31 of `a`, 64 bytes
    // per step for kcp / 16 steps, tmm6–7 read 16 rows of `b`'s NR pairs per step.
    unsafe {
        asm!(
            "test {acc}, {acc}",
            "jz 3f",
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c1} + {ldc}*1]",
            "tileloadd tmm3, [{c1} + {ldc}*1 + 64]",
            "jmp 4f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "4:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b}, {bstep}",
            "dec {n}",
            "jnz 4b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c0} + {ldc}*1 + 64], tmm1",
            "tilestored [{c1} + {ldc}*1], tmm2",
            "tilestored [{c1} + {ldc}*1 + 64], tmm3",
            acc = in(reg) usize::from(accumulate),
            c0 = in(reg) c,
            c1 = in(reg) c.add(16 * ldc),
            ldc = in(reg) ldc * 4,
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.add(16 * lda) => _,
            lda = in(reg) lda * 4,
            b = inout(reg) b => _,
            ldb = in(reg) NR * 4,
            bstep = const PAIRS * NR * 4,
            n = inout(reg) kcp / PAIRS => _,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// A scalar model of the kernel: the same tiles, multiplied as Intel's reference
/// pseudo-code for `tdpbf16ps` describes (bf16 inputs widened with denormals read as
/// zero, each product added to the f32 accumulator in turn, even element of a pair
/// first; denormal results flushed to zero).
#[cfg(test)]
pub(crate) mod model {
    use super::{NR, PAIRS};

    /// [`super::kernel`] on the model.
    pub(crate) fn kernel(
        kcp: usize,
        (a, lda): (&[u32], usize),
        b: &[u32],
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        for (ti, tj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let mut tile = [[0f32; 16]; 16];
            let (r0, c0) = (16 * ti, 16 * tj);
            if accumulate {
                for (m, row) in tile.iter_mut().enumerate() {
                    row.copy_from_slice(&c[(r0 + m) * ldc + c0..][..16]);
                }
            }
            for step in 0..kcp / PAIRS {
                let at_a = |m: usize, k: usize| a[(r0 + m) * lda + step * PAIRS + k];
                let at_b = |k: usize, n: usize| b[(step * PAIRS + k) * NR + c0 + n];
                tdpbf16ps(&mut tile, at_a, at_b);
            }
            for (m, row) in tile.iter().enumerate() {
                c[(r0 + m) * ldc + c0..][..16].copy_from_slice(row);
            }
        }
    }

    /// One `tdpbf16ps` on 16 x 16 tiles: `a(m, k)` and `b(k, n)` the pairs.
    pub(crate) fn tdpbf16ps(
        c: &mut [[f32; 16]; 16],
        a: impl Fn(usize, usize) -> u32,
        b: impl Fn(usize, usize) -> u32,
    ) {
        let widen = |bits: u32| {
            let v = f32::from_bits(bits << 16);
            if v.is_subnormal() {
                0.0
            } else {
                v
            }
        };
        let flush = |v: f32| if v.is_subnormal() { 0.0 } else { v };
        for (m, row) in c.iter_mut().enumerate() {
            for k in 0..16 {
                let (lo, hi) = (a(m, k) & 0xffff, a(m, k) >> 16);
                for (n, acc) in row.iter_mut().enumerate() {
                    let (blo, bhi) = (b(k, n) & 0xffff, b(k, n) >> 16);
                    *acc = flush(*acc + widen(lo) * widen(blo));
                    *acc = flush(*acc + widen(hi) * widen(bhi));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(len: usize, seed: u32) -> Vec<u32> {
        let value =
            |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 61) as f32 / 8.0 - 3.8;
        (0..len)
            .map(|i| super::super::bf16::pair(value(2 * i), value(2 * i + 1)))
            .collect()
    }

    /// The kernel's sums in f64, `c0 + Σ a·b` over the pairs' halves, each with the sum
    /// of its terms' magnitudes (what bounds the error of f32 summation in any order).
    fn reference(
        kcp: usize,
        (a, lda): (&[u32], usize),
        b: &[u32],
        c0: &[f32],
        ldc: usize,
    ) -> Vec<(f64, f64)> {
        let half = |bits: u32| f64::from(f32::from_bits(bits << 16));
        let mut out = vec![(0f64, 0f64); ROWS * NR];
        for i in 0..ROWS {
            for j in 0..NR {
                let c = f64::from(c0[i * ldc + j]);
                let (mut s, mut m) = (c, c.abs());
                for kp in 0..kcp {
                    let (x, y) = (a[i * lda + kp], b[kp * NR + j]);
                    for (p, q) in [(x & 0xffff, y & 0xffff), (x >> 16, y >> 16)] {
                        s += half(p) * half(q);
                        m += (half(p) * half(q)).abs();
                    }
                }
                out[i * NR + j] = (s, m);
            }
        }
        out
    }

    /// Runs `unit`'s kernel on a 48-pair reduction (three tile steps) with a row stride
    /// wider than the reduction and an output stride wider than NR, fresh and
    /// accumulating, against the f64 sums. The products of bf16 values are exact in f32;
    /// the sums may round at every addition, in whatever order the unit adds (Intel
    /// documents the instruction's result, not its order of addition), so each is held to
    /// the classic bound of f32 summation, n·2⁻²⁴·Σ|terms| for n terms, doubled: any
    /// misplaced or dropped pair is off by a whole product, hundreds of times more.
    fn check(unit: Unit) {
        let (kcp, lda, ldc) = (48, 53, 40);
        let a = pairs(ROWS * lda, 1);
        let b = pairs(kcp * NR, 2);
        let start: Vec<f32> = (0..ROWS * ldc).map(|i| (i % 13) as f32 - 6.0).collect();
        for accumulate in [false, true] {
            let mut c = start.clone();
            kernel(unit, kcp, (&a, lda), &b, &mut c, ldc, accumulate);
            let base = if accumulate {
                start.clone()
            } else {
                vec![0.0; start.len()]
            };
            let want = reference(kcp, (&a, lda), &b, &base, ldc);
            let terms = (2 * kcp + 1) as f64;
            for i in 0..ROWS {
                for j in 0..NR {
                    let (got, (want, magnitude)) = (f64::from(c[i * ldc + j]), want[i * NR + j]);
                    let bound = terms * f64::from(f32::EPSILON) * magnitude;
                    assert!(
                        (got - want).abs() <= bound,
                        "{unit:?} ({i}, {j}): {got} vs {want} (bound {bound})"
                    );
                }
                // Columns past NR are not touched.
                assert_eq!(c[i * ldc + NR..][..ldc - NR], start[i * ldc + NR..][..ldc - NR]);
            }
        }
    }

    #[test]
    fn the_tile_model_sums_every_pair_into_its_place() {
        check(Unit::Model);
    }

    /// The assembly against the f64 sums, held to the same bound as the model.
    #[test]
    fn amx_tiles_match_f64_sums() {
        if !supported() {
            brisk_hosts::skipped(
                "brisk_ops::amx_tiles_match_f64_sums",
                "this CPU lacks AMX-BF16 (or Linux refused the tile state)",
            );
            return;
        }
        check(Unit::Amx);
    }

    /// Pairs of a packed weight land at row-major places, rows and pairs past the weight
    /// zero; a second reduction block starts after the first's whole tiles.
    #[test]
    fn weight_tiles_put_each_row_in_place() {
        let (rows, kdim) = (13, KC + 35);
        let w: Vec<f32> = (0..rows * kdim).map(|i| (i % 97) as f32 - 48.0).collect();
        let packed = super::super::PackedWeight::rows(&w, rows, kdim);
        let tiles = weight_tiles(&packed.data, rows, kdim);
        let bf = |v: f32| u32::from(half::bf16::from_f32(v).to_bits());
        for (kc0, kc) in [(0, KC), (KC, 35)] {
            let (panel, lda) = weight_panel(&tiles, rows, 0, kc0, kc);
            assert_eq!(lda, pairs_of(kc));
            for i in 0..ROWS {
                for kp in 0..lda {
                    let at = |k: usize| {
                        if i < rows && k < kc {
                            bf(w[i * kdim + kc0 + k])
                        } else {
                            0
                        }
                    };
                    let want = at(2 * kp) | (at(2 * kp + 1) << 16);
                    assert_eq!(panel[i * lda + kp], want, "block {kc0}, row {i}, pair {kp}");
                }
            }
        }
    }
}
