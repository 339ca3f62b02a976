//! The fuzz campaign: damaged copies of every file brisk reads — shard, manifest, model
//! (dense, sparse, int8) and its sidecar, optimizer state, checkpoint state, run config,
//! IDX (plain and gzip), CIFAR binaries, an image folder's PNG — each fed to its reader.
//! Every input must get an error or a valid result: no panic, and no single allocation
//! larger than the input justifies (a length field claiming gigabytes must not be
//! believed). The damage comes from proptest: bit flips, truncations at every length,
//! overwritten runs, oversized 4- and 8-byte length fields, random bytes.
//!
//! `BRISK_FUZZ_CASES=N` sets the cases per reader (48 by default; docs/reliability.md
//! reports a larger campaign run by hand).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::Result;
use brisk_models::{ModelSpec, Network};
use brisk_testkit::write_idx;
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Tracks the largest single allocation since the last reset.
struct Peak;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the wrapper only
// records sizes.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Peak = Peak;

/// The most a reader may allocate at once for an input of `len` bytes: a generous
/// multiple of the input (decoding, f32 widening, a model built from its file) plus a
/// constant for buffers and thread pools — far below what a believed length field asks.
fn allocation_bound(len: usize) -> usize {
    (64 << 20) + 256 * len
}

/// The tests share one allocation counter: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn cases() -> u32 {
    std::env::var("BRISK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}

/// One way to damage a file.
#[derive(Clone, Debug)]
enum Damage {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        keep: usize,
    },
    Overwrite {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A 4- or 8-byte little- or big-endian field set huge (length fields, dims).
    Huge {
        at: usize,
        wide: bool,
        big_endian: bool,
    },
    Random(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        2 => any::<usize>().prop_map(|keep| Damage::Truncate { keep }),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
        2 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(at, wide, big_endian)| Damage::Huge { at, wide, big_endian }),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Random),
    ]
}

impl Damage {
    fn apply(&self, original: &[u8]) -> Vec<u8> {
        let mut b = original.to_vec();
        let n = b.len().max(1);
        match self {
            Damage::Flip { at, bit } if !b.is_empty() => b[at % n] ^= 1 << bit,
            Damage::Truncate { keep } => b.truncate(keep % n),
            Damage::Overwrite { at, bytes } => {
                for (i, v) in bytes.iter().enumerate() {
                    if let Some(x) = b.get_mut((at % n) + i) {
                        *x = *v;
                    }
                }
            }
            Damage::Huge { at, wide, big_endian } => {
                let value: u64 = if *wide { 1 << 40 } else { 0x7fff_fff0 };
                let bytes: Vec<u8> = match (wide, big_endian) {
                    (true, true) => value.to_be_bytes().to_vec(),
                    (true, false) => value.to_le_bytes().to_vec(),
                    (false, true) => (value as u32).to_be_bytes().to_vec(),
                    (false, false) => (value as u32).to_le_bytes().to_vec(),
                };
                let start = (at % n).min(b.len().saturating_sub(bytes.len()));
                for (i, v) in bytes.into_iter().enumerate() {
                    if let Some(x) = b.get_mut(start + i) {
                        *x = v;
                    }
                }
            }
            Damage::Random(bytes) => b = bytes.clone(),
            Damage::Flip { .. } => {}
        }
        b
    }
}

/// Valid inputs for every reader, made once.
struct Seeds {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| make_seeds().expect("the campaign's seed files"))
}

fn make_seeds() -> Result<Seeds> {
    brisk_ops::init_compute(1)?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    brisk_testkit::pack_synthetic(&root.join("data"), 24, 8, 8)?;
    let mut spec = ModelSpec::seresnet18_cifar(10).with_width(0.0625);
    spec.image_size = 8;
    spec.se_ratio = 2;
    let net = Network::new(spec, 3, &Device::Cpu)?;
    net.save(&root.join("model.safetensors"))?;
    let masks = brisk_compress::Masks::magnitude(&net, 0.5, brisk_compress::Scope::Global, &[])?;
    masks.apply()?;
    brisk_compress::sparse::save(&net, &root.join("sparse.safetensors"))?;
    brisk_compress::quantize::save(&net, &root.join("int8.safetensors"))?;
    let velocity = vec![(
        "velocity.fc.weight".to_string(),
        Tensor::ones((10, 32), candle_core::DType::F32, &Device::Cpu)?,
    )];
    let state = brisk_train::checkpoint::TrainState::new(Default::default(), Default::default(), None, 0);
    brisk_train::checkpoint::write(&root.join("checkpoints"), &net, &velocity, &state)?;
    let mut config = brisk_train::TrainConfig::default();
    config.set_text("optimizer.kind", "adamw")?;
    config.write(&root.join("config.toml"))?;
    write_idx(&root.join("images.idx"), &[3, 5, 4], &[7; 60], false)?;
    write_idx(&root.join("labels.idx"), &[3], &[1, 2, 0], false)?;
    write_idx(&root.join("images.idx.gz"), &[3, 5, 4], &[9; 60], true)?;
    write_idx(&root.join("labels.idx.gz"), &[3], &[2, 0, 1], true)?;
    let record: Vec<u8> = std::iter::once(3u8)
        .chain((0..3072).map(|i| (i % 251) as u8))
        .collect();
    std::fs::write(root.join("data_batch.bin"), [record.clone(), record].concat())?;
    for class in ["cat", "dog"] {
        let d = root.join("folder").join(class);
        std::fs::create_dir_all(&d)?;
        for i in 0..2 {
            image::RgbImage::from_pixel(6, 5, image::Rgb([i * 40, 90, 200]))
                .save(d.join(format!("{i}.png")))?;
        }
    }
    Ok(Seeds { _dir: dir, root })
}

/// Copies the seed `name` (a file or folder) into a fresh folder, damages `target`
/// inside it, runs `read` on the copy, and checks it ended well: a result or an error,
/// no panic (proptest reports one as a failure), no outsized allocation.
fn case(
    name: &str,
    target: &str,
    d: &Damage,
    read: impl Fn(&Path) -> bool,
) -> std::result::Result<(), TestCaseError> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let from = seeds().root.join(name);
    let to = work.path().join(name);
    copy(&from, &to).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let file = work.path().join(target);
    let original = std::fs::read(&file).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let damaged = d.apply(&original);
    std::fs::write(&file, &damaged).map_err(|e| TestCaseError::fail(e.to_string()))?;
    LARGEST.store(0, Ordering::Relaxed);
    let _accepted = read(work.path());
    let largest = LARGEST.load(Ordering::Relaxed);
    let input: usize = size_of(&to);
    prop_assert!(
        largest <= allocation_bound(input),
        "{target} damaged by {d:?}: one allocation of {largest} bytes for {input} bytes of input"
    );
    Ok(())
}

fn size_of(path: &Path) -> usize {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len() as usize)
    }
}

fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}

fn dataset(dir: &Path) -> bool {
    brisk_data::Dataset::open(&dir.join("data"))
        .and_then(|d| d.verify())
        .is_ok()
}

fn model(file: &str) -> impl Fn(&Path) -> bool + '_ {
    move |dir| brisk_compress::load_model(&dir.join(file), &Device::Cpu).is_ok()
}

fn checkpoint(dir: &Path) -> bool {
    let found = brisk_train::checkpoint::list(&dir.join("checkpoints")).unwrap_or_default();
    found
        .iter()
        .any(|(_, d)| brisk_train::checkpoint::read(d, &Device::Cpu).is_ok())
}

fn idx(gz: &str) -> impl Fn(&Path) -> bool + '_ {
    move |dir| {
        let files = brisk_data::IdxFiles {
            images: dir.join(format!("images.idx{gz}")),
            labels: dir.join(format!("labels.idx{gz}")),
        };
        brisk_data::pack_idx(&files, &files, &dir.join("out"), 16).is_ok()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn shards(d in damage()) {
        case("data", "data/train-00000.safetensors", &d, dataset)?;
    }

    #[test]
    fn manifests(d in damage()) {
        case("data", "data/manifest.json", &d, dataset)?;
    }

    #[test]
    fn dense_models(d in damage()) {
        case("model.safetensors", "model.safetensors", &d, model("model.safetensors"))?;
    }

    #[test]
    fn sidecars(d in damage()) {
        case("model.json", "model.json", &d, |dir| {
            let _ = std::fs::copy(seeds().root.join("model.safetensors"), dir.join("model.safetensors"));
            model("model.safetensors")(dir)
        })?;
    }

    #[test]
    fn sparse_models(d in damage()) {
        case("sparse.safetensors", "sparse.safetensors", &d, |dir| {
            let _ = std::fs::copy(seeds().root.join("sparse.json"), dir.join("sparse.json"));
            model("sparse.safetensors")(dir)
        })?;
    }

    #[test]
    fn int8_models(d in damage()) {
        case("int8.safetensors", "int8.safetensors", &d, |dir| {
            let _ = std::fs::copy(seeds().root.join("int8.json"), dir.join("int8.json"));
            model("int8.safetensors")(dir)
        })?;
    }

    #[test]
    fn optimizer_states(d in damage()) {
        case("checkpoints", "checkpoints/step-000000000/optimizer.safetensors", &d, checkpoint)?;
    }

    #[test]
    fn training_states(d in damage()) {
        case("checkpoints", "checkpoints/step-000000000/state.json", &d, checkpoint)?;
    }

    #[test]
    fn run_configs(d in damage()) {
        case("config.toml", "config.toml", &d, |dir| brisk_train::TrainConfig::from_file(&dir.join("config.toml")).is_ok())?;
    }

    #[test]
    fn idx_files(d in damage(), labels in any::<bool>()) {
        let target = if labels { "labels.idx" } else { "images.idx" };
        case(target, target, &d, |dir| {
            let other = if labels { "images.idx" } else { "labels.idx" };
            let _ = std::fs::copy(seeds().root.join(other), dir.join(other));
            idx("")(dir)
        })?;
    }

    #[test]
    fn gzipped_idx_files(d in damage(), labels in any::<bool>()) {
        let target = if labels { "labels.idx.gz" } else { "images.idx.gz" };
        case(target, target, &d, |dir| {
            let other = if labels { "images.idx.gz" } else { "labels.idx.gz" };
            let _ = std::fs::copy(seeds().root.join(other), dir.join(other));
            idx(".gz")(dir)
        })?;
    }

    #[test]
    fn cifar_binaries(d in damage()) {
        case("data_batch.bin", "data_batch.bin", &d, |dir| {
            let input = dir.join("cifar");
            let _ = std::fs::create_dir_all(&input);
            for name in ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"] {
                let _ = std::fs::copy(dir.join("data_batch.bin"), input.join(name));
            }
            brisk_data::pack_cifar(&input, &dir.join("out"), brisk_data::Cifar::Ten, 16).is_ok()
        })?;
    }

    #[test]
    fn image_folders(d in damage()) {
        case("folder", "folder/cat/0.png", &d, |dir| {
            brisk_data::pack_folder(&dir.join("folder"), &dir.join("out"), 8, 0.5, 16).is_ok()
        })?;
    }
}
