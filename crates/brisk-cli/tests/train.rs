//! `brisk train` and `brisk eval` as a user meets them: a run killed with SIGKILL and
//! resumed ends bit-identical to an uninterrupted one; eval's JSON keys; config errors.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use brisk_testkit::Brisk;

const BRISK: Brisk = Brisk(env!("CARGO_BIN_EXE_brisk"));

fn brisk() -> Command {
    BRISK.command()
}

fn run(args: &[&str]) -> Result<Output> {
    BRISK.run(args)
}

fn ok(args: &[&str]) -> Result<Output> {
    BRISK.ok(args)
}

/// Packs a small synthetic set of 16x16 images into `dir`.
fn pack(dir: &Path, train: usize) -> Result<()> {
    BRISK.pack(dir, train, 64, 16)
}

/// The training flags both runs of the resume test share: about 200 updates of a
/// narrow ResNet-18, a checkpoint every 5 updates, two threads whatever the machine
/// (the split of work among threads fixes the summation order).
const TRAIN: &[&str] = &[
    "--width",
    "0.25",
    "--epochs",
    "3",
    "--batch",
    "8",
    "--threads",
    "2",
    "--quiet",
    "--set",
    "checkpoint.every_steps=5",
];

fn newest_checkpoint(out: &Path) -> u64 {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn events(out: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    Ok(text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
}

#[test]
fn a_run_killed_and_resumed_ends_bit_identical_to_an_uninterrupted_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack(&data, 512)?;
    let d = data.to_str().expect("utf-8");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    let mut args = vec!["train", "--data", d, "--out", a.to_str().expect("utf-8")];
    args.extend_from_slice(TRAIN);
    ok(&args)?;

    // The same run, killed with SIGKILL once it has written a checkpoint past update 40
    // (of 192): the kill lands mid-epoch, between checkpoints.
    let mut args = vec!["train", "--data", d, "--out", b.to_str().expect("utf-8")];
    args.extend_from_slice(TRAIN);
    let mut child = brisk().args(&args).spawn()?;
    let start = Instant::now();
    while newest_checkpoint(&b) < 40 {
        if let Some(status) = child.try_wait()? {
            bail!("the run ended ({status}) before it could be killed");
        }
        if start.elapsed() > Duration::from_secs(300) {
            child.kill()?;
            bail!("no checkpoint past update 40 after 300 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill()?;
    child.wait()?;
    assert!(
        !b.join("summary.json").exists(),
        "the run finished before the kill: the test proves nothing; give it more updates"
    );
    ok(&["train", "--resume", b.to_str().expect("utf-8"), "--quiet"])?;

    let wa = std::fs::read(a.join("model.safetensors"))?;
    let wb = std::fs::read(b.join("model.safetensors"))?;
    assert!(wa == wb, "resumed weights differ from the uninterrupted run's");
    // The log of the resumed run reads as one run: one start, one resume, 3 epochs.
    let ev = events(&b)?;
    let count = |kind: &str| ev.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(
        (
            count("start"),
            count("resume"),
            count("epoch"),
            count("eval"),
            count("end")
        ),
        (1, 1, 3, 3, 1)
    );
    let steps: Vec<u64> = ev
        .iter()
        .filter_map(|e| e["step"].as_u64().filter(|_| e["event"] == "step"))
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "step events out of order: {steps:?}"
    );

    // `brisk eval` on the run's folder reports the contract's keys and the run's accuracy.
    let out = ok(&[
        "eval",
        "--checkpoint",
        a.to_str().expect("utf-8"),
        "--data",
        d,
        "--json",
        "--confusion",
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("summary.json"))?)?;
    for key in ["top1", "top5", "loss", "n"] {
        assert_eq!(v[key], summary[key], "{key}");
    }
    assert_eq!(v["n"], 64);
    assert_eq!(v["per_class"].as_array().map(Vec::len), Some(10));
    let confusion_total: u64 = v["confusion"]
        .as_array()
        .expect("confusion")
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("count"))
        })
        .sum();
    assert_eq!(confusion_total, 64);
    let text = ok(&["eval", "--checkpoint", a.to_str().expect("utf-8"), "--data", d])?;
    assert!(String::from_utf8(text.stdout)?.contains("top1"));
    Ok(())
}

#[test]
fn bad_settings_name_the_field_and_the_source() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack(&data, 16)?;
    let d = data.to_str().expect("utf-8");
    let o = dir.path().join("o");
    let o = o.to_str().expect("utf-8");
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = run(&["train", "--data", d, "--out", o, "--set", "optimizer.momentum=2"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("momentum"), "{}", stderr(&out));

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "epochs = 2\n[optimizer]\nkind = \"rmsprop\"\n")?;
    let out = run(&[
        "train",
        "--data",
        d,
        "--out",
        o,
        "--config",
        config.to_str().expect("utf-8"),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("bad.toml") && e.contains("optimizer.kind") && e.contains("sgd"),
        "{e}"
    );

    let out = run(&["train", "--data", d, "--out", o, "--model", "vgg16"])?;
    assert!(
        stderr(&out).contains("resnet18-cifar"),
        "allowed values: {}",
        stderr(&out)
    );

    // Usage errors exit with 2.
    assert_eq!(run(&["train", "--data", d])?.status.code(), Some(2));
    assert_eq!(
        run(&["train", "--resume", o, "--epochs", "3"])?.status.code(),
        Some(2)
    );

    let out = run(&[
        "eval",
        "--checkpoint",
        "/nonexistent/model.safetensors",
        "--data",
        d,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/model"), "{}", stderr(&out));
    Ok(())
}
