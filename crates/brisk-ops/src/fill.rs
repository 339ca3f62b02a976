//! New f32 buffers written in parallel, each task zeroing only its own chunk right before
//! it fills it: no single-threaded zero-fill of the whole buffer first.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// A vector of `len` values, `chunk` per task: task `i` gets elements `i * chunk..` (the
/// last chunk may be shorter), zeroed, and `fill(i, values)` writes them.
///
/// `vec![0f32; n]` zeroes all of a reused heap block on the calling thread while the
/// other cores wait (measured: 46 ms of a 850 ms training step at width 1, batch 32);
/// here each task zeroes its chunk in cache just before writing it.
pub fn par_build(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| {
            part.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of `part` was initialised on the line above, and
            // MaybeUninit<f32> has f32's layout.
            let part = unsafe { std::slice::from_raw_parts_mut(part.as_mut_ptr().cast::<f32>(), part.len()) };
            fill(i, part);
        });
    // SAFETY: the chunks cover elements 0..len of the capacity, and each task initialised
    // its whole chunk before anything else (a panic in `fill` unwinds past this line).
    unsafe { v.set_len(len) };
    v
}

/// `len` zeros, zeroed in parallel.
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    par_build(len, 1 << 16, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_zeroed_then_filled_once() {
        // 10 values, 3 a chunk: chunks 0..3, 3..6, 6..9, 9..10.
        let v = par_build(10, 3, |i, part| {
            assert!(part.iter().all(|&x| x == 0.0), "chunk {i} not zeroed");
            for (j, x) in part.iter_mut().enumerate().skip(1) {
                *x = (i * 3 + j) as f32;
            }
        });
        assert_eq!(v, [0., 1., 2., 0., 4., 5., 0., 7., 8., 0.]);
        assert_eq!(par_zeros(100_000), vec![0f32; 100_000]);
        assert!(par_build(0, 4, |_, _| panic!("no chunks")).is_empty());
    }
}
