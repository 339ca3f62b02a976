//! Fast CPU kernels as candle custom ops: convolution and fused batch-norm (filled by the kernels issue).
