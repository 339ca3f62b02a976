//! brisk's data: images packed once into safetensors shards with a `manifest.json`, opened
//! through memory maps and checked; the built-in synthetic dataset; the sampler,
//! augmentations and the prefetching `Loader` that hands the trainer plain f32 batches.
//!
//! ```
//! use brisk_data::{pack_synthetic, Dataset, Split, SyntheticConfig};
//! let dir = tempfile::tempdir().unwrap();
//! let config = SyntheticConfig { train: 20, test: 10, seed: 1, size: 16 };
//! pack_synthetic(dir.path(), &config, 8).unwrap();
//! let data = Dataset::open(dir.path()).unwrap();
//! let (image, label) = data.get(Split::Train, 3).unwrap();
//! assert_eq!((image.len(), label), (16 * 16 * 3, 3));
//! ```

pub mod augment;
pub mod dataset;
pub mod error;
pub mod import;
pub mod loader;
pub mod manifest;
pub mod preview;
pub mod sampler;
pub mod synthetic;
pub mod writer;

pub use augment::Augment;
pub use dataset::Dataset;
pub use error::{Error, Result};
pub use import::{pack_cifar, pack_folder, pack_idx, Cifar, IdxFiles};
pub use loader::{Batch, Epoch, Loader, LoaderConfig};
pub use manifest::{Manifest, ShardInfo, Split, MANIFEST_FILE};
pub use preview::write_preview;
pub use sampler::Sampler;
pub use synthetic::{pack_synthetic, SyntheticConfig, CLASSES as SYNTHETIC_CLASSES};
pub use writer::{DatasetWriter, ImageShape};
