//! The machine and the source revision a report was measured on.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    /// The /proc/cpuinfo flags that decide brisk's kernel paths (avx2, fma, avx512f,
    /// avx512_bf16, avx512_fp16, amx_bf16, amx_tile), those present; empty in reports
    /// written before they were recorded.
    #[serde(default)]
    pub isa: Vec<String>,
    pub cores: usize,
    pub memory_gib: f64,
    pub os: String,
}

/// The CPU flags a report names: the ones brisk's kernels choose between.
const ISA_FLAGS: [&str; 7] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
];

impl Machine {
    /// The CPU model and the flags that decide brisk's kernel paths, as one phrase.
    pub fn cpu_and_isa(&self) -> String {
        if self.isa.is_empty() {
            return self.cpu.clone();
        }
        format!("{} ({})", self.cpu, self.isa.join(" "))
    }

    /// The machine in one phrase: CPU (flags), cores, memory, OS.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB, {}",
            self.cpu_and_isa(),
            self.cores,
            self.memory_gib,
            self.os
        )
    }

    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
            .map_or_else(|| "unknown".into(), |s| s.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map_or_else(
                || std::env::consts::OS.to_string(),
                |s| s.trim_matches('"').to_string(),
            );
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split(':').nth(1)))
            .map_or_else(Vec::new, |f| f.split_whitespace().collect());
        let isa = ISA_FLAGS
            .iter()
            .filter(|f| flags.contains(f))
            .map(|f| f.to_string())
            .collect();
        Machine {
            cpu,
            isa,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: kib / (1024.0 * 1024.0),
            os,
        }
    }
}

/// `git rev-parse HEAD`, with `-dirty` when the tree has changes.
pub fn git_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::root().unwrap_or(Path::new(".")))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}
