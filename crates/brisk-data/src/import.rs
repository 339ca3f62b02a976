//! Importers from the formats datasets ship in: the CIFAR-10/100 binaries, MNIST-style IDX
//! files (optionally gzip'd) and a folder of PNG/JPEG images per class. Each streams
//! records into a `DatasetWriter`, so memory stays bounded by one shard.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Split};
use crate::writer::{DatasetWriter, ImageShape};

/// Which CIFAR and which labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    /// CIFAR-100 with its 100 fine labels.
    HundredFine,
    /// CIFAR-100 with its 20 coarse labels.
    HundredCoarse,
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of file, an error naming
/// the file when a record is cut short.
fn read_record(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(Error::corrupt(
                    path,
                    format!("ends inside a record ({filled} of {} bytes)", buf.len()),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("cannot read", path, e)),
        }
    }
    Ok(true)
}

/// Class names from a text file of one name per line, or `0..n` when it is absent.
fn class_names(file: Option<PathBuf>, n: usize) -> Result<Vec<String>> {
    if let Some(path) = file.filter(|p| p.exists()) {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("cannot read", &path, e))?;
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() != n {
            return Err(Error::corrupt(
                &path,
                format!("lists {} class names, expected {n}", names.len()),
            ));
        }
        return Ok(names);
    }
    Ok((0..n).map(|i| i.to_string()).collect())
}

/// Packs the CIFAR binary distribution in `input` (`data_batch_1.bin` … `data_batch_5.bin`
/// and `test_batch.bin`, or `train.bin` and `test.bin` for CIFAR-100) into `out`.
pub fn pack_cifar(input: &Path, out: &Path, which: Cifar, shard_size: usize) -> Result<Manifest> {
    let (files, classes, names_file, label_skip): (Vec<(&str, Split)>, usize, &str, usize) = match which {
        Cifar::Ten => (
            vec![
                ("data_batch_1.bin", Split::Train),
                ("data_batch_2.bin", Split::Train),
                ("data_batch_3.bin", Split::Train),
                ("data_batch_4.bin", Split::Train),
                ("data_batch_5.bin", Split::Train),
                ("test_batch.bin", Split::Test),
            ],
            10,
            "batches.meta.txt",
            0,
        ),
        // A CIFAR-100 record starts with the coarse label, then the fine one.
        Cifar::HundredFine => (
            vec![("train.bin", Split::Train), ("test.bin", Split::Test)],
            100,
            "fine_label_names.txt",
            1,
        ),
        Cifar::HundredCoarse => (
            vec![("train.bin", Split::Train), ("test.bin", Split::Test)],
            20,
            "coarse_label_names.txt",
            0,
        ),
    };
    let label_bytes = if which == Cifar::Ten { 1 } else { 2 };
    let names = class_names(Some(input.join(names_file)), classes)?;
    let name = if which == Cifar::Ten {
        "cifar10"
    } else {
        "cifar100"
    };
    let shape = ImageShape {
        height: 32,
        width: 32,
        channels: 3,
    };
    let mut writer = DatasetWriter::create(out, name, names, shape, shard_size)?;
    let mut record = vec![0u8; label_bytes + 3072];
    let mut hwc = vec![0u8; 3072];
    for (file, split) in files {
        let path = input.join(file);
        let mut r = open(&path)?;
        let mut n = 0;
        while read_record(&mut r, &mut record, &path)? {
            let label = record[label_skip] as u32;
            if label as usize >= classes {
                return Err(Error::corrupt(
                    &path,
                    format!("record {n} has label {label}, expected < {classes}"),
                ));
            }
            // Records are planar (all red, then green, then blue); shards are HWC.
            let planes = &record[label_bytes..];
            for p in 0..1024 {
                for c in 0..3 {
                    hwc[p * 3 + c] = planes[c * 1024 + p];
                }
            }
            writer.push(split, &hwc, label)?;
            n += 1;
        }
        if n == 0 {
            return Err(Error::corrupt(&path, "holds no records"));
        }
    }
    writer.finish()
}

/// A reader over a plain or gzip'd file (gzip detected by its magic bytes).
fn maybe_gzip(path: &Path) -> Result<Box<dyn Read>> {
    let mut r = open(path)?;
    let mut magic = [0u8; 2];
    let n = r
        .read(&mut magic)
        .map_err(|e| Error::io("cannot read", path, e))?;
    let head = std::io::Cursor::new(magic[..n].to_vec()).chain(r);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(flate2::read::GzDecoder::new(head))))
    } else {
        Ok(Box::new(head))
    }
}

/// Reads an IDX header: the data type must be u8 (0x08) and the rank `dims`.
fn idx_header(r: &mut impl Read, path: &Path, dims: usize) -> Result<Vec<usize>> {
    let mut magic = [0u8; 4];
    if !read_record(r, &mut magic, path)? {
        return Err(Error::corrupt(path, "is empty"));
    }
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] as usize != dims {
        return Err(Error::corrupt(
            path,
            format!("is not an IDX file of u8 with {dims} dimensions (magic {magic:02x?}, expected [00, 00, 08, {dims:02x}])"),
        ));
    }
    let mut out = Vec::with_capacity(dims);
    for _ in 0..dims {
        let mut d = [0u8; 4];
        if !read_record(r, &mut d, path)? {
            return Err(Error::corrupt(path, "ends inside its header"));
        }
        out.push(u32::from_be_bytes(d) as usize);
    }
    Ok(out)
}

/// The IDX files of one split.
#[derive(Clone, Debug)]
pub struct IdxFiles {
    pub images: PathBuf,
    pub labels: PathBuf,
}

/// Largest label in an IDX label file, plus one. The labels are read in chunks: the
/// header's count is checked against what the file holds, never trusted for a buffer.
fn idx_classes(files: &IdxFiles) -> Result<usize> {
    let mut r = maybe_gzip(&files.labels)?;
    let count = idx_header(&mut r, &files.labels, 1)?[0];
    let mut chunk = vec![0u8; count.min(1 << 16)];
    let (mut left, mut max) = (count, None);
    while left > 0 {
        let part = &mut chunk[..left.min(1 << 16)];
        if !read_record(&mut r, part, &files.labels)? {
            return Err(Error::corrupt(
                &files.labels,
                format!(
                    "ends after {} of the {count} labels its header announces",
                    count - left
                ),
            ));
        }
        max = part.iter().copied().chain(max).max();
        left -= part.len();
    }
    Ok(max.map_or(0, |m| m as usize + 1))
}

/// The largest image brisk packs: 2^28 values (16384x16384), far above any classifier's.
const MAX_IMAGE_VALUES: usize = 1 << 28;

/// Checks that an IDX image file holds the `count` images of `h`x`w` its header
/// announces, by reading it through (nothing kept), before any buffer is sized from the
/// header.
fn check_idx_images(path: &Path, dims: &[usize]) -> Result<()> {
    let mut r = maybe_gzip(path)?;
    idx_header(&mut r, path, 3)?;
    let held = std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| Error::io("cannot read", path, e))?;
    let wanted = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    if wanted.is_none_or(|w| held < w) {
        return Err(Error::corrupt(
            path,
            format!("holds {held} bytes of images, its header announces {dims:?}"),
        ));
    }
    Ok(())
}

/// Packs MNIST-style IDX files (any image size the header gives, one channel). Class
/// names are the label numbers; the class count is the largest label plus one.
pub fn pack_idx(train: &IdxFiles, test: &IdxFiles, out: &Path, shard_size: usize) -> Result<Manifest> {
    let classes = idx_classes(train)?.max(idx_classes(test)?);
    let mut header = maybe_gzip(&train.images)?;
    let dims = idx_header(&mut header, &train.images, 3)?;
    if dims[1]
        .checked_mul(dims[2])
        .is_none_or(|v| v > MAX_IMAGE_VALUES || v == 0)
    {
        return Err(Error::corrupt(
            &train.images,
            format!("announces {}x{} images: not a size brisk packs", dims[1], dims[2]),
        ));
    }
    check_idx_images(&train.images, &dims)?;
    let shape = ImageShape {
        height: dims[1],
        width: dims[2],
        channels: 1,
    };
    let names = (0..classes).map(|i| i.to_string()).collect();
    let mut writer = DatasetWriter::create(out, "idx", names, shape.clone(), shard_size)?;
    for (files, split) in [(train, Split::Train), (test, Split::Test)] {
        let mut images = maybe_gzip(&files.images)?;
        let dims = idx_header(&mut images, &files.images, 3)?;
        check_idx_images(&files.images, &dims)?;
        if dims[1..] != [shape.height, shape.width] {
            return Err(Error::corrupt(
                &files.images,
                format!(
                    "holds {}x{} images, the training images are {}x{}",
                    dims[1], dims[2], shape.height, shape.width
                ),
            ));
        }
        let mut labels = maybe_gzip(&files.labels)?;
        let count = idx_header(&mut labels, &files.labels, 1)?[0];
        if count != dims[0] {
            return Err(Error::corrupt(
                &files.labels,
                format!("holds {count} labels for {} images", dims[0]),
            ));
        }
        let mut img = vec![0u8; shape.height * shape.width];
        let mut label = [0u8; 1];
        for i in 0..count {
            if !read_record(&mut images, &mut img, &files.images)? {
                return Err(Error::corrupt(
                    &files.images,
                    format!("ends after {i} of {count} images"),
                ));
            }
            if !read_record(&mut labels, &mut label, &files.labels)? {
                return Err(Error::corrupt(
                    &files.labels,
                    format!("ends after {i} of {count} labels"),
                ));
            }
            writer.push(split, &img, label[0] as u32)?;
        }
    }
    writer.finish()
}

/// Image files (PNG, JPEG) directly inside `dir`, sorted by name.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    let mut files = Vec::new();
    for e in entries {
        let path = e.map_err(|e| Error::io("cannot list", dir, e))?.path();
        let ext = path.extension().map(|x| x.to_string_lossy().to_ascii_lowercase());
        if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Sub-folders of `dir`, sorted by name.
fn class_dirs(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io("cannot list", dir, e))?;
        if e.path().is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Decodes an image, resizes its shorter side to `size` and crops the centre square, RGB.
fn load_square(path: &Path, size: usize) -> Result<Vec<u8>> {
    let img = image::open(path)
        .map_err(|e| Error::corrupt(path, format!("cannot decode image: {e}")))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    Ok(
        image::imageops::crop_imm(&resized, x0, y0, size as u32, size as u32)
            .to_image()
            .into_raw(),
    )
}

/// Packs a folder of images, one sub-folder per class, resized (shorter side) and
/// centre-cropped to `size`x`size` RGB. With `train/` and `test/` sub-folders those are
/// the splits; otherwise each file goes to the test split when the CRC-32 of its path
/// within `input` falls in the first `test_fraction` of the range (stable across runs).
pub fn pack_folder(
    input: &Path,
    out: &Path,
    size: usize,
    test_fraction: f64,
    shard_size: usize,
) -> Result<Manifest> {
    if size == 0 {
        return Err(Error::InvalidConfig {
            field: "size",
            problem: "must be at least 1".into(),
        });
    }
    if !(0.0..1.0).contains(&test_fraction) {
        return Err(Error::InvalidConfig {
            field: "test_fraction",
            problem: format!("must be in [0, 1), got {test_fraction}"),
        });
    }
    let presplit = input.join("train").is_dir() && input.join("test").is_dir();
    let root = if presplit {
        input.join("train")
    } else {
        input.to_path_buf()
    };
    let classes = class_dirs(&root)?;
    if classes.is_empty() {
        return Err(Error::corrupt(input, "has no class sub-folders"));
    }
    let shape = ImageShape {
        height: size,
        width: size,
        channels: 3,
    };
    let mut writer = DatasetWriter::create(out, "folder", classes.clone(), shape, shard_size)?;
    let splits: Vec<(PathBuf, Option<Split>)> = if presplit {
        vec![
            (input.join("train"), Some(Split::Train)),
            (input.join("test"), Some(Split::Test)),
        ]
    } else {
        vec![(input.to_path_buf(), None)]
    };
    for (dir, split) in splits {
        for (label, class) in classes.iter().enumerate() {
            let class_dir = dir.join(class);
            if !class_dir.is_dir() {
                return Err(Error::corrupt(
                    &class_dir,
                    "missing: every split needs a folder for every class",
                ));
            }
            for file in image_files(&class_dir)? {
                let split = split.unwrap_or_else(|| {
                    let rel = file.strip_prefix(input).unwrap_or(&file);
                    let h = crc32fast::hash(rel.to_string_lossy().as_bytes()) as f64 / u32::MAX as f64;
                    if h < test_fraction {
                        Split::Test
                    } else {
                        Split::Train
                    }
                });
                writer.push(split, &load_square(&file, size)?, label as u32)?;
            }
        }
    }
    writer.finish()
}
