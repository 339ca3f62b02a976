//! Importers on files written in their real formats by the tests themselves.

use std::path::Path;

use anyhow::Result;
use brisk_data::{pack_cifar, pack_folder, pack_idx, Cifar, Dataset, IdxFiles, Split};
use brisk_testkit::write_idx;

/// One CIFAR record: label byte(s), then red, green and blue planes of 32x32.
fn cifar_record(labels: &[u8], rgb: [u8; 3]) -> Vec<u8> {
    let mut r = labels.to_vec();
    for v in rgb {
        r.extend(std::iter::repeat_n(v, 1024));
    }
    r
}

#[test]
fn cifar10_binaries_import() -> Result<()> {
    let input = tempfile::tempdir()?;
    for b in 1..=5 {
        let mut bytes = Vec::new();
        for i in 0..3u8 {
            bytes.extend(cifar_record(&[(b as u8 + i) % 10], [10 * b as u8, 20, 30 + i]));
        }
        std::fs::write(input.path().join(format!("data_batch_{b}.bin")), bytes)?;
    }
    std::fs::write(
        input.path().join("test_batch.bin"),
        [cifar_record(&[9], [1, 2, 3]), cifar_record(&[0], [4, 5, 6])].concat(),
    )?;
    let names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    std::fs::write(input.path().join("batches.meta.txt"), names.join("\n") + "\n\n")?;
    let out = tempfile::tempdir()?;
    let m = pack_cifar(input.path(), out.path(), Cifar::Ten, 4)?;
    assert_eq!(m.classes, names);
    let d = Dataset::open(out.path())?;
    d.verify()?;
    assert_eq!((d.len(Split::Train), d.len(Split::Test)), (15, 2));
    let (img, label) = d.get(Split::Train, 4).expect("image");
    // data_batch_2, record 1: label 3, planes (20, 20, 31) → every HWC pixel [20, 20, 31].
    assert_eq!(label, 3);
    assert_eq!(&img[..6], &[20, 20, 31, 20, 20, 31]);
    assert_eq!(d.get(Split::Test, 1).expect("test image").0[..3], [4, 5, 6]);
    Ok(())
}

#[test]
fn cifar100_fine_and_coarse_labels_import() -> Result<()> {
    let input = tempfile::tempdir()?;
    std::fs::write(
        input.path().join("train.bin"),
        [
            cifar_record(&[3, 77], [1, 1, 1]),
            cifar_record(&[19, 99], [2, 2, 2]),
        ]
        .concat(),
    )?;
    std::fs::write(input.path().join("test.bin"), cifar_record(&[0, 5], [3, 3, 3]))?;
    for (which, want) in [(Cifar::HundredFine, [77, 99]), (Cifar::HundredCoarse, [3, 19])] {
        let out = tempfile::tempdir()?;
        let m = pack_cifar(input.path(), out.path(), which, 10)?;
        let d = Dataset::open(out.path())?;
        let labels: Vec<u32> = (0..2).map(|i| d.get(Split::Train, i).expect("image").1).collect();
        assert_eq!(labels, want);
        assert_eq!(
            m.classes.len(),
            if which == Cifar::HundredFine { 100 } else { 20 }
        );
    }
    Ok(())
}

#[test]
fn truncated_cifar_file_is_named() -> Result<()> {
    let input = tempfile::tempdir()?;
    std::fs::write(
        input.path().join("train.bin"),
        &cifar_record(&[1, 2], [0, 0, 0])[..2000],
    )?;
    std::fs::write(input.path().join("test.bin"), cifar_record(&[1, 2], [0, 0, 0]))?;
    let out = tempfile::tempdir()?;
    let err = pack_cifar(input.path(), out.path(), Cifar::HundredFine, 10)
        .expect_err("truncated")
        .to_string();
    assert!(
        err.contains("train.bin") && err.contains("ends inside a record"),
        "{err}"
    );
    Ok(())
}

#[test]
fn idx_files_plain_and_gzipped_import() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    // Three 5x7 training images, two test images; labels up to 6 → 7 classes.
    let train_images: Vec<u8> = (0..3 * 35).map(|i| i as u8).collect();
    write_idx(&p("train-images"), &[3, 5, 7], &train_images, false)?;
    write_idx(&p("train-labels.gz"), &[3], &[4, 6, 0], true)?;
    write_idx(&p("test-images.gz"), &[2, 5, 7], &[9; 70], true)?;
    write_idx(&p("test-labels"), &[2], &[1, 2], false)?;
    let out = tempfile::tempdir()?;
    let train = IdxFiles {
        images: p("train-images"),
        labels: p("train-labels.gz"),
    };
    let test = IdxFiles {
        images: p("test-images.gz"),
        labels: p("test-labels"),
    };
    let m = pack_idx(&train, &test, out.path(), 10)?;
    assert_eq!((m.height, m.width, m.channels, m.classes.len()), (5, 7, 1, 7));
    let d = Dataset::open(out.path())?;
    let (img, label) = d.get(Split::Train, 1).expect("image");
    assert_eq!((img[0], label), (35, 6));
    assert_eq!(d.len(Split::Test), 2);
    Ok(())
}

#[test]
fn wrong_idx_magic_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("images"), [0u8, 0, 0x0d, 3, 0, 0, 0, 0])?; // float data
    write_idx(&p("labels"), &[0], &[], false)?;
    let files = IdxFiles {
        images: p("images"),
        labels: p("labels"),
    };
    let out = tempfile::tempdir()?;
    let err = pack_idx(&files, &files, out.path(), 10)
        .expect_err("bad magic")
        .to_string();
    assert!(
        err.contains("images") && err.contains("not an IDX file of u8"),
        "{err}"
    );
    Ok(())
}

fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) -> Result<()> {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path)?;
    Ok(())
}

#[test]
fn image_folders_import_resized_and_split() -> Result<()> {
    let input = tempfile::tempdir()?;
    for (class, rgb) in [("cats", [200, 0, 0]), ("dogs", [0, 0, 200])] {
        std::fs::create_dir(input.path().join(class))?;
        for i in 0..10 {
            write_png(
                &input.path().join(class).join(format!("{i}.png")),
                20 + i,
                12,
                rgb,
            )?;
        }
    }
    std::fs::write(input.path().join("cats").join("notes.txt"), "not an image")?;
    let out = tempfile::tempdir()?;
    let m = pack_folder(input.path(), out.path(), 8, 0.3, 100)?;
    assert_eq!(m.classes, ["cats", "dogs"]);
    assert_eq!((m.height, m.width, m.channels), (8, 8, 3));
    let d = Dataset::open(out.path())?;
    assert_eq!(d.len(Split::Train) + d.len(Split::Test), 20);
    assert!(d.len(Split::Test) > 0 && d.len(Split::Train) > d.len(Split::Test));
    let (img, label) = d.get(Split::Train, 0).expect("image");
    assert_eq!((label, &img[..3]), (0, &[200u8, 0, 0][..]));
    // The split is stable: packing again gives the same manifest.
    let again = tempfile::tempdir()?;
    assert_eq!(
        pack_folder(input.path(), again.path(), 8, 0.3, 100)?.shards,
        m.shards
    );
    Ok(())
}

#[test]
fn presplit_folders_and_bad_images() -> Result<()> {
    let input = tempfile::tempdir()?;
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = input.path().join(split).join(class);
            std::fs::create_dir_all(&d)?;
            write_png(&d.join("x.png"), 9, 9, [1, 2, 3])?;
        }
    }
    let out = tempfile::tempdir()?;
    pack_folder(input.path(), out.path(), 4, 0.0, 10)?;
    let d = Dataset::open(out.path())?;
    assert_eq!((d.len(Split::Train), d.len(Split::Test)), (2, 2));
    std::fs::write(
        input.path().join("train").join("a").join("broken.png"),
        b"\x89PNG garbage",
    )?;
    let out2 = tempfile::tempdir()?;
    let err = pack_folder(input.path(), out2.path(), 4, 0.0, 10)
        .expect_err("broken")
        .to_string();
    assert!(
        err.contains("broken.png") && err.contains("cannot decode"),
        "{err}"
    );
    Ok(())
}
