//! Fast CPU kernels as candle custom ops with their own backward passes: 2-D convolution
//! (im2col/col2im + AVX-512 GEMM, forward, input gradient and weight gradient), padded
//! max-pooling, fused batch-norm (+ReLU) and the fused SGD update. Every op is checked against candle's reference op.

mod batchnorm;
mod conv;
mod gemm;
mod optim;
mod pool;

pub use batchnorm::{batch_norm, BatchNormOutput};
pub use conv::conv2d;
pub use optim::{sgd_update, SgdStep};
pub use pool::max_pool2d;

/// Sets the number of compute threads for brisk's kernels and candle's own CPU ops (both
/// run on rayon's global pool; candle also reads `RAYON_NUM_THREADS`). Call once, early,
/// before any tensor work; a second call with another count is an error.
pub fn set_threads(threads: usize) -> candle_core::Result<()> {
    if threads == 0 {
        candle_core::bail!("thread count must be at least 1");
    }
    // candle reads the variable whenever it sizes its work; setting it before any
    // compute thread exists keeps every reader consistent.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == threads => Ok(()),
        Err(e) => candle_core::bail!("cannot use {threads} threads: the thread pool already runs {} ({e})", rayon::current_num_threads()),
    }
}
