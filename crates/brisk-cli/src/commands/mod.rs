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
