//! One module per `brisk` subcommand: its clap `Args` and its `run`; and the few things
//! every command shares (compute threads, parsers for the crates' named values).

pub mod bench;
pub mod compress;
pub mod data;
pub mod models;
pub mod train;
pub mod verify;

use clap::builder::{PossibleValuesParser, TypedValueParser};

/// Sets up the compute threads: `threads`, or by default every core.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads.unwrap_or_else(|| brisk_ops::default_threads(1));
    brisk_ops::init_compute(n)?;
    Ok(n)
}

/// Whether the run can compute on `device`: the CPU can; for a GPU the device is opened
/// first, so a machine without the driver or the device gets an error naming what is
/// missing (brisk-cuda's), and one with it is told that brisk's CUDA training backend is
/// not built yet (docs/gpu.md).
pub fn check_device(device: brisk_schema::DeviceChoice) -> anyhow::Result<()> {
    let brisk_schema::DeviceChoice::Cuda(ordinal) = device else {
        return Ok(());
    };
    let gpu = brisk_cuda::Gpu::open(ordinal).map_err(|e| anyhow::anyhow!("device {device}: {e}"))?;
    anyhow::bail!(
        "device {device} ({}): brisk cannot train, evaluate or time steps on a GPU yet: its CUDA backend \
         is being built (docs/gpu.md)",
        gpu.name().unwrap_or_else(|_| "a CUDA device".into())
    )
}

/// Loads a model file of any brisk format (a folder: its `model.safetensors`), saying on
/// stderr when it carries no checksum (another tool wrote it: it loads unverified).
pub fn load_model(path: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, brisk_models::Network)> {
    let file = brisk_models::model_file(path);
    if let Ok(brisk_files::Checksum::Absent) = brisk_models::verify_model_file(&file) {
        eprintln!(
            "note: {} carries no checksum (not written by brisk): loading it unverified",
            file.display()
        );
    }
    let net = brisk_compress::load_model(&file, &candle_core::Device::Cpu)?;
    Ok((file, net))
}

/// A clap parser for one of the crates' named values (`Arch`, `Precision`, a pruning
/// method…): `--help` lists `names`, which the type's own `FromStr` parses, so the names
/// are written once, in the crate that owns the type.
pub fn named<T>(names: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}
