//! The training recipe's switches, each checked to act: the moving average of the weights
//! (`ema`) is what is evaluated and saved and resumes exactly, flip test-time augmentation
//! (`eval.flip`) changes what is measured, and a zero-initialised residual scale
//! (`model.zero_init_residual`) starts every block as the identity.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use brisk_data::{Dataset, Split};
use brisk_models::Network;
use brisk_testkit::pack_synthetic;
use brisk_train::{evaluate, EvalScope, TrainConfig, Trainer};
use candle_core::{Device, Tensor};

/// A narrow CIFAR ResNet-18 on `data` for `epochs`, batches of 16, written to `out`.
fn config(data: &Path, out: &Path, epochs: usize, extra: &str) -> Result<TrainConfig> {
    let text = format!(
        "data = {data:?}\nout = {out:?}\nepochs = {epochs}\nlog_every = 4\n{extra}\n\
         [model]\nwidth = 0.125\n[batch]\nkind = \"fixed\"\nsize = 16\n[lr]\nbase = 0.05\n"
    );
    Ok(TrainConfig::from_toml_str(&text, "test config")?)
}

/// Every tensor of a model file, by name.
fn file_values(path: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let net = Network::load(path, &Device::Cpu)?;
    values(&net)
}

fn values(net: &Network) -> Result<Vec<(String, Vec<f32>)>> {
    net.named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// The newest checkpoint folder of a run.
fn last_checkpoint(run: &Path) -> Result<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(run.join("checkpoints"))?
        .map(|e| Ok(e?.path()))
        .collect::<Result<_>>()?;
    dirs.sort();
    Ok(dirs.pop().expect("a checkpoint"))
}

#[test]
fn the_weight_average_is_evaluated_and_saved_and_resumes_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 48, 16, 16)?;
    let ema = "[ema]\ndecay = 0.9";

    // Without an average the saved model is the last checkpoint's raw weights.
    let plain = dir.path().join("plain");
    Trainer::new(config(&data, &plain, 2, "")?)?.run()?;
    let raw = file_values(&last_checkpoint(&plain)?.join("model.safetensors"))?;
    assert_eq!(file_values(&plain.join("model.safetensors"))?, raw);

    // With one, the saved model is the average: not the raw weights, and it is what the
    // trainer's network holds after the run and what the final evaluation measured.
    let averaged = dir.path().join("averaged");
    let mut trainer = Trainer::new(config(&data, &averaged, 2, ema)?)?;
    let summary = trainer.run()?;
    let saved = file_values(&averaged.join("model.safetensors"))?;
    let raw = file_values(&last_checkpoint(&averaged)?.join("model.safetensors"))?;
    assert_ne!(saved, raw, "the moving average equals the raw weights");
    assert_eq!(values(trainer.network())?, saved);
    let ds = Arc::new(Dataset::open(&data)?);
    let net = Network::load(&averaged.join("model.safetensors"), &Device::Cpu)?;
    let again = evaluate(&net, &ds, EvalScope::all(Split::Test, 256), (0, 1), &mut |_| {
        Ok(())
    })?;
    assert_eq!(again.top1, summary.top1);
    assert_eq!(again.loss, summary.loss);

    // Stopped after its first batch and resumed, the same run ends with the same bits:
    // the checkpoint carries the average.
    let resumed = dir.path().join("resumed");
    let mut first = Trainer::new(config(&data, &resumed, 2, ema)?)?;
    first.set_stop_flag(Arc::new(AtomicBool::new(true)));
    assert!(first.run().is_err(), "a stop request ends the run with an error");
    Trainer::resume(&resumed, None)?.run()?;
    assert_eq!(file_values(&resumed.join("model.safetensors"))?, saved);
    Ok(())
}

#[test]
fn flip_augmentation_averages_the_logits_of_each_image_and_its_mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 8, 32, 16)?;
    let ds = Arc::new(Dataset::open(&data)?);
    let mut spec = brisk_models::ModelSpec::resnet18_cifar(10).with_width(0.125);
    spec.image_size = 16;
    let net = Network::new(spec, 5, &Device::Cpu)?;
    let scope = EvalScope::all(Split::Test, 256);
    let eval = |flip| evaluate(&net, &ds, EvalScope { flip, ..scope }, (0, 1), &mut |_| Ok(()));
    let (plain, flipped) = (eval(false)?, eval(true)?);
    assert_eq!(flipped.n, plain.n);
    // The reference: the mean of the logits of the images and of their mirror images,
    // computed here on candle's graph.
    let loader = brisk_data::Loader::new(ds.clone(), brisk_data::LoaderConfig::eval(&ds))?;
    let (mut loss, mut n) = (0.0, 0.0);
    for b in loader.epoch(0, 256, 0)? {
        let b = b?;
        let (c, h, w) = b.shape;
        let x = Tensor::from_slice(&b.images, (b.len(), c, h, w), &Device::Cpu)?;
        let mirror = x.flip(&[3])?;
        let logits = ((net.forward_t(&x, false)? + net.forward_t(&mirror, false)?)? * 0.5)?;
        let y = Tensor::from_slice(&b.labels, b.len(), &Device::Cpu)?;
        let l = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        loss += l * b.len() as f64;
        n += b.len() as f64;
    }
    let reference = loss / n;
    assert!(
        (flipped.loss - reference).abs() < 1e-4 * reference,
        "flip loss {} vs reference {reference}",
        flipped.loss
    );
    assert!(
        (plain.loss - reference).abs() > 1e-3 * reference,
        "the mirror images changed nothing: the flip was ignored"
    );
    Ok(())
}

#[test]
fn a_zero_initialised_residual_scale_starts_every_block_as_the_identity() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 8, 8, 16)?;
    let ds = Dataset::open(&data)?;
    let x = brisk_testkit::randn(9, 0.0, 1.0, (4, 3, 16, 16))?;
    let logits_change = |zero: &str| -> Result<bool> {
        let c = config(&data, &dir.path().join("unused"), 1, "")?;
        let mut c = c;
        c.set_text("model.zero_init_residual", zero)?;
        let m = ds.manifest();
        let net = Network::new(
            c.model_spec(m.classes.len(), m.channels, m.height)?,
            2,
            &Device::Cpu,
        )?;
        let before = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        // Change a convolution inside residual branches: with γ = 0 after it, the
        // branch adds nothing, so the logits cannot move.
        for (name, var) in net.all_vars()? {
            if name.ends_with(".conv1.weight") && name.starts_with("layer") {
                var.set(&(var.as_tensor() * 3.0)?)?;
            }
        }
        let after = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(before != after)
    };
    assert!(logits_change("false")?, "the residual branches do act by default");
    assert!(
        !logits_change("true")?,
        "with γ = 0 the residual branches must add nothing"
    );
    Ok(())
}

/// `engine` in the scope decides what runs the evaluation, as `TrainConfig::engine` does
/// for training; both give the same figures (to rounding).
#[test]
fn evaluation_runs_where_the_config_says() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 8, 24, 16)?;
    let ds = Arc::new(Dataset::open(&data)?);
    let mut spec = brisk_models::ModelSpec::resnet18_cifar(10).with_width(0.125);
    spec.image_size = 16;
    let net = Network::new(spec, 3, &Device::Cpu)?;
    let eval = |engine| {
        let scope = EvalScope {
            engine,
            ..EvalScope::all(Split::Test, 256)
        };
        evaluate(&net, &ds, scope, (0, 1), &mut |_| Ok(()))
    };
    let (engine, graph) = (eval(true)?, eval(false)?);
    assert_eq!((engine.path, graph.path), ("engine", "graph"));
    assert_eq!(engine.n, graph.n);
    assert!(
        (engine.loss - graph.loss).abs() < 1e-4,
        "engine loss {} vs graph {}",
        engine.loss,
        graph.loss
    );
    Ok(())
}
