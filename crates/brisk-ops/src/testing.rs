//! Helpers shared by the kernels' unit tests.

use candle_core::Tensor;

/// max |a - b| / max |b|: the error relative to the reference tensor's scale.
pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff");
    let scale = b
        .abs()
        .and_then(|t| t.max_all()?.to_scalar::<f32>())
        .expect("scale");
    diff / scale.max(1e-6)
}
