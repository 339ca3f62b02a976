//! Times brisk's convolution (forward, input gradient, weight gradient) on every distinct
//! CIFAR ResNet-18 conv shape, with GFLOP/s, to see where a training step's time goes.
//!
//! `cargo run --release -p brisk-ops --example conv_shapes -- [BATCH] [THREADS]`

use std::time::Instant;

use anyhow::Result;
use brisk_ops::{ConvShape, Products};

/// (name, Cin, Cout, input size, kernel, stride, count in the network).
const SHAPES: [(&str, usize, usize, usize, usize, usize, usize); 11] = [
    ("stem", 3, 64, 32, 3, 1, 1),
    ("layer1", 64, 64, 32, 3, 1, 4),
    ("layer2.0.conv1", 64, 128, 32, 3, 2, 1),
    ("layer2", 128, 128, 16, 3, 1, 3),
    ("layer2.ds", 64, 128, 32, 1, 2, 1),
    ("layer3.0.conv1", 128, 256, 16, 3, 2, 1),
    ("layer3", 256, 256, 8, 3, 1, 3),
    ("layer3.ds", 128, 256, 16, 1, 2, 1),
    ("layer4.0.conv1", 256, 512, 8, 3, 2, 1),
    ("layer4", 512, 512, 4, 3, 1, 3),
    ("layer4.ds", 256, 512, 8, 1, 2, 1),
];

fn time<T>(mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let batch = args.first().copied().unwrap_or(32);
    brisk_ops::init_compute(args.get(1).copied().unwrap_or(2))?;
    brisk_ops::keep_freed_memory();
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}  (ms, best of 5; GFLOP/s)",
        "shape", "fwd", "dx", "dw", "fwd", "dx", "dw"
    );
    let mut totals = [0f64; 3];
    let values = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + seed) % 23) as f32 * 0.1 - 1.1)
            .collect()
    };
    for (name, cin, cout, hw, k, s, count) in SHAPES {
        let g = ConvShape::new(&[batch, cin, hw, hw], &[cout, cin, k, k], s, k / 2)?;
        let x = values(batch * g.in_len(), 1);
        let w = values(cout * cin * k * k, 2);
        let dy = values(batch * g.out_len(), 3);
        let flops = 2.0 * (batch * g.out_len() * cin * k * k) as f64;
        let fwd = time(|| Ok(brisk_ops::conv_forward(&g, &x, &w, Products::F32)))?;
        let dx = time(|| Ok(brisk_ops::conv_input_grad(&g, &dy, &w, Products::F32)))?;
        let dw = time(|| Ok(brisk_ops::conv_weight_grad(&g, &x, &dy, Products::F32)))?;
        for (t, v) in totals.iter_mut().zip([fwd, dx, dw]) {
            *t += v * count as f64;
        }
        println!(
            "{name:<16} {:>9.2} {:>9.2} {:>9.2} {:>7.0} {:>7.0} {:>7.0}",
            fwd * 1e3,
            dx * 1e3,
            dw * 1e3,
            flops / fwd / 1e9,
            flops / dx / 1e9,
            flops / dw / 1e9
        );
    }
    println!(
        "network totals (ms): forward {:.1}, input grad {:.1}, weight grad {:.1}",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
    Ok(())
}
