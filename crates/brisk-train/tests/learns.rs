//! The pieces compose and learn: brisk's loader, ResNet, cross-entropy, SGD and one-cycle
//! schedule overfit a tiny synthetic set (the loop itself arrives with the training issue).

use std::sync::Arc;

use anyhow::Result;
use brisk_data::{pack_synthetic, Dataset, Loader, LoaderConfig, Split, SyntheticConfig};
use brisk_models::{ModelSpec, Network};
use brisk_train::loss::{cross_entropy, top_k_correct};
use brisk_train::{LrSchedule, LrShape, Sgd, SgdConfig};
use candle_core::{Device, Tensor};

#[test]
fn a_tiny_model_overfits_a_tiny_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    pack_synthetic(
        dir.path(),
        &SyntheticConfig {
            train: 64,
            test: 0,
            seed: 1,
            size: 16,
        },
        64,
    )?;
    let data = Arc::new(Dataset::open(dir.path())?);
    // No augmentation: the model must memorise these exact images.
    let m = data.manifest();
    let mut config = LoaderConfig::train(&data);
    config.augment = brisk_data::Augment::eval(m.mean.clone(), m.std.clone());
    let loader = Loader::new(data.clone(), config)?;

    let dev = Device::Cpu;
    let mut spec = ModelSpec::resnet18_cifar(10).with_width(0.125);
    spec.image_size = 16;
    let net = Network::new(spec, 0, &dev)?;
    let vars = net.trainable_vars()?.into_iter().map(|(_, v)| v).collect();
    let epochs = 25;
    let mut sgd = Sgd::new(
        vars,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        },
    )?;
    let schedule = LrSchedule {
        base_lr: 0.05,
        shape: LrShape::OneCycle {
            pct_start: 0.2,
            div: 10.0,
            final_div: 10.0,
        },
        warmup_epochs: 0.0,
        epochs: epochs as f64,
    };
    let batches = loader.batches_per_epoch(16);
    let mut first_loss = None;
    for epoch in 0..epochs {
        for batch in loader.epoch(epoch as u64, 16, 0)? {
            let b = batch?;
            let (c, h, w) = b.shape;
            let x = Tensor::from_slice(&b.images, (b.len(), c, h, w), &dev)?;
            let y = Tensor::from_slice(&b.labels, b.len(), &dev)?;
            sgd.set_learning_rate(schedule.lr(epoch as f64 + b.index as f64 / batches as f64));
            let loss = cross_entropy(&net.forward_t(&x, true)?, &y, 0.0)?;
            first_loss.get_or_insert(loss.to_scalar::<f32>()?);
            sgd.step(&loss.backward()?)?;
        }
    }
    // Train accuracy in eval mode (running statistics), on the training images.
    let mut correct = 0;
    for batch in Loader::new(
        data.clone(),
        LoaderConfig {
            split: Split::Train,
            shuffle: false,
            ..LoaderConfig::eval(&data)
        },
    )?
    .epoch(0, 64, 0)?
    {
        let b = batch?;
        let (c, h, w) = b.shape;
        let x = Tensor::from_slice(&b.images, (b.len(), c, h, w), &dev)?;
        let y = Tensor::from_slice(&b.labels, b.len(), &dev)?;
        correct += top_k_correct(&net.forward_t(&x, false)?, &y, 1)?;
    }
    let first = first_loss.expect("trained");
    assert!(first > 1.5, "an untrained net starts near ln(10): {first}");
    assert!(correct >= 58, "only {correct} of 64 training images learned");
    Ok(())
}
