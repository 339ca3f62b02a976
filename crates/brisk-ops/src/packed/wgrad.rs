//! The weight gradient of a 3x3 stride-1 convolution computed directly, for narrow
//! layers: `dw[co][c][ki][kj] = Σ_p dy[co][p] · x_pad[c][p + ki·wp + kj]` summed over the
//! output positions `p` of every image, with no im2col matrix. Positions run on the padded
//! row (`wp = w + 2 pad` wide, the output gradient zero past each row's `wo` outputs), so
//! each tap's input is one contiguous run of the zero-padded image and every product is a
//! 16-lane FMA: 8 output channels x the 3 taps of a kernel row in 24 accumulators. Where
//! bf16 products run as `vdpbf16ps` ([`super::bf16::Path::Dot`]) the operands are copied
//! to bf16 and each lane multiplies a pair of neighbouring positions: 32 positions a vector.
//!
//! Stride-2 convolutions run the same way on each channel's four phase planes (the padded
//! plane's rows of one parity and columns of one parity), where every tap of a stride-2
//! window is again a contiguous run ([`Planes`], shared with the direct convolutions).
//!
//! im2col + GEMM computes the same sums as a `[cout, kdim] x [kdim, positions]ᵀ` product
//! whose output is tiny for narrow layers (8 x 72 at 8 channels), so the GEMM's tiles were
//! mostly empty: 25–50 GFLOP/s there against the forward pass's 70–85.

use super::isa::Simd;
use super::Planes;
use crate::shape::ConvShape;

/// Output channels per kernel call.
const CO: usize = 8;
/// Kernel taps per kernel call: one kernel row.
const TAPS: usize = 3;

/// Weights (output channels rounded up to CO, times the reduction) up to which the
/// direct path runs: its 16-lane sums (64 bytes per weight, added to by every block of
/// positions) then stay within 1 MiB. Measured on an AMD EPYC, 1 thread, batch 16: at 8–32
/// channels (up to 9,216 weights) the direct path ran 1.1–2.4x faster than im2col + GEMM,
/// the ResNet stem at 64 channels (1,728 weights) 4.8x; at 64 channels on 16x16 maps
/// (36,864 weights) 0.93x, at 256 channels on 8x8 maps 0.63x.
const MAX_WEIGHTS: usize = 16 * 1024;

/// Positions of one block of work (at least; images are not split below it): CO
/// output-gradient rows of them (16 KiB) stay in L1 while every input channel and kernel
/// row meets them.
const BLOCK_POSITIONS: usize = 512;

/// Whether the weight gradient of `g` runs here: a 3x3 convolution of stride 1 or 2 and
/// at most [`MAX_WEIGHTS`] weights, on a CPU with AVX-512 or AVX2, where at least 3/5 of the
/// positions computed (grid rows, whole vectors) are output positions.
pub(crate) fn applies(g: &ConvShape) -> bool {
    super::available()
        && g.k == TAPS
        && (g.stride == 1 || g.stride == 2)
        && g.cout.next_multiple_of(CO) * g.kdim() <= MAX_WEIGHTS
        && g.out_hw() as f64 >= 0.6 * Shape::of(g, 16).p as f64
}

/// Values past the last padded image that the last vector of taps may read (zeros): a
/// vector and two taps past the end of the output rows, which lie inside the plane.
const SLACK: usize = 64;

thread_local! {
    /// [`weight_grad`]'s scratch, kept for the next call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The bf16 copies of a group's operands, as pairs.
    static HALVES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The weight gradient `[cout, cin, 3, 3]` over images `images` of `x` `[n, cin, h, w]`
/// and `dy` `[n, cout, ho, wo]` ([`applies`] must hold), its products in bf16 pairs when
/// `bf16` (the operands hold bf16 values; [`super::bf16::supported`] must hold). Images
/// go in groups of at least [`BLOCK_POSITIONS`] positions (or one image, split into blocks
/// of that many); each block's products add to 16-lane sums per weight, summed across
/// lanes once at the end. The order of addition depends only on the shape and the range.
pub(crate) fn weight_grad(
    g: &ConvShape,
    (x, dy): (&[f32], &[f32]),
    images: std::ops::Range<usize>,
    bf16: bool,
) -> Vec<f32> {
    assert!(applies(g) && (!bf16 || super::bf16::supported()));
    let per_vector = if bf16 { 32 } else { 16 };
    let shape = Shape::of(g, per_vector);
    let group = BLOCK_POSITIONS.div_ceil(shape.p);
    let lanes = shape.rows * g.kdim() * 16;
    let len = lanes + group * (shape.image + shape.rows * shape.p) + SLACK;
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        let (sums, rest) = scratch.split_at_mut(lanes);
        sums.fill(0.0);
        for first in images.clone().step_by(group) {
            let count = group.min(images.end - first);
            let ready = Group::new(g, shape, (x, dy), (first, count), rest);
            if bf16 {
                HALVES.with(|h| ready.add_in_bf16(&mut h.borrow_mut(), sums));
            } else {
                add_products::<f32>(&ready, (ready.xs, ready.dys), sums);
            }
        }
        let mut dw = vec![0f32; g.cout * g.kdim()];
        for (d, lane) in dw.iter_mut().zip(sums.chunks_exact(16)) {
            *d = lane.iter().sum();
        }
        dw
    })
}

/// Where a group's operands lie: the images as [`Planes`] lays them out (stride 1, each
/// channel's padded plane; stride 2, its four phase planes), so that every tap of a
/// window is a contiguous run, and output positions on rows of the copy's width.
#[derive(Clone, Copy)]
struct Shape {
    /// Positions per image: `ho` rows of `planes.row`, rounded up to whole vectors.
    p: usize,
    /// Gradient rows: cout rounded up to CO.
    rows: usize,
    /// Values per image copy.
    image: usize,
    planes: Planes,
}

impl Shape {
    fn of(g: &ConvShape, per_vector: usize) -> Shape {
        // `applies` (stride 1 or 2, 3x3) guarantees the layout; a shape without one has
        // no positions, and nothing runs.
        let planes = Planes::of(g).unwrap_or(Planes {
            phases: 1,
            rows: 0,
            row: 0,
        });
        Shape {
            p: (g.ho * planes.row).next_multiple_of(per_vector),
            rows: g.cout.next_multiple_of(CO),
            image: planes.image(g),
            planes,
        }
    }

    /// Kernel row `ki`'s three taps: their offsets in an image's copy.
    fn taps(&self, c: usize, ki: usize) -> [usize; TAPS] {
        [0, 1, 2].map(|kj| self.planes.tap(c, ki, kj))
    }
}

/// A group of images made ready for the kernel: the images padded (`xs`, zeros after
/// them), their output gradient on the padded rows (`dys`, `[count, rows, p]`: zero past
/// each row's outputs, past the rows and in the rows past `cout`).
struct Group<'a> {
    g: &'a ConvShape,
    shape: Shape,
    xs: &'a [f32],
    dys: &'a [f32],
    count: usize,
}

impl<'a> Group<'a> {
    fn new(
        g: &'a ConvShape,
        shape: Shape,
        (x, dy): (&[f32], &[f32]),
        (first, count): (usize, usize),
        buf: &'a mut [f32],
    ) -> Self {
        let (Shape { p, rows, image, .. }, row) = (shape, shape.planes.row);
        let (xs, rest) = buf.split_at_mut(count * image + SLACK);
        let dys = &mut rest[..count * rows * p];
        shape.planes.copy(g, x, first, &mut xs[..count * image]);
        xs[count * image..].fill(0.0);
        dys.fill(0.0);
        for (img, rows_of) in dys.chunks_exact_mut(rows * p).enumerate() {
            let src = &dy[(first + img) * g.out_len()..][..g.out_len()];
            for (dst, src) in rows_of.chunks_exact_mut(p).zip(src.chunks_exact(g.out_hw())) {
                for (drow, srow) in dst.chunks_mut(row).zip(src.chunks_exact(g.wo)) {
                    drow[..g.wo].copy_from_slice(srow);
                }
            }
        }
        Group {
            g,
            shape,
            xs,
            dys,
            count,
        }
    }

    /// [`add_products`] on bf16 copies of the operands (made in `halves`, as pairs: the
    /// same values in the same order, two to a `u32`).
    fn add_in_bf16(&self, halves: &mut Vec<u32>, sums: &mut [f32]) {
        let (nx, ny) = (self.xs.len().div_ceil(2), self.dys.len().div_ceil(2));
        halves.resize(nx + ny, 0);
        let (hx, hy) = halves.split_at_mut(nx);
        super::bf16::row_pairs(self.xs, hx);
        super::bf16::row_pairs(self.dys, hy);
        // SAFETY: u16 has u32's size halved and no stricter alignment; each slice covers
        // exactly the memory of its pairs, whose values in order are the bf16 values.
        let (xs, dys) = unsafe {
            (
                std::slice::from_raw_parts(hx.as_ptr().cast::<u16>(), 2 * nx),
                std::slice::from_raw_parts(hy.as_ptr().cast::<u16>(), 2 * ny),
            )
        };
        add_products::<u16>(self, (xs, dys), sums);
    }
}

/// Adds a group's products to `sums` (`[rows, kdim, 16]`) from its operands as `E`
/// values, block by block of positions, each block's CO gradient rows meeting every
/// channel and kernel row.
fn add_products<E: Lane>(group: &Group, (xs, dys): (&[E], &[E]), sums: &mut [f32]) {
    let (g, shape) = (group.g, group.shape);
    let Shape { p, rows, image, .. } = shape;
    let (vectors, step) = (p / E::PER_VECTOR, (BLOCK_POSITIONS / E::PER_VECTOR).max(1));
    for t0 in (0..vectors).step_by(step) {
        let at = E::PER_VECTOR * t0;
        for cb in 0..rows / CO {
            for c in 0..g.cin {
                for ki in 0..TAPS {
                    let taps = shape.taps(c, ki);
                    let call = Call {
                        dy: &dys[cb * CO * p + at..],
                        dy_strides: (rows * p, p),
                        x: &xs[taps[0] + at..],
                        taps: taps.map(|t| t - taps[0]),
                        x_image: image,
                        count: group.count,
                        vectors: step.min(vectors - t0),
                        simd: super::isa::simd(),
                    };
                    let to = (cb * CO * g.kdim() + (c * TAPS + ki) * TAPS) * 16;
                    call.run(&mut sums[to..], g.kdim() * 16);
                }
            }
        }
    }
}

/// One kernel call: the sums over `count` images of `vectors` vectors of positions of CO
/// output-gradient rows times the TAPS shifted runs of one input row.
struct Call<'a, E> {
    /// Row `co` of image `i` at `i * dy_strides.0 + co * dy_strides.1`.
    dy: &'a [E],
    dy_strides: (usize, usize),
    /// Image `i`'s runs at `i * x_image`, tap `kj`'s from `taps[kj]` on.
    x: &'a [E],
    taps: [usize; TAPS],
    x_image: usize,
    count: usize,
    vectors: usize,
    /// The instructions f32 products run on.
    simd: Option<Simd>,
}

/// What a kernel lane multiplies: f32 values (16 positions a vector) or bf16 values (32:
/// each lane a pair of neighbouring positions).
trait Lane: Copy {
    const PER_VECTOR: usize;
    fn value(self) -> f32;
    /// [`Call::run`] on vector instructions, `false` where the CPU lacks them.
    fn run_vectors(call: &Call<Self>, sums: &mut [f32], co_stride: usize) -> bool;
}

impl Lane for f32 {
    const PER_VECTOR: usize = 16;

    fn value(self) -> f32 {
        self
    }

    fn run_vectors(call: &Call<f32>, sums: &mut [f32], co_stride: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        match call.simd.filter(|s| s.supported()) {
            // SAFETY (both): the features were detected; `Call::run` asserted every bound.
            Some(Simd::Avx512) => {
                unsafe { call.fma_avx512(sums.as_mut_ptr(), co_stride) };
                return true;
            }
            Some(Simd::Avx2) => {
                unsafe { call.fma_avx2(sums.as_mut_ptr(), co_stride) };
                return true;
            }
            None => {}
        }
        false
    }
}

impl Lane for u16 {
    const PER_VECTOR: usize = 32;

    fn value(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }

    fn run_vectors(call: &Call<u16>, sums: &mut [f32], co_stride: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if super::bf16::supported() {
            // SAFETY: AVX512-BF16 was detected; `Call::run` asserted every bound.
            unsafe { call.dot_avx512(sums.as_mut_ptr(), co_stride) };
            return true;
        }
        false
    }
}

impl<E: Lane> Call<'_, E> {
    /// Adds to `sums[co * co_stride + 16 kj ..][..16]` the 16-lane sums over images and
    /// positions of dy row `co` · the run shifted by `kj`.
    fn run(&self, sums: &mut [f32], co_stride: usize) {
        let span = self.vectors * E::PER_VECTOR;
        let last = self.count.saturating_sub(1);
        assert!(self.count > 0 && span > 0);
        assert!(self.dy.len() >= last * self.dy_strides.0 + (CO - 1) * self.dy_strides.1 + span);
        let reach = self.taps.iter().max().copied().unwrap_or(0);
        assert!(self.x.len() >= last * self.x_image + reach + span);
        assert!(sums.len() >= (CO - 1) * co_stride + TAPS * 16);
        if E::run_vectors(self, sums, co_stride) {
            return;
        }
        for i in 0..self.count {
            for q in 0..span {
                let lane = (q % E::PER_VECTOR) * 16 / E::PER_VECTOR;
                for co in 0..CO {
                    let d = self.dy[i * self.dy_strides.0 + co * self.dy_strides.1 + q].value();
                    for kj in 0..TAPS {
                        let x = self.x[i * self.x_image + self.taps[kj] + q].value();
                        sums[co * co_stride + 16 * kj + lane] += d * x;
                    }
                }
            }
        }
    }
}

/// Adds a kernel's CO x TAPS accumulators to `sums` (rows `co_stride` floats apart, TAPS
/// vectors of 16 in each). A macro so that each kernel, with its own target features,
/// keeps its accumulators in registers; expanded in an `unsafe` block of an AVX-512 function
/// whose contract covers the stores.
macro_rules! add_sums {
    ($acc:expr, $sums:expr, $co_stride:expr) => {
        for (co, a) in $acc.iter().enumerate() {
            for (kj, &a) in a.iter().enumerate() {
                let at = $sums.add(co * $co_stride + 16 * kj);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), a));
            }
        }
    };
}

impl Call<'_, f32> {
    /// # Safety
    /// The CPU must have AVX-512F; the slices must hold what [`Call::run`] asserts, and
    /// `sums` point to CO rows of TAPS x 16 floats `co_stride` apart.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_avx512(&self, sums: *mut f32, co_stride: usize) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); TAPS]; CO];
        for i in 0..self.count {
            let dy = self.dy.as_ptr().wrapping_add(i * self.dy_strides.0);
            let x = self.x.as_ptr().wrapping_add(i * self.x_image);
            for t in 0..self.vectors {
                let q = 16 * t;
                // SAFETY: each tap's q + 15 lies inside image i's runs and q + 15 inside
                // each of its CO rows (the caller's contract).
                unsafe {
                    let xv = self.taps.map(|t| _mm512_loadu_ps(x.add(t + q)));
                    for (co, a) in acc.iter_mut().enumerate() {
                        let d = _mm512_loadu_ps(dy.add(co * self.dy_strides.1 + q));
                        for (a, &xv) in a.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(d, xv, *a);
                        }
                    }
                }
            }
        }
        // SAFETY: the caller's contract for `sums`.
        unsafe { add_sums!(acc, sums, co_stride) };
    }

    /// [`Call::fma_avx512`] on AVX2: each 16-lane sum as two 8-lane halves, in four
    /// passes over the positions (two halves of the lanes x two halves of the CO rows:
    /// 12 accumulators, 3 tap vectors and a row vector fill the 16 registers).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the slices must hold what [`Call::run`] asserts,
    /// and `sums` point to CO rows of TAPS x 16 floats `co_stride` apart.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_avx2(&self, sums: *mut f32, co_stride: usize) {
        use std::arch::x86_64::*;
        const ROWS: usize = CO / 2;
        for lanes in [0, 8] {
            for co0 in [0, ROWS] {
                let mut acc = [[_mm256_setzero_ps(); TAPS]; ROWS];
                for i in 0..self.count {
                    let dy = self.dy.as_ptr().wrapping_add(i * self.dy_strides.0);
                    let x = self.x.as_ptr().wrapping_add(i * self.x_image);
                    for t in 0..self.vectors {
                        let q = 16 * t + lanes;
                        // SAFETY: each tap's q + 7 lies inside image i's runs and q + 7
                        // inside each of its CO rows (the caller's contract).
                        unsafe {
                            let xv = self.taps.map(|t| _mm256_loadu_ps(x.add(t + q)));
                            for (co, a) in acc.iter_mut().enumerate() {
                                let d = _mm256_loadu_ps(dy.add((co0 + co) * self.dy_strides.1 + q));
                                for (a, &xv) in a.iter_mut().zip(&xv) {
                                    *a = _mm256_fmadd_ps(d, xv, *a);
                                }
                            }
                        }
                    }
                }
                for (co, a) in acc.iter().enumerate() {
                    for (kj, &a) in a.iter().enumerate() {
                        // SAFETY: the caller's contract for `sums`: lanes `lanes..lanes +
                        // 8` of row co0 + co's vector kj.
                        unsafe {
                            let at = sums.add((co0 + co) * co_stride + 16 * kj + lanes);
                            _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), a));
                        }
                    }
                }
            }
        }
    }
}

impl Call<'_, u16> {
    /// # Safety
    /// The CPU must have AVX512-BF16; the slices must hold what [`Call::run`] asserts, and
    /// `sums` point to CO rows of TAPS x 16 floats `co_stride` apart.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_avx512(&self, sums: *mut f32, co_stride: usize) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); TAPS]; CO];
        for i in 0..self.count {
            let dy = self.dy.as_ptr().wrapping_add(i * self.dy_strides.0);
            let x = self.x.as_ptr().wrapping_add(i * self.x_image);
            for t in 0..self.vectors {
                let q = 32 * t;
                // SAFETY: each tap's q + 31 lies inside image i's runs and q + 31 inside
                // each of its CO rows (the caller's contract); the transmutes read 512
                // bits as 32 bf16 values.
                unsafe {
                    let xv: [__m512bh; TAPS] = self
                        .taps
                        .map(|t| std::mem::transmute(_mm512_loadu_si512(x.add(t + q).cast())));
                    for (co, a) in acc.iter_mut().enumerate() {
                        let d: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            dy.add(co * self.dy_strides.1 + q).cast(),
                        ));
                        for (a, &xv) in a.iter_mut().zip(&xv) {
                            *a = _mm512_dpbf16_ps(*a, d, xv);
                        }
                    }
                }
            }
        }
        // SAFETY: the caller's contract for `sums`.
        unsafe { add_sums!(acc, sums, co_stride) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One kernel call on each instruction set against the scalar code, on values whose
    /// sums are exact in f32 (so any order of addition gives the same bits): two images
    /// of three vectors, taps one apart and a row apart.
    #[test]
    fn vector_sums_match_scalar_code() {
        let values = |len: usize, mul: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * mul % 19) as f32 - 9.0) * 0.25).collect()
        };
        let (count, vectors, co_stride) = (2, 3, 3 * 16 + 5);
        let dy = values(count * 200 + CO * 50, 7);
        let x = values(count * 300 + 100, 5);
        for simd in super::super::tests::simds_here("brisk_ops::vector_sums_match_scalar_code") {
            let call = |simd| {
                let call = Call {
                    dy: &dy,
                    dy_strides: (200, 50),
                    x: &x,
                    taps: [0, 1, 37],
                    x_image: 300,
                    count,
                    vectors,
                    simd,
                };
                let mut sums = values(CO * co_stride, 3);
                call.run(&mut sums, co_stride);
                sums
            };
            assert_eq!(call(Some(simd)), call(None), "{simd:?}");
        }
    }
}
