//! NVRTC for the test gate: brisk-cuda's kernels are compiled by NVRTC in its tests, and
//! NVRTC runs without a GPU, so `cargo xtask test` fetches PyPI's `nvidia-cuda-nvrtc`
//! wheel once into target/nvrtc/ and puts its library folder on `LD_LIBRARY_PATH`. Where
//! that cannot be done (no python3, no network) the kernel test records itself as skipped.
//! cuDNN (no GPU needed to load it and read its version) is put there too where python3's
//! NVIDIA wheels have it (PyTorch's dependencies); it is not fetched.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The wheel matching the CUDA version brisk-cuda is built for (cudarc's `cuda-13000`).
const WHEEL: &str = "nvidia-cuda-nvrtc==13.0.*";

/// The folder holding libnvrtc.so.13, fetched when absent.
fn library_dir() -> Result<PathBuf> {
    let root = crate::root()?.join("target/nvrtc");
    let lib = root.join("nvidia/cu13/lib");
    if lib.join("libnvrtc.so.13").is_file() {
        return Ok(lib);
    }
    eprintln!(
        "xtask: fetching NVRTC ({WHEEL}) from PyPI into {}",
        root.display()
    );
    let wheels = root.join("wheel");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d"])
        .arg(&wheels)
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("pip download {WHEEL} failed ({status})");
    }
    let unzip = "import sys, zipfile, pathlib\n\
                 w = next(pathlib.Path(sys.argv[1]).glob('*.whl'))\n\
                 zipfile.ZipFile(w).extractall(sys.argv[2])";
    let status = Command::new("python3")
        .args(["-c", unzip])
        .arg(&wheels)
        .arg(&root)
        .status()?;
    if !status.success() || !lib.join("libnvrtc.so.13").is_file() {
        bail!("the NVRTC wheel did not unpack to {}", lib.display());
    }
    Ok(lib)
}

/// The folder of python3's cuDNN wheel (`nvidia-cudnn-cu13`), if it has one.
fn cudnn_dir() -> Option<PathBuf> {
    let find = "import nvidia.cudnn, pathlib\n\
                print(pathlib.Path(list(nvidia.cudnn.__path__)[0]) / 'lib')";
    let out = Command::new("python3").args(["-c", find]).output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && dir.join("libcudnn.so.9").is_file()).then_some(dir)
}

/// Puts NVRTC (and cuDNN where python3 has it) on `LD_LIBRARY_PATH` for the tests this
/// process starts, or says why not.
pub fn provide() {
    if let Some(dir) = cudnn_dir() {
        prepend_library_path(dir);
    }
    match library_dir() {
        Ok(lib) => prepend_library_path(lib),
        Err(e) => {
            eprintln!("xtask: NVRTC is not available ({e:#}): the GPU kernel compile test will be SKIPPED")
        }
    }
}

/// Puts `dir` first on `LD_LIBRARY_PATH`.
fn prepend_library_path(dir: PathBuf) {
    let mut path = dir.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    // xtask is single-threaded here; the variable is for the test processes.
    std::env::set_var("LD_LIBRARY_PATH", path);
}
