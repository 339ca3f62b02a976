//! brisk's ResNet against PyTorch: fixtures written by `scripts/make_torch_fixture.py`
//! (the torchvision-named reference ResNet) must load and be reproduced within 1e-4.

use std::path::PathBuf;

use anyhow::{Context, Result};
use brisk_models::Network;
use candle_core::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |a - b| / max |b|: the error relative to the reference tensor's scale.
fn relative_error(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

fn check(name: &str) -> Result<()> {
    let dev = Device::Cpu;
    let weights = fixture(&format!("{name}.safetensors"));
    let io = candle_core::safetensors::load(fixture(&format!("{name}.io.safetensors")), &dev)?;
    let get = |k: &str| io.get(k).with_context(|| format!("fixture lacks {k}"));
    let net = Network::load(&weights, &dev)?;
    let x = get("input")?;

    let eval = net.forward_t(x, false)?;
    let err = relative_error(&eval, get("logits_eval")?)?;
    assert!(
        err < 1e-4,
        "{name}: eval logits differ from PyTorch by {err:e} (relative)"
    );

    let train = net.forward_t(x, true)?;
    let err = relative_error(&train, get("logits_train")?)?;
    assert!(
        err < 1e-4,
        "{name}: train logits differ from PyTorch by {err:e} (relative)"
    );

    let mut checked = 0;
    for (tensor_name, ours) in net.named_tensors()? {
        if let Some(reference) = io.get(&format!("after.{tensor_name}")) {
            let err = relative_error(&ours, reference)?;
            assert!(
                err < 1e-4,
                "{name}: {tensor_name} after one train step differs by {err:e}"
            );
            checked += 1;
        }
    }
    // Two statistics per batch-norm: 1 + 2 per block (8 blocks) + 3 downsamples = 20 BNs.
    assert_eq!(checked, 40, "{name}: every running statistic must be compared");
    Ok(())
}

#[test]
fn resnet18_matches_pytorch() -> Result<()> {
    check("resnet18_w0125")
}

#[test]
fn seresnet18_matches_pytorch() -> Result<()> {
    check("seresnet18_w0125")
}

#[test]
fn imagenet_stem_matches_pytorch() -> Result<()> {
    check("resnet18_imagenet_w00625")
}
