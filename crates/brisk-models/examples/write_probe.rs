//! Writes a freshly initialised preset and a probe (input + eval logits) for
//! `scripts/check_torchvision_load.py`, which loads the checkpoint into torchvision.
//!
//! `cargo run --release -p brisk-models --example write_probe -- resnet18-cifar /tmp/probe`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use brisk_models::{ModelSpec, Network};
use candle_core::{Device, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, out] = args.as_slice() else {
        bail!("usage: write_probe PRESET OUT_DIR (presets: resnet18, resnet34, seresnet18, resnet18-cifar, seresnet18-cifar)");
    };
    let spec = ModelSpec::preset_named(preset).with_context(|| format!("unknown preset {preset}"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let dev = Device::Cpu;
    let net = Network::new(spec.clone(), 42, &dev)?;
    // Train-mode forwards move the running statistics away from (0, 1), so that eval
    // mode exercises them.
    for _ in 0..3 {
        net.forward_t(
            &Tensor::randn(0.5f32, 2.0, (4, 3, spec.image_size, spec.image_size), &dev)?,
            true,
        )?;
    }
    net.save(&out.join("model.safetensors"))?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, spec.image_size, spec.image_size), &dev)?;
    let logits = net.forward_t(&x, false)?;
    let probe = HashMap::from([("input".to_string(), x), ("logits".to_string(), logits)]);
    candle_core::safetensors::save(&probe, out.join("probe.safetensors"))?;
    println!("wrote {}", out.display());
    Ok(())
}
