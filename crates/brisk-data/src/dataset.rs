//! `Dataset`: a packed dataset opened through memory maps, zero-copy, with every header,
//! shape, count and label checked against the manifest at open and checksums on demand.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::manifest::{Manifest, ShardInfo, Split};
use crate::writer::label_dtype;

/// One shard, mapped.
#[derive(Debug)]
struct Shard {
    info: ShardInfo,
    path: PathBuf,
    map: Mmap,
    images: Range<usize>,
    labels: Range<usize>,
    /// 2 (u16) or 4 (u32).
    label_width: usize,
}

impl Shard {
    fn label(&self, i: usize) -> u32 {
        let at = self.labels.start + i * self.label_width;
        let b = &self.map[at..at + self.label_width];
        match self.label_width {
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// A packed dataset. Images are borrowed straight from the memory-mapped shards.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
}

impl Dataset {
    /// Opens `dir`: reads the manifest, maps every shard and checks its header, tensor
    /// names, dtypes and shapes, its count and metadata against the manifest, and every
    /// label against the class count. Errors name the file and the problem.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for info in &manifest.shards {
            shards.push(open_shard(dir, info, &manifest)?);
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Images in a split.
    pub fn len(&self, split: Split) -> usize {
        self.manifest.count(split)
    }

    /// True when a split has no images.
    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    /// Image `index` of a split (HWC bytes, borrowed from the map) and its label, or
    /// `None` past the end.
    pub fn get(&self, split: Split, index: usize) -> Option<(&[u8], u32)> {
        let mut i = index;
        for s in self.shards.iter().filter(|s| s.info.split == split) {
            if i < s.info.count {
                let n = self.manifest.image_bytes();
                let start = s.images.start + i * n;
                return Some((&s.map[start..start + n], s.label(i)));
            }
            i -= s.info.count;
        }
        None
    }

    /// Images per class in a split.
    pub fn class_histogram(&self, split: Split) -> Vec<usize> {
        let mut h = vec![0; self.manifest.classes.len()];
        for s in self.shards.iter().filter(|s| s.info.split == split) {
            for i in 0..s.info.count {
                h[s.label(i) as usize] += 1;
            }
        }
        h
    }

    /// Reads every byte and checks both tensors' CRC-32 in every shard against the
    /// manifest: a flipped bit anywhere is an error naming the shard and the tensor.
    pub fn verify(&self) -> Result<()> {
        for s in &self.shards {
            for (name, range, want) in [
                ("images", &s.images, s.info.images_crc32),
                ("labels", &s.labels, s.info.labels_crc32),
            ] {
                let got = crc32fast::hash(&s.map[range.clone()]);
                if got != want {
                    return Err(Error::corrupt(
                        &s.path,
                        format!("checksum of `{name}` is {got:08x}, the manifest says {want:08x}: the shard is damaged"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn open_shard(dir: &Path, info: &ShardInfo, m: &Manifest) -> Result<Shard> {
    let path = dir.join(&info.file);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::corrupt(
                &path,
                "missing: the manifest lists this shard but the file is not there",
            )
        } else {
            Error::io("cannot open", &path, e)
        }
    })?;
    // SAFETY: the map is read-only and brisk never writes a shard after packing (shards
    // are written to a temporary file and renamed into place). If another process
    // truncates or rewrites the file while it is mapped, reads may see the new bytes or
    // fault (SIGBUS); the sizes checked below hold only for the file as opened.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", &path, e))?;
    let bad = |problem: String| Error::corrupt(&path, problem);
    let (header, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| bad(format!("not a valid safetensors file (truncated?): {e}")))?;
    let data_start = 8 + header;
    let shape = [info.count, m.height, m.width, m.channels];
    let images = meta
        .info("images")
        .ok_or_else(|| bad("has no `images` tensor".into()))?;
    if images.dtype != Dtype::U8 || images.shape != shape {
        return Err(bad(format!(
            "`images` is {:?} {:?}, the manifest implies U8 {shape:?}",
            images.dtype, images.shape
        )));
    }
    let labels = meta
        .info("labels")
        .ok_or_else(|| bad("has no `labels` tensor".into()))?;
    let ldt = label_dtype(m.classes.len());
    if labels.dtype != ldt || labels.shape != [info.count] {
        return Err(bad(format!(
            "`labels` is {:?} {:?}, the manifest implies {ldt:?} [{}]",
            labels.dtype, labels.shape, info.count
        )));
    }
    if let Some(md) = meta.metadata() {
        let split = md.get("split").map(String::as_str);
        if split != Some(info.split.name()) {
            return Err(bad(format!(
                "is marked split {split:?}, the manifest says {:?}",
                info.split.name()
            )));
        }
    }
    let range = |o: (usize, usize)| data_start + o.0..data_start + o.1;
    let shard = Shard {
        info: info.clone(),
        images: range(images.data_offsets),
        labels: range(labels.data_offsets),
        label_width: if ldt == Dtype::U16 { 2 } else { 4 },
        path: path.clone(),
        map,
    };
    for i in 0..info.count {
        let l = shard.label(i);
        if l as usize >= m.classes.len() {
            return Err(bad(format!(
                "label {l} of image {i} is out of range for {} classes",
                m.classes.len()
            )));
        }
    }
    Ok(shard)
}
