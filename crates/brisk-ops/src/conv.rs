//! 2-D convolution (NCHW, square kernels, any stride and padding) as a candle custom op:
//! im2col + GEMM forward, GEMM + col2im input gradient, GEMM weight gradient; in f32, or
//! in half precision for bf16/f16 inputs (see `half`).

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fill::{par_build, par_zeros};
use crate::gemm::{matmul, parallelism, Mat};
use crate::half::{f32_values, round_to, storage_of};
use crate::packed::{self, PackedWeight};
pub use crate::shape::ConvShape;

/// Convolves `x` `[N, Cin, H, W]` with `weight` `[Cout, Cin, K, K]` (no bias, no groups
/// or dilation) using brisk's kernels; differentiable in both arguments. The input
/// gradient is skipped when `x` needs none (an image batch, say).
///
/// The convolution computes in `x`'s dtype: for f32 in f32; for bf16 or f16 as autocast
/// does — the weight (an f32 master weight) and the output gradient rounded to that
/// format, products summed in f32. The output is f32 (batch-norm statistics follow in
/// f32), the input gradient has `x`'s dtype and the weight gradient is f32.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if stride == 0 {
        candle_core::bail!("brisk conv2d: stride must be at least 1");
    }
    if weight.dtype() != DType::F32 {
        candle_core::bail!(
            "brisk conv2d: the weight must be f32 (master weights), got {:?}",
            weight.dtype()
        );
    }
    let compute = x.dtype();
    if !matches!(compute, DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("brisk conv2d: the input must be f32, bf16 or f16, got {compute:?}");
    }
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        Conv2d {
            stride,
            padding,
            compute,
        },
    )
}

/// How a convolution computing in `compute` multiplies (its operands rounded to it).
fn products_in(compute: DType) -> Products {
    if compute == DType::BF16 {
        Products::Bf16
    } else {
        Products::F32
    }
}

/// The values of an operand as f32, rounded to `compute` (borrowed when nothing changes).
fn operand<'a>(s: &'a CpuStorage, l: &Layout, compute: DType, what: &str) -> Result<Cow<'a, [f32]>> {
    let mut v = f32_values(s, l, "conv2d", what)?;
    if compute != DType::F32 && s.dtype() == DType::F32 {
        round_to(compute, v.to_mut());
    }
    Ok(v)
}

/// How im2col and col2im move an image's values: by output-row runs (copies of whole
/// rows), or, for small maps, by a table of offsets — the input offset in a channel plane
/// of each (kernel tap, output position), [`OUTSIDE`] in the padding. With rows of under
/// 16 positions (the 8x8 to 1x1 maps of small images) a row run is a few values, and the
/// calls that copy and zero-fill them cost more than the values (im2col was a fifth of an
/// 8x8 step, `memmove`/`memset` another tenth); the table is made once per call.
enum Taps {
    Rows,
    Table(Vec<u32>),
}

/// A tap that reads the padding.
const OUTSIDE: u32 = u32::MAX;

impl Taps {
    fn new(g: &ConvShape) -> Self {
        if g.wo >= 16 || g.h * g.w >= OUTSIDE as usize {
            return Taps::Rows;
        }
        let mut table = Vec::with_capacity(g.k * g.k * g.out_hw());
        for ki in 0..g.k {
            for kj in 0..g.k {
                for oh in 0..g.ho {
                    let ih = g.input_row(oh, ki);
                    for ow in 0..g.wo {
                        let iw = (ow * g.stride + kj).checked_sub(g.pad).filter(|&iw| iw < g.w);
                        table.push(match (ih, iw) {
                            (Some(ih), Some(iw)) => (ih * g.w + iw) as u32,
                            _ => OUTSIDE,
                        });
                    }
                }
            }
        }
        Taps::Table(table)
    }
}

/// Unfolds one image `[Cin, H, W]` into the `Ho*Wo` columns of `col` `[Cin*K*K, ld]`
/// that start at its first element (row r at `col[r * ld..]`).
fn im2col(g: &ConvShape, taps: &Taps, x: &[f32], col: &mut [f32], ld: usize) {
    let (k, s, howo) = (g.k, g.stride, g.out_hw());
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        if let Taps::Table(table) = taps {
            for (t, offsets) in table.chunks_exact(howo).enumerate() {
                let row = &mut col[(c * k * k + t) * ld..][..howo];
                for (d, &o) in row.iter_mut().zip(offsets) {
                    *d = plane.get(o as usize).copied().unwrap_or(0.0);
                }
            }
            continue;
        }
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut col[((c * k + ki) * k + kj) * ld..][..howo];
                let (lo, hi) = g.valid_cols(kj);
                for oh in 0..g.ho {
                    let dst = &mut row[oh * g.wo..(oh + 1) * g.wo];
                    let Some(ih) = g.input_row(oh, ki) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &plane[ih * g.w..(ih + 1) * g.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if s == 1 {
                        let start = lo + kj - g.pad;
                        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                    } else {
                        for (ow, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = src[(ow + lo) * s + kj - g.pad];
                        }
                    }
                }
            }
        }
    }
}

/// Folds the `Ho*Wo` columns of `col` `[Cin*K*K, ld]` that start at its first element
/// back into one image gradient `[Cin, H, W]`, adding.
fn col2im(g: &ConvShape, taps: &Taps, col: &[f32], ld: usize, dx: &mut [f32]) {
    let (k, s, howo) = (g.k, g.stride, g.out_hw());
    for c in 0..g.cin {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        if let Taps::Table(table) = taps {
            for (t, offsets) in table.chunks_exact(howo).enumerate() {
                let row = &col[(c * k * k + t) * ld..][..howo];
                for (v, &o) in row.iter().zip(offsets) {
                    if let Some(d) = plane.get_mut(o as usize) {
                        *d += v;
                    }
                }
            }
            continue;
        }
        for ki in 0..k {
            for kj in 0..k {
                let row = &col[((c * k + ki) * k + kj) * ld..][..howo];
                let (lo, hi) = g.valid_cols(kj);
                for oh in 0..g.ho {
                    let Some(ih) = g.input_row(oh, ki) else { continue };
                    let src = &row[oh * g.wo..(oh + 1) * g.wo];
                    let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                    if s == 1 {
                        let start = lo + kj - g.pad;
                        for (d, v) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for ow in lo..hi {
                            dst[ow * s + kj - g.pad] += src[ow];
                        }
                    }
                }
            }
        }
    }
}

fn threads() -> usize {
    rayon::current_num_threads()
}

thread_local! {
    /// Per-thread im2col buffer, kept between calls: a fresh large buffer per image would
    /// cost an mmap, page faults and an munmap (with cross-core TLB shootdowns) each time.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of at least `len` floats (contents
/// unspecified). `f` must not call `with_scratch` again.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Columns a GEMM should have at least: below this the `gemm` crate falls back to its
/// narrow micro-kernel (measured: layer4's 4x4 maps ran at half the speed of layer3's).
const MIN_GEMM_COLUMNS: usize = 256;

/// How many images share one GEMM: small feature maps are batched side by side so the
/// product has at least `MIN_GEMM_COLUMNS` columns.
fn group_size(g: &ConvShape) -> usize {
    (MIN_GEMM_COLUMNS / g.out_hw().max(1)).clamp(1, g.n.max(1))
}

/// Images per GEMM, columns of the im2col buffer, and the scratch floats a thread needs:
/// the im2col (or its gradient) buffer, plus a buffer for the gathered output-shaped
/// operand when several images share a GEMM.
fn group_plan(g: &ConvShape) -> (usize, usize, usize) {
    let group = group_size(g);
    let cols = group * g.out_hw();
    (
        group,
        cols,
        g.kdim() * cols + if group > 1 { g.cout * cols } else { 0 },
    )
}

/// The output of `images` images, `per_image` floats each, from `f(first image, images,
/// output chunk (zeroed), scratch, gemm parallelism)` run for every group of `group`
/// images: in parallel over groups with single-threaded GEMMs when there are enough
/// groups to keep every thread busy, otherwise one group at a time with multi-threaded
/// GEMMs.
fn for_each_group<F>(images: usize, per_image: usize, group: usize, scratch: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, usize, &mut [f32], &mut [f32], gemm::Parallelism) + Sync,
{
    let chunk = (per_image * group).max(1);
    let len = images * per_image;
    let groups = len.div_ceil(chunk);
    let t = threads();
    if groups >= t && t > 1 {
        par_build(len, chunk, |i, o| {
            with_scratch(scratch, |buf| {
                f(i * group, o.len() / per_image, o, buf, gemm::Parallelism::None)
            })
        })
    } else {
        let mut out = par_zeros(len);
        with_scratch(scratch, |buf| {
            for (i, o) in out.chunks_mut(chunk).enumerate() {
                f(i * group, o.len() / per_image, o, buf, parallelism(t));
            }
        });
        out
    }
}

/// Copies images `first..first + count` of an NCHW tensor with `c` channels of `hw`
/// values into `dst` `[c, count * hw]` (image j in columns `j*hw..`).
fn gather(src: &[f32], first: usize, count: usize, c: usize, hw: usize, dst: &mut [f32]) {
    let ld = count * hw;
    for j in 0..count {
        for ch in 0..c {
            let from = &src[((first + j) * c + ch) * hw..][..hw];
            dst[ch * ld + j * hw..][..hw].copy_from_slice(from);
        }
    }
}

/// The inverse of [`gather`]: `src` `[c, count * hw]` into `count` NCHW images in `dst`.
fn scatter(src: &[f32], count: usize, c: usize, hw: usize, dst: &mut [f32]) {
    let ld = count * hw;
    for j in 0..count {
        for ch in 0..c {
            dst[(j * c + ch) * hw..][..hw].copy_from_slice(&src[ch * ld + j * hw..][..hw]);
        }
    }
}

/// The im2col matrix `[Cin*K*K, count*Ho*Wo]` of images `first..first + count`: the
/// image itself for a single pointwise convolution, else unfolded into `buf`.
fn unfold<'a>(
    g: &ConvShape,
    taps: &Taps,
    x: &'a [f32],
    (first, count): (usize, usize),
    buf: &'a mut [f32],
) -> &'a [f32] {
    if count == 1 && g.is_pointwise() {
        return &x[first * g.in_len()..(first + 1) * g.in_len()];
    }
    let ld = count * g.out_hw();
    for j in 0..count {
        let img = &x[(first + j) * g.in_len()..(first + j + 1) * g.in_len()];
        im2col(g, taps, img, &mut buf[j * g.out_hw()..], ld);
    }
    &buf[..g.kdim() * ld]
}

/// How a convolution multiplies its operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Products {
    /// f32 products.
    #[default]
    F32,
    /// The operands hold bf16 values (rounded already, as mixed precision stores them):
    /// the packed kernels multiply them as bf16 pairs (`vdpbf16ps` or AMX tiles) where
    /// the CPU has them and they pay (`packed::isa::bf16_path`), elsewhere in f32. The
    /// products are exact either way and summed in f32: the two differ only in summation
    /// order.
    Bf16,
}

/// The convolution of f32 slices: `x` `[n, cin, h, w]`, `w` `[cout, cin, k, k]` → `[n,
/// cout, ho, wo]` (what the custom op computes; brisk-models' engine calls it directly).
/// On CPUs with AVX-512 or AVX2 it runs brisk's packed kernels (`packed`), else im2col + `gemm`.
pub fn conv_forward(g: &ConvShape, x: &[f32], w: &[f32], products: Products) -> Vec<f32> {
    if let Some(tap) = g.only_tap() {
        return conv_forward(&g.pointwise(), x, &tap_weights(g, w, tap), products);
    }
    conv_packed(g, x, products, || PackedWeight::rows(w, g.cout, g.kdim()))
        .unwrap_or_else(|| conv_forward_gemm(g, x, w))
}

/// Kernel tap `tap` of the weight `w` of `g`: `[cout, cin]`.
fn tap_weights(g: &ConvShape, w: &[f32], tap: usize) -> Vec<f32> {
    w.iter().skip(tap).step_by(g.k * g.k).copied().collect()
}

/// [`conv_forward`] by im2col and the `gemm` crate.
fn conv_forward_gemm(g: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (group, cols, scratch) = group_plan(g);
    let taps = Taps::new(g);
    for_each_group(g.n, g.out_len(), group, scratch, |first, count, o, buf, par| {
        let (col_buf, prod) = buf.split_at_mut(g.kdim() * cols);
        let col = unfold(g, &taps, x, (first, count), col_buf);
        let ld = count * g.out_hw();
        let wm = Mat::rows(w, g.kdim());
        if count == 1 {
            matmul((g.cout, ld, g.kdim()), o, wm, Mat::rows(col, ld), false, par);
        } else {
            matmul((g.cout, ld, g.kdim()), prod, wm, Mat::rows(col, ld), false, par);
            scatter(prod, count, g.cout, g.out_hw(), o);
        }
    })
}

/// The convolution `g` on brisk's packed kernels with the weight `weight()` packs, when
/// the CPU has them and there are enough image groups to keep every thread busy (the
/// packed kernels run one group per thread); `None` otherwise.
fn conv_packed(
    g: &ConvShape,
    x: &[f32],
    products: Products,
    weight: impl FnOnce() -> PackedWeight,
) -> Option<Vec<f32>> {
    let group = (packed::NC / g.out_hw().max(1)).clamp(1, g.n.max(1));
    let t = threads();
    if !packed::pays(g) || (t > 1 && g.n.div_ceil(group) < t) {
        return None;
    }
    let weight = match (products, packed::isa::bf16_path()) {
        (Products::Bf16, Some(path)) => weight().in_bf16(path),
        _ => weight(),
    };
    Some(run_packed(g, x, &weight, group))
}

/// The convolution `g` of `x` with the packed weight `a`, `group` images a task.
fn run_packed(g: &ConvShape, x: &[f32], a: &PackedWeight, group: usize) -> Vec<f32> {
    for_each_group(
        g.n,
        g.out_len(),
        group,
        packed::scratch_len(g, group),
        |first, count, o, buf, _| packed::conv_images(g, x, a, first, count, o, buf),
    )
}

/// The input gradient `[n, cin, h, w]` of [`conv_forward`] from the output gradient `dy`.
///
/// A stride-1 convolution's input gradient is itself a convolution: of `dy`, padded by
/// `k - 1 - pad`, with the weight flipped in space and transposed in channels. On AVX-512 or
/// AVX2 CPUs that convolution runs on the packed kernels, the flipped weight packed straight
/// from `w`; otherwise (and for other strides) the column gradient `Wᵀ·dy` is computed and
/// folded back with col2im.
pub fn conv_input_grad(g: &ConvShape, dy: &[f32], w: &[f32], products: Products) -> Vec<f32> {
    if let Some(tap) = g.only_tap() {
        return conv_input_grad(&g.pointwise(), dy, &tap_weights(g, w, tap), products);
    }
    if let Some(flipped) = g.input_grad_as_conv() {
        if let Some(dx) = conv_packed(&flipped, dy, products, || flipped_weight(g, w)) {
            return dx;
        }
    }
    conv_input_grad_col2im(g, dy, w)
}

/// `w` `[cout, cin, k, k]` flipped in both spatial axes and transposed to `[cin, cout, k,
/// k]`, packed: the weight of [`ConvShape::input_grad_as_conv`].
fn flipped_weight(g: &ConvShape, w: &[f32]) -> PackedWeight {
    let kk = g.k * g.k;
    // Element r = (co, t) of row ci is w[co][ci][kk - 1 - t]: row ci at ci * kk, plus this.
    let at: Vec<usize> = (0..g.cout * kk)
        .map(|r| (r / kk) * g.cin * kk + kk - 1 - r % kk)
        .collect();
    PackedWeight::strided(w, g.cin, kk, &at)
}

/// [`conv_input_grad`] by `Wᵀ·dy` and col2im: any stride.
fn conv_input_grad_col2im(g: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (group, cols, scratch) = group_plan(g);
    let taps = Taps::new(g);
    for_each_group(g.n, g.in_len(), group, scratch, |first, count, dxo, buf, par| {
        let (dcol, dy_buf) = buf.split_at_mut(g.kdim() * cols);
        let ld = count * g.out_hw();
        let dyg: &[f32] = if count == 1 {
            &dy[first * g.out_len()..(first + 1) * g.out_len()]
        } else {
            gather(dy, first, count, g.cout, g.out_hw(), dy_buf);
            &dy_buf[..g.cout * ld]
        };
        let wt = Mat::transposed(w, g.kdim());
        if count == 1 && g.is_pointwise() {
            matmul((g.kdim(), ld, g.cout), dxo, wt, Mat::rows(dyg, ld), false, par);
            return;
        }
        matmul((g.kdim(), ld, g.cout), dcol, wt, Mat::rows(dyg, ld), false, par);
        for j in 0..count {
            col2im(
                g,
                &taps,
                &dcol[j * g.out_hw()..],
                ld,
                &mut dxo[j * g.in_len()..(j + 1) * g.in_len()],
            );
        }
    })
}

/// The weight gradient `[cout, cin, k, k]` of [`conv_forward`] from the output gradient
/// `dy`; the summation order depends only on the thread count.
pub fn conv_weight_grad(g: &ConvShape, x: &[f32], dy: &[f32], products: Products) -> Vec<f32> {
    let bf16 = packed::isa::bf16_path().filter(|_| products == Products::Bf16);
    weight_grad(g, x, dy, bf16)
}

/// [`conv_weight_grad`], its products in bf16 on a path the CPU has, or in f32 (`None`):
/// directly where [`packed::wgrad::applies`] (narrow layers; bf16 pairs where they run as
/// `vdpbf16ps`, else f32 products, exact for bf16 values too), else by im2col and a GEMM.
fn weight_grad(g: &ConvShape, x: &[f32], dy: &[f32], bf16: Option<packed::bf16::Path>) -> Vec<f32> {
    if let Some(tap) = g.only_tap() {
        // The other taps multiply padding only: their gradient is zero.
        let kk = g.k * g.k;
        let mut dw = vec![0f32; g.cout * g.cin * kk];
        let dtap = weight_grad(&g.pointwise(), x, dy, bf16);
        dw.iter_mut()
            .skip(tap)
            .step_by(kk)
            .zip(dtap)
            .for_each(|(d, v)| *d = v);
        return dw;
    }
    weight_grad_on(g, x, dy, bf16, packed::wgrad::applies(g))
}

/// [`weight_grad`] on the path asked for (`direct`: [`packed::wgrad`], which must apply;
/// otherwise im2col and a GEMM).
fn weight_grad_on(
    g: &ConvShape,
    x: &[f32],
    dy: &[f32],
    bf16: Option<packed::bf16::Path>,
    direct: bool,
) -> Vec<f32> {
    let wlen = g.cout * g.kdim();
    if direct {
        return weight_grad_direct(g, x, dy, bf16 == Some(packed::bf16::Path::Dot));
    }
    let (group, cols, scratch) = group_plan(g);
    let groups = g.n.div_ceil(group);
    // A fixed split of the groups into one chunk per thread keeps the summation order,
    // and so the result, independent of scheduling.
    let chunks = threads().min(groups).max(1);
    let per_chunk = groups.div_ceil(chunks);
    let par = if chunks == 1 {
        parallelism(threads())
    } else {
        gemm::Parallelism::None
    };
    // Two orientations of the same product. The `gemm` crate packs its right operand
    // fast only when it is row-major; here one operand must be read transposed. While the
    // gradient is small (layers 1-3 of ResNet-18) accumulating dw^T [K, Cout] = col · dy^T
    // reads the smaller dy transposed and measured 1.5-2.4x faster; for layer4's 512 x 4608
    // gradient dw = dy · col^T measured 1.4x faster.
    // bf16 products (`packed::bf16::weight_grad_t`) accumulate dw^T.
    let transposed = bf16.is_some() || wlen <= 1 << 20;
    let taps = Taps::new(g);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; wlen];
            with_scratch(scratch, |buf| {
                for grp in c * per_chunk..((c + 1) * per_chunk).min(groups) {
                    let first = grp * group;
                    let count = group.min(g.n - first);
                    let (col_buf, dy_buf) = buf.split_at_mut(g.kdim() * cols);
                    let ld = count * g.out_hw();
                    let col = unfold(g, &taps, x, (first, count), col_buf);
                    let dyg: &[f32] = if count == 1 {
                        &dy[first * g.out_len()..(first + 1) * g.out_len()]
                    } else {
                        gather(dy, first, count, g.cout, g.out_hw(), dy_buf);
                        &dy_buf[..g.cout * ld]
                    };
                    if let Some(path) = bf16 {
                        packed::bf16::weight_grad_t(path, col, dyg, ld, &mut acc);
                    } else if transposed {
                        let (col, dyt) = (Mat::rows(col, ld), Mat::transposed(dyg, ld));
                        matmul((g.kdim(), g.cout, ld), &mut acc, col, dyt, true, par);
                    } else {
                        let (dyg, colt) = (Mat::rows(dyg, ld), Mat::transposed(col, ld));
                        matmul((g.cout, g.kdim(), ld), &mut acc, dyg, colt, true, par);
                    }
                }
            });
            acc
        })
        .collect();
    let mut iter = partials.into_iter();
    let mut total = iter.next().unwrap_or_else(|| vec![0f32; wlen]);
    for p in iter {
        crate::add_assign(&mut total, &p);
    }
    if !transposed {
        return total;
    }
    // dw [Cout, K] from dw^T [K, Cout], a row of dw per task.
    par_build(wlen, g.kdim(), |co, row| {
        for (r, d) in row.iter_mut().enumerate() {
            *d = total[r * g.cout + co];
        }
    })
}

/// [`packed::wgrad::weight_grad`] over the images split into one fixed range per thread
/// (the order of addition independent of scheduling), the partial sums added in order.
fn weight_grad_direct(g: &ConvShape, x: &[f32], dy: &[f32], bf16: bool) -> Vec<f32> {
    let chunks = threads().min(g.n).max(1);
    let per = g.n.div_ceil(chunks);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| packed::wgrad::weight_grad(g, (x, dy), c * per..((c + 1) * per).min(g.n), bf16))
        .collect();
    let mut iter = partials.into_iter();
    let mut total = iter.next().unwrap_or_else(|| vec![0f32; g.cout * g.kdim()]);
    for p in iter {
        crate::add_assign(&mut total, &p);
    }
    total
}

/// The differentiable convolution: (input, weight) → output.
#[derive(Clone, Copy, Debug)]
struct Conv2d {
    stride: usize,
    padding: usize,
    /// The input's dtype, which the products are rounded to.
    compute: DType,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "brisk-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvShape::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let out = conv_forward(
            &g,
            &operand(s1, l1, self.compute, "input")?,
            &operand(s2, l2, self.compute, "weight")?,
            products_in(self.compute),
        );
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &Conv2dInputGrad {
                    stride: self.stride,
                    padding: self.padding,
                    h,
                    w: wd,
                    compute: self.compute,
                },
            )?)
        } else {
            None
        };
        let (_, _, k, _) = w.dims4()?;
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Conv2dWeightGrad {
                stride: self.stride,
                padding: self.padding,
                k,
                compute: self.compute,
            },
        )?;
        Ok((dx, Some(dw)))
    }
}

/// (output gradient, weight) → input gradient, in the input's dtype `compute`. `h`, `w`
/// fix the input size, which a strided convolution's output does not determine.
#[derive(Clone, Copy, Debug)]
struct Conv2dInputGrad {
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
    compute: DType,
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "brisk-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[n, cout, ho, wo], &[_, cin, _, _]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!(
                "brisk conv2d input grad: bad shapes {:?} {:?}",
                l1.dims(),
                l2.dims()
            );
        };
        let g = ConvShape::new(&[n, cin, self.h, self.w], l2.dims(), self.stride, self.padding)?;
        if (g.cout, g.ho, g.wo) != (cout, ho, wo) {
            candle_core::bail!(
                "brisk conv2d input grad: gradient {:?} does not fit {g:?}",
                l1.dims()
            );
        }
        let dx = conv_input_grad(
            &g,
            &operand(s1, l1, self.compute, "gradient")?,
            &operand(s2, l2, self.compute, "weight")?,
            products_in(self.compute),
        );
        Ok((
            storage_of(dx, self.compute)?,
            Shape::from((n, cin, self.h, self.w)),
        ))
    }
}

/// (input, output gradient) → f32 weight gradient, products rounded to `compute`.
#[derive(Clone, Copy, Debug)]
struct Conv2dWeightGrad {
    stride: usize,
    padding: usize,
    k: usize,
    compute: DType,
}

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "brisk-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[_, cin, _, _], &[_, cout, _, _]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!(
                "brisk conv2d weight grad: bad shapes {:?} {:?}",
                l1.dims(),
                l2.dims()
            );
        };
        let g = ConvShape::new(l1.dims(), &[cout, cin, self.k, self.k], self.stride, self.padding)?;
        if l2.dims() != [g.n, g.cout, g.ho, g.wo] {
            candle_core::bail!(
                "brisk conv2d weight grad: gradient {:?} does not fit {g:?}",
                l2.dims()
            );
        }
        let dw = conv_weight_grad(
            &g,
            &operand(s1, l1, self.compute, "input")?,
            &operand(s2, l2, self.compute, "gradient")?,
            products_in(self.compute),
        );
        Ok((CpuStorage::F32(dw), Shape::from((cout, cin, self.k, self.k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_testkit::{max_rel, randn};
    use candle_core::{DType, Device, Var};

    /// (N, Cin, H, W, Cout, K, stride, padding).
    type Shape8 = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Odd sizes, stride 2, batch 1, 1x1 and 7x7,
    /// small maps (several images share a GEMM) and large ones.
    const SHAPES: [Shape8; 12] = [
        (2, 3, 7, 9, 4, 3, 1, 1),
        (1, 5, 8, 8, 6, 3, 2, 1),
        (3, 4, 9, 7, 5, 1, 2, 0),
        (2, 3, 11, 10, 4, 7, 2, 3),
        (1, 2, 5, 5, 3, 1, 1, 0),
        (2, 4, 6, 6, 3, 3, 1, 0),
        (1, 3, 4, 5, 2, 3, 2, 0),
        (5, 6, 3, 3, 7, 3, 1, 2),
        // Pointwise over several images (grouped into one GEMM), and a large map (one image a GEMM).
        (4, 3, 5, 5, 2, 1, 1, 0),
        (2, 3, 20, 18, 4, 3, 1, 1),
        // 1x1 maps: a 3x3 convolution with one tap inside the image (run as a pointwise
        // one), and a 5x5 with padding 2.
        (3, 5, 1, 1, 4, 3, 1, 1),
        (2, 4, 1, 1, 3, 5, 1, 2),
    ];

    /// Forward and both gradients of brisk's conv against candle's own conv2d and autograd.
    fn check(shape: Shape8) -> Result<()> {
        let (n, cin, h, w, cout, k, s, p) = shape;
        let x = Var::from_tensor(&randn(1, 0.0, 1.0, (n, cin, h, w))?)?;
        let wt = Var::from_tensor(&randn(2, 0.0, 1.0, (cout, cin, k, k))?)?;
        let ours = conv2d(&x, &wt, s, p)?;
        let reference = x.conv2d(&wt, p, s, 1, 1)?;
        assert_eq!(ours.dims(), reference.dims(), "{shape:?}");
        assert!(max_rel(&ours, &reference)? < 1e-5, "forward {shape:?}");
        // candle's own backward fails when the stride does not divide (size + 2 * padding -
        // kernel): its conv_transpose2d, run without output padding, returns an input
        // gradient one row or column short. The finite-difference test covers those shapes.
        if (h + 2 * p - k) % s != 0 || (w + 2 * p - k) % s != 0 {
            return Ok(());
        }
        let r = randn(3, 0.0, 1.0, ours.dims())?;
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_ref = (reference * &r)?.sum_all()?.backward()?;
        for (v, what) in [(&x, "input"), (&wt, "weight")] {
            let a = g_ours.get(v).expect("our grad");
            let b = g_ref.get(v).expect("reference grad");
            assert!(
                max_rel(a, b)? < 1e-5,
                "{what} gradient {shape:?}: {}",
                max_rel(a, b)?
            );
        }
        Ok(())
    }

    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        for shape in SHAPES {
            check(shape)?;
        }
        Ok(())
    }

    /// A convolution on a bf16/f16 input is the f32 convolution of the rounded input and
    /// weight; its gradients are the f32 gradients for the rounded output gradient (the
    /// input's rounded to its dtype, the weight's in f32). Bit for bit where the products
    /// run in f32; where bf16 ones run (`packed::isa::bf16_path`) the sums differ in order
    /// only: within 1e-5 of the largest value (f32 outputs) or one bf16 step (bf16 ones).
    #[test]
    fn half_inputs_compute_on_rounded_operands() -> Result<()> {
        let round = |t: &Tensor, d: DType| t.to_dtype(d).and_then(|t| t.to_dtype(DType::F32));
        let values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        for half in [DType::BF16, DType::F16] {
            let exact = half == DType::F16 || packed::isa::bf16_path().is_none();
            let agree = |what: &str, a: &Tensor, b: &Tensor, rel: f32| -> Result<()> {
                let (a, b) = (values(a)?, values(b)?);
                if exact {
                    assert_eq!(a, b, "{what} in {half:?}");
                    return Ok(());
                }
                let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(err <= rel * scale, "{what} in {half:?}: {err} of {scale}");
                Ok(())
            };
            for (n, cin, h, w, cout, k, s, p) in [SHAPES[0], SHAPES[3], SHAPES[8], SHAPES[9]] {
                let x32 = randn(4, 0.0, 1.0, (n, cin, h, w))?;
                let xh = Var::from_tensor(&x32.to_dtype(half)?)?;
                let xr = Var::from_tensor(&round(&x32, half)?)?;
                let wt = Var::from_tensor(&randn(5, 0.0, 1.0, (cout, cin, k, k))?)?;
                let wr = Var::from_tensor(&round(wt.as_tensor(), half)?)?;
                let yh = conv2d(&xh, &wt, s, p)?;
                let yr = conv2d(&xr, &wr, s, p)?;
                assert_eq!(yh.dtype(), DType::F32);
                agree("output", &yh, &yr, 1e-5)?;
                let probe = randn(6, 0.0, 1.0, yh.dims())?;
                let gh = (yh * &probe)?.sum_all()?.backward()?;
                let gr = (yr * round(&probe, half)?)?.sum_all()?.backward()?;
                let dxh = gh.get(&xh).expect("input gradient");
                assert_eq!(dxh.dtype(), half);
                let dxr = gr.get(&xr).expect("reference input gradient").to_dtype(half)?;
                agree("input gradient", dxh, &dxr, 1.0 / 128.0)?;
                let dwh = gh.get(&wt).expect("weight gradient");
                let dwr = gr.get(&wr).expect("reference weight gradient");
                assert_eq!(dwh.dtype(), DType::F32);
                agree("weight gradient", dwh, dwr, 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // Every shape, including those whose last input row or column no output reaches
        // (where candle's own backward fails).
        for shape in SHAPES {
            check_finite_differences(shape)?;
        }
        Ok(())
    }

    fn check_finite_differences(
        shape: (usize, usize, usize, usize, usize, usize, usize, usize),
    ) -> Result<()> {
        // The loss sum(conv(x, w) * r) is linear in each argument, so a central difference
        // is exact up to rounding.
        let dev = Device::Cpu;
        let (n, cin, h, w, cout, k, s, p) = shape;
        let x = Var::from_tensor(&randn(7, 0.0, 1.0, (n, cin, h, w))?)?;
        let wt = Var::from_tensor(&randn(8, 0.0, 1.0, (cout, cin, k, k))?)?;
        let out_dims = conv2d(&x, &wt, s, p)?.dims().to_vec();
        let r = randn(9, 0.0, 1.0, out_dims)?;
        let loss = |x: &Tensor, wt: &Tensor| -> Result<f64> {
            (conv2d(x, wt, s, p)? * &r)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
        };
        let grads = (conv2d(&x, &wt, s, p)? * &r)?.sum_all()?.backward()?;
        for (var, other, is_x) in [(&x, &wt, true), (&wt, &x, false)] {
            let g = grads.get(var).expect("grad").flatten_all()?.to_vec1::<f32>()?;
            let base = var.flatten_all()?.to_vec1::<f32>()?;
            for idx in (0..base.len()).step_by(base.len() / 23 + 1) {
                let eps = 0.5f32;
                let mut plus = base.clone();
                plus[idx] += eps;
                let mut minus = base.clone();
                minus[idx] -= eps;
                let shape = var.dims();
                let tp = Tensor::from_vec(plus, shape, &dev)?;
                let tm = Tensor::from_vec(minus, shape, &dev)?;
                let (lp, lm) = if is_x {
                    (loss(&tp, other)?, loss(&tm, other)?)
                } else {
                    (loss(other, &tp)?, loss(other, &tm)?)
                };
                let fd = (lp - lm) / (2.0 * eps as f64);
                assert!(
                    (fd - g[idx] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                    "{shape:?} idx {idx}: fd {fd} vs {}",
                    g[idx]
                );
            }
        }
        Ok(())
    }

    /// Shapes that exercise the packed kernels' edges: channel counts off the 8-row tiles,
    /// position counts off the 32-wide tiles and across the 256-position blocks,
    /// reductions longer than one 256-row block, images split between blocks, strides, 1x1
    /// and 7x7, rows packed by masked loads (wide or odd maps) and by gathers (small maps).
    const EDGE_SHAPES: [Shape8; 23] = [
        (3, 5, 12, 12, 13, 3, 1, 1),
        (4, 6, 8, 8, 10, 3, 2, 1),
        (2, 40, 6, 6, 9, 3, 1, 1),
        (4, 3, 9, 7, 8, 3, 2, 1),
        (2, 6, 11, 10, 7, 7, 2, 3),
        (5, 16, 4, 4, 24, 1, 2, 0),
        (3, 7, 5, 5, 6, 3, 1, 2),
        (2, 31, 3, 3, 17, 3, 1, 0),
        (9, 8, 4, 4, 16, 3, 1, 1),
        // Direct convolutions (stride 1, output rows of 16k positions), partial
        // 32-position groups, padding 0 and 2.
        (3, 5, 16, 16, 13, 3, 1, 1),
        (2, 3, 32, 32, 9, 3, 1, 1),
        (2, 4, 18, 17, 8, 3, 1, 0),
        (2, 6, 16, 16, 11, 5, 1, 2),
        (3, 9, 4, 16, 7, 1, 1, 0),
        // Direct convolutions of output rows off whole vectors (28, 14, 13 and 12
        // positions computed as 32, 30, 16 or 14) ...
        (2, 3, 28, 28, 16, 3, 1, 1),
        (3, 5, 14, 14, 9, 3, 1, 1),
        (3, 4, 12, 13, 8, 3, 1, 1),
        (2, 5, 9, 12, 10, 5, 1, 2),
        // ... and on padded rows, vectors running on into the next row (7 and 8 wide).
        (3, 6, 7, 7, 9, 3, 1, 1),
        (2, 5, 8, 8, 12, 3, 1, 1),
        // Stride 2 directly, on phase planes: 3x3 (even and odd sizes, padding 0) and 7x7.
        (2, 5, 32, 32, 13, 3, 2, 1),
        (3, 4, 35, 33, 9, 3, 2, 0),
        (2, 3, 32, 32, 16, 7, 2, 3),
    ];

    /// The packed kernels against im2col + `gemm`, forward and stride-1 input gradient, on
    /// the edge shapes.
    #[test]
    fn packed_kernels_match_the_gemm_path() {
        let max_diff = |a: &[f32], b: &[f32]| -> f32 {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
        };
        for (n, cin, h, wd, cout, k, s, p) in EDGE_SHAPES {
            let g = ConvShape::new(&[n, cin, h, wd], &[cout, cin, k, k], s, p).expect("shape");
            let len = |d: &[usize]| d.iter().product::<usize>();
            let x: Vec<f32> = (0..len(&[n, cin, h, wd]))
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..len(&[cout, cin, k, k]))
                .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let want = conv_forward_gemm(&g, &x, &w);
            for group in [1, 2, n] {
                let got = run_packed(&g, &x, &PackedWeight::rows(&w, cout, g.kdim()), group);
                let err = max_diff(&want, &got);
                assert!(
                    err < 1e-4,
                    "forward {:?} group {group}: {err}",
                    (n, cin, h, wd, cout, k, s, p)
                );
            }
            if let Some(flipped) = g.input_grad_as_conv() {
                let dy: Vec<f32> = (0..want.len())
                    .map(|i| ((i * 3 % 13) as f32 - 6.0) * 0.1)
                    .collect();
                let want = conv_input_grad_col2im(&g, &dy, &w);
                let got = run_packed(&flipped, &dy, &flipped_weight(&g, &w), 2);
                let err = max_diff(&want, &got);
                assert!(
                    err < 1e-4,
                    "input grad {:?}: {err}",
                    (n, cin, h, wd, cout, k, s, p)
                );
            }
        }
    }

    /// The direct weight gradient (`packed::wgrad`) against im2col + `gemm`, on every edge
    /// shape it takes plus a 32x32 map (one image split into blocks), padding 0 and 2,
    /// several image groups, channel counts off its 8-row blocks and stride 2; some shape
    /// of each kind must take it.
    #[test]
    fn direct_weight_grad_matches_the_gemm_path() {
        if !packed::available() {
            brisk_hosts::skipped(
                "brisk_ops::direct_weight_grad_matches_the_gemm_path",
                "this CPU lacks AVX-512F and AVX2",
            );
            return;
        }
        let mut shapes = EDGE_SHAPES.to_vec();
        shapes.extend([
            (3, 5, 32, 32, 11, 3, 1, 1),
            (9, 4, 8, 8, 21, 3, 1, 0),
            (5, 3, 7, 9, 8, 3, 1, 2),
            // Stride 2 on phase planes: even and odd sizes, paddings 0, 1 and 2.
            (3, 5, 32, 32, 11, 3, 2, 1),
            (2, 4, 17, 15, 9, 3, 2, 0),
            (2, 6, 16, 16, 16, 3, 2, 2),
        ]);
        let mut taken = 0;
        for (n, cin, h, wd, cout, k, s, p) in shapes {
            let g = ConvShape::new(&[n, cin, h, wd], &[cout, cin, k, k], s, p).expect("shape");
            if !packed::wgrad::applies(&g) {
                continue;
            }
            taken += 1;
            // bf16 values, so that the bf16 pair products (where this CPU has them) are
            // checked on the same operands.
            let bf16 = |v: Vec<f32>| -> Vec<f32> {
                let mut v = v;
                crate::half::round_to_bf16(&mut v);
                v
            };
            let x = bf16(
                (0..n * cin * h * wd)
                    .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
                    .collect(),
            );
            let dy = bf16(
                (0..n * g.out_len())
                    .map(|i| ((i * 3 % 13) as f32 - 6.0) * 0.1)
                    .collect(),
            );
            let want = weight_grad_on(&g, &x, &dy, None, false);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let mut paths = vec![None];
            if packed::bf16::supported() {
                paths.push(Some(packed::bf16::Path::Dot));
            }
            for path in paths {
                let got = weight_grad_on(&g, &x, &dy, path, true);
                let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "{path:?} {:?}: {err} of {scale}",
                    (n, cin, h, wd, cout, k, s, p)
                );
            }
        }
        assert!(taken >= 11, "only {taken} shapes ran directly");
        if !packed::bf16::supported() {
            brisk_hosts::skipped(
                "brisk_ops::direct_weight_grad_matches_the_gemm_path (bf16 pairs)",
                "this CPU lacks AVX512-BF16 (or AVX512-BW/VL)",
            );
        }
    }

    /// bf16 pair products (`vdpbf16ps`) against f32 products of the same bf16 values.
    #[test]
    fn bf16_products_match_f32_products_of_the_same_values() {
        if !packed::bf16::supported() {
            brisk_hosts::skipped(
                "brisk_ops::bf16_products_match_f32_products_of_the_same_values",
                "this CPU lacks AVX512-BF16 (or AVX512-BW/VL)",
            );
            return;
        }
        bf16_path_matches_f32_products(packed::bf16::Path::Dot);
    }

    /// AMX tile products (`tdpbf16ps`) against f32 products of the same bf16 values.
    #[test]
    fn amx_tile_products_match_f32_products_of_the_same_values() {
        if !packed::amx::supported() {
            brisk_hosts::skipped(
                "brisk_ops::amx_tile_products_match_f32_products_of_the_same_values",
                "this CPU lacks AMX-BF16 (or Linux refused the tile state)",
            );
            return;
        }
        bf16_path_matches_f32_products(packed::bf16::Path::Tiles(packed::amx::Unit::Amx));
    }

    /// The AMX drivers (weight tiles, padded reductions, 32-row blocks, the weight
    /// gradient's row operand) on the scalar model of the tile instruction: their layouts
    /// checked on any CPU.
    #[test]
    fn amx_drivers_on_the_tile_model_match_f32_products() {
        bf16_path_matches_f32_products(packed::bf16::Path::Tiles(packed::amx::Unit::Model));
    }

    /// `path`'s products against f32 products of the same bf16 values, forward, stride-1
    /// input gradient and weight gradient, on the edge shapes and on a reduction of 9 x 57
    /// rows (odd: a last pair half empty, and three 256-row blocks) with 70 output
    /// channels (three 32-row tile blocks, the last partial): the products are exact in
    /// both, so only the summation order differs.
    fn bf16_path_matches_f32_products(path: packed::bf16::Path) {
        let bf16 = |v: Vec<f32>| -> Vec<f32> {
            let mut v = v;
            crate::half::round_to_bf16(&mut v);
            v
        };
        let value = |i: usize, m: usize| ((i * 7 % m) as f32 - (m / 2) as f32) * 0.37;
        let mut shapes = EDGE_SHAPES.to_vec();
        shapes.push((2, 57, 8, 8, 70, 3, 1, 1));
        for (n, cin, h, wd, cout, k, s, p) in shapes {
            let g = ConvShape::new(&[n, cin, h, wd], &[cout, cin, k, k], s, p).expect("shape");
            let x = bf16((0..n * cin * h * wd).map(|i| value(i, 23)).collect());
            let w = bf16((0..cout * g.kdim()).map(|i| value(i, 17)).collect());
            let dy = bf16((0..g.n * g.out_len()).map(|i| value(i, 13)).collect());
            let scale = |v: &[f32]| v.iter().fold(1f32, |m, a| m.max(a.abs()));
            let check = |what: &str, want: &[f32], got: &[f32]| {
                let err = want.iter().zip(got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale(want) * (g.kdim() as f32).sqrt(),
                    "{path:?} {what} {:?}: {err} of {}",
                    (n, cin, h, wd, cout, k, s, p),
                    scale(want)
                );
            };
            let want = conv_forward_gemm(&g, &x, &w);
            for group in [1, n] {
                let a = PackedWeight::rows(&w, cout, g.kdim()).in_bf16(path);
                check("forward", &want, &run_packed(&g, &x, &a, group));
            }
            if let Some(flipped) = g.input_grad_as_conv() {
                let want = conv_input_grad_col2im(&g, &dy, &w);
                let got = run_packed(&flipped, &dy, &flipped_weight(&g, &w).in_bf16(path), 2);
                check("input grad", &want, &got);
            }
            // The weight gradient sums over every position of every image.
            let want = weight_grad_on(&g, &x, &dy, None, false);
            let got = weight_grad_on(&g, &x, &dy, Some(path), false);
            let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let bound = 1e-5 * scale(&want) * ((g.n * g.out_hw()) as f32).sqrt();
            assert!(
                err <= bound,
                "{path:?} weight grad {:?}: {err}",
                (n, cin, h, wd, cout, k, s, p)
            );
        }
    }

    #[test]
    fn input_gradient_is_skipped_for_plain_inputs() -> Result<()> {
        let x = randn(10, 0.0, 1.0, (2, 3, 6, 6))?;
        let wt = Var::from_tensor(&randn(11, 0.0, 1.0, (4, 3, 3, 3))?)?;
        let grads = conv2d(&x, &wt, 1, 1)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&wt).is_some());
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).expect("x");
        let w = Tensor::zeros((4, 3, 5, 5), DType::F32, &dev).expect("w");
        assert!(conv2d(&x, &w, 1, 0).is_err());
        let w2 = Tensor::zeros((4, 2, 1, 1), DType::F32, &dev).expect("w");
        assert!(conv2d(&x, &w2, 1, 0).is_err());
        // f64 inputs and half-precision weights (masters must be f32) are refused.
        let x64 = x.to_dtype(DType::F64).expect("f64");
        assert!(conv2d(&x64, &w, 1, 2).is_err());
        let wh = w.to_dtype(DType::BF16).expect("bf16");
        let e = conv2d(&x, &wh, 1, 2).expect_err("bf16 weight").to_string();
        assert!(e.contains("f32"), "{e}");
    }
}
