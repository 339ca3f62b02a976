//! brisk's batch-norm passes over f32 slices on the CIFAR ResNet-18 layer1 and layer4
//! shapes (batch 32), as brisk's engine runs them: statistics, normalise (+ReLU), and the
//! backward's gradient sums and input gradient written over its incoming gradient.
//! Throughput is in values of the activation.

use brisk_ops::{bn_grad_sums, bn_input_grad_in_place, bn_normalize, bn_stats, BnParams};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

/// (name, channels, plane size).
const SHAPES: [(&str, usize, usize); 2] = [("layer1_64x32x32", 64, 1024), ("layer4_512x4x4", 512, 16)];

fn batchnorm(c: &mut Criterion) {
    brisk_ops::init_compute(2).expect("threads");
    let n = 32;
    let mut group = c.benchmark_group("batchnorm_b32");
    group.sample_size(10);
    for (name, ch, hw) in SHAPES {
        let len = n * ch * hw;
        let x: Vec<f32> = (0..len).map(|i| ((i * 7 % 29) as f32 - 14.0) * 0.1).collect();
        let dz: Vec<f32> = (0..len).map(|i| ((i * 3 % 17) as f32 - 8.0) * 0.05).collect();
        let affine: Vec<f32> = (0..2 * ch).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let stats = bn_stats(&x, n, ch, hw);
        group.throughput(Throughput::Elements(len as u64));
        group.bench_with_input(BenchmarkId::new("forward", name), &(), |b, _| {
            b.iter(|| {
                let stats = bn_stats(&x, n, ch, hw);
                let p = BnParams {
                    n,
                    c: ch,
                    hw,
                    stats: &stats,
                    affine: &affine,
                    eps: 1e-5,
                };
                bn_normalize(&x, &p, true, None)
            })
        });
        let p = BnParams {
            n,
            c: ch,
            hw,
            stats: &stats,
            affine: &affine,
            eps: 1e-5,
        };
        let mut g = dz.clone();
        group.bench_with_input(BenchmarkId::new("backward", name), &(), |b, _| {
            b.iter(|| {
                g.copy_from_slice(&dz);
                let sums = bn_grad_sums(&x, &g, &p);
                bn_input_grad_in_place(&x, &mut g, &p, &sums, true);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, batchnorm);
