//! GFLOP/s of brisk's matrix products on the shapes a CIFAR ResNet-18 step runs, in f32
//! (the `gemm` crate), bf16 (brisk's AVX512-BF16 kernel where the CPU has it) and f16
//! (rounded operands, f32 GEMM), with 1 and 2 threads: the measurements behind
//! docs/kernels.md.
//!
//! `cargo run --release -p brisk-ops --example gemm_shapes`

use std::time::Instant;

use candle_core::DType;

fn bench(dtype: DType, (m, n, k): (usize, usize, usize), threads: usize) -> candle_core::Result<f64> {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    brisk_ops::matmul_rows(dtype, (m, n, k), &mut c, &a, &b, false, threads)?;
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        brisk_ops::matmul_rows(dtype, (m, n, k), &mut c, &a, &b, false, threads)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * n * k) as f64 / best / 1e9)
}

fn main() -> candle_core::Result<()> {
    brisk_ops::init_compute(2)?;
    let shapes = [
        (64, 1024, 576),
        (576, 64, 1024),
        (256, 256, 2304),
        (2304, 256, 256),
        (512, 256, 4608),
    ];
    println!("threads (m, n, k): GFLOP/s f32 / bf16 / f16");
    for threads in [1, 2] {
        for s in shapes {
            println!(
                "{threads} {s:?}: {:.0} / {:.0} / {:.0}",
                bench(DType::F32, s, threads)?,
                bench(DType::BF16, s, threads)?,
                bench(DType::F16, s, threads)?
            );
        }
    }
    Ok(())
}
