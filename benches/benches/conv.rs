//! brisk's convolution kernels on the CIFAR ResNet-18 conv shapes (batch 32): forward,
//! input gradient and weight gradient, in f32 and in bf16 (bf16 products where the CPU
//! is an AMD one with AVX512-BF16; `BRISK_ISA=avx512` forces f32 products to compare). Throughput is in FLOPs (criterion's "elem/s" read
//! as FLOP/s), so the distance to the machine's peak is visible.

use brisk_ops::conv2d;
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

/// (name, Cin, Cout, input size, kernel, stride). Then width-0.25 shapes of 8x8 images:
/// small maps (im2col by a tap table) and a 1x1 map (a pointwise convolution; its
/// throughput counts the nominal 3x3 FLOPs, padding products included); and of 28x28
/// images: narrow layers on direct convolutions whose output rows (28, 14) are computed
/// as whole 16-lane vectors.
const SHAPES: [(&str, usize, usize, usize, usize, usize); 12] = [
    ("layer1_64x32x32_k3", 64, 64, 32, 3, 1),
    ("layer2_128x16x16_k3", 128, 128, 16, 3, 1),
    ("layer3_256x8x8_k3", 256, 256, 8, 3, 1),
    ("layer4_512x4x4_k3", 512, 512, 4, 3, 1),
    ("layer3.0_128to256_s2_k3", 128, 256, 16, 3, 2),
    ("layer3.ds_128to256_s2_k1", 128, 256, 16, 1, 2),
    ("stem_3to64x32x32_k3", 3, 64, 32, 3, 1),
    ("small_16x8x8_k3", 16, 16, 8, 3, 1),
    ("small_32x4x4_k3", 32, 32, 4, 3, 1),
    ("small_128x1x1_k3", 128, 128, 1, 3, 1),
    ("narrow_16x28x28_k3", 16, 16, 28, 3, 1),
    ("narrow_32x14x14_k3", 32, 32, 14, 3, 1),
];

fn conv(c: &mut Criterion) {
    brisk_ops::init_compute(2).expect("threads");
    let dev = Device::Cpu;
    let batch = 32;
    let mut group = c.benchmark_group("conv2d_b32");
    group.sample_size(10);
    for (name, cin, cout, hw, k, s) in SHAPES {
        let pad = k / 2;
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, cin, hw, hw), &dev).expect("x")).expect("var");
        let w =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).expect("w")).expect("var");
        let ho = (hw + 2 * pad - k) / s + 1;
        let flops = 2 * (batch * cout * ho * ho * cin * k * k) as u64;
        group.throughput(Throughput::Elements(flops));
        group.bench_with_input(BenchmarkId::new("forward", name), &(), |b, _| {
            b.iter(|| conv2d(&x, &w, s, pad).expect("conv"))
        });
        // Backward with a plain input computes the weight gradient only; with a variable
        // input both gradients. Their difference is the input gradient's cost.
        let plain = x.as_tensor().detach();
        group.bench_with_input(BenchmarkId::new("forward+weight_grad", name), &(), |b, _| {
            b.iter(|| {
                conv2d(&plain, &w, s, pad)
                    .and_then(|y| y.sum_all()?.backward())
                    .expect("backward")
            })
        });
        group.bench_with_input(
            BenchmarkId::new("forward+weight_grad+input_grad", name),
            &(),
            |b, _| {
                b.iter(|| {
                    conv2d(&x, &w, s, pad)
                        .and_then(|y| y.sum_all()?.backward())
                        .expect("backward")
                })
            },
        );
        // A half layer of mixed-bf16: bf16 input, f32 master weight.
        let half = Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16).expect("bf16")).expect("var");
        group.bench_with_input(BenchmarkId::new("bf16_forward", name), &(), |b, _| {
            b.iter(|| conv2d(&half, &w, s, pad).expect("conv"))
        });
        group.bench_with_input(
            BenchmarkId::new("bf16_forward+weight_grad+input_grad", name),
            &(),
            |b, _| {
                b.iter(|| {
                    conv2d(&half, &w, s, pad)
                        .and_then(|y| y.sum_all()?.backward())
                        .expect("backward")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, conv);
