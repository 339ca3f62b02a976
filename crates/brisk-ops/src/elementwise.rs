//! Element-wise helpers over f32 slices that the engine's backward pass uses between
//! layers: ReLU's backward and the sum where a residual block's branches meet.

use rayon::prelude::*;

/// ReLU's backward over f32 slices, in place: `dy` is kept where the output `y` is
/// positive and zeroed elsewhere (no new buffer: the engine owns its gradients).
pub fn relu_backward(y: &[f32], dy: &mut [f32]) {
    assert_eq!(y.len(), dy.len(), "relu_backward: lengths differ");
    dy.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| {
            // A select, not a branch: the signs are random, and the select vectorises.
            for (g, &y) in g.iter_mut().zip(y) {
                *g = if y > 0.0 { *g } else { 0.0 };
            }
        });
}

/// `dst += src`, element by element, in parallel: where a residual block's two branch
/// gradients meet.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_assign_adds_every_element_across_chunk_boundaries() {
        let len = 3 * (1 << 14) + 123;
        let a: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.5).collect();
        let b: Vec<f32> = (0..len).map(|i| (i % 31) as f32 - 15.0).collect();
        let mut sum = a.clone();
        add_assign(&mut sum, &b);
        for i in 0..len {
            assert_eq!(sum[i], a[i] + b[i], "element {i}");
        }
    }

    #[test]
    fn relu_backward_keeps_the_gradient_where_the_output_is_positive() {
        let y = [1.0, 0.0, -2.0, 3.0];
        let mut dy = [0.5, 0.25, 4.0, -1.0];
        relu_backward(&y, &mut dy);
        assert_eq!(dy, [0.5, 0.0, 0.0, -1.0]);
    }
}
