//! Compression plugged into the training loop: masks survive optimiser steps (with
//! momentum and weight decay), gradual pruning reaches its target, distillation trains.

use std::path::Path;

use anyhow::Result;
use brisk_compress::masks::{default_exclusions, Masks, Scope};
use brisk_compress::{Distillation, GradualPruning, MaskHook, PruneSchedule};
use brisk_models::Network;
use brisk_testkit::pack_synthetic;
use brisk_train::{TrainConfig, Trainer};

fn setup(dir: &Path) -> Result<(TrainConfig, Network)> {
    let data = dir.join("data");
    pack_synthetic(&data, 64, 16, 16)?;
    let text = format!(
        "data = {data:?}\nout = {:?}\nepochs = 2\n[model]\nwidth = 0.125\n[batch]\nkind = \"fixed\"\nsize = 16\n[lr]\nbase = 0.05\n",
        dir.join("run")
    );
    let config = TrainConfig::from_toml_str(&text, "test")?;
    let spec = config.model_spec(10, 3, 16)?;
    Ok((config, Network::new(spec, 1, &candle_core::Device::Cpu)?))
}

fn zeros_of(net: &Network, name: &str) -> Result<Vec<usize>> {
    let (_, t) = net
        .named_tensors()?
        .into_iter()
        .find(|(n, _)| n == name)
        .expect("tensor");
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == 0.0)
        .map(|(i, _)| i)
        .collect())
}

#[test]
fn masks_survive_optimiser_steps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, net) = setup(dir.path())?;
    let masks = Masks::magnitude(&net, 0.7, Scope::Global, &default_exclusions())?;
    masks.apply()?;
    let before = zeros_of(&net, "layer2.0.conv1.weight")?;
    assert!(!before.is_empty());
    let mut trainer = Trainer::with_network(config, net)?;
    trainer.add_hook(Box::new(MaskHook::new(masks)));
    trainer.set_quiet(true);
    let summary = trainer.run()?;
    assert!(summary.updates > 0);
    // Exactly the same weights are zero after training with momentum and weight decay.
    assert_eq!(zeros_of(trainer.network(), "layer2.0.conv1.weight")?, before);
    Ok(())
}

#[test]
fn gradual_pruning_reaches_its_target_during_training() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, net) = setup(dir.path())?;
    let mut trainer = Trainer::with_network(config, net)?;
    let schedule = PruneSchedule {
        initial: 0.0,
        final_sparsity: 0.6,
        start: 1,
        every: 1,
        count: 4,
    };
    trainer.add_hook(Box::new(GradualPruning::new(
        schedule,
        Scope::Global,
        default_exclusions(),
    )?));
    trainer.set_quiet(true);
    trainer.run()?;
    let s = Masks::from_zeros(trainer.network(), &default_exclusions())?.sparsity()?;
    assert!((s - 0.6).abs() < 0.01, "sparsity {s}");
    let log = std::fs::read_to_string(dir.path().join("run/metrics.jsonl"))?;
    assert!(log.contains("\"sparsity\""));
    Ok(())
}

#[test]
fn a_student_trains_on_a_teachers_outputs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, teacher) = setup(dir.path())?;
    let mut student_config = config.clone();
    student_config.model.width = Some(0.0625);
    let mut trainer = Trainer::new(student_config)?;
    trainer.set_loss(Box::new(Distillation::new(teacher, 4.0, 0.9)?));
    trainer.set_quiet(true);
    let summary = trainer.run()?;
    assert!(summary.loss.is_finite() && summary.updates == 8);
    assert!(trainer.network().spec().param_count() < config.model_spec(10, 3, 16)?.param_count());
    Ok(())
}
