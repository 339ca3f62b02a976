//! OpenMPI for the distributed tests: found, installed (root + apt-get, saying so), or
//! a failure that prints the exact install command.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian/Ubuntu packages the `mpi` feature needs: the MPI library and launcher, and
/// libclang for rsmpi's generated bindings.
pub const PACKAGES: [&str; 3] = ["libopenmpi-dev", "openmpi-bin", "libclang-dev"];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// libclang as bindgen finds it: `LIBCLANG_PATH`, or Debian's LLVM folders.
fn has_libclang() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let Ok(entries) = std::fs::read_dir("/usr/lib") else {
        return false;
    };
    entries.flatten().any(|e| {
        let lib = e.path().join("lib");
        e.file_name().to_string_lossy().starts_with("llvm-")
            && std::fs::read_dir(&lib).is_ok_and(|files| {
                files
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().starts_with("libclang"))
            })
    }) || Path::new("/usr/lib/x86_64-linux-gnu/libclang.so").exists()
}

/// What is missing for the MPI build and tests, if anything.
fn missing() -> Vec<&'static str> {
    let mut m = Vec::new();
    if !on_path("mpicc") {
        m.push("mpicc (libopenmpi-dev)");
    }
    if !on_path("mpirun") {
        m.push("mpirun (openmpi-bin)");
    }
    if !has_libclang() {
        m.push("libclang (libclang-dev)");
    }
    m
}

/// `Ok` when a brisk with MPI can be built and launched here, else why not (with the
/// install command).
pub fn missing_reason() -> std::result::Result<(), String> {
    let gaps = missing();
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "MPI is not installed ({} missing); install it with `apt-get install {}`",
            gaps.join(", "),
            PACKAGES.join(" ")
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Makes sure OpenMPI and libclang are installed: installs them with apt-get when this
/// process is root, else fails with the command to run.
pub fn ensure() -> Result<()> {
    let gaps = missing();
    if gaps.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", PACKAGES.join(" "));
    if !(is_root() && on_path("apt-get")) {
        bail!(
            "the distributed tests need OpenMPI and libclang, and {} missing.\n\
             Install them (Debian/Ubuntu):\n    sudo apt-get update && sudo {install}\n\
             or run the other tests alone with `cargo xtask test --skip-mpi`.",
            gaps.join(", ")
        );
    }
    eprintln!(
        "xtask: the distributed tests need OpenMPI ({} missing): installing with apt-get: {install}",
        gaps.join(", ")
    );
    for args in [
        vec!["update", "-q"],
        [
            vec!["install", "-y", "-q", "--no-install-recommends"],
            PACKAGES.to_vec(),
        ]
        .concat(),
    ] {
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed ({status}); install by hand: {install}",
                args.join(" ")
            );
        }
    }
    let gaps = missing();
    if !gaps.is_empty() {
        bail!("after installing, still missing: {}", gaps.join(", "));
    }
    Ok(())
}
