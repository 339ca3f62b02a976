//! Half-precision policies: the network computes close to f32, its weights stay f32, the
//! gradients reaching them are f32, and its checkpoints are ordinary f32 checkpoints.

use anyhow::Result;
use brisk_models::{ModelSpec, Network};
use brisk_precision::{Dtype, Precision, PrecisionPolicy};
use brisk_testkit::{max_rel, randn};
use candle_core::{DType, Device};

fn check(spec: ModelSpec, mode: Precision) -> Result<()> {
    let dev = Device::Cpu;
    let size = spec.image_size;
    let x = randn(1, 0.0, 1.0, (4, 3, size, size))?;
    let f32_net = Network::new(spec.clone(), 3, &dev)?;
    let mut net = Network::new(spec, 3, &dev)?;
    net.set_precision(PrecisionPolicy::new(mode))?;
    for train in [false, true] {
        let want = f32_net.forward_t(&x, train)?;
        let got = net.forward_t(&x, train)?;
        assert_eq!(got.dtype(), DType::F32);
        // bf16 keeps 8 bits of mantissa, f16 11: logits within a few per cent.
        let err = max_rel(&got, &want)?;
        let tol = if mode.half() == Some(Dtype::Bf16) {
            0.08
        } else {
            0.01
        };
        assert!(err < tol, "{mode:?} train={train}: logits differ by {err}");
    }
    let loss = net.forward_t(&x, true)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    for (name, var) in net.trainable_vars()? {
        assert_eq!(var.dtype(), DType::F32, "{name} must stay f32");
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name} got no gradient ({mode:?})"));
        assert_eq!(g.dtype(), DType::F32, "{name}'s gradient must be f32");
    }
    // The checkpoint of a half-precision run loads into an f32 network, same weights.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    net.save(&path)?;
    let back = Network::load(&path, &dev)?;
    assert_eq!(back.precision(), &PrecisionPolicy::default());
    let mut f32_view = Network::load(&path, &dev)?;
    f32_view.set_precision(PrecisionPolicy::default())?;
    assert_eq!(
        back.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?,
        f32_view.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn every_mode_computes_close_to_f32_with_f32_weights() -> Result<()> {
    let mut cifar = ModelSpec::resnet18_cifar(10).with_width(0.125);
    cifar.image_size = 16;
    let mut se = ModelSpec::seresnet18_cifar(10).with_width(0.125);
    se.image_size = 16;
    let mut imagenet = ModelSpec::resnet18(10).with_width(0.0625);
    imagenet.image_size = 40;
    for mode in [
        Precision::MixedBf16,
        Precision::MixedF16,
        Precision::Bf16,
        Precision::F16,
    ] {
        check(cifar.clone(), mode)?;
    }
    check(se, Precision::MixedBf16)?;
    check(imagenet, Precision::MixedF16)?;
    Ok(())
}

#[test]
fn activations_between_layers_are_stored_in_the_half_format() -> Result<()> {
    // The activations between layers are stored in the half format.
    let dev = Device::Cpu;
    let mut spec = ModelSpec::resnet18_cifar(10).with_width(0.125);
    spec.image_size = 8;
    let mut net = Network::new(spec, 0, &dev)?;
    net.set_precision(PrecisionPolicy::new(Precision::MixedBf16))?;
    let x = randn(2, 0.0, 1.0, (2, 3, 8, 8))?;
    // The stem's output (the first block's input) is bf16 under mixed-bf16, f32 under f32.
    assert_eq!(net.model().stem(&x, true)?.dtype(), DType::BF16);
    net.set_precision(PrecisionPolicy::default())?;
    assert_eq!(net.model().stem(&x, true)?.dtype(), DType::F32);
    Ok(())
}
