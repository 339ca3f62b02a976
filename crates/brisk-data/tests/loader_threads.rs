//! No loader thread outlives its epoch. Alone in its test binary, so that no other test's
//! loader threads are alive while it counts.

use std::sync::Arc;

use anyhow::Result;
use brisk_data::{pack_synthetic, Dataset, Loader, LoaderConfig, SyntheticConfig};

fn loader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("brisk-loader"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn dropping_an_epoch_midway_joins_its_threads() -> Result<()> {
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
    let loader = Loader::new(
        d.clone(),
        LoaderConfig {
            workers: 3,
            prefetch: 2,
            ..LoaderConfig::train(&d)
        },
    )?;
    let mut epoch = loader.epoch(0, 2, 0)?;
    epoch.next().expect("batch")?;
    assert!(loader_threads() >= 1 || cfg!(not(target_os = "linux")));
    drop(epoch);
    // Dropping the epoch joins its threads; a joined thread's /proc entry can still be
    // listed for a moment while the kernel reaps it (pthread_join returns when the
    // thread clears its tid, before the task leaves the group), so look again briefly
    // before calling it alive. A thread that was not joined keeps running and stays.
    let mut alive = loader_threads();
    for _ in 0..100 {
        if alive == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        alive = loader_threads();
    }
    assert_eq!(alive, 0, "no loader thread may outlive its epoch");
    Ok(())
}
