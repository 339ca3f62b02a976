//! brisk's data: images packed once into safetensors shards with a `manifest.json`, opened
//! through memory maps and checked, and the built-in synthetic dataset. (The importers,
//! sampler, augmentations and prefetching `Loader` arrive with the rest of the data issue.)
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

pub mod dataset;
pub mod error;
pub mod manifest;
pub mod synthetic;
pub mod writer;

pub use dataset::Dataset;
pub use error::{Error, Result};
pub use manifest::{Manifest, ShardInfo, Split, MANIFEST_FILE};
pub use synthetic::{pack_synthetic, SyntheticConfig, CLASSES as SYNTHETIC_CLASSES};
pub use writer::{DatasetWriter, ImageShape};
