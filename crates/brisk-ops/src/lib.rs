//! Fast CPU kernels as candle custom ops with their own backward passes: 2-D convolution
//! (im2col/col2im + AVX-512 GEMM, forward, input gradient and weight gradient), padded
//! max-pooling and fused batch-norm training. Every op is checked against candle's reference op.

mod conv;
mod gemm;
mod pool;

pub use conv::conv2d;
pub use pool::max_pool2d;
