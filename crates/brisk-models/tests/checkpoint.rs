//! Checkpoint round trips and the errors a damaged or mismatched checkpoint must give.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use brisk_models::{ModelSpec, Network};
use brisk_testkit::randn;
use candle_core::{DType, Device, Tensor};

fn tiny() -> ModelSpec {
    let mut spec = ModelSpec::seresnet18_cifar(10).with_width(0.125);
    spec.se_ratio = 4;
    spec
}

/// Saves a tiny network, lets `damage` edit its tensors, rewrites the file and returns
/// the error loading it gives.
fn check_damaged(damage: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    Network::new(tiny(), 1, &Device::Cpu)?.save(&path)?;
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    damage(&mut tensors);
    candle_core::safetensors::save(&tensors, &path)?;
    let err = Network::load(&path, &Device::Cpu).expect_err("damaged checkpoint must not load");
    Ok(err.to_string())
}

#[test]
fn save_load_round_trips_bit_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    let net = Network::new(tiny(), 7, &Device::Cpu)?;
    // One train-mode forward so running statistics are no longer their initial values.
    let x = randn(1, 0.0, 1.0, (3, 3, 16, 16))?;
    net.forward_t(&x, true)?;
    net.save(&path)?;
    assert_eq!(
        std::fs::metadata(&path)?.len(),
        tiny().checkpoint_bytes(),
        "checkpoint_bytes must be exact"
    );
    let back = Network::load(&path, &Device::Cpu)?;
    assert_eq!(back.spec(), net.spec());
    for ((n1, t1), (n2, t2)) in net.named_tensors()?.into_iter().zip(back.named_tensors()?) {
        assert_eq!(n1, n2);
        assert_eq!(
            t1.flatten_all()?.to_vec1::<f32>()?,
            t2.flatten_all()?.to_vec1::<f32>()?,
            "{n1}"
        );
    }
    let a = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    let b = back.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn same_seed_same_weights() -> Result<()> {
    let a = Network::new(tiny(), 3, &Device::Cpu)?.named_tensors()?;
    let b = Network::new(tiny(), 3, &Device::Cpu)?.named_tensors()?;
    let c = Network::new(tiny(), 4, &Device::Cpu)?.named_tensors()?;
    let flat = |v: &[(String, Tensor)]| -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for (_, t) in v {
            out.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    };
    assert_eq!(flat(&a)?, flat(&b)?);
    assert_ne!(flat(&a)?, flat(&c)?);
    Ok(())
}

#[test]
fn built_variables_are_exactly_the_tensor_table() -> Result<()> {
    for spec in [ModelSpec::resnet34(1000), ModelSpec::seresnet18_cifar(10)] {
        let net = Network::new(spec.clone(), 0, &Device::Cpu)?;
        let built: Vec<(String, Vec<usize>)> = net
            .named_tensors()?
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        let mut table: Vec<(String, Vec<usize>)> =
            spec.tensors().into_iter().map(|t| (t.name, t.shape)).collect();
        table.sort();
        assert_eq!(built, table);
        let params: usize = net.trainable_vars()?.iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(params, spec.param_count());
    }
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let msg = check_damaged(|t| {
        t.remove("layer3.1.bn2.running_var");
    })?;
    assert!(
        msg.contains("lacks tensor `layer3.1.bn2.running_var`") && msg.contains("[32]"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn extra_tensor_is_named() -> Result<()> {
    let msg = check_damaged(|t| {
        t.insert(
            "layer9.0.conv1.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("zeros"),
        );
    })?;
    assert!(
        msg.contains("`layer9.0.conv1.weight`") && msg.contains("[2, 2]"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn wrong_shape_names_both_shapes() -> Result<()> {
    let msg = check_damaged(|t| {
        t.insert(
            "fc.weight".into(),
            Tensor::zeros((10, 7), DType::F32, &Device::Cpu).expect("zeros"),
        );
    })?;
    assert!(
        msg.contains("`fc.weight`") && msg.contains("[10, 7]") && msg.contains("[10, 64]"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn wrong_dtype_is_named() -> Result<()> {
    let msg = check_damaged(|t| {
        let w = t["fc.bias"].to_dtype(DType::F16).expect("cast");
        t.insert("fc.bias".into(), w);
    })?;
    assert!(msg.contains("`fc.bias`") && msg.contains("F16"), "{msg}");
    Ok(())
}

#[test]
fn num_batches_tracked_is_accepted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    Network::new(tiny(), 1, &Device::Cpu)?.save(&path)?;
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    tensors.insert("bn1.num_batches_tracked".into(), Tensor::new(3i64, &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, &path)?;
    Network::load(&path, &Device::Cpu)?;
    Ok(())
}

#[test]
fn truncated_file_and_missing_sidecar_are_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    Network::new(tiny(), 1, &Device::Cpu)?.save(&path)?;
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let msg = Network::load(&path, &Device::Cpu)
        .expect_err("truncated")
        .to_string();
    assert!(
        msg.contains("m.safetensors") && msg.contains("safetensors file"),
        "{msg}"
    );
    let msg = Network::load(Path::new("/nonexistent/x.safetensors"), &Device::Cpu)
        .expect_err("missing")
        .to_string();
    assert!(msg.contains("/nonexistent/x.json"), "{msg}");
    Ok(())
}
