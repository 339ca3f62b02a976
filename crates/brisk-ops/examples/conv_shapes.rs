//! Times brisk's convolution (forward, input gradient, weight gradient) on every distinct
//! CIFAR ResNet-18 conv shape, with GFLOP/s, to see where a training step's time goes.
//!
//! `cargo run --release -p brisk-ops --example conv_shapes -- [BATCH] [THREADS] [WIDTH] [IMAGE] [CHANNELS]`
//! (defaults 32, 2, 1, 32, 3).

use std::time::Instant;

use anyhow::Result;
use brisk_ops::{ConvShape, Products};

/// Every distinct convolution of a CIFAR ResNet-18 of `width` on `image`-pixel images of
/// `channels` channels: (name, Cin, Cout, input size, kernel, stride, count in the network).
fn shapes(
    width: f64,
    image: usize,
    channels: usize,
) -> Vec<(String, usize, usize, usize, usize, usize, usize)> {
    let c = |base: f64| ((base * width).round() as usize).max(1);
    let half = |hw: usize| (hw - 1) / 2 + 1;
    let mut out = vec![
        ("stem".to_string(), channels, c(64.0), image, 3, 1, 1),
        ("layer1".into(), c(64.0), c(64.0), image, 3, 1, 4),
    ];
    let mut hw = image;
    for (i, base) in [128.0, 256.0, 512.0].into_iter().enumerate() {
        let (cin, cout, l) = (c(base / 2.0), c(base), i + 2);
        out.push((format!("layer{l}.0.conv1"), cin, cout, hw, 3, 2, 1));
        out.push((format!("layer{l}"), cout, cout, half(hw), 3, 1, 3));
        out.push((format!("layer{l}.ds"), cin, cout, hw, 1, 2, 1));
        hw = half(hw);
    }
    out
}

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
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let arg = |i: usize, default: f64| args.get(i).copied().unwrap_or(default);
    let batch = arg(0, 32.0) as usize;
    brisk_ops::init_compute(arg(1, 2.0) as usize)?;
    let (width, image, channels) = (arg(2, 1.0), arg(3, 32.0) as usize, arg(4, 3.0) as usize);
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
    for (name, cin, cout, hw, k, s, count) in shapes(width, image, channels) {
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
