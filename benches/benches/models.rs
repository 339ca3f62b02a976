//! Whole-model passes of a narrow CIFAR ResNet-18 (width 0.25, batch 16): forward in eval
//! and train mode on candle's graph, and a whole training step's forward + backward on
//! candle's autograd graph against brisk's engine (the same step without the graph).

use brisk_models::{Engine, ModelSpec, Network};
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
    group.bench_function("step_graph", |b| {
        b.iter(|| {
            let logits = net.forward_t(&x, true).expect("forward");
            logits.sum_all().and_then(|l| l.backward()).expect("backward")
        })
    });
    let mut engine = Engine::new(&net).expect("engine");
    let images = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("images");
    let dlogits = vec![1f32; batch * 10];
    group.bench_function("step_engine", |b| {
        b.iter(|| {
            engine.forward_train(&images, batch).expect("forward");
            engine.backward(&dlogits).expect("backward")
        })
    });
    group.finish();
}

criterion_group!(benches, forward);
