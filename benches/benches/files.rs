//! What checksums cost: a full-width CIFAR ResNet-18's 45 MB of weights serialised as
//! plain safetensors, with brisk's per-tensor checksums, verified, and written atomically
//! (temporary file, fsync, rename) — the write the checksums ride on.

use brisk_models::{ModelSpec, Network};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};

fn checksums(c: &mut Criterion) {
    let net = Network::new(ModelSpec::resnet18_cifar(10), 0, &Device::Cpu).expect("model");
    let tensors = net.named_tensors().expect("tensors");
    let views: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let path = std::path::Path::new("model.safetensors");
    let bytes = brisk_files::checksum::safetensors_with_checksums(views.clone(), Default::default(), path)
        .expect("serialise");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("resnet18_cifar_checkpoint");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(10);
    group.bench_function("serialise_plain", |b| {
        b.iter(|| {
            safetensors::serialize(views.iter().map(|(n, t)| (n.as_str(), *t)), None).expect("serialise")
        })
    });
    group.bench_function("serialise_with_checksums", |b| {
        b.iter(|| {
            brisk_files::checksum::safetensors_with_checksums(views.clone(), Default::default(), path)
                .expect("serialise")
        })
    });
    group.bench_function("verify", |b| {
        b.iter(|| brisk_files::checksum::verify_safetensors(&bytes, path).expect("verify"))
    });
    group.bench_function("write_atomic", |b| {
        b.iter(|| brisk_files::write_atomic(&dir.path().join("m.safetensors"), &bytes).expect("write"))
    });
    group.finish();
}

criterion_group!(benches, checksums);
