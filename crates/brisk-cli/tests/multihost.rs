//! `brisk train` across two simulated hosts (brisk-hosts: network namespaces with their own
//! hostnames, joined by veth; mpirun launching through `ip netns exec`): 2 hosts × 1 rank
//! and 2 hosts × 2 ranks end with the single-process weights, with TCP carrying the
//! gradients between hosts; compute threads follow the ranks per host; a host that dies
//! ends the job naming it, and `--resume` continues from the last checkpoint. Where the
//! machine cannot make namespaces (not root, the kernel refuses) each test says SKIPPED
//! and records it for `cargo xtask test`'s summary.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brisk_hosts::{skipped, Hosts, NAMES};
use brisk_models::Network;
use brisk_testkit::{max_rel, ok, train_args, Brisk};
use candle_core::Device;

const BRISK: &str = env!("CARGO_BIN_EXE_brisk");

/// Two hosts with `slots` slots each, or `None` after recording why not.
fn hosts(test: &str, slots: usize) -> Result<Option<Hosts>> {
    match Hosts::create(slots) {
        Ok(h) => Ok(Some(h)),
        Err(brisk_hosts::Error::Unavailable(why)) => {
            skipped(&format!("multihost::{test}"), &why);
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The worst relative difference of any tensor between two runs' final models.
fn worst(a: &Path, b: &Path) -> Result<(String, f64)> {
    let load = |p: &Path| Network::load(&p.join(brisk_models::MODEL_FILE), &Device::Cpu);
    let (a, b) = (load(a)?, load(b)?);
    let mut worst = (String::new(), 0.0);
    for ((name, x), (_, y)) in a.named_tensors()?.iter().zip(&b.named_tensors()?) {
        let d = f64::from(max_rel(x, y)?);
        if d >= worst.1 {
            worst = (name.clone(), d);
        }
    }
    Ok(worst)
}

/// The `start` event's compute threads of a run (rank 0's log).
fn threads_of(out: &Path) -> Result<u64> {
    let log = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let start: serde_json::Value = serde_json::from_str(log.lines().next().context("empty log")?)?;
    start["threads"].as_u64().context("no threads in the start event")
}

#[test]
fn two_hosts_train_to_the_single_process_weights_over_tcp() -> Result<()> {
    let Some(hosts) = hosts("two_hosts_train_to_the_single_process_weights_over_tcp", 2)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    Brisk(BRISK).pack(&data, 64, 32, 16)?;
    let extra = [
        "--epochs",
        "1",
        "--threads",
        "1",
        "--set",
        "distributed.sync_batch_norm=true",
        "--set",
        "eval.every_epochs=0",
    ];
    let single = dir.path().join("single");
    ok(Command::new(BRISK).args(train_args(&data, &single, 32, &extra)))?;
    // (ranks, transports): 2 hosts × 1 rank with TCP the only transport between ranks,
    // and 2 hosts × 2 ranks with shared memory inside a host and TCP across.
    for (np, btl) in [(2, "tcp,self"), (4, "tcp,vader,self")] {
        let out = dir.path().join(format!("np{np}"));
        let mut c = hosts.mpirun(np);
        c.args(["--mca", "btl", btl, "--mca", "btl_base_verbose", "30", BRISK])
            .args(train_args(&data, &out, 32 / np, &extra));
        let output = ok(&mut c)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // OpenMPI's own report: the TCP transport opened on the hosts' addresses.
        assert!(
            text.contains("btl: tcp") || text.contains("btl:tcp") || text.contains("tcp_component"),
            "no TCP transport in OpenMPI's report for {np} ranks:\n{text}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
        assert_eq!(summary["world"], np);
        let (name, diff) = worst(&single, &out)?;
        assert!(
            diff <= 1e-5,
            "{np} ranks on 2 hosts: {name} differs by {diff:e} (relative)"
        );
    }
    Ok(())
}

#[test]
fn compute_threads_follow_the_ranks_per_host() -> Result<()> {
    let Some(hosts) = hosts("compute_threads_follow_the_ranks_per_host", 2)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    Brisk(BRISK).pack(&data, 16, 8, 16)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // 2 ranks fill one slot per host (by node); 4 ranks fill two. Unbound (the harness
    // passes --bind-to none), each rank takes its host's cores divided by the ranks on
    // that host.
    for (np, per_host) in [(2u64, 1u64), (4, 2)] {
        let out = dir.path().join(format!("np{np}"));
        let mut c = hosts.mpirun(np as usize);
        c.args(["--map-by", "node", BRISK]).args(train_args(
            &data,
            &out,
            4,
            &["--epochs", "1", "--set", "eval.every_epochs=0"],
        ));
        ok(&mut c)?;
        assert_eq!(
            threads_of(&out)?,
            (cores / per_host).max(1),
            "{np} ranks on 2 hosts"
        );
    }
    Ok(())
}

/// The newest complete checkpoint's step, if any.
fn checkpointed(out: &Path) -> Option<u64> {
    out.join("checkpoints")
        .read_dir()
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .max()
}

#[test]
fn a_dead_host_ends_the_job_naming_it_and_resume_continues() -> Result<()> {
    let Some(hosts) = hosts("a_dead_host_ends_the_job_naming_it_and_resume_continues", 1)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    Brisk(BRISK).pack(&data, 128, 16, 16)?;
    let out = dir.path().join("run");
    let extra = [
        "--epochs",
        "40",
        "--threads",
        "1",
        "--set",
        "checkpoint.every_steps=4",
        "--set",
        "eval.every_epochs=0",
    ];
    let mut c = hosts.mpirun(2);
    c.args(["--mca", "btl", "tcp,self", BRISK])
        .args(train_args(&data, &out, 8, &extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut job = c.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpointed(&out).is_none() {
        if Instant::now() > deadline || job.try_wait()?.is_some() {
            let _ = job.kill();
            let o = job.wait_with_output()?;
            bail!(
                "the 2-host job ended or stalled before its first checkpoint ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // h2 dies: every process on it (its rank and OpenMPI's daemon) killed at once.
    let killed = hosts.kill(1);
    assert!(killed >= 2, "h2 ran {killed} processes");
    let died = Instant::now();
    // A guard against a hang, not a timing: the job must end by itself.
    while job.try_wait()?.is_none() {
        if died.elapsed() > Duration::from_secs(120) {
            let _ = job.kill();
            bail!("the job still runs two minutes after h2 died");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended_after = died.elapsed();
    let result = job.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("the job ended {ended_after:?} after h2 died, saying:\n{text}");
    assert!(!result.status.success());
    // OpenMPI 4.1 reports a host whose daemon died as daemons that could not be started,
    // naming no host; the surviving rank says which ranks ran where.
    assert!(
        text.contains(&format!("rank 1 on {}", NAMES[1])),
        "the ranks and hosts are named:\n{text}"
    );
    assert!(
        hosts.pids(0).is_empty() || hosts.pids(0).iter().all(|p| !is_brisk(*p)),
        "no rank survives on h1"
    );
    assert!(
        !out.join("summary.json").exists(),
        "the job finished before h2 died"
    );
    // Both hosts again: the job continues from its last checkpoint to the end.
    let from = checkpointed(&out).context("a checkpoint")?;
    let mut c = hosts.mpirun(2);
    c.args(["--mca", "btl", "tcp,self", BRISK, "train", "--resume"])
        .arg(&out)
        .arg("--quiet");
    ok(&mut c)?;
    let log = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("\"resume\"") && l.contains(&format!("\"step\":{from}"))),
        "the resumed job starts at step {from}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    assert_eq!(summary["world"], 2);
    assert_eq!(summary["epochs"], 40);
    Ok(())
}

/// Whether process `pid` is a brisk rank.
fn is_brisk(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(BRISK))
}
