//! Convolution as brisk's own blocked GEMM on AVX-512 or AVX2: the weights packed once
//! per call into 8-row panels, the image operand either read in place from a zero-padded
//! copy (stride 1, output rows of 16k positions: [`Direct`]) or packed straight from the
//! image (im2col fused into the packing, so no im2col matrix is written and re-read: row
//! runs by masked loads, small maps by AVX-512 gathers), and an 8 x 32 micro-kernel (8
//! output channels x 32 output positions: in registers at once on AVX-512, in four
//! 4 x 16 passes on AVX2).
//!
//! `conv.rs` uses it, when the CPU has AVX-512 or AVX2 ([`isa::simd`]), for the forward
//! pass and for the input gradient of stride-1 convolutions (a convolution of the output
//! gradient with the flipped, transposed weight, packed straight from the weight);
//! elsewhere the `gemm` crate's path runs. Both are tested against each other and against
//! candle.

use rayon::prelude::*;

use crate::shape::ConvShape;

pub(crate) mod amx;
pub(crate) mod bf16;
pub(crate) mod isa;
pub(crate) mod wgrad;

use isa::Simd;

/// Output channels per micro-kernel tile (rows of the packed weight panels).
const MR: usize = 8;
/// Output positions per micro-kernel tile: two 16-float vectors.
const NR: usize = 32;
/// Reduction rows per block: a weight block (channels x KC) stays in L2, an 8-row panel of
/// it and a 32-position image panel in L1.
const KC: usize = 256;
/// Output positions per block (a multiple of NR): the image panel (KC x NC) stays in L2.
pub(crate) const NC: usize = 256;

/// Output channels below which the packed kernels lose to im2col + `gemm`: each packed
/// image value then feeds too few products to pay for its packing (measured at width
/// 0.125, 8–64 channels: 10–20% slower).
const MIN_ROWS: usize = 64;

/// Whether the convolution `g` runs on the packed kernels: the CPU has them, and either
/// it has [`MIN_ROWS`] output channels or it runs directly (nothing packed per block,
/// see [`Direct`]) with at least one micro-kernel tile of them and a reduction of at
/// least 64 rows (a 1-channel stem's 9 ran slower than im2col + `gemm`). On AVX2 a
/// packed image panel must be packed from output rows of 16 positions or more: on
/// smaller maps (gathers, short runs) the AVX2 kernel lost to im2col + `gemm` (AMD EPYC,
/// width 1, batch 32: the 8x8 and 4x4 layers' forward 16.9–17.6 against 14.3–15.5 ms).
pub(crate) fn pays(g: &ConvShape) -> bool {
    let packs = g.cout >= MIN_ROWS && (isa::simd() == Some(Simd::Avx512) || g.wo >= 16);
    let direct = g.cout >= MR && Direct::applies(g);
    available() && (packs || (direct && (g.cout >= MIN_ROWS || g.kdim() >= 64)))
}

/// Output channels from which a direct convolution computes on whole-vector rows only,
/// never on padded rows: at 256 channels on 8x8 maps the packed path (every position
/// useful, its packing spread over many channels) beat padded rows (80% useful) by 8%,
/// while at 64 channels on 7x7 maps padded rows beat it by 1.27x.
const PADDED_ROWS_BELOW: usize = 128;

/// Whether this CPU runs the packed kernels (x86-64 with AVX-512F, or AVX2 and FMA).
pub(crate) fn available() -> bool {
    isa::simd().is_some()
}

/// A weight matrix `[rows, kdim]` packed for the micro-kernel: for each block of KC
/// reduction rows, for each block of MR rows, `kc` groups of MR values (row-minor), rows
/// past `rows` zero. A reduction block's panels are contiguous, so the weight block a
/// block of positions multiplies is one stretch of memory.
pub(crate) struct PackedWeight {
    data: Vec<f32>,
    /// The same weight in bf16 when the products run in bf16 ([`PackedWeight::in_bf16`]).
    half: HalfWeight,
    rows: usize,
    kdim: usize,
}

/// A packed weight's bf16 copy, in the layout its [`bf16::Path`] reads.
enum HalfWeight {
    /// f32 products: no copy.
    None,
    /// Pairs for `vdpbf16ps` ([`bf16::weight_pairs`]).
    Pairs(Vec<u32>),
    /// Rows of pairs for AMX tiles ([`amx::weight_tiles`]), and what multiplies them.
    Tiles(Vec<u32>, amx::Unit),
}

thread_local! {
    /// The last packed weight's buffer, kept for the next (a fresh one would be zeroed
    /// or faulted in at every call: 9 MB for a layer4 convolution).
    static SPARE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for PackedWeight {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // A thread being torn down has no spare to keep.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.capacity() < data.capacity() {
                *s = data;
            }
        });
    }
}

impl PackedWeight {
    /// Packs the `rows x kdim` matrix whose element (row, r) is `w[row * stride + at[r]]`;
    /// reduction blocks are packed in parallel. Both layouts brisk packs have this form,
    /// so the loops index memory directly (a callback per element, or a division per
    /// element for the flipped weight, made packing 4-5% of a batch-32 step).
    pub(crate) fn strided(w: &[f32], rows: usize, stride: usize, at: &[usize]) -> Self {
        let kdim = at.len();
        let padded = rows.div_ceil(MR) * MR;
        let mut data = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
        // Every element is written below; resizing keeps old values where it can.
        data.resize(padded * kdim, 0.0);
        data.par_chunks_mut((padded * KC).max(1))
            .enumerate()
            .for_each(|(kb, block)| {
                let (kc0, kc) = (kb * KC, block.len() / padded);
                let at = &at[kc0..kc0 + kc];
                for (b, panel) in block.chunks_mut(kc * MR).enumerate() {
                    let row0 = b * MR;
                    let full = (rows - row0).min(MR);
                    for (group, &o) in panel.chunks_mut(MR).zip(at) {
                        for (i, d) in group[..full].iter_mut().enumerate() {
                            *d = w[(row0 + i) * stride + o];
                        }
                        group[full..].fill(0.0);
                    }
                }
            });
        PackedWeight {
            data,
            half: HalfWeight::None,
            rows,
            kdim,
        }
    }

    /// This weight multiplied in bf16 on `path` (one the CPU has: [`isa::bf16_path`]): each
    /// value rounded to bf16, and the image operand rounded as it is paired.
    pub(crate) fn in_bf16(mut self, path: bf16::Path) -> Self {
        self.half = match path {
            bf16::Path::Dot => HalfWeight::Pairs(bf16::weight_pairs(&self.data, self.blocks(), self.kdim)),
            bf16::Path::Tiles(unit) => {
                HalfWeight::Tiles(amx::weight_tiles(&self.data, self.rows, self.kdim), unit)
            }
        };
        self
    }

    /// The row-major `[rows, kdim]` weight of a convolution.
    pub(crate) fn rows(w: &[f32], rows: usize, kdim: usize) -> Self {
        let at: Vec<usize> = (0..kdim).collect();
        Self::strided(w, rows, kdim, &at)
    }

    fn blocks(&self) -> usize {
        self.rows.div_ceil(MR)
    }

    /// Reduction rows `kc0..kc0 + kc` (a whole reduction block) of row block `b`: `kc`
    /// groups of MR values.
    fn panel(&self, b: usize, kc0: usize, kc: usize) -> &[f32] {
        &self.data[kc0 * self.blocks() * MR + b * kc * MR..][..kc * MR]
    }
}

/// Scratch floats one call of [`conv_images`] needs for `count` images of `g`: the image
/// panel, the accumulator ([`acc_rows`] rows) and, for direct convolutions, the padded
/// images.
pub(crate) fn scratch_len(g: &ConvShape, count: usize) -> usize {
    KC * NC + acc_rows(g) * NC + Direct::padded_len(g, count)
}

/// Rows of the accumulator: `g.cout` rounded up to a whole block of the largest kernel
/// (AMX's 32 rows; a multiple of the vector kernels' MR).
fn acc_rows(g: &ConvShape) -> usize {
    g.cout.next_multiple_of(amx::ROWS)
}

/// The convolution `g` of images `first..first + count` of `x` with the packed weight
/// `a` (`g.cout` rows of `g.cin * k * k`), written to `out` (those images' outputs,
/// `[count, cout, ho, wo]`). `scratch` holds at least [`scratch_len`]`(g.cout)` floats.
pub(crate) fn conv_images(
    g: &ConvShape,
    x: &[f32],
    a: &PackedWeight,
    first: usize,
    count: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (panel, rest) = scratch.split_at_mut(KC * NC);
    let (acc, padded) = rest.split_at_mut(acc_rows(g) * NC);
    let direct = Direct::new(g, x, first, count, padded);
    // Direct convolutions compute more positions than they store (see `Grid`).
    let grid = match &direct {
        Some(_) => Direct::grid(g),
        None => Grid::dense(g),
    };
    let positions = count * grid.per_image;
    for p0 in (0..positions).step_by(NC) {
        let np = NC.min(positions - p0);
        match &direct {
            Some(d) => d.conv_block(a, p0, np, acc),
            None => conv_block(g, x, a, first, p0, np, panel, acc),
        }
        store(g, grid, acc, p0, np, out);
    }
}

/// Which positions a block of output computes and where they go: `row` positions per
/// output row, of which the first `wo` are stored, and `per_image` positions per image,
/// of which the first `ho` rows are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grid {
    row: usize,
    per_image: usize,
}

impl Grid {
    /// Every position computed is an output position.
    fn dense(g: &ConvShape) -> Grid {
        Grid {
            row: g.wo,
            per_image: g.out_hw(),
        }
    }

    /// Output positions among those computed.
    fn useful(&self, g: &ConvShape) -> f64 {
        g.out_hw() as f64 / self.per_image as f64
    }
}

/// Direct convolution, for stride-1 convolutions (and stride-2 ones on phase planes,
/// [`Planes`]): the group's images are copied once with their zero padding, and the
/// micro-kernel loads each 16-position vector of the image operand straight from that
/// copy (row `ki`, column `kj` of a run of output positions' windows is one contiguous
/// run there) instead of packing an im2col panel for every reduction block: for
/// 64-channel layers that packing cost a third of the products' time. A vector must be
/// contiguous in the copy, so positions are computed on a grid ([`Direct::grid`]) wider
/// than the output: either each output row rounded up to whole vectors (28 → 32), or the
/// copy's row itself (a 7-wide output row of a 3x3 convolution computed as the 9 columns
/// of its padded row, so vectors run on into the next row), each image's positions
/// rounded up to whole vectors; the extra positions read padding or the next row and are
/// not stored. It runs where at least three quarters of the computed positions are
/// output ones.
struct Direct<'a> {
    g: ConvShape,
    planes: Planes,
    /// The images as [`Planes`] lays them out.
    padded: &'a [f32],
}

impl<'a> Direct<'a> {
    /// Whether `g` runs directly: its images can be laid out as [`Planes`], at least three
    /// quarters of the computed positions ([`Direct::grid`]) are output ones, on a CPU
    /// with the packed kernels; stride 2 only for output rows of a whole vector or more
    /// (measured, width 0.125: 16x16 outputs 0.26–0.27 ms against im2col + `gemm`'s
    /// 0.32–0.39, 8x8 outputs 0.22–0.30 against 0.17–0.19).
    fn applies(g: &ConvShape) -> bool {
        available()
            && g.wo > 0
            && (g.stride == 1 || g.wo >= 16)
            && Planes::of(g).is_some()
            && Self::grid(g).useful(g) >= 0.75
    }

    /// The positions computed: output rows rounded up to whole vectors, or, under
    /// [`PADDED_ROWS_BELOW`] output channels, the copy's rows where they waste less; per
    /// image, rounded up to whole vectors (so no vector spans two images).
    fn grid(g: &ConvShape) -> Grid {
        let on = |row: usize| Grid {
            row,
            per_image: (g.ho * row).next_multiple_of(16),
        };
        let copied = Planes::of(g).map_or(g.wo, |p| p.row);
        let (rounded, padded) = (on(g.wo.next_multiple_of(16)), on(copied));
        if g.cout < PADDED_ROWS_BELOW && padded.per_image < rounded.per_image {
            padded
        } else {
            rounded
        }
    }

    /// Floats of the copy of `count` images (0 where `g` does not run directly), with
    /// room after it for the last image's computed positions past its end (at most a
    /// vector and a kernel row past the copy, at any grid).
    fn padded_len(g: &ConvShape, count: usize) -> usize {
        match Planes::of(g).filter(|_| Self::applies(g)) {
            Some(planes) => count * planes.image(g) + Self::grid(g).row + 2 * g.k + 32,
            None => 0,
        }
    }

    /// Copies images `first..first + count` of `x` into `buf` as [`Planes`] lays them out,
    /// or `None` where `g` does not run directly.
    fn new(g: &ConvShape, x: &[f32], first: usize, count: usize, buf: &'a mut [f32]) -> Option<Self> {
        let planes = Planes::of(g).filter(|_| Self::applies(g))?;
        let padded = &mut buf[..Self::padded_len(g, count)];
        let images = count * planes.image(g);
        padded[images..].fill(0.0);
        planes.copy(g, x, first, &mut padded[..images]);
        Some(Direct {
            g: *g,
            planes,
            padded,
        })
    }

    /// [`conv_block`]'s products, the image operand read from the copy.
    fn conv_block(&self, a: &PackedWeight, p0: usize, np: usize, acc: &mut [f32]) {
        let (g, planes) = (&self.g, self.planes);
        let (k, grid) = (g.k, Self::grid(g));
        // Where the 16 positions from `q` (on the grid) start in the copy: the window's
        // corner.
        let start = |q: usize| {
            let (img, rem) = (q / grid.per_image, q % grid.per_image);
            img * planes.image(g) + rem / grid.row * planes.row + rem % grid.row
        };
        let mut offsets = [0usize; KC];
        for kc0 in (0..a.kdim).step_by(KC) {
            let kc = KC.min(a.kdim - kc0);
            // Reduction row r = (channel, ki, kj) reads the window shifted by this.
            for (kk, o) in offsets[..kc].iter_mut().enumerate() {
                let r = kc0 + kk;
                *o = planes.tap(r / (k * k), r / k % k, r % k);
            }
            for nb in 0..np.div_ceil(NR) {
                let q = p0 + nb * NR;
                // A partial last group (fewer than 32 positions) computes its second
                // vector from the first's data; those columns of `acc` are not stored.
                let second = if np - nb * NR > 16 {
                    start(q + 16)
                } else {
                    start(q)
                };
                let src =
                    DirectPanel::new([&self.padded[start(q)..], &self.padded[second..]], &offsets[..kc]);
                products(a, (kc0, kc), &src, acc, nb * NR);
            }
        }
    }
}

/// How direct kernels lay out an image so that every tap of a window is a contiguous
/// run: stride 1, each channel its zero-padded plane (`h + 2 pad` rows of `w + 2 pad`);
/// stride 2 (kernels of 3 or more), each channel four phase planes — the padded plane's
/// rows of one parity and columns of one parity, `rows` x `row` each, half the padded
/// size rounded up — so that input (2 oh + ki, 2 ow + kj) is phase (ki % 2, kj % 2) at
/// (oh + ki / 2, ow + kj / 2). Output positions then run on rows of `row`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    /// Planes per channel: 1 or 4.
    pub phases: usize,
    pub rows: usize,
    pub row: usize,
}

impl Planes {
    /// The layout for `g`, or `None` for other strides (and 1x1 stride-2 kernels, which
    /// would copy three phases they never read).
    pub(crate) fn of(g: &ConvShape) -> Option<Planes> {
        let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
        match (g.stride, g.k) {
            (1, _) => Some(Planes {
                phases: 1,
                rows: hp,
                row: wp,
            }),
            (2, k) if k >= 3 => Some(Planes {
                phases: 4,
                rows: hp.div_ceil(2),
                row: wp.div_ceil(2),
            }),
            _ => None,
        }
    }

    pub(crate) fn plane(&self) -> usize {
        self.rows * self.row
    }

    /// Floats of one image's copy.
    pub(crate) fn image(&self, g: &ConvShape) -> usize {
        g.cin * self.phases * self.plane()
    }

    /// Where tap (ki, kj) of channel `c` of the window at an output position lies, from
    /// that position's place on the rows (`oh * row + ow`) in the image's copy.
    pub(crate) fn tap(&self, c: usize, ki: usize, kj: usize) -> usize {
        let (phase, down, right) = match self.phases {
            1 => (0, ki, kj),
            _ => ((ki % 2) * 2 + kj % 2, ki / 2, kj / 2),
        };
        (c * self.phases + phase) * self.plane() + down * self.row + right
    }

    /// Copies images `first..` of `x` (`[n, cin, h, w]`; as many as `dst` holds) into
    /// `dst` in this layout.
    pub(crate) fn copy(&self, g: &ConvShape, x: &[f32], first: usize, dst: &mut [f32]) {
        let count = dst.len() / self.image(g).max(1);
        if self.phases == 1 {
            return pad_images(g, x, first, count, dst);
        }
        for (ic, planes) in dst.chunks_exact_mut(self.phases * self.plane()).enumerate() {
            let src = &x[(first * g.cin + ic) * g.h * g.w..][..g.h * g.w];
            for (phase, out) in planes.chunks_exact_mut(self.plane()).enumerate() {
                let (a, b) = (phase / 2, phase % 2);
                for (i, out_row) in out.chunks_exact_mut(self.row).enumerate() {
                    let ih = (2 * i + a).checked_sub(g.pad).filter(|&ih| ih < g.h);
                    for (j, o) in out_row.iter_mut().enumerate() {
                        let iw = (2 * j + b).checked_sub(g.pad).filter(|&iw| iw < g.w);
                        *o = match (ih, iw) {
                            (Some(ih), Some(iw)) => src[ih * g.w + iw],
                            _ => 0.0,
                        };
                    }
                }
            }
        }
    }
}

/// Copies images `first..first + count` of `x` (`[n, cin, h, w]`) into `dst`, each channel
/// a `(h + 2 pad) x (w + 2 pad)` plane with zeros around; `dst` holds exactly those planes.
fn pad_images(g: &ConvShape, x: &[f32], first: usize, count: usize, dst: &mut [f32]) {
    let (pad, plane) = (g.pad, g.h * g.w);
    let (hp, wp) = (g.h + 2 * pad, g.w + 2 * pad);
    assert_eq!(dst.len(), count * g.cin * hp * wp);
    let src = &x[first * g.cin * plane..][..count * g.cin * plane];
    for (dst, src) in dst.chunks_mut(hp * wp).zip(src.chunks(plane)) {
        dst[..pad * wp].fill(0.0);
        dst[(pad + g.h) * wp..].fill(0.0);
        for (drow, srow) in dst[pad * wp..].chunks_mut(wp).zip(src.chunks(g.w)) {
            drow[..pad].fill(0.0);
            drow[pad..pad + g.w].copy_from_slice(srow);
            drow[pad + g.w..].fill(0.0);
        }
    }
}

/// A run of output positions in one output row: `run` positions from column `ow` of row
/// `oh` of image `img`, packed at offset `j` of its NR-wide column group `nb`.
#[derive(Clone, Copy, Debug)]
struct Run {
    nb: usize,
    j: usize,
    run: usize,
    img: usize,
    oh: usize,
    ow: usize,
}

/// The runs of positions `p0..p0 + np` (counted from image `first`), by column group.
fn runs(g: &ConvShape, first: usize, p0: usize, np: usize) -> Vec<Run> {
    let howo = g.out_hw();
    let mut out = Vec::with_capacity(np / g.wo.max(1) + 2 * np.div_ceil(NR));
    for nb in 0..np.div_ceil(NR) {
        let q0 = p0 + nb * NR;
        let qn = NR.min(np - nb * NR);
        let mut j = 0;
        while j < qn {
            let p = q0 + j;
            let rem = p % howo;
            let (oh, ow) = (rem / g.wo, rem % g.wo);
            let run = (g.wo - ow).min(qn - j);
            out.push(Run {
                nb,
                j,
                run,
                img: first + p / howo,
                oh,
                ow,
            });
            j += run;
        }
    }
    out
}

/// How a block's image panels are packed: by gathers (small maps), or by row runs with
/// each kernel column's valid output range ([`ConvShape::valid_cols`]).
enum Packing {
    Gathers(Gathers),
    Runs {
        runs: Vec<Run>,
        cols: Vec<(usize, usize)>,
    },
}

/// Output positions `p0..p0 + np` (counted from image `first`) of every channel into
/// `acc` `[blocks * MR, NC]`.
#[allow(clippy::too_many_arguments)]
fn conv_block(
    g: &ConvShape,
    x: &[f32],
    a: &PackedWeight,
    first: usize,
    p0: usize,
    np: usize,
    panel: &mut [f32],
    acc: &mut [f32],
) {
    let kdim = a.kdim;
    let groups = np.div_ceil(NR);
    let packing = match Gathers::new(g, first, p0, np) {
        Some(gathers) => Packing::Gathers(gathers),
        None => Packing::Runs {
            runs: runs(g, first, p0, np),
            cols: (0..g.k).map(|kj| g.valid_cols(kj)).collect(),
        },
    };
    for kc0 in (0..kdim).step_by(KC) {
        let kc = KC.min(kdim - kc0);
        match &packing {
            Packing::Gathers(gathers) => gathers.pack(g, x, kc0, kc, panel),
            Packing::Runs { runs, cols } => pack_image(g, x, runs, cols, groups, kc0, kc, panel),
        }
        // Each image micro-panel (kc x NR, in L1) meets every weight panel (streamed
        // from L2, where the weight block fits).
        for nb in 0..groups {
            let bp = PackedPanel(&panel[nb * KC * NR..][..kc * NR]);
            products(a, (kc0, kc), &bp, acc, nb * NR);
        }
    }
}

/// Packs reduction rows `kc0..kc0 + kc` (r = (channel, ki, kj)) of the im2col matrix
/// for the positions of `runs` into `panel`: for each of the `groups` NR-wide column
/// groups, `kc` rows of NR values (zero outside the image and past the last position).
/// `cols[kj]` is [`ConvShape::valid_cols`] of `kj`.
#[allow(clippy::too_many_arguments)]
fn pack_image(
    g: &ConvShape,
    x: &[f32],
    runs: &[Run],
    cols: &[(usize, usize)],
    groups: usize,
    kc0: usize,
    kc: usize,
    panel: &mut [f32],
) {
    let k = g.k;
    // Positions past the last run (a partial last group) stay zero.
    if let Some(last) = runs.last() {
        let end = last.j + last.run;
        if end < NR {
            let sub = &mut panel[last.nb * KC * NR..][..kc * NR];
            sub.chunks_mut(NR).for_each(|row| row[end..].fill(0.0));
        }
    }
    debug_assert!(runs.iter().all(|r| r.nb < groups));
    for kk in 0..kc {
        let r = kc0 + kk;
        let (c, ki, kj) = (r / (k * k), r / k % k, r % k);
        let (lo, hi) = cols[kj];
        for run in runs {
            let dst = &mut panel[(run.nb * KC + kk) * NR + run.j..][..run.run];
            match (run.oh * g.stride + ki).checked_sub(g.pad).filter(|&ih| ih < g.h) {
                None => dst.fill(0.0),
                Some(ih) => {
                    let row = &x[((run.img * g.cin + c) * g.h + ih) * g.w..][..g.w];
                    fill_row(g, row, (lo, hi), kj, run.ow, dst);
                }
            }
        }
    }
}

/// `seg[t]` = the input at column `(ow + t) * stride + kj - pad` of `row`, 0 outside;
/// `(lo, hi)` are the output columns whose input lies inside the row.
fn fill_row(g: &ConvShape, row: &[f32], (lo, hi): (usize, usize), kj: usize, ow: usize, seg: &mut [f32]) {
    if g.stride == 1
        && seg.len() <= NR
        && fill_run(isa::simd(), row, (ow + kj) as isize - g.pad as isize, seg)
    {
        return;
    }
    let (a, b) = (lo.max(ow), hi.min(ow + seg.len()));
    if a >= b {
        seg.fill(0.0);
        return;
    }
    seg[..a - ow].fill(0.0);
    seg[b - ow..].fill(0.0);
    let start = a * g.stride + kj - g.pad;
    let dst = &mut seg[a - ow..b - ow];
    if g.stride == 1 {
        dst.copy_from_slice(&row[start..start + dst.len()]);
    } else {
        for (t, d) in dst.iter_mut().enumerate() {
            *d = row[start + t * g.stride];
        }
    }
}

/// `seg[t] = row[start + t]` where that index lies in `row`, else 0, for `seg` of at
/// most NR values, by masked loads on `simd` (lanes outside `row` are not read); false
/// (nothing written) without vector instructions.
fn fill_run(simd: Option<Simd>, row: &[f32], start: isize, seg: &mut [f32]) -> bool {
    assert!(seg.len() <= NR);
    #[cfg(target_arch = "x86_64")]
    match simd.filter(|s| s.supported()) {
        // SAFETY (both): the features were detected; the functions read only
        // row[start + t] for t < seg.len() with 0 <= start + t < row.len(), and write
        // seg[..seg.len()], at most 32 values.
        Some(Simd::Avx512) => {
            unsafe { fill_run_avx512(row, start, seg) };
            return true;
        }
        Some(Simd::Avx2) => {
            unsafe { fill_run_avx2(row, start, seg) };
            return true;
        }
        None => {}
    }
    false
}

/// Lanes `t < lanes` of a vector of `n` lanes starting at `row[first]` that lie inside a
/// row of `w` values: `t` in the returned `lo..hi`.
#[cfg(target_arch = "x86_64")]
fn lanes_inside(first: isize, lanes: usize, w: isize, n: isize) -> (u32, u32) {
    let lo = (-first).clamp(0, n) as u32;
    let hi = (w - first).clamp(0, lanes as isize) as u32;
    (lo, hi.max(lo))
}

/// [`fill_run`] by two masked 16-lane loads.
///
/// # Safety
/// The CPU must have AVX-512F; `seg.len() <= 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_run_avx512(row: &[f32], start: isize, seg: &mut [f32]) {
    use std::arch::x86_64::*;
    let (w, len) = (row.len() as isize, seg.len());
    for half in 0..len.div_ceil(16) {
        let first = start + 16 * half as isize;
        let lanes = (len - 16 * half).min(16);
        let (lo, hi) = lanes_inside(first, lanes, w, 16);
        let below = |n: u32| ((1u32 << n) - 1) as u16;
        let mask = below(hi) & !below(lo);
        // SAFETY: masked-off lanes are neither read nor faulted on; enabled lanes read
        // row[first + t], inside row; the pointer is only formed with wrapping arithmetic.
        // The store writes `lanes` values inside seg.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_offset(first));
            let store: u16 = if lanes == 16 {
                u16::MAX
            } else {
                (1u16 << lanes) - 1
            };
            _mm512_mask_storeu_ps(seg.as_mut_ptr().add(16 * half), store, v);
        }
    }
}

/// [`fill_run`] by masked 8-lane loads (`vmaskmovps`: lanes off the mask are neither
/// read nor faulted on).
///
/// # Safety
/// The CPU must have AVX2; `seg.len() <= 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_run_avx2(row: &[f32], start: isize, seg: &mut [f32]) {
    use std::arch::x86_64::*;
    let (w, len) = (row.len() as isize, seg.len());
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // Lanes t with lo <= t < hi: all bits set in the lanes a mask enables.
    let between = |lo: u32, hi: u32| {
        let above = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo as i32 - 1));
        _mm256_and_si256(above, _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), lane))
    };
    for part in 0..len.div_ceil(8) {
        let first = start + 8 * part as isize;
        let lanes = (len - 8 * part).min(8);
        let (lo, hi) = lanes_inside(first, lanes, w, 8);
        // SAFETY: masked-off lanes are neither read nor faulted on; enabled lanes read
        // row[first + t], inside row; the pointer is only formed with wrapping arithmetic.
        // The store writes `lanes` values inside seg.
        unsafe {
            let v = _mm256_maskload_ps(row.as_ptr().wrapping_offset(first), between(lo, hi));
            _mm256_maskstore_ps(seg.as_mut_ptr().add(8 * part), between(0, lanes as u32), v);
        }
    }
}

/// Packing by vector gathers, for small output maps (rows of fewer than 16 positions,
/// where copying row runs costs more than the products) whose planes hold whole 16-lane
/// vectors: for each vector of 16 positions and each kernel offset (ki, kj), the offsets of
/// its input values in a channel plane and which of them lie inside it.
///
/// Invariant (what makes the gathers safe): a lane's mask bit is set only where its offset
/// `ih * w + iw` has `ih < h` and `iw < w`, inside the `h * w` plane.
struct Gathers {
    /// Per vector: its image.
    img: Vec<usize>,
    /// Per (vector, offset): the 16 in-plane offsets (0 where outside) and the lane mask.
    idx: Vec<[i32; 16]>,
    mask: Vec<u16>,
}

impl Gathers {
    /// `None` unless this CPU gathers (AVX-512), rows are shorter than 16 positions and every
    /// 16-position vector lies in one image.
    fn new(g: &ConvShape, first: usize, p0: usize, np: usize) -> Option<Self> {
        let howo = g.out_hw();
        if isa::simd() != Some(Simd::Avx512)
            || g.wo >= 16
            || !howo.is_multiple_of(16)
            || !p0.is_multiple_of(16)
            || g.h * g.w > i32::MAX as usize
        {
            return None;
        }
        let (k, vectors) = (g.k, np.div_ceil(16));
        let mut out = Gathers {
            img: Vec::with_capacity(vectors),
            idx: Vec::with_capacity(vectors * k * k),
            mask: Vec::with_capacity(vectors * k * k),
        };
        for v in 0..vectors {
            let p = p0 + v * 16;
            out.img.push(first + p / howo);
            for ki in 0..k {
                for kj in 0..k {
                    let (mut idx, mut mask) = ([0i32; 16], 0u16);
                    for (t, slot) in idx.iter_mut().enumerate() {
                        let rem = (p + t) % howo;
                        let (oh, ow) = (rem / g.wo, rem % g.wo);
                        let ih = (oh * g.stride + ki).checked_sub(g.pad).filter(|&ih| ih < g.h);
                        let iw = (ow * g.stride + kj).checked_sub(g.pad).filter(|&iw| iw < g.w);
                        if let (Some(ih), Some(iw), true) = (ih, iw, p + t < p0 + np) {
                            *slot = (ih * g.w + iw) as i32;
                            mask |= 1 << t;
                        }
                    }
                    out.idx.push(idx);
                    out.mask.push(mask);
                }
            }
        }
        Some(out)
    }

    /// [`pack_image`] by gathers.
    fn pack(&self, g: &ConvShape, x: &[f32], kc0: usize, kc: usize, panel: &mut [f32]) {
        let (kk, plane) = (g.k * g.k, g.h * g.w);
        let vectors = self.img.len();
        if vectors % 2 == 1 {
            // The last group's second vector has no positions.
            let sub = &mut panel[(vectors / 2) * KC * NR..][..kc * NR];
            sub.chunks_mut(NR).for_each(|row| row[16..].fill(0.0));
        }
        for r in kc0..kc0 + kc {
            let (c, off) = (r / kk, r % kk);
            for (v, &img) in self.img.iter().enumerate() {
                let base = &x[(img * g.cin + c) * plane..][..plane];
                let dst = &mut panel[((v / 2) * KC + r - kc0) * NR + (v % 2) * 16..][..16];
                // SAFETY: by the struct's invariant every enabled lane's offset lies in
                // the plane, and `base` is the whole plane.
                unsafe { gather16(base, &self.idx[v * kk + off], self.mask[v * kk + off], dst) };
            }
        }
    }
}

/// `dst[t] = base[idx[t]]` where bit t of `mask` is set, else 0.
///
/// # Safety
/// Every lane enabled in `mask` must have `0 <= idx[t] < base.len()` (checked once, when
/// the indices are built, instead of at each of the millions of calls).
unsafe fn gather16(base: &[f32], idx: &[i32; 16], mask: u16, dst: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { gather16_on(isa::simd(), base, idx, mask, dst) }
}

/// [`gather16`] on `simd`'s gathers (scalar loads where `None` or AVX2).
///
/// # Safety
/// As [`gather16`].
unsafe fn gather16_on(simd: Option<Simd>, base: &[f32], idx: &[i32; 16], mask: u16, dst: &mut [f32]) {
    assert!(dst.len() >= 16);
    #[cfg(target_arch = "x86_64")]
    match simd.filter(|s| s.supported()) {
        // SAFETY: AVX-512F was detected; every lane the mask enables reads base[idx[t]],
        // inside `base` by the caller's contract; the store writes dst[..16].
        Some(Simd::Avx512) => {
            unsafe { gather16_avx512(base.as_ptr(), idx, mask, dst.as_mut_ptr()) };
            return;
        }
        Some(Simd::Avx2) | None => {}
    }
    for t in 0..16 {
        dst[t] = if mask & (1 << t) != 0 {
            base[idx[t] as usize]
        } else {
            0.0
        };
    }
}

/// # Safety
/// The CPU must have AVX-512F; every lane enabled in `mask` must index inside the
/// allocation `base` points into; `dst` must hold 16 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather16_avx512(base: *const f32, idx: &[i32; 16], mask: u16, dst: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let vindex = _mm512_loadu_si512(idx.as_ptr().cast());
        let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, vindex, base.cast());
        _mm512_storeu_ps(dst, v);
    }
}

/// Copies positions `p0..p0 + np` of `acc` (rows = output channels; positions on
/// `grid`) that are output positions to their images' places in `out`
/// `[count, cout, ho, wo]`.
fn store(g: &ConvShape, grid: Grid, acc: &[f32], p0: usize, np: usize, out: &mut [f32]) {
    let howo = g.out_hw();
    let mut copy = |img: usize, at: usize, j: usize, run: usize| {
        for co in 0..g.cout {
            out[(img * g.cout + co) * howo + at..][..run].copy_from_slice(&acc[co * NC + j..][..run]);
        }
    };
    let dense = grid == Grid::dense(g);
    let mut j = 0;
    while j < np {
        let p = p0 + j;
        let (img, rem) = (p / grid.per_image, p % grid.per_image);
        if dense {
            // Every position stored: runs reach to the image's end.
            let run = (howo - rem).min(np - j);
            copy(img, rem, j, run);
            j += run;
        } else if rem >= g.ho * grid.row {
            // Past the image's last row.
            j += (grid.per_image - rem).min(np - j);
        } else {
            let (oh, ow) = (rem / grid.row, rem % grid.row);
            let computed = (grid.row - ow).min(np - j);
            let run = g.wo.saturating_sub(ow).min(computed);
            if run > 0 {
                copy(img, oh * g.wo + ow, j, run);
            }
            j += computed;
        }
    }
}

/// The image operand of one micro-kernel call: `kc` rows of NR values, each row two
/// 16-value halves somewhere in memory.
trait ImagePanel {
    /// Whether rows `0..kc` lie inside the memory the operand borrows.
    fn holds(&self, kc: usize) -> bool;
    /// Where row `k`'s two halves start (dereferenced only where `holds` covers `k`).
    fn halves(&self, k: usize) -> [*const f32; 2];
}

/// A packed panel: `kc` rows of NR values one after another.
struct PackedPanel<'a>(&'a [f32]);

impl ImagePanel for PackedPanel<'_> {
    fn holds(&self, kc: usize) -> bool {
        self.0.len() >= kc * NR
    }

    #[inline(always)]
    fn halves(&self, k: usize) -> [*const f32; 2] {
        let row = self.0.as_ptr().wrapping_add(k * NR);
        [row, row.wrapping_add(16)]
    }
}

/// Rows read in place: row `k`'s halves are 16 values at `offsets[k]` from each base.
struct DirectPanel<'a> {
    base: [&'a [f32]; 2],
    offsets: &'a [usize],
}

impl<'a> DirectPanel<'a> {
    /// Checks once that every offset's 16 values lie inside both bases (instead of at
    /// every row of every call).
    fn new(base: [&'a [f32]; 2], offsets: &'a [usize]) -> Self {
        let end = offsets.iter().max().map_or(0, |&o| o + 16);
        assert!(
            base.iter().all(|b| b.len() >= end),
            "direct panel reads past its images"
        );
        DirectPanel { base, offsets }
    }
}

impl ImagePanel for DirectPanel<'_> {
    fn holds(&self, kc: usize) -> bool {
        self.offsets.len() >= kc
    }

    #[inline(always)]
    fn halves(&self, k: usize) -> [*const f32; 2] {
        let o = self.offsets[k];
        self.base.map(|b| b.as_ptr().wrapping_add(o))
    }
}

thread_local! {
    /// An image micro-panel as bf16 pairs ([`bf16::image_pairs`]).
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reduction rows `kc0..kc0 + kc` of every row block of `a` times the image micro-panel
/// `b`, into columns `col..col + NR` of `acc` (`[acc_rows, NC]`): added to what is there
/// unless `kc0` is 0. In bf16 where `a` is ([`PackedWeight::in_bf16`]), else in f32.
fn products(a: &PackedWeight, (kc0, kc): (usize, usize), b: &impl ImagePanel, acc: &mut [f32], col: usize) {
    match &a.half {
        HalfWeight::None => {
            for blk in 0..a.blocks() {
                let c = &mut acc[blk * MR * NC + col..];
                kernel(kc, a.panel(blk, kc0, kc), b, c, NC, kc0 > 0);
            }
        }
        HalfWeight::Pairs(w) => with_pairs(b, kc, kc.div_ceil(2), |pairs| {
            for blk in 0..a.blocks() {
                let c = &mut acc[blk * MR * NC + col..];
                let w = bf16::weight_panel(w, a.blocks(), blk, kc0, kc);
                bf16::kernel(kc.div_ceil(2), (w, bf16::PANEL), pairs, c, NC, kc0 > 0);
            }
        }),
        HalfWeight::Tiles(w, unit) => {
            let kcp = amx::pairs_of(kc);
            with_pairs(b, kc, kcp, |pairs| {
                for rb in 0..a.rows.div_ceil(amx::ROWS) {
                    let c = &mut acc[rb * amx::ROWS * NC + col..];
                    let w = amx::weight_panel(w, a.rows, rb, kc0, kc);
                    amx::kernel(*unit, kcp, w, pairs, c, NC, kc0 > 0);
                }
            })
        }
    }
}

/// `f` on the first `kc` rows of the image micro-panel `b` as bf16 pairs
/// ([`bf16::image_pairs`]), followed by zero rows up to `rows` rows of pairs (AMX tiles
/// read whole 16-pair steps).
fn with_pairs(b: &impl ImagePanel, kc: usize, rows: usize, f: impl FnOnce(&[u32])) {
    PAIRS.with(|pairs| {
        let mut pairs = pairs.borrow_mut();
        pairs.resize(bf16::PANEL_PAIRS, 0);
        bf16::image_pairs(b, kc, &mut pairs);
        pairs[kc.div_ceil(2) * NR..rows * NR].fill(0);
        f(&pairs)
    })
}

/// Writes a micro-kernel's MR x NR accumulators `acc` (`[[__m512; 2]; MR]`) to `c` (rows
/// `ldc` apart), added to what is there when `accumulate`. A macro, not a function: in a
/// function of its own the bf16 kernel (other target features) did not inline it and kept
/// its accumulators in memory, at half the speed. Expanded inside an `unsafe fn` with
/// AVX-512F whose contract says `c` holds MR rows of NR floats `ldc` apart.
macro_rules! store_tile {
    ($acc:expr, $c:expr, $ldc:expr, $accumulate:expr) => {
        for (i, row) in $acc.iter().enumerate() {
            // SAFETY: row i of c spans c[i * ldc .. i * ldc + NR], inside c by the
            // enclosing function's contract.
            unsafe {
                let ci = $c.add(i * $ldc);
                let (mut v0, mut v1) = (row[0], row[1]);
                if $accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(ci));
                    v1 = _mm512_add_ps(v1, _mm512_loadu_ps(ci.add(16)));
                }
                _mm512_storeu_ps(ci, v0);
                _mm512_storeu_ps(ci.add(16), v1);
            }
        }
    };
}
pub(crate) use store_tile;

/// `c[i][j] (+)= Σ_k a[k][i] · b[k][j]` for an MR x NR tile: `a` is `kc` groups of MR,
/// `b` `kc` rows of NR, `c` MR rows `ldc` apart.
fn kernel(kc: usize, a: &[f32], b: &impl ImagePanel, c: &mut [f32], ldc: usize, accumulate: bool) {
    kernel_on(isa::simd(), kc, a, b, c, ldc, accumulate);
}

/// [`kernel`] on `simd`'s instructions (scalar code where `None` or where the CPU lacks
/// them).
fn kernel_on(
    simd: Option<Simd>,
    kc: usize,
    a: &[f32],
    b: &impl ImagePanel,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.len() >= kc * MR && b.holds(kc) && c.len() >= (MR - 1) * ldc + NR);
    #[cfg(target_arch = "x86_64")]
    match simd.filter(|s| s.supported()) {
        // SAFETY (both): the features were detected on this CPU; the assert above bounds
        // every access the kernels make (kc groups of MR in `a`, kc rows of NR in `b`, MR
        // rows of NR at stride ldc in `c`).
        Some(Simd::Avx512) => {
            unsafe { kernel_avx512(kc, a.as_ptr(), b, c.as_mut_ptr(), ldc, accumulate) };
            return;
        }
        Some(Simd::Avx2) => {
            unsafe { kernel_avx2(kc, a.as_ptr(), b, c.as_mut_ptr(), ldc, accumulate) };
            return;
        }
        None => {}
    }
    for i in 0..MR {
        for j in 0..NR {
            let s: f32 = (0..kc)
                .map(|k| {
                    let half = b.halves(k)[j / 16];
                    // SAFETY: `b` holds rows 0..kc (asserted above): 16 values per half.
                    a[k * MR + i] * unsafe { *half.add(j % 16) }
                })
                .sum();
            let d = &mut c[i * ldc + j];
            *d = if accumulate { *d + s } else { s };
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F; `a` must hold `kc * MR` floats, `b` must hold `kc` rows,
/// and `c` MR rows of NR floats `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: &impl ImagePanel,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for k in 0..kc {
        // SAFETY: k < kc: row k of b (two halves of 16 floats) and group k of a (MR
        // floats) are in bounds.
        unsafe {
            let [h0, h1] = b.halves(k);
            let b0 = _mm512_loadu_ps(h0);
            let b1 = _mm512_loadu_ps(h1);
            let ak = a.add(k * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ak.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
    }
    store_tile!(acc, c, ldc, accumulate);
}

/// Rows of the AVX2 micro-kernel's register tile: 4 rows x 16 positions in 8
/// accumulators (of 16 registers), each step 2 loads of the image row, 4 broadcasts of
/// the weights and 8 FMAs.
const AVX2_ROWS: usize = 4;

/// [`kernel_avx512`] on AVX2: the MR x NR tile in four passes of [`AVX2_ROWS`] rows x one
/// 16-position half, the image half-panel (16 KiB at KC rows) and the weight panel (8 KiB)
/// staying in L1 across them.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold `kc * MR` floats, `b` must hold `kc`
/// rows, and `c` MR rows of NR floats `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(
    kc: usize,
    a: *const f32,
    b: &impl ImagePanel,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        for i0 in (0..MR).step_by(AVX2_ROWS) {
            let mut acc = [[_mm256_setzero_ps(); 2]; AVX2_ROWS];
            for k in 0..kc {
                // SAFETY: k < kc: row k of b (its half `half`: 16 floats) and group k of
                // a (rows i0..i0 + AVX2_ROWS of MR) are in bounds.
                unsafe {
                    let h = b.halves(k)[half];
                    let b0 = _mm256_loadu_ps(h);
                    let b1 = _mm256_loadu_ps(h.add(8));
                    let ak = a.add(k * MR + i0);
                    for (i, row) in acc.iter_mut().enumerate() {
                        let ai = _mm256_broadcast_ss(&*ak.add(i));
                        row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                        row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                // SAFETY: row i0 + i of c, positions 16 half..16 half + 16, lie inside c
                // by the contract.
                unsafe {
                    let ci = c.add((i0 + i) * ldc + 16 * half);
                    let (mut v0, mut v1) = (row[0], row[1]);
                    if accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci.add(8)));
                    }
                    _mm256_storeu_ps(ci, v0);
                    _mm256_storeu_ps(ci.add(8), v1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grid each CIFAR map size computes on: the one wasting less, or none where a
    /// quarter or more would be waste.
    #[test]
    fn direct_grids_waste_under_a_quarter() {
        let grid = |side: usize| {
            let g = ConvShape::new(&[2, 16, side, side], &[16, 16, 3, 3], 1, 1).expect("shape");
            (Direct::grid(&g), Direct::applies(&g))
        };
        // (side, computed per row, per image): 32 and 16 on whole vectors, 28, 12, 8 and 7
        // on their padded rows (30, 14, 10, 9), 4x4 maps not at all (a third wasted).
        for (side, row, per_image, runs) in [
            (32, 32, 1024, true),
            (28, 30, 848, true),
            (16, 16, 256, true),
            (14, 16, 224, true),
            (12, 14, 176, true),
            (8, 10, 80, true),
            (7, 9, 64, true),
            (4, 6, 32, false),
        ] {
            assert_eq!(
                grid(side),
                (Grid { row, per_image }, runs && available()),
                "{side}x{side}"
            );
        }
        // Stride 2 on phase planes: a 32x32 input gives 16x16 outputs, whole vectors; a
        // 7x7 or 8x8 one gives 4x4 outputs (rows under a vector: not direct); 1x1 kernels
        // never (three of the four phases would be copied for nothing).
        let strided = |side: usize, k: usize| {
            let g = ConvShape::new(&[2, 16, side, side], &[16, 16, k, k], 2, k / 2).expect("shape");
            (Direct::grid(&g), Direct::applies(&g))
        };
        assert_eq!(
            strided(32, 3),
            (
                Grid {
                    row: 16,
                    per_image: 256
                },
                available()
            )
        );
        assert_eq!(
            strided(7, 3),
            (
                Grid {
                    row: 5,
                    per_image: 32
                },
                false
            )
        );
        assert!(!strided(8, 3).1 && !strided(32, 1).1);
    }

    /// The vector instruction sets this CPU has, each test of one it lacks recorded as
    /// SKIPPED under `test`.
    pub(crate) fn simds_here(test: &str) -> Vec<Simd> {
        [Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|s| {
                if !s.supported() {
                    brisk_hosts::skipped(&format!("{test} on {s:?}"), "this CPU lacks it");
                }
                s.supported()
            })
            .collect()
    }

    /// Values off a simple integer pattern, exactly representable: sums of their products
    /// are exact in f32 whatever the order.
    fn pattern(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) * 0.25)
            .collect()
    }

    /// The micro-kernel on each instruction set against the scalar code: reduction depths
    /// of 1, an odd count and a whole block, written and added to, from a packed panel
    /// and from rows read in place.
    #[test]
    fn micro_kernels_match_scalar_code() {
        for simd in simds_here("brisk_ops::micro_kernels_match_scalar_code") {
            for kc in [1, 7, KC] {
                let a = pattern(kc * MR, 5, 17);
                let b = pattern(kc * NR + 40, 7, 23);
                let offsets: Vec<usize> = (0..kc).map(|k| (k * 13) % (kc * NR - 16)).collect();
                let direct = DirectPanel::new([&b, &b[20..]], &offsets);
                let packed = PackedPanel(&b);
                for accumulate in [false, true] {
                    let run = |simd, panel: &dyn Fn(Option<Simd>, &mut [f32])| {
                        let mut c = pattern((MR - 1) * 40 + NR, 3, 11);
                        panel(simd, &mut c);
                        c
                    };
                    let on_packed = |s, c: &mut [f32]| kernel_on(s, kc, &a, &packed, c, 40, accumulate);
                    let on_direct = |s, c: &mut [f32]| kernel_on(s, kc, &a, &direct, c, 40, accumulate);
                    assert_eq!(
                        run(Some(simd), &on_packed),
                        run(None, &on_packed),
                        "{simd:?} kc {kc}"
                    );
                    assert_eq!(
                        run(Some(simd), &on_direct),
                        run(None, &on_direct),
                        "{simd:?} kc {kc}"
                    );
                }
            }
        }
    }

    /// Masked row runs on each instruction set, and AVX-512 gathers, against the scalar
    /// code: runs at every start around both ends of the row and every length up to NR.
    #[test]
    fn masked_loads_and_gathers_match_scalar_code() {
        let row = pattern(21, 7, 23);
        for simd in simds_here("brisk_ops::masked_loads_and_gathers_match_scalar_code") {
            for len in 0..=NR {
                for start in -(NR as isize) - 2..row.len() as isize + 2 {
                    let want: Vec<f32> = (0..len as isize)
                        .map(|t| {
                            usize::try_from(start + t)
                                .ok()
                                .and_then(|i| row.get(i))
                                .map_or(0.0, |v| *v)
                        })
                        .collect();
                    let mut got = vec![f32::NAN; len];
                    assert!(fill_run(Some(simd), &row, start, &mut got));
                    assert_eq!(got, want, "{simd:?} start {start} len {len}");
                }
            }
            if simd != Simd::Avx512 {
                continue; // gathers run on AVX-512 only
            }
            let idx: [i32; 16] = std::array::from_fn(|t| (t * 5 % 21) as i32);
            for mask in [0u16, 1, 0x8001, 0x00ff, 0xff00, 0x5a5a, u16::MAX] {
                let (mut got, mut want) = ([f32::NAN; 16], [f32::NAN; 16]);
                // SAFETY: every index lies in `row` (21 values).
                unsafe {
                    gather16_on(Some(simd), &row, &idx, mask, &mut got);
                    gather16_on(None, &row, &idx, mask, &mut want);
                }
                assert_eq!(got, want, "{simd:?} mask {mask:#x}");
            }
        }
    }
}
