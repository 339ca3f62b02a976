//! Post-training int8 weights: batch-norm folded into the convolution before it, then
//! every convolution and linear weight quantised symmetrically per output channel
//! (`q = round(w / s)`, `s = max|w| / 127`), stored as i8 plus f32 scales in safetensors
//! (`__metadata__` format `brisk-int8`). Loading dequantises into an ordinary network
//! whose batch-norms are the identity plus the folded bias.

use std::collections::HashMap;
use std::path::Path;

use brisk_models::{read_sidecar, Network, Role};
use brisk_spec::{tensor_name, BN_EPS};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub const FORMAT: &str = "brisk-int8";
const SCALE: &str = "::scale";

/// Per-row symmetric int8: (q, scales) for a weight whose first dimension is the output.
fn quantize_rows(w: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
    let rows = w.dim(0)?;
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let per = values.len() / rows.max(1);
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows);
    for row in values.chunks(per.max(1)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(s);
        q.extend(row.iter().map(|v| (v / s).round().clamp(-127.0, 127.0) as i8));
    }
    Ok((q, scales))
}

/// A tensor as safetensors bytes (candle has no i8 tensors).
#[derive(Debug)]
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn f32(t: &Tensor) -> Result<Self> {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Raw {
            dtype: safetensors::Dtype::F32,
            shape: t.dims().to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    }

    fn i8(q: Vec<i8>, shape: &[usize]) -> Self {
        Raw {
            dtype: safetensors::Dtype::I8,
            shape: shape.to_vec(),
            data: q.into_iter().map(|v| v as u8).collect(),
        }
    }
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Folds batch-norm into the convolutions and quantises; returns the tensors to store.
fn quantized_tensors(net: &Network) -> Result<Vec<(String, Raw)>> {
    let mut t: HashMap<String, Tensor> = net.named_tensors()?.into_iter().collect();
    let roles: HashMap<String, Role> = net
        .spec()
        .tensors()
        .into_iter()
        .map(|i| (i.name, i.role))
        .collect();
    let get = |t: &HashMap<String, Tensor>, n: &str| {
        t.get(n).cloned().ok_or_else(|| Error::InvalidConfig {
            field: "model",
            problem: format!("tensor `{n}` is missing"),
        })
    };
    let mut out = Vec::new();
    let dev = Device::Cpu;
    for pair in net.spec().conv_bn_pairs() {
        let (conv, bn) = (&pair.conv, &pair.bn);
        let mut take = |role: Role| {
            let name = tensor_name(if role == Role::ConvWeight { conv } else { bn }, role);
            let value = get(&t, &name);
            t.remove(&name);
            value
        };
        let w = take(Role::ConvWeight)?;
        let gamma = take(Role::BnWeight { zero: false })?;
        let beta = take(Role::BnBias)?;
        let mean = take(Role::RunningMean)?;
        let var = take(Role::RunningVar)?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let folded = w.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        let (q, s) = quantize_rows(&folded)?;
        let weight = tensor_name(conv, Role::ConvWeight);
        out.push((weight.clone(), Raw::i8(q, folded.dims())));
        let n = s.len();
        out.push((
            format!("{weight}{SCALE}"),
            Raw::f32(&Tensor::from_vec(s, n, &dev)?)?,
        ));
        out.push((tensor_name(bn, Role::BnBias), Raw::f32(&bias)?));
    }
    // What is left: the classifier and SE layers (weights quantised, biases kept).
    let mut rest: Vec<(String, Tensor)> = t.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, w) in rest {
        if roles.get(&name).is_some_and(|r| r.is_weight_matrix()) {
            let (q, s) = quantize_rows(&w)?;
            out.push((name.clone(), Raw::i8(q, w.dims())));
            let n = s.len();
            out.push((
                format!("{name}{SCALE}"),
                Raw::f32(&Tensor::from_vec(s, n, &dev)?)?,
            ));
        } else {
            out.push((name, Raw::f32(&w)?));
        }
    }
    Ok(out)
}

/// Writes the int8 checkpoint of `net` to `path` (with the `model.json` sidecar).
pub fn save(net: &Network, path: &Path) -> Result<()> {
    let tensors = quantized_tensors(net)?;
    crate::write_model_file(path, &tensors, FORMAT, net.spec())?;
    Ok(())
}

/// Reads an int8 checkpoint into an f32 network (dequantised weights, folded batch-norm).
pub fn load(path: &Path, device: &Device) -> Result<Network> {
    let spec = read_sidecar(path)?;
    let bad = |message: String| Error::Format {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    brisk_files::checksum::verify_safetensors(&bytes, path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let dev = Device::Cpu;
    let f32_of = |name: &str| -> Result<Tensor> {
        let v = file.tensor(name).map_err(|e| bad(format!("`{name}`: {e}")))?;
        if v.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("`{name}` must be f32, found {:?}", v.dtype())));
        }
        Ok(Tensor::from_raw_buffer(v.data(), DType::F32, v.shape(), &dev)?)
    };
    let mut tensors = Vec::new();
    for name in file.names() {
        if name.ends_with(SCALE) {
            continue;
        }
        let v = file.tensor(name).map_err(|e| bad(format!("`{name}`: {e}")))?;
        match v.dtype() {
            safetensors::Dtype::I8 => {
                let scales = f32_of(&format!("{name}{SCALE}"))?.to_vec1::<f32>()?;
                let rows = v.shape().first().copied().unwrap_or(0);
                if scales.len() != rows || rows == 0 {
                    return Err(bad(format!("`{name}`: {rows} rows but {} scales", scales.len())));
                }
                let per = v.data().len() / rows;
                let w: Vec<f32> = v
                    .data()
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| f32::from(b as i8) * scales[i / per])
                    .collect();
                tensors.push((name.to_string(), Tensor::from_vec(w, v.shape(), &dev)?));
            }
            _ => tensors.push((name.to_string(), f32_of(name)?)),
        }
    }
    // The folded batch-norms: identity (γ = 1, μ = 0, σ² = 1 − ε) plus the folded bias.
    for pair in spec.conv_bn_pairs() {
        let bn = &pair.bn;
        let c = f32_of(&tensor_name(bn, Role::BnBias))?.dim(0)?;
        tensors.push((
            tensor_name(bn, Role::BnWeight { zero: false }),
            Tensor::ones(c, DType::F32, &dev)?,
        ));
        tensors.push((
            tensor_name(bn, Role::RunningMean),
            Tensor::zeros(c, DType::F32, &dev)?,
        ));
        tensors.push((
            tensor_name(bn, Role::RunningVar),
            Tensor::full((1.0 - BN_EPS) as f32, c, &dev)?,
        ));
    }
    Ok(Network::from_named(spec, tensors, path, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use brisk_testkit::randn;

    #[test]
    fn int8_files_are_a_quarter_and_compute_within_rounding() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        for spec in [
            ModelSpec::resnet18_cifar(10).with_width(0.25),
            ModelSpec::seresnet18_cifar(10).with_width(0.25),
        ] {
            let mut spec = spec;
            spec.image_size = 16;
            let net = Network::new(spec, 4, &dev)?;
            // Realistic batch-norm statistics: a few training-mode forwards.
            let x = randn(1, 0.0, 1.0, (8, 3, 16, 16))?;
            for _ in 0..3 {
                net.forward_t(&x, true)?;
            }
            let f32_path = dir.path().join("f32.safetensors");
            let q_path = dir.path().join("int8.safetensors");
            net.save(&f32_path)?;
            save(&net, &q_path)?;
            let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64).unwrap_or(0.0);
            let ratio = size(&q_path) / size(&f32_path);
            assert!(ratio <= 0.27, "int8 file is {ratio} of the f32 file");
            let back = load(&q_path, &dev)?;
            let want = net.forward_t(&x, false)?;
            let got = back.forward_t(&x, false)?;
            let scale = want.abs()?.max_keepdim(1)?.max(0)?.to_vec1::<f32>()?[0];
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            // 8-bit weights: errors of a few per cent of the logits' range.
            assert!(err < 0.05 * scale, "logits differ by {err} (scale {scale})");
            // Round trip of the weights: every dequantised conv weight within half a step.
            let (q, s) = quantize_rows(&Tensor::new(&[[0.5f32, -1.27, 0.0], [0.0, 0.0, 0.0]], &dev)?)?;
            assert_eq!(q, [50, -127, 0, 0, 0, 0]);
            assert!((s[0] - 0.01).abs() < 1e-7 && s[1] == 1.0);
        }
        Ok(())
    }
}
