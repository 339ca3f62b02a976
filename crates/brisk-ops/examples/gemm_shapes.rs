//! GFLOP/s of the `gemm` crate on the matrix products a CIFAR ResNet-18 step runs, with 1
//! and 2 threads: the measurement behind the GEMM choice in docs/kernels.md.
//!
//! `cargo run --release -p brisk-ops --example gemm_shapes`

use std::time::Instant;

use gemm::{gemm, Parallelism};

fn bench(m: usize, n: usize, k: usize, par: Parallelism) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let mut run = || {
        // SAFETY: a is m x k, b is k x n and c is m x n, all row-major and in bounds.
        unsafe {
            gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    run();
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

fn main() {
    let shapes = [
        (64, 1024, 576),
        (576, 64, 1024),
        (256, 256, 2304),
        (2304, 256, 256),
        (512, 256, 4608),
    ];
    for (threads, par) in [(1, Parallelism::None), (2, Parallelism::Rayon(2))] {
        for (m, n, k) in shapes {
            println!("{threads} ({m}, {n}, {k}) {:.0} GFLOP/s", bench(m, n, k, par));
        }
    }
}
