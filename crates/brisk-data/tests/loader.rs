//! The prefetching loader: order, determinism across thread counts, resume, changing
//! batch sizes, buffer reuse and clean shutdown.

use std::sync::Arc;

use anyhow::Result;
use brisk_data::{pack_synthetic, Batch, Dataset, Loader, LoaderConfig, SyntheticConfig};

fn dataset() -> Result<(tempfile::TempDir, Arc<Dataset>)> {
    let dir = tempfile::tempdir()?;
    pack_synthetic(
        dir.path(),
        &SyntheticConfig {
            train: 37,
            test: 9,
            seed: 2,
            size: 10,
        },
        16,
    )?;
    let d = Arc::new(Dataset::open(dir.path())?);
    Ok((dir, d))
}

/// A batch as a test sees it: (index, labels, images).
type Seen = (usize, Vec<u32>, Vec<f32>);

/// Every batch of an epoch.
fn check_epoch(loader: &Loader, epoch: u64, batch: usize, start: usize) -> Result<Vec<Seen>> {
    let mut out = Vec::new();
    for b in loader.epoch(epoch, batch, start)? {
        let b: Batch = b?;
        assert_eq!(b.epoch, epoch);
        out.push((b.index, b.labels.clone(), b.images.clone()));
    }
    Ok(out)
}

#[test]
fn batches_are_in_order_and_identical_for_any_thread_count() -> Result<()> {
    let (_dir, d) = dataset()?;
    let mut reference = None;
    for workers in [0, 1, 2, 3] {
        let loader = Loader::new(
            d.clone(),
            LoaderConfig {
                workers,
                seed: 11,
                ..LoaderConfig::train(&d)
            },
        )?;
        let epoch = check_epoch(&loader, 1, 8, 0)?;
        assert_eq!(epoch.iter().map(|b| b.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(
            epoch.iter().map(|b| b.1.len()).collect::<Vec<_>>(),
            [8, 8, 8, 8, 5]
        );
        assert_eq!(epoch[0].2.len(), 8 * 3 * 10 * 10);
        match &reference {
            None => reference = Some(epoch),
            Some(r) => assert!(r == &epoch, "workers={workers} differs"),
        }
    }
    // The epoch covers every training image once.
    let mut seen: Vec<u32> = reference.expect("ran").iter().flat_map(|b| b.1.clone()).collect();
    seen.sort();
    assert_eq!(seen.len(), 37);
    Ok(())
}

#[test]
fn epochs_differ_and_resume_mid_epoch_matches() -> Result<()> {
    let (_dir, d) = dataset()?;
    let loader = Loader::new(
        d.clone(),
        LoaderConfig {
            workers: 2,
            ..LoaderConfig::train(&d)
        },
    )?;
    let full = check_epoch(&loader, 3, 5, 0)?;
    assert_ne!(full, check_epoch(&loader, 4, 5, 0)?);
    let resumed = check_epoch(&loader, 3, 5, 4)?;
    assert_eq!(resumed, full[4..].to_vec());
    Ok(())
}

#[test]
fn batch_size_can_change_between_epochs_down_to_one() -> Result<()> {
    let (_dir, d) = dataset()?;
    let loader = Loader::new(
        d.clone(),
        LoaderConfig {
            drop_last: true,
            ..LoaderConfig::train(&d)
        },
    )?;
    for (bs, batches) in [(1, 37), (4, 9), (16, 2)] {
        let epoch = check_epoch(&loader, 0, bs, 0)?;
        assert_eq!(epoch.len(), batches, "batch size {bs}");
        assert_eq!(loader.batches_per_epoch(bs), batches);
        assert!(epoch.iter().all(|b| b.1.len() == bs));
    }
    Ok(())
}

#[test]
fn eval_loader_reads_the_test_split_in_order() -> Result<()> {
    let (_dir, d) = dataset()?;
    let loader = Loader::new(d.clone(), LoaderConfig::eval(&d))?;
    let labels: Vec<u32> = check_epoch(&loader, 0, 4, 0)?
        .into_iter()
        .flat_map(|b| b.1)
        .collect();
    assert_eq!(labels, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    Ok(())
}

#[test]
fn buffers_are_reused() -> Result<()> {
    let (_dir, d) = dataset()?;
    let loader = Loader::new(
        d.clone(),
        LoaderConfig {
            workers: 0,
            ..LoaderConfig::train(&d)
        },
    )?;
    let mut epoch = loader.epoch(0, 8, 0)?;
    let first = epoch.next().expect("batch")?;
    let ptr = first.images.as_ptr();
    drop(first);
    let second = epoch.next().expect("batch")?;
    assert_eq!(
        second.images.as_ptr(),
        ptr,
        "the dropped batch's buffer must be reused"
    );
    Ok(())
}

#[test]
fn bad_settings_are_errors() -> Result<()> {
    let (_dir, d) = dataset()?;
    let bad_rank = LoaderConfig {
        rank: 2,
        world: 2,
        ..LoaderConfig::train(&d)
    };
    assert!(Loader::new(d.clone(), bad_rank).is_err());
    let loader = Loader::new(d.clone(), LoaderConfig::train(&d))?;
    assert!(loader.epoch(0, 0, 0).is_err());
    Ok(())
}
