//! The weight gradient of a 3x3 stride-1 convolution computed directly, for narrow
//! layers: `dw[co][c][ki][kj] = Σ_p dy[co][p] · x_pad[c][p + ki·wp + kj]` summed over the
//! output positions `p` of every image, with no im2col matrix. Positions run on the padded
//! row (`wp = w + 2 pad` wide, the output gradient zero past each row's `wo` outputs), so
//! each tap's input is one contiguous run of the zero-padded image and every product is a
//! 16-lane FMA: 8 output channels x the 3 taps of a kernel row in 24 accumulators.
//!
//! im2col + GEMM computes the same sums as a `[cout, kdim] x [kdim, positions]ᵀ` product
//! whose output is tiny for narrow layers (8 x 72 at 8 channels), so the GEMM's tiles were
//! mostly empty: 25–50 GFLOP/s there against the forward pass's 70–85.

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

/// Whether the weight gradient of `g` runs here: a 3x3 stride-1 convolution of at most
/// [`MAX_WEIGHTS`] weights, on a CPU with AVX-512, where at least 3/5 of the positions
/// computed (padded rows, whole vectors) are output positions.
pub(crate) fn applies(g: &ConvShape) -> bool {
    super::available()
        && g.k == TAPS
        && g.stride == 1
        && g.cout.next_multiple_of(CO) * g.kdim() <= MAX_WEIGHTS
        && g.out_hw() as f64 >= 0.6 * positions(g) as f64
}

/// Positions computed per image: the output rows on the padded width, rounded up to whole
/// vectors.
fn positions(g: &ConvShape) -> usize {
    (g.ho * (g.w + 2 * g.pad)).next_multiple_of(16)
}

/// Floats past the last padded image that the last vector of taps may read (zeros): a
/// vector and two taps past the end of the output rows, which lie inside the plane.
const SLACK: usize = 32;

thread_local! {
    /// [`weight_grad`]'s scratch, kept for the next call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The weight gradient `[cout, cin, 3, 3]` over images `images` of `x` `[n, cin, h, w]`
/// and `dy` `[n, cout, ho, wo]` ([`applies`] must hold). Images go in groups of about
/// [`BLOCK_POSITIONS`] positions (or one image, split into blocks of that many); each
/// block's products add to 16-lane sums per weight, summed across lanes once at the end.
/// The order of addition depends only on the shape and the range.
pub(crate) fn weight_grad(
    g: &ConvShape,
    (x, dy): (&[f32], &[f32]),
    images: std::ops::Range<usize>,
) -> Vec<f32> {
    assert!(applies(g));
    let (p, rows) = (positions(g), g.cout.next_multiple_of(CO));
    let group = BLOCK_POSITIONS.div_ceil(p);
    let plane = (g.h + 2 * g.pad) * (g.w + 2 * g.pad);
    let lanes = rows * g.kdim() * 16;
    let len = lanes + group * g.cin * plane + SLACK + group * rows * p;
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        let (sums, rest) = scratch.split_at_mut(lanes);
        sums.fill(0.0);
        for first in images.clone().step_by(group) {
            let count = group.min(images.end - first);
            Group::new(g, (x, dy), (first, count), rest).add_to(sums);
        }
        let mut dw = vec![0f32; g.cout * g.kdim()];
        for (d, lane) in dw.iter_mut().zip(sums.chunks_exact(16)) {
            *d = lane.iter().sum();
        }
        dw
    })
}

/// A group of images made ready for the kernel: the images padded, their output
/// gradient on the padded rows (zero past each row's outputs, past the rows and in the
/// rows past `cout`).
struct Group<'a> {
    g: &'a ConvShape,
    xs: &'a [f32],
    dys: &'a [f32],
    count: usize,
}

impl<'a> Group<'a> {
    fn new(
        g: &'a ConvShape,
        (x, dy): (&[f32], &[f32]),
        (first, count): (usize, usize),
        buf: &'a mut [f32],
    ) -> Self {
        let (p, rows, wp) = (positions(g), g.cout.next_multiple_of(CO), g.w + 2 * g.pad);
        let images = count * g.cin * (g.h + 2 * g.pad) * wp;
        let (xs, rest) = buf.split_at_mut(images + SLACK);
        let dys = &mut rest[..count * rows * p];
        super::pad_images(g, x, first, count, &mut xs[..images]);
        xs[images..].fill(0.0);
        dys.fill(0.0);
        for (img, rows_of) in dys.chunks_exact_mut(rows * p).enumerate() {
            let src = &dy[(first + img) * g.out_len()..][..g.out_len()];
            for (dst, src) in rows_of.chunks_exact_mut(p).zip(src.chunks_exact(g.out_hw())) {
                for (drow, srow) in dst.chunks_mut(wp).zip(src.chunks_exact(g.wo)) {
                    drow[..g.wo].copy_from_slice(srow);
                }
            }
        }
        Group { g, xs, dys, count }
    }

    /// Adds the group's products to `sums` (`[rows, kdim, 16]`), block by block of
    /// positions, each block's CO gradient rows meeting every channel and kernel row.
    fn add_to(&self, sums: &mut [f32]) {
        let g = self.g;
        let (p, rows, wp) = (positions(g), g.cout.next_multiple_of(CO), g.w + 2 * g.pad);
        let plane = (g.h + 2 * g.pad) * wp;
        let step = (BLOCK_POSITIONS / 16).max(1);
        for t0 in (0..p / 16).step_by(step) {
            let vectors = step.min(p / 16 - t0);
            for cb in 0..rows / CO {
                for c in 0..g.cin {
                    for ki in 0..TAPS {
                        let call = Call {
                            dy: &self.dys[cb * CO * p + 16 * t0..],
                            dy_strides: (rows * p, p),
                            x: &self.xs[c * plane + ki * wp + 16 * t0..],
                            x_image: g.cin * plane,
                            count: self.count,
                            vectors,
                        };
                        let at = (cb * CO * g.kdim() + (c * TAPS + ki) * TAPS) * 16;
                        call.run(&mut sums[at..], g.kdim() * 16);
                    }
                }
            }
        }
    }
}

/// One kernel call: the sums over `count` images of `vectors` 16-position vectors of CO
/// output-gradient rows times the TAPS shifted runs of one input row.
struct Call<'a> {
    /// Row `co` of image `i` at `i * dy_strides.0 + co * dy_strides.1`.
    dy: &'a [f32],
    dy_strides: (usize, usize),
    /// Image `i`'s run at `i * x_image`; tap `kj` reads it from `kj` on.
    x: &'a [f32],
    x_image: usize,
    count: usize,
    vectors: usize,
}

impl Call<'_> {
    /// Adds to `sums[co * co_stride + 16 kj ..][..16]` the 16-lane sums over images and
    /// positions of dy row `co` · the run shifted by `kj`.
    fn run(&self, sums: &mut [f32], co_stride: usize) {
        let span = self.vectors * 16;
        let last = self.count.saturating_sub(1);
        assert!(self.count > 0 && span > 0);
        assert!(self.dy.len() >= last * self.dy_strides.0 + (CO - 1) * self.dy_strides.1 + span);
        assert!(self.x.len() >= last * self.x_image + span + TAPS - 1);
        assert!(sums.len() >= (CO - 1) * co_stride + TAPS * 16);
        #[cfg(target_arch = "x86_64")]
        if super::available() {
            // SAFETY: AVX-512F was detected; the asserts above bound every load and store.
            unsafe { self.run_avx512(sums.as_mut_ptr(), co_stride) };
            return;
        }
        for i in 0..self.count {
            for q in 0..span {
                for co in 0..CO {
                    let d = self.dy[i * self.dy_strides.0 + co * self.dy_strides.1 + q];
                    for kj in 0..TAPS {
                        sums[co * co_stride + 16 * kj + q % 16] += d * self.x[i * self.x_image + q + kj];
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F; the slices must hold what [`Call::run`] asserts, and
    /// `sums` point to CO rows of TAPS x 16 floats `co_stride` apart.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, sums: *mut f32, co_stride: usize) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); TAPS]; CO];
        for i in 0..self.count {
            let dy = self.dy.as_ptr().wrapping_add(i * self.dy_strides.0);
            let x = self.x.as_ptr().wrapping_add(i * self.x_image);
            for t in 0..self.vectors {
                let q = 16 * t;
                // SAFETY: q + 15 + TAPS - 1 lies inside image i's run and q + 15 inside
                // each of its CO rows (the caller's contract).
                unsafe {
                    let xv = [0, 1, 2].map(|kj| _mm512_loadu_ps(x.add(q + kj)));
                    for (co, a) in acc.iter_mut().enumerate() {
                        let d = _mm512_loadu_ps(dy.add(co * self.dy_strides.1 + q));
                        for (a, &xv) in a.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(d, xv, *a);
                        }
                    }
                }
            }
        }
        for (co, a) in acc.iter().enumerate() {
            for (kj, &a) in a.iter().enumerate() {
                // SAFETY: inside the CO rows of TAPS x 16 floats (the caller's contract).
                unsafe {
                    let at = sums.add(co * co_stride + 16 * kj);
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), a));
                }
            }
        }
    }
}
