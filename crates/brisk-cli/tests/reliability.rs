//! Nothing silently wrong: a run SIGKILLed at random moments and resumed each time ends
//! bit-identical to an uninterrupted one; a damaged checkpoint is named by `eval` and
//! `verify`, skipped by `--resume` (kept aside, never deleted); a full disk during a
//! checkpoint leaves the previous one intact and the run resumable; a model another tool
//! wrote loads with a note that it carries no checksum.
//!
//! `BRISK_KILL_CAMPAIGN=N` sets the number of kills (3 by default; docs/reliability.md
//! reports a larger campaign run by hand).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brisk_testkit::Brisk;

const BRISK: Brisk = Brisk(env!("CARGO_BIN_EXE_brisk"));

/// The run every test trains: 64 updates an epoch of a narrow ResNet-18 on 512 images of
/// 16x16, a checkpoint every 5 updates, two threads whatever the machine (the split of
/// work among threads fixes the summation order, so runs are bit-reproducible).
const TRAIN: &[&str] = &[
    "--width",
    "0.25",
    "--batch",
    "8",
    "--threads",
    "2",
    "--quiet",
    "--set",
    "checkpoint.every_steps=5",
    "--set",
    "checkpoint.keep_last=3",
];

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Epochs of the runs: 3, or more for a larger kill campaign (so its kills land before
/// the run ends).
fn epochs() -> usize {
    3 + kills().saturating_sub(3) / 3
}

fn kills() -> usize {
    std::env::var("BRISK_KILL_CAMPAIGN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// `brisk train` on `data` into `out` (fresh), or `--resume out`.
fn train_command(data: &Path, out: &Path, resume: bool) -> Command {
    let mut c = BRISK.command();
    if resume {
        c.args(["train", "--resume", s(out), "--quiet"]);
    } else {
        c.args(["train", "--data", s(data), "--out", s(out)])
            .args(TRAIN)
            .args(["--epochs", &epochs().to_string()]);
    }
    c
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out.join("checkpoints")).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
    })
}

fn newest_checkpoint(out: &Path) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .collect();
    dirs.sort();
    dirs.pop().context("no checkpoint")
}

/// A reproducible sequence of delays (xorshift): the campaign's moments.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

/// Packs the data and trains the reference run; returns (data, reference output).
fn setup(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let data = dir.join("data");
    BRISK.pack(&data, 512, 64, 16)?;
    let reference = dir.join("reference");
    brisk_testkit::ok(&mut train_command(&data, &reference, false))?;
    Ok((data, reference))
}

fn same_weights(a: &Path, b: &Path) -> Result<bool> {
    Ok(std::fs::read(a.join("model.safetensors"))? == std::fs::read(b.join("model.safetensors"))?)
}

#[test]
fn a_run_killed_at_random_moments_and_resumed_ends_bit_identical() -> Result<()> {
    let kills = kills();
    let dir = tempfile::tempdir()?;
    let (data, reference) = setup(dir.path())?;
    let out = dir.path().join("killed");
    let mut moments = Moments(0x9e37_79b9_7f4a_7c15);
    let mut landed = 0;
    for _ in 0..kills {
        let mut child = train_command(&data, &out, has_checkpoint(&out))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let delay = Duration::from_millis(moments.next_ms(100, 700));
        let start = Instant::now();
        while start.elapsed() < delay && child.try_wait()?.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("a campaign run failed on its own ({status})");
            }
            break; // finished before this moment: the campaign is over
        }
        child.kill()?;
        child.wait()?;
        landed += 1;
    }
    brisk_testkit::ok(&mut train_command(&data, &out, has_checkpoint(&out)))?;
    eprintln!("kill campaign: {landed} of {kills} kills landed before the run finished");
    assert!(landed > 0, "no kill landed: the test proves nothing");
    assert!(
        same_weights(&reference, &out)?,
        "after {landed} kills the resumed weights differ from the uninterrupted run's"
    );
    // Every file of the finished run verifies.
    BRISK.ok(&["verify", s(&out)])?;
    Ok(())
}

/// Flips one bit in the middle of a file.
fn flip_a_bit(path: &Path) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    let i = bytes.len() / 2;
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes)?;
    Ok(())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_damaged_checkpoint_is_named_skipped_and_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, reference) = setup(dir.path())?;
    let out = dir.path().join("damaged");
    brisk_testkit::ok(&mut train_command(&data, &out, false))?;
    let newest = newest_checkpoint(&out)?;
    let model = newest.join("model.safetensors");
    flip_a_bit(&model)?;

    let o = BRISK.run(&["eval", "--checkpoint", s(&newest), "--data", s(&data)])?;
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(s(&model)) && e.contains("tensor"), "{e}");

    let o = BRISK.run(&["verify", s(&out)])?;
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("DAMAGED") && text.contains(s(&model)), "{text}");

    // Resume passes over it, keeps it aside, and ends where the uninterrupted run did.
    let o = train_command(&data, &out, true).output()?;
    assert!(o.status.success(), "{}", stderr(&o));
    let kept = PathBuf::from(format!("{}.damaged", newest.display()));
    assert!(
        stderr(&o).contains("skipped a damaged checkpoint") && kept.is_dir(),
        "{}",
        stderr(&o)
    );
    assert!(same_weights(&reference, &out)?);
    // A damaged manifest byte is named too.
    flip_a_bit(&data.join("manifest.json"))?;
    let o = BRISK.run(&["verify", s(&data)])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("manifest.json"), "{}", stderr(&o));
    Ok(())
}

/// Runs `c` with its files limited to `bytes` (RLIMIT_FSIZE) and SIGXFSZ ignored, so a
/// write past the limit fails with EFBIG as a full disk would.
fn with_file_size_limit(c: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions
    // (signal, setrlimit) on values it owns.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_leaves_the_previous_one_resumable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, reference) = setup(dir.path())?;
    let out = dir.path().join("full");
    // Stop the run (as Ctrl-C does) once it has a checkpoint.
    let mut child = train_command(&data, &out, false).spawn()?;
    let start = Instant::now();
    while !has_checkpoint(&out) {
        if child.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(300) {
            bail!("the run ended or stalled before its first checkpoint");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait()?;
    assert_eq!(
        status.code(),
        Some(130),
        "Ctrl-C writes a checkpoint and exits 130"
    );
    let before = newest_checkpoint(&out)?;

    // Resumed with room for the log but not for a model file: the next model write fails.
    let o = with_file_size_limit(&mut train_command(&data, &out, true), 32 << 10).output()?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("File too large") && e.contains(s(&out)), "{e}");
    // The checkpoint from before is intact and still the newest complete one.
    assert_eq!(newest_checkpoint(&out)?, before);
    BRISK.ok(&["verify", s(&before)])?;

    // With room again, the run resumes and ends where the uninterrupted run did.
    brisk_testkit::ok(&mut train_command(&data, &out, true))?;
    assert!(same_weights(&reference, &out)?);
    Ok(())
}

#[test]
fn a_model_without_checksums_loads_with_a_note() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    BRISK.pack(&data, 64, 32, 16)?;
    let run = dir.path().join("run");
    let mut c = BRISK.command();
    c.args(["train", "--data", s(&data), "--out", s(&run), "--width", "0.0625"])
        .args(["--epochs", "1", "--batch", "16", "--threads", "1", "--quiet"]);
    brisk_testkit::ok(&mut c)?;
    // The same tensors written by another tool: plain safetensors, no brisk metadata.
    let bytes = std::fs::read(run.join("model.safetensors"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = file.tensors();
    let plain = safetensors::serialize(tensors, None)?;
    let foreign = dir.path().join("foreign.safetensors");
    std::fs::write(&foreign, plain)?;
    std::fs::copy(run.join("model.json"), dir.path().join("foreign.json"))?;
    let o = BRISK.run(&["eval", "--checkpoint", s(&foreign), "--data", s(&data), "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("carries no checksum"), "{}", stderr(&o));
    let o = BRISK.ok(&["verify", s(&foreign)])?;
    assert!(String::from_utf8_lossy(&o.stdout).contains("no checksum"));
    Ok(())
}
