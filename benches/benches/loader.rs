//! The prefetching loader on CIFAR-shaped data (32x32x3, crop + flip + normalise, batch
//! 128): one epoch of 5,000 images with 2 workers and synchronously.

use std::sync::Arc;

use brisk_data::{pack_synthetic, Dataset, Loader, LoaderConfig, SyntheticConfig};
use criterion::{criterion_group, Criterion, Throughput};

fn loader(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SyntheticConfig {
        train: 5_000,
        test: 0,
        seed: 0,
        size: 32,
    };
    pack_synthetic(dir.path(), &config, 2_500).expect("pack");
    let data = Arc::new(Dataset::open(dir.path()).expect("open"));
    let mut group = c.benchmark_group("loader_epoch_5000_b128");
    group.throughput(Throughput::Elements(5_000));
    group.sample_size(10);
    for (name, workers) in [("workers2", 2), ("sync", 0)] {
        let l = Loader::new(
            data.clone(),
            LoaderConfig {
                workers,
                ..LoaderConfig::train(&data)
            },
        )
        .expect("loader");
        group.bench_function(name, |b| b.iter(|| l.measure(128, 1).expect("epoch")));
    }
    group.finish();
}

criterion_group!(benches, loader);
