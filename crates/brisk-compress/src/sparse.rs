//! Sparse checkpoints: each weight with zeros is stored as a bitmask of its non-zero
//! positions plus the non-zero values, so the file shrinks with sparsity, and loads back
//! to exactly the dense weights. A safetensors file (`__metadata__` format
//! `brisk-sparse`) with the usual `model.json` sidecar.

use std::collections::HashMap;
use std::path::Path;

use brisk_models::{read_sidecar, Network};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub const FORMAT: &str = "brisk-sparse";
const MASK: &str = "::mask";
const VALUES: &str = "::values";

/// Writes `net` to `path`, each tensor holding zeros as `<name>::mask` (u8, one bit per
/// element, little-endian within a byte) and `<name>::values` (the non-zero values in
/// order), other tensors as they are.
pub fn save(net: &Network, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in net.named_tensors()? {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let nonzero = values.iter().filter(|v| **v != 0.0).count();
        // A bitmask costs 1/32 of the dense size: worth it from 1/32 zeros up.
        if (values.len() - nonzero) * 32 <= values.len() {
            tensors.push((name, t));
            continue;
        }
        let mut bits = vec![0u8; values.len().div_ceil(8)];
        let mut kept = Vec::with_capacity(nonzero);
        for (i, &v) in values.iter().enumerate() {
            if v != 0.0 {
                bits[i / 8] |= 1 << (i % 8);
                kept.push(v);
            }
        }
        let dev = t.device();
        let shape_bits = bits.len();
        tensors.push((format!("{name}{MASK}"), Tensor::from_vec(bits, shape_bits, dev)?));
        let n = kept.len();
        tensors.push((format!("{name}{VALUES}"), Tensor::from_vec(kept, n, dev)?));
    }
    crate::write_model_file(path, &tensors, FORMAT, net.spec())?;
    Ok(())
}

/// Reads a checkpoint written by [`save`] back into a dense network.
pub fn load(path: &Path, device: &Device) -> Result<Network> {
    let spec = read_sidecar(path)?;
    let bad = |message: String| Error::Format {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    brisk_files::checksum::verify_safetensors(&bytes, path)?;
    let stored =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let shapes: HashMap<String, Vec<usize>> = spec.tensors().into_iter().map(|t| (t.name, t.shape)).collect();
    let mut dense = Vec::new();
    for (name, t) in &stored {
        if name.ends_with(VALUES) {
            continue;
        }
        let Some(base) = name.strip_suffix(MASK) else {
            dense.push((name.clone(), t.clone()));
            continue;
        };
        let shape = shapes
            .get(base)
            .ok_or_else(|| bad(format!("`{name}` masks a tensor the model does not have")))?;
        let values = stored
            .get(&format!("{base}{VALUES}"))
            .ok_or_else(|| bad(format!("`{base}` has a mask but no values")))?
            .to_vec1::<f32>()?;
        let bits = t.to_dtype(DType::U8)?.to_vec1::<u8>()?;
        let n: usize = shape.iter().product();
        if bits.len() != n.div_ceil(8) {
            return Err(bad(format!(
                "the mask of `{base}` has {} bytes, {n} elements need {}",
                bits.len(),
                n.div_ceil(8)
            )));
        }
        let mut out = vec![0f32; n];
        let mut next = values.iter();
        for (i, o) in out.iter_mut().enumerate() {
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                *o = *next
                    .next()
                    .ok_or_else(|| bad(format!("`{base}` has fewer values than mask bits")))?;
            }
        }
        if next.next().is_some() {
            return Err(bad(format!("`{base}` has more values than mask bits")));
        }
        dense.push((
            base.to_string(),
            Tensor::from_vec(out, shape.as_slice(), &Device::Cpu)?,
        ));
    }
    Ok(Network::from_named(spec, dense, path, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::{default_exclusions, Masks, Scope};
    use brisk_models::ModelSpec;

    #[test]
    fn sparse_files_shrink_with_sparsity_and_round_trip_exactly() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut spec = ModelSpec::resnet18_cifar(10).with_width(0.25);
        spec.image_size = 8;
        let net = Network::new(spec, 2, &Device::Cpu)?;
        let dense_path = dir.path().join("dense.safetensors");
        net.save(&dense_path)?;
        Masks::magnitude(&net, 0.8, Scope::Global, &default_exclusions())?.apply()?;
        let path = dir.path().join("sparse.safetensors");
        save(&net, &path)?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let ratio = size(&path) as f64 / size(&dense_path) as f64;
        // 80% zeros: values 20% + bitmask 3% of the dense bytes, plus the unpruned layers.
        assert!(ratio < 0.3, "sparse file is {ratio} of the dense one");
        let back = load(&path, &Device::Cpu)?;
        for ((n1, a), (n2, b)) in net.named_tensors()?.iter().zip(back.named_tensors()?) {
            assert_eq!(n1, &n2);
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
                "{n1}"
            );
        }
        Ok(())
    }
}
