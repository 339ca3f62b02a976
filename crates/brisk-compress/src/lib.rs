//! Smaller models from trained ones: unstructured magnitude pruning (global or per layer,
//! one shot or gradual, masks kept through fine-tuning by a training hook), sparse
//! checkpoints, structured filter pruning into a smaller dense `ModelSpec`, knowledge
//! distillation as a training loss, int8 weights, and the before/after figures the
//! compression commands report (`measure`).

pub mod distill;
pub mod error;
pub mod filter;
pub mod masks;
pub mod measure;
pub mod prune;
pub mod quantize;
pub mod sparse;

pub use distill::Distillation;
pub use error::{Error, Result};
pub use filter::{prune_filters, FilterCriterion};
pub use masks::{GradualPruning, MaskHook, Masks, PruneSchedule, Scope};
pub use measure::{measure, nonzero_params};
pub use prune::{FineTune, PruneMethod, PruneOptions, Pruning};

use std::path::Path;

/// Loads any brisk model file: dense (`Network::save`), sparse ([`sparse::save`]) or
/// int8 ([`quantize::save`]), by the format in its safetensors metadata.
pub fn load_model(path: &Path, device: &candle_core::Device) -> Result<brisk_models::Network> {
    match model_format(path)?.as_deref() {
        Some(sparse::FORMAT) => sparse::load(path, device),
        Some(quantize::FORMAT) => quantize::load(path, device),
        _ => Ok(brisk_models::Network::load(path, device)?),
    }
}

/// Writes `tensors` as a safetensors file with `format` in its metadata, atomically,
/// and the `model.json` sidecar holding `spec`.
pub(crate) fn write_model_file<'a, V>(
    path: &Path,
    tensors: &'a [(String, V)],
    format: &str,
    spec: &brisk_models::ModelSpec,
) -> Result<()>
where
    &'a V: safetensors::View,
{
    let metadata = std::collections::HashMap::from([("format".to_string(), format.to_string())]);
    let views: Vec<(String, &'a V)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let bytes = brisk_files::checksum::safetensors_with_checksums(views, metadata, path)?;
    brisk_files::write_atomic(path, &bytes)?;
    brisk_models::write_sidecar(path, spec)?;
    Ok(())
}

/// The `format` entry of a safetensors file's metadata, if any.
pub fn model_format(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let io = |e| Error::io("cannot read", path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(Error::Format {
            path: path.to_path_buf(),
            message: format!("header of {len} bytes: not a safetensors file"),
        });
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: format!("unreadable safetensors header: {e}"),
    })?;
    Ok(v["__metadata__"]["format"].as_str().map(str::to_string))
}
