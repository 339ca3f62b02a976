//! Whole-model forward passes (eval and train mode) of a narrow CIFAR ResNet-18.

use brisk_models::{ModelSpec, Network};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};

fn forward(c: &mut Criterion) {
    let dev = Device::Cpu;
    let batch = 16;
    let net = Network::new(ModelSpec::resnet18_cifar(10).with_width(0.25), 0, &dev).expect("model");
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &dev).expect("input");
    let mut group = c.benchmark_group("resnet18_cifar_w025_b16");
    group.throughput(Throughput::Elements(batch as u64));
    group.sample_size(10);
    group.bench_function("forward_eval", |b| {
        b.iter(|| net.forward_t(&x, false).expect("forward"))
    });
    group.bench_function("forward_train", |b| {
        b.iter(|| net.forward_t(&x, true).expect("forward"))
    });
    group.finish();
}

criterion_group!(benches, forward);
