//! Access to the f32 data of a candle CPU storage, the one way every kernel reads its
//! inputs: contiguous f32 or an error naming the op and the argument.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The contiguous f32 values `layout` selects from `storage`.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("brisk {op}: {what} must be contiguous"),
        _ => candle_core::bail!("brisk {op}: {what} must be f32, got {:?}", storage.dtype()),
    }
}

/// The mutable counterpart of [`f32_slice`], for in-place ops.
pub(crate) fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a mut [f32]> {
    let dtype = storage.dtype();
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("brisk {op}: {what} must be contiguous"),
        _ => candle_core::bail!("brisk {op}: {what} must be f32, got {dtype:?}"),
    }
}
