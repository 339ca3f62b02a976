//! `manifest.json`: the dataset facts (classes, image shape, mean/std, shards and their
//! checksums) written beside the shards once packing has finished.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// `format` value of a brisk manifest.
pub const MANIFEST_FORMAT: &str = "brisk-dataset";

/// Which part of the dataset a shard belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];
    pub const NAMES: [&'static str; 2] = [Split::Train.name(), Split::Test.name()];

    pub const fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| crate::Error::InvalidConfig {
                field: "split",
                problem: format!("{s:?} is not one of {}", Split::NAMES.join(", ")),
            })
    }
}

/// One shard file as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name, relative to the dataset folder.
    pub file: String,
    pub split: Split,
    /// Images in the shard.
    pub count: usize,
    /// CRC-32 of the `images` tensor's bytes.
    pub images_crc32: u32,
    /// CRC-32 of the `labels` tensor's bytes.
    pub labels_crc32: u32,
}

/// Everything known about a packed dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Where the data came from (`synthetic`, `cifar10`, …).
    pub name: String,
    /// Class names; labels index this list.
    pub classes: Vec<String>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Per-channel mean of the training images, pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the training images, pixels scaled to [0, 1].
    pub std: Vec<f32>,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    /// Bytes of one image (H * W * C u8 values, HWC order).
    pub fn image_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Images in a split.
    pub fn count(&self, split: Split) -> usize {
        self.shards
            .iter()
            .filter(|s| s.split == split)
            .map(|s| s.count)
            .sum()
    }

    /// Reads and checks `DIR/manifest.json`; errors name the file and the problem.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::corrupt(
                    &path,
                    "missing: this is not a packed dataset, or packing did not finish (the manifest is written last)",
                )
            } else {
                Error::io("cannot read", &path, e)
            }
        })?;
        // The manifest carries its own checksum (datasets packed before it did read
        // unverified): a changed mean, std or class name must not pass silently.
        let (m, _): (Manifest, _) = brisk_files::checksum::json_checked(text.as_bytes(), &path)?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::corrupt(
                &path,
                format!("format is {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            ));
        }
        if m.version != 1 {
            return Err(Error::corrupt(
                &path,
                format!("version {} is not supported (expected 1)", m.version),
            ));
        }
        if m.classes.is_empty() || m.height == 0 || m.width == 0 || m.channels == 0 {
            return Err(Error::corrupt(
                &path,
                "classes, height, width and channels must all be non-empty",
            ));
        }
        if m.mean.len() != m.channels || m.std.len() != m.channels {
            return Err(Error::corrupt(
                &path,
                format!("mean and std must have {} entries", m.channels),
            ));
        }
        Ok(m)
    }
}
