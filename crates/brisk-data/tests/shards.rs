//! Packing and opening shards, and the errors damaged datasets must give.

use std::path::Path;

use anyhow::Result;
use brisk_data::{pack_synthetic, Dataset, DatasetWriter, ImageShape, Split, SyntheticConfig};

fn tiny(dir: &Path) -> Result<()> {
    let config = SyntheticConfig {
        train: 25,
        test: 12,
        seed: 3,
        size: 12,
    };
    pack_synthetic(dir, &config, 10)?;
    Ok(())
}

/// Packs a tiny set, lets `damage` change a file, and returns the error opening (or, if
/// opening succeeds, verifying) gives.
fn check_damage(damage: impl FnOnce(&Path) -> Result<()>) -> Result<String> {
    let dir = tempfile::tempdir()?;
    tiny(dir.path())?;
    damage(dir.path())?;
    let err = match Dataset::open(dir.path()) {
        Err(e) => e,
        Ok(d) => d.verify().expect_err("damage must be detected"),
    };
    Ok(err.to_string())
}

#[test]
fn packed_data_reads_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tiny(dir.path())?;
    let data = Dataset::open(dir.path())?;
    data.verify()?;
    let m = data.manifest();
    assert_eq!((data.len(Split::Train), data.len(Split::Test)), (25, 12));
    // 25 training images in shards of 10: 10 + 10 + 5.
    let train_shards: Vec<usize> = m
        .shards
        .iter()
        .filter(|s| s.split == Split::Train)
        .map(|s| s.count)
        .collect();
    assert_eq!(train_shards, [10, 10, 5]);
    assert_eq!(data.class_histogram(Split::Train), [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]);
    let (img, label) = data.get(Split::Train, 17).expect("image 17");
    assert_eq!(label, 7);
    assert_eq!(img.len(), 12 * 12 * 3);
    assert!(data.get(Split::Train, 25).is_none());
    assert!(m.mean.iter().all(|&v| v > 0.05 && v < 0.95), "{:?}", m.mean);
    assert!(m.std.iter().all(|&v| v > 0.05 && v < 0.6), "{:?}", m.std);
    Ok(())
}

#[test]
fn mean_and_std_are_exact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let shape = ImageShape {
        height: 1,
        width: 2,
        channels: 2,
    };
    let mut w = DatasetWriter::create(dir.path(), "hand", vec!["a".into(), "b".into()], shape, 4)?;
    w.push(Split::Train, &[0, 255, 255, 255], 0)?;
    w.push(Split::Train, &[0, 0, 255, 0], 1)?;
    w.push(Split::Test, &[7, 7, 7, 7], 1)?; // test images do not count
    let m = w.finish()?;
    // Channel 0 values: 0, 1, 0, 1 → mean 0.5, std 0.5; channel 1: 1, 1, 0, 0 → same.
    assert_eq!(m.mean, [0.5, 0.5]);
    assert_eq!(m.std, [0.5, 0.5]);
    Ok(())
}

#[test]
fn packing_twice_into_one_folder_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tiny(dir.path())?;
    let err = pack_synthetic(
        dir.path(),
        &SyntheticConfig {
            train: 2,
            test: 0,
            seed: 0,
            size: 8,
        },
        4,
    )
    .expect_err("refused");
    assert!(err.to_string().contains("already exists"), "{err}");
    Ok(())
}

#[test]
fn flipped_byte_is_found_by_verify() -> Result<()> {
    let msg = check_damage(|d| {
        let path = d.join("train-00001.safetensors");
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len() - 40; // inside the tensor data
        bytes[last] ^= 0x10;
        std::fs::write(&path, bytes)?;
        Ok(())
    })?;
    assert!(
        msg.contains("train-00001.safetensors") && msg.contains("checksum"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn truncated_shard_is_named() -> Result<()> {
    let msg = check_damage(|d| {
        let path = d.join("test-00000.safetensors");
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() - 7])?;
        Ok(())
    })?;
    assert!(
        msg.contains("test-00000.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn missing_shard_is_named() -> Result<()> {
    let msg = check_damage(|d| Ok(std::fs::remove_file(d.join("train-00002.safetensors"))?))?;
    assert!(
        msg.contains("train-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn manifest_that_disagrees_is_named() -> Result<()> {
    // An edited manifest fails its own checksum, naming it.
    let msg = check_damage(|d| {
        let path = d.join("manifest.json");
        let text = std::fs::read_to_string(&path)?.replacen("\"count\": 10", "\"count\": 11", 1);
        std::fs::write(&path, text)?;
        Ok(())
    })?;
    assert!(msg.contains("manifest.json") && msg.contains("checksum"), "{msg}");
    // One without a checksum (packed before manifests carried one) is still
    // cross-checked against the shards, which name themselves.
    let msg = check_damage(|d| {
        let path = d.join("manifest.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("checksum");
        }
        let text = serde_json::to_string_pretty(&v)?.replacen("\"count\": 10", "\"count\": 11", 1);
        std::fs::write(&path, text)?;
        Ok(())
    })?;
    assert!(
        msg.contains("train-00000.safetensors") && msg.contains("manifest implies"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn label_out_of_range_is_named() -> Result<()> {
    // Rewrite a shard whose labels say 12 of 10 classes; the checksum alone would catch
    // the change, but the open-time label check must name the problem first.
    let msg = check_damage(|d| {
        let path = d.join("test-00001.safetensors");
        let bytes = std::fs::read(&path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let images = st.tensor("images")?;
        let labels = st.tensor("labels")?;
        let mut label_bytes = labels.data().to_vec();
        label_bytes[0] = 12;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let out = safetensors::serialize(
            [
                (
                    "images",
                    safetensors::tensor::TensorView::new(
                        images.dtype(),
                        images.shape().to_vec(),
                        images.data(),
                    )?,
                ),
                (
                    "labels",
                    safetensors::tensor::TensorView::new(
                        labels.dtype(),
                        labels.shape().to_vec(),
                        &label_bytes,
                    )?,
                ),
            ],
            meta.metadata().clone(),
        )?;
        std::fs::write(&path, out)?;
        Ok(())
    })?;
    assert!(
        msg.contains("test-00001.safetensors") && msg.contains("label 12"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn folder_without_manifest_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = Dataset::open(dir.path()).expect_err("no dataset").to_string();
    assert!(msg.contains("manifest.json") && msg.contains("missing"), "{msg}");
}
