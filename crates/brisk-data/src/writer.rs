//! `DatasetWriter`: packs images into safetensors shards as they stream in, holding at most
//! one shard per split in memory, and writes the manifest last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, ShardInfo, Split, MANIFEST_FILE, MANIFEST_FORMAT};

/// What the images of a dataset look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// Labels are stored as u16 when every class fits, else u32.
pub(crate) fn label_dtype(classes: usize) -> Dtype {
    if classes <= 1 << 16 {
        Dtype::U16
    } else {
        Dtype::U32
    }
}

#[derive(Debug, Default)]
struct Pending {
    images: Vec<u8>,
    labels: Vec<u32>,
    shards_written: usize,
}

/// Streams images into `DIR/{train,test}-NNNNN.safetensors` and `DIR/manifest.json`.
///
/// Each shard holds `images` u8 `[N, H, W, C]` and `labels` u16/u32 `[N]`, with the
/// dataset facts and the tensors' CRC-32s in its safetensors metadata; any safetensors
/// reader (Python's too) opens it. Per-channel mean and std of the training images are
/// accumulated on the way.
#[derive(Debug)]
pub struct DatasetWriter {
    dir: PathBuf,
    name: String,
    classes: Vec<String>,
    shape: ImageShape,
    shard_size: usize,
    pending: HashMap<Split, Pending>,
    shards: Vec<ShardInfo>,
    /// Per channel: sum and sum of squares of pixel / 255 over the training images.
    sums: Vec<(f64, f64)>,
    train_pixels: u64,
}

impl DatasetWriter {
    /// Starts a dataset in `dir` (created if needed). A folder that already holds a
    /// dataset is refused rather than overwritten. By default, shards hold 10,000 images.
    pub fn create(
        dir: &Path,
        name: &str,
        classes: Vec<String>,
        shape: ImageShape,
        shard_size: usize,
    ) -> Result<Self> {
        if classes.is_empty() {
            return Err(Error::InvalidConfig {
                field: "classes",
                problem: "at least one class is needed".into(),
            });
        }
        if shape.height == 0 || shape.width == 0 || shape.channels == 0 {
            return Err(Error::InvalidConfig {
                field: "shape",
                problem: format!("{shape:?} has a zero side"),
            });
        }
        if shard_size == 0 {
            return Err(Error::InvalidConfig {
                field: "shard_size",
                problem: "must be at least 1".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        let manifest = dir.join(MANIFEST_FILE);
        if manifest.exists() {
            return Err(Error::corrupt(
                &manifest,
                "already exists: remove the folder or pack into another one",
            ));
        }
        Ok(DatasetWriter {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            sums: vec![(0.0, 0.0); shape.channels],
            classes,
            shape,
            shard_size,
            pending: HashMap::new(),
            shards: Vec::new(),
            train_pixels: 0,
        })
    }

    /// Adds one image (`H * W * C` bytes, HWC order) with its label.
    pub fn push(&mut self, split: Split, image: &[u8], label: u32) -> Result<()> {
        let expected = self.shape.height * self.shape.width * self.shape.channels;
        if image.len() != expected {
            return Err(Error::InvalidConfig {
                field: "image",
                problem: format!(
                    "has {} bytes, expected {expected} ({:?})",
                    image.len(),
                    self.shape
                ),
            });
        }
        if label as usize >= self.classes.len() {
            return Err(Error::InvalidConfig {
                field: "label",
                problem: format!("{label} is out of range for {} classes", self.classes.len()),
            });
        }
        if split == Split::Train {
            let c = self.shape.channels;
            for (i, &v) in image.iter().enumerate() {
                let x = v as f64 / 255.0;
                let s = &mut self.sums[i % c];
                s.0 += x;
                s.1 += x * x;
            }
            self.train_pixels += (image.len() / c) as u64;
        }
        let p = self.pending.entry(split).or_default();
        p.images.extend_from_slice(image);
        p.labels.push(label);
        if p.labels.len() == self.shard_size {
            self.flush(split)?;
        }
        Ok(())
    }

    fn flush(&mut self, split: Split) -> Result<()> {
        let Some(p) = self.pending.get_mut(&split) else {
            return Ok(());
        };
        if p.labels.is_empty() {
            return Ok(());
        }
        let count = p.labels.len();
        let file = format!("{}-{:05}.safetensors", split.name(), p.shards_written);
        let label_bytes: Vec<u8> = match label_dtype(self.classes.len()) {
            Dtype::U16 => p.labels.iter().flat_map(|&l| (l as u16).to_le_bytes()).collect(),
            _ => p.labels.iter().flat_map(|&l| l.to_le_bytes()).collect(),
        };
        let info = ShardInfo {
            file: file.clone(),
            split,
            count,
            images_crc32: crc32fast::hash(&p.images),
            labels_crc32: crc32fast::hash(&label_bytes),
        };
        let path = self.dir.join(&file);
        let bad =
            |e: safetensors::SafeTensorError| Error::corrupt(&path, format!("cannot encode shard: {e}"));
        let images = TensorView::new(
            Dtype::U8,
            vec![count, self.shape.height, self.shape.width, self.shape.channels],
            &p.images,
        )
        .map_err(bad)?;
        let labels =
            TensorView::new(label_dtype(self.classes.len()), vec![count], &label_bytes).map_err(bad)?;
        let metadata = HashMap::from([
            ("format".to_string(), "brisk-shard".to_string()),
            ("dataset".to_string(), self.name.clone()),
            ("split".to_string(), split.name().to_string()),
            ("count".to_string(), count.to_string()),
            ("classes".to_string(), self.classes.len().to_string()),
            ("images_crc32".to_string(), info.images_crc32.to_string()),
            ("labels_crc32".to_string(), info.labels_crc32.to_string()),
        ]);
        let bytes =
            safetensors::serialize([("images", images), ("labels", labels)], Some(metadata)).map_err(bad)?;
        brisk_files::write_atomic(&path, &bytes)?;
        p.images.clear();
        p.labels.clear();
        p.shards_written += 1;
        self.shards.push(info);
        Ok(())
    }

    /// Writes the last shards and then the manifest; returns the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        for split in Split::ALL {
            self.flush(split)?;
        }
        let n = self.train_pixels.max(1) as f64;
        let mean: Vec<f32> = self.sums.iter().map(|s| (s.0 / n) as f32).collect();
        let std: Vec<f32> = self
            .sums
            .iter()
            .map(|s| ((s.1 / n - (s.0 / n).powi(2)).max(0.0)).sqrt() as f32)
            .collect();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            name: self.name,
            classes: self.classes,
            height: self.shape.height,
            width: self.shape.width,
            channels: self.shape.channels,
            mean,
            std,
            shards: self.shards,
        };
        let path = self.dir.join(MANIFEST_FILE);
        let json = brisk_files::checksum::json_with_checksum(&manifest, &path)?;
        brisk_files::write_atomic(&path, &json)?;
        Ok(manifest)
    }
}
