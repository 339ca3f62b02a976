//! cuDNN convolutions on NHWC device buffers: a small RAII layer of brisk's own over
//! cudarc's `cudnn::result` and `sys` (cudarc's safe types pick algorithms by heuristic
//! only and keep their raw handles private). A [`Cudnn`] handle on a stream; a
//! [`ConvOp`] per convolution shape, its descriptors made once from
//! [`conv_plan::describe`](crate::conv_plan::describe); its algorithms found once by timing
//! them (`cudnnFind*AlgorithmEx`; deterministic ones only when asked, [`choose`]); then the
//! forward, backward-data and backward-filter convolutions launched with the sizes of every
//! buffer checked first. A machine without cuDNN gets an error naming it, not cudarc's
//! panic.

use std::sync::Arc;

use cudarc::cudnn::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::conv_plan::{ConvData, CudnnConv, MathType, Tensor4d};
use crate::error::{Error, Result};

/// Whether the cuDNN library loads here.
pub fn cudnn_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it could.
    unsafe { sys::is_culib_present() }
}

/// The error for a machine without cuDNN.
fn missing() -> Error {
    Error::Missing {
        library: "libcudnn (cuDNN 9)",
        hint: "install cuDNN 9 for CUDA 13 (the `nvidia-cudnn-cu13` wheel has it) and put its lib \
               folder first on LD_LIBRARY_PATH (its sub-libraries are loaded by name from there)",
    }
}

/// The loaded cuDNN's version (9.x.y as 9xxyy; needs no GPU), or an error naming the
/// library where it is missing.
pub fn cudnn_version() -> Result<usize> {
    if !cudnn_present() {
        return Err(missing());
    }
    Ok(result::get_version())
}

fn cudnn_err(what: &str, e: result::CudnnError) -> Error {
    Error::Driver {
        what: format!("cuDNN {what}"),
        detail: format!("{e:?}"),
    }
}

/// A cuDNN handle whose work runs on one stream.
#[derive(Debug)]
pub struct Cudnn {
    handle: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

impl Cudnn {
    /// A handle on `stream`, or an error naming cuDNN where it is not installed.
    pub fn new(stream: Arc<CudaStream>) -> Result<Cudnn> {
        if !cudnn_present() {
            return Err(missing());
        }
        let handle = result::create_handle().map_err(|e| cudnn_err("creating a handle", e))?;
        // From here `Drop` destroys the handle, whatever fails next.
        let cudnn = Cudnn { handle, stream };
        // SAFETY: the handle was just created and is not destroyed before `cudnn` is; the
        // stream outlives it (`cudnn` holds an `Arc` of it).
        unsafe { result::set_stream(cudnn.handle, cudnn.stream.cu_stream() as _) }
            .map_err(|e| cudnn_err("setting the stream", e))?;
        Ok(cudnn)
    }

    /// The stream its work runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Drop for Cudnn {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` in `new`, destroyed only here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// Element types cuDNN convolves here, with the [`ConvData`] they are.
pub trait ConvElement: DeviceRepr {
    const DATA: ConvData;
}

impl ConvElement for f32 {
    const DATA: ConvData = ConvData::F32;
}

impl ConvElement for half::bf16 {
    const DATA: ConvData = ConvData::Bf16;
}

impl ConvElement for half::f16 {
    const DATA: ConvData = ConvData::F16;
}

fn data_type(data: ConvData) -> sys::cudnnDataType_t {
    match data {
        ConvData::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        ConvData::Bf16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        ConvData::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
    }
}

fn math_type(math: MathType) -> sys::cudnnMathType_t {
    match math {
        MathType::Fma => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        MathType::Default => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        MathType::TensorOp => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// A tensor descriptor, destroyed on drop.
#[derive(Debug)]
struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn new(t: &Tensor4d, data: ConvData) -> Result<Self> {
        let d =
            TensorDesc(result::create_tensor_descriptor().map_err(|e| cudnn_err("tensor descriptor", e))?);
        // SAFETY: `d.0` was just created and is destroyed only by `d`'s drop.
        unsafe { result::set_tensor4d_descriptor_ex(d.0, data_type(data), t.dims, t.strides) }
            .map_err(|e| cudnn_err(&format!("tensor {:?} strides {:?}", t.dims, t.strides), e))?;
        Ok(d)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A filter descriptor (KRSC: NHWC format), destroyed on drop.
#[derive(Debug)]
struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl FilterDesc {
    fn new(krsc: [i32; 4], data: ConvData) -> Result<Self> {
        let d =
            FilterDesc(result::create_filter_descriptor().map_err(|e| cudnn_err("filter descriptor", e))?);
        // SAFETY: `d.0` was just created and is destroyed only by `d`'s drop.
        unsafe {
            result::set_filter4d_descriptor(
                d.0,
                data_type(data),
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                krsc,
            )
        }
        .map_err(|e| cudnn_err(&format!("filter {krsc:?}"), e))?;
        Ok(d)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

/// A convolution descriptor (cross-correlation, f32 accumulation, the plan's math type),
/// destroyed on drop.
#[derive(Debug)]
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    fn new(p: &CudnnConv) -> Result<Self> {
        let d = ConvDesc(
            result::create_convolution_descriptor().map_err(|e| cudnn_err("convolution descriptor", e))?,
        );
        // SAFETY: `d.0` was just created and is destroyed only by `d`'s drop.
        unsafe {
            result::set_convolution2d_descriptor(
                d.0,
                p.pad[0],
                p.pad[1],
                p.stride[0],
                p.stride[1],
                p.dilation[0],
                p.dilation[1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .and_then(|()| result::set_convolution_math_type(d.0, math_type(p.math)))
        }
        .map_err(|e| cudnn_err(&format!("convolution {p:?}"), e))?;
        Ok(d)
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// One algorithm cuDNN timed: whether it ran, whether it is deterministic, the
/// workspace it needs and its time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timed {
    pub ran: bool,
    pub deterministic: bool,
    pub workspace: usize,
    pub ms: f32,
}

/// The algorithm to use among cuDNN's timings (`timed[i]` for algorithm i of the list it
/// returned): the fastest that ran within `workspace_limit` bytes, deterministic only
/// when `deterministic` is asked; `None` when none qualifies.
pub fn choose(timed: &[Timed], deterministic: bool, workspace_limit: usize) -> Option<usize> {
    timed
        .iter()
        .enumerate()
        .filter(|(_, t)| t.ran && t.workspace <= workspace_limit && (t.deterministic || !deterministic))
        .min_by(|a, b| a.1.ms.total_cmp(&b.1.ms))
        .map(|(i, _)| i)
}

/// The algorithms a convolution runs with, found once per shape.
#[derive(Clone, Copy, Debug)]
pub struct Algorithms {
    pub forward: sys::cudnnConvolutionFwdAlgo_t,
    pub backward_data: sys::cudnnConvolutionBwdDataAlgo_t,
    pub backward_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// The workspace bytes the three need (the largest of them).
    pub workspace: usize,
}

/// One convolution shape on cuDNN: its descriptors, and its algorithms once found.
#[derive(Debug)]
pub struct ConvOp {
    plan: CudnnConv,
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    algorithms: Option<Algorithms>,
}

/// Up to this many algorithms are timed per convolution.
const CANDIDATES: usize = 8;

impl ConvOp {
    /// The descriptors of `plan` (see [`crate::conv_plan::describe`]).
    pub fn new(plan: CudnnConv) -> Result<ConvOp> {
        Ok(ConvOp {
            x: TensorDesc::new(&plan.x, plan.data)?,
            w: FilterDesc::new(plan.filter, plan.data)?,
            y: TensorDesc::new(&plan.y, plan.data)?,
            conv: ConvDesc::new(&plan)?,
            plan,
            algorithms: None,
        })
    }

    /// What cuDNN was told.
    pub fn plan(&self) -> &CudnnConv {
        &self.plan
    }

    /// The algorithms found by [`ConvOp::find`], if it ran.
    pub fn algorithms(&self) -> Option<Algorithms> {
        self.algorithms
    }

    fn filter_len(&self) -> usize {
        self.plan.filter.iter().map(|&d| d as usize).product()
    }

    /// Checks the element type and the three buffers' lengths against the plan.
    fn check<T: ConvElement>(&self, what: &str, lens: [usize; 3]) -> Result<()> {
        let want = [self.plan.x.len(), self.filter_len(), self.plan.y.len()];
        if T::DATA != self.plan.data || lens != want {
            return Err(Error::Shape(format!(
                "cuDNN {what}: {:?} buffers of {lens:?} values for a {:?} convolution of {want:?} (x, w, y)",
                T::DATA,
                self.plan.data
            )));
        }
        Ok(())
    }

    /// Times cuDNN's algorithms for the three convolutions on these buffers (their
    /// outputs `y`, `dx`, `dw` are overwritten) and keeps the fastest within `workspace`
    /// (deterministic ones only when `deterministic`).
    pub fn find<T: ConvElement>(
        &mut self,
        cudnn: &Cudnn,
        (x, w, y): (&CudaSlice<T>, &CudaSlice<T>, &mut CudaSlice<T>),
        (dx, dw): (&mut CudaSlice<T>, &mut CudaSlice<T>),
        workspace: &mut CudaSlice<u8>,
        deterministic: bool,
    ) -> Result<Algorithms> {
        self.check::<T>("algorithm search", [x.len(), w.len(), y.len()])?;
        self.check::<T>("algorithm search", [dx.len(), dw.len(), y.len()])?;
        let stream = cudnn.stream.clone();
        let limit = workspace.len();
        let (xp, _rx) = x.device_ptr(&stream);
        let (wp, _rw) = w.device_ptr(&stream);
        let (yp, _ry) = y.device_ptr_mut(&stream);
        let (dxp, _rdx) = dx.device_ptr_mut(&stream);
        let (dwp, _rdw) = dw.device_ptr_mut(&stream);
        let (ws, _rws) = workspace.device_ptr_mut(&stream);
        let search = Search {
            op: self,
            handle: cudnn.handle,
            deterministic,
            workspace: (ws, limit),
        };
        // SAFETY: the buffers' lengths were checked against the descriptors above, they
        // and the workspace are device buffers on the handle's stream (pointers taken on
        // it), and the workspace holds `limit` bytes.
        let (fwd, bwd, flt) = unsafe {
            (
                search.forward(xp, wp, yp)?,
                search.backward_data(wp, yp, dxp)?,
                search.backward_filter(xp, yp, dwp)?,
            )
        };
        let found = Algorithms {
            forward: fwd.algo,
            backward_data: bwd.algo,
            backward_filter: flt.algo,
            workspace: fwd.memory.max(bwd.memory).max(flt.memory),
        };
        self.algorithms = Some(found);
        Ok(found)
    }

    fn found(&self, what: &str) -> Result<Algorithms> {
        self.algorithms.ok_or_else(|| Error::Driver {
            what: format!("cuDNN {what} of {:?}", self.plan),
            detail: "no algorithm found yet: call ConvOp::find first".into(),
        })
    }

    /// `y = x ⊛ w`.
    pub fn forward<T: ConvElement>(
        &self,
        cudnn: &Cudnn,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        workspace: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.check::<T>("forward", [x.len(), w.len(), y.len()])?;
        let algo = self.found("forward")?;
        let stream = cudnn.stream.clone();
        let (xp, _rx) = x.device_ptr(&stream);
        let (wp, _rw) = w.device_ptr(&stream);
        let (yp, _ry) = y.device_ptr_mut(&stream);
        let (ws, bytes) = workspace_ptr(workspace, &stream, algo.workspace)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: descriptors alive, pointers to buffers of the described lengths (checked),
        // the workspace holds what the algorithm needs (checked), alpha and beta are f32 as
        // cuDNN reads them for an f32 compute type.
        unsafe {
            result::convolution_forward(
                cudnn.handle,
                ptr(&alpha),
                self.x.0,
                xp as _,
                self.w.0,
                wp as _,
                self.conv.0,
                algo.forward,
                ws.0 as _,
                bytes,
                ptr(&beta),
                self.y.0,
                yp as _,
            )
        }
        .map_err(|e| cudnn_err("forward", e))
    }

    /// `dx` from the output gradient `dy` (backward data).
    pub fn backward_data<T: ConvElement>(
        &self,
        cudnn: &Cudnn,
        dy: &CudaSlice<T>,
        w: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        workspace: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.check::<T>("backward data", [dx.len(), w.len(), dy.len()])?;
        let algo = self.found("backward data")?;
        let stream = cudnn.stream.clone();
        let (dyp, _rdy) = dy.device_ptr(&stream);
        let (wp, _rw) = w.device_ptr(&stream);
        let (dxp, _rdx) = dx.device_ptr_mut(&stream);
        let (ws, bytes) = workspace_ptr(workspace, &stream, algo.workspace)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: as in `forward`.
        unsafe {
            result::convolution_backward_data(
                cudnn.handle,
                ptr(&alpha),
                self.w.0,
                wp as _,
                self.y.0,
                dyp as _,
                self.conv.0,
                algo.backward_data,
                ws.0 as _,
                bytes,
                ptr(&beta),
                self.x.0,
                dxp as _,
            )
        }
        .map_err(|e| cudnn_err("backward data", e))
    }

    /// `dw` from the input `x` and the output gradient `dy` (backward filter).
    pub fn backward_filter<T: ConvElement>(
        &self,
        cudnn: &Cudnn,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        dw: &mut CudaSlice<T>,
        workspace: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.check::<T>("backward filter", [x.len(), dw.len(), dy.len()])?;
        let algo = self.found("backward filter")?;
        let stream = cudnn.stream.clone();
        let (xp, _rx) = x.device_ptr(&stream);
        let (dyp, _rdy) = dy.device_ptr(&stream);
        let (dwp, _rdw) = dw.device_ptr_mut(&stream);
        let (ws, bytes) = workspace_ptr(workspace, &stream, algo.workspace)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: as in `forward`.
        unsafe {
            result::convolution_backward_filter(
                cudnn.handle,
                ptr(&alpha),
                self.x.0,
                xp as _,
                self.y.0,
                dyp as _,
                self.conv.0,
                algo.backward_filter,
                ws.0 as _,
                bytes,
                ptr(&beta),
                self.w.0,
                dwp as _,
            )
        }
        .map_err(|e| cudnn_err("backward filter", e))
    }
}

/// One of cuDNN's algorithm-search results (`cudnnConvolution*AlgoPerf_t`).
trait Perf: Copy {
    fn zeroed() -> Self;
    fn timed(&self) -> Timed;
}

macro_rules! perf {
    ($t:ty) => {
        impl Perf for $t {
            fn zeroed() -> Self {
                // SAFETY: a C struct of integers, a float and enums whose value 0 is a
                // variant (CUDNN_STATUS_SUCCESS, algorithm 0, ...): all zero is valid.
                unsafe { std::mem::zeroed() }
            }
            fn timed(&self) -> Timed {
                timing(self.status, self.determinism, self.memory, self.time)
            }
        }
    };
}
perf!(sys::cudnnConvolutionFwdAlgoPerf_t);
perf!(sys::cudnnConvolutionBwdDataAlgoPerf_t);
perf!(sys::cudnnConvolutionBwdFilterAlgoPerf_t);

/// A device pointer.
type Ptr = cudarc::driver::sys::CUdeviceptr;

/// One convolution's algorithm search: the handle, the workspace (pointer, bytes), and
/// which algorithms qualify.
struct Search<'a> {
    op: &'a ConvOp,
    handle: sys::cudnnHandle_t,
    deterministic: bool,
    workspace: (Ptr, usize),
}

impl Search<'_> {
    /// Runs cuDNN's search `find` (given the count it writes and an array of
    /// CANDIDATES results) and returns the [`choose`]n result.
    fn run<P: Perf>(
        &self,
        what: &str,
        find: impl FnOnce(&mut i32, *mut P) -> sys::cudnnStatus_t,
    ) -> Result<P> {
        let mut perf = [P::zeroed(); CANDIDATES];
        let mut n = 0;
        find(&mut n, perf.as_mut_ptr())
            .result()
            .map_err(|e| cudnn_err(&format!("{what} algorithm search"), e))?;
        let limit = self.workspace.1;
        let i = choose(&timings(&perf, n), self.deterministic, limit).ok_or_else(|| Error::Driver {
            what: format!("cuDNN {what} of {:?}", self.op.plan),
            detail: format!(
                "no algorithm ran within {limit} workspace bytes{}",
                if self.deterministic {
                    " deterministically"
                } else {
                    ""
                }
            ),
        })?;
        Ok(perf[i])
    }

    // The three searches. Safety, for each: `x`/`w`/`y` (or their gradients) are device
    // buffers of the lengths the op's descriptors describe, on the handle's stream, and
    // the workspace holds the bytes given; the descriptors are alive (owned by the op) and
    // `run` passes arrays of CANDIDATES results, the count requested.

    unsafe fn forward(&self, x: Ptr, w: Ptr, y: Ptr) -> Result<sys::cudnnConvolutionFwdAlgoPerf_t> {
        let (op, (ws, bytes)) = (self.op, self.workspace);
        // SAFETY: the caller keeps the contract said above these three searches.
        self.run("forward", |n, out| unsafe {
            sys::cudnnFindConvolutionForwardAlgorithmEx(
                self.handle,
                op.x.0,
                x as _,
                op.w.0,
                w as _,
                op.conv.0,
                op.y.0,
                y as _,
                CANDIDATES as i32,
                n,
                out,
                ws as _,
                bytes,
            )
        })
    }

    unsafe fn backward_data(
        &self,
        w: Ptr,
        dy: Ptr,
        dx: Ptr,
    ) -> Result<sys::cudnnConvolutionBwdDataAlgoPerf_t> {
        let (op, (ws, bytes)) = (self.op, self.workspace);
        // SAFETY: the caller keeps the contract said above these three searches.
        self.run("backward data", |n, out| unsafe {
            sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                self.handle,
                op.w.0,
                w as _,
                op.y.0,
                dy as _,
                op.conv.0,
                op.x.0,
                dx as _,
                CANDIDATES as i32,
                n,
                out,
                ws as _,
                bytes,
            )
        })
    }

    unsafe fn backward_filter(
        &self,
        x: Ptr,
        dy: Ptr,
        dw: Ptr,
    ) -> Result<sys::cudnnConvolutionBwdFilterAlgoPerf_t> {
        let (op, (ws, bytes)) = (self.op, self.workspace);
        // SAFETY: the caller keeps the contract said above these three searches.
        self.run("backward filter", |n, out| unsafe {
            sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                self.handle,
                op.x.0,
                x as _,
                op.y.0,
                dy as _,
                op.conv.0,
                op.w.0,
                dw as _,
                CANDIDATES as i32,
                n,
                out,
                ws as _,
                bytes,
            )
        })
    }
}

/// The first `n` of cuDNN's perf results as [`Timed`].
fn timings<P: Perf>(perf: &[P], n: i32) -> Vec<Timed> {
    perf[..(n.max(0) as usize).min(perf.len())]
        .iter()
        .map(P::timed)
        .collect()
}

/// One of cuDNN's perf results as [`Timed`].
fn timing(status: sys::cudnnStatus_t, determinism: sys::cudnnDeterminism_t, memory: usize, ms: f32) -> Timed {
    Timed {
        ran: status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
        deterministic: determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
        workspace: memory,
        ms,
    }
}

fn ptr(v: &f32) -> *const std::ffi::c_void {
    (v as *const f32).cast()
}

/// The workspace's device pointer (kept alive by the returned guard) and its size, or
/// an error when it is smaller than `need` bytes.
fn workspace_ptr<'a>(
    workspace: &'a mut CudaSlice<u8>,
    stream: &'a CudaStream,
    need: usize,
) -> Result<(
    (cudarc::driver::sys::CUdeviceptr, cudarc::driver::SyncOnDrop<'a>),
    usize,
)> {
    let bytes = workspace.len();
    if bytes < need {
        return Err(Error::Shape(format!(
            "cuDNN workspace of {bytes} bytes, the algorithms need {need}"
        )));
    }
    Ok((workspace.device_ptr_mut(stream), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ran: bool, deterministic: bool, workspace: usize, ms: f32) -> Timed {
        Timed {
            ran,
            deterministic,
            workspace,
            ms,
        }
    }

    #[test]
    fn the_fastest_qualifying_algorithm_is_chosen() {
        let timed = [
            t(false, true, 0, 0.1),      // failed to run
            t(true, false, 0, 0.2),      // fastest that ran, not deterministic
            t(true, true, 1 << 30, 0.3), // deterministic, too much workspace
            t(true, true, 1 << 10, 0.5),
            t(true, true, 0, 0.4),
        ];
        assert_eq!(choose(&timed, false, 1 << 20), Some(1));
        assert_eq!(choose(&timed, true, 1 << 20), Some(4));
        assert_eq!(choose(&timed, true, 1 << 31), Some(2));
        assert_eq!(choose(&timed[..1], false, 1 << 31), None);
        assert_eq!(choose(&[], false, 0), None);
    }

    /// Where cuDNN loads (no GPU needed), it is the cuDNN 9 cudarc's bindings are for;
    /// elsewhere the error names it and the test is recorded as SKIPPED.
    #[test]
    fn cudnn_loads_as_version_9_or_is_named_missing() {
        match cudnn_version() {
            Ok(v) => assert!((90_000..100_000).contains(&v), "cuDNN version {v}"),
            Err(e) => {
                assert!(!cudnn_present() && e.to_string().contains("libcudnn"), "{e}");
                brisk_hosts::skipped(
                    "brisk_cuda::cudnn_loads_as_version_9_or_is_named_missing",
                    "no cuDNN (libcudnn) on the library path",
                );
            }
        }
    }

    /// NCHW values as NHWC (or KCRS filters as KRSC: the same transposition).
    fn nhwc(v: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..hw {
                    out[(i * hw + p) * c + ch] = v[(i * c + ch) * hw + p];
                }
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + seed) % 23) as f32 * 0.1 - 1.1)
            .collect()
    }

    fn max_rel(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    /// On a GPU with cuDNN: forward, backward-data and backward-filter in strict f32
    /// against brisk-ops' kernels on the same values (NHWC here, NCHW there), for a
    /// stem-like, a block, a stride-2 and a 1x1 downsample convolution; elsewhere
    /// SKIPPED.
    #[test]
    fn convolutions_on_the_gpu_match_brisk_ops() -> Result<()> {
        const TEST: &str = "convolutions_on_the_gpu_match_brisk_ops";
        let Some(gpu) = crate::launch::test_gpu_with(TEST, "cuDNN (libcudnn)", cudnn_present()) else {
            return Ok(());
        };
        let stream = gpu.context().default_stream();
        let cudnn = Cudnn::new(stream.clone())?;
        let dev = |e: cudarc::driver::DriverError| crate::launch::driver("copying", e);
        let mut workspace = stream.alloc_zeros::<u8>(256 << 20).map_err(dev)?;
        for (n, cin, side, cout, k, stride, pad) in [
            (2, 3, 8, 16, 3, 1, 1),
            (3, 16, 8, 16, 3, 1, 1),
            (2, 16, 8, 32, 3, 2, 1),
            (2, 16, 8, 32, 1, 2, 0),
        ] {
            let g = brisk_ops::ConvShape::new(&[n, cin, side, side], &[cout, cin, k, k], stride, pad)
                .map_err(|e| Error::Shape(e.to_string()))?;
            let (x, w) = (values(n * cin * side * side, 1), values(cout * cin * k * k, 2));
            let hw_out = g.out_hw();
            let dy = values(n * cout * hw_out, 3);
            let f32s = brisk_ops::Products::F32;
            let want_y = nhwc(&brisk_ops::conv_forward(&g, &x, &w, f32s), n, cout, hw_out);
            let want_dx = nhwc(
                &brisk_ops::conv_input_grad(&g, &dy, &w, f32s),
                n,
                cin,
                side * side,
            );
            let want_dw = nhwc(&brisk_ops::conv_weight_grad(&g, &x, &dy, f32s), cout, cin, k * k);
            let geometry = crate::conv_plan::ConvGeometry {
                n,
                cin,
                h: side,
                w: side,
                cout,
                k,
                stride,
                pad,
            };
            let plan =
                crate::conv_plan::describe(&geometry, ConvData::F32, crate::conv_plan::F32Math::Strict)?;
            let mut op = ConvOp::new(plan)?;
            let xd = stream.clone_htod(&nhwc(&x, n, cin, side * side)).map_err(dev)?;
            let wd = stream.clone_htod(&nhwc(&w, cout, cin, k * k)).map_err(dev)?;
            let dyd = stream.clone_htod(&nhwc(&dy, n, cout, hw_out)).map_err(dev)?;
            let mut y = stream.alloc_zeros::<f32>(want_y.len()).map_err(dev)?;
            let mut dx = stream.alloc_zeros::<f32>(want_dx.len()).map_err(dev)?;
            let mut dw = stream.alloc_zeros::<f32>(want_dw.len()).map_err(dev)?;
            op.find(
                &cudnn,
                (&xd, &wd, &mut y),
                (&mut dx, &mut dw),
                &mut workspace,
                true,
            )?;
            op.forward(&cudnn, &xd, &wd, &mut y, &mut workspace)?;
            op.backward_data(&cudnn, &dyd, &wd, &mut dx, &mut workspace)?;
            op.backward_filter(&cudnn, &xd, &dyd, &mut dw, &mut workspace)?;
            for (what, got, want) in [
                ("forward", &y, &want_y),
                ("backward data", &dx, &want_dx),
                ("backward filter", &dw, &want_dw),
            ] {
                let got = stream.clone_dtoh(got).map_err(dev)?;
                let err = max_rel(&got, want);
                assert!(err < 1e-4, "{what} {g:?}: {err}");
            }
        }
        Ok(())
    }
}
