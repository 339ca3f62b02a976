//! The training loop end to end on tiny data: it overfits a tiny set, two runs with one
//! seed give the same bits, batches of 1 and a growing batch work, and a diverging run
//! stops with an error naming the step.

use std::path::Path;

use anyhow::Result;
use brisk_data::Split;
use brisk_testkit::pack_synthetic;
use brisk_train::{evaluate, BatchSchedule, EvalScope, TrainConfig, Trainer};

/// `net` evaluated on `ds`'s training split (all of it, 64 images at a time).
fn train_accuracy(
    net: &brisk_models::Network,
    ds: &std::sync::Arc<brisk_data::Dataset>,
) -> Result<brisk_train::EvalReport> {
    Ok(evaluate(
        net,
        ds,
        EvalScope::all(Split::Train, 64),
        (0, 1),
        &mut |_| Ok(()),
    )?)
}

/// A config for a narrow CIFAR ResNet-18 on `data`, written to `out`.
fn tiny_config(data: &Path, out: &Path, epochs: usize) -> Result<TrainConfig> {
    let text = format!(
        "data = {data:?}\nout = {out:?}\nepochs = {epochs}\nlog_every = 4\n\
         [model]\nwidth = 0.125\n[batch]\nkind = \"fixed\"\nsize = 16\n[lr]\nbase = 0.05\n"
    );
    Ok(TrainConfig::from_toml_str(&text, "test config")?)
}

/// Every tensor of a network by name, as plain values.
type Weights = Vec<(String, Vec<f32>)>;

fn weights(trainer: &Trainer) -> Result<Weights> {
    let mut out = Vec::new();
    for (name, t) in trainer.network().named_tensors()? {
        out.push((name, t.flatten_all()?.to_vec1::<f32>()?));
    }
    Ok(out)
}

#[test]
fn a_tiny_model_overfits_a_tiny_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 64, 16, 16)?;
    let mut config = tiny_config(&data, &dir.path().join("run"), 25)?;
    // No augmentation: the model must memorise these exact images.
    config.loader.crop_padding = 0;
    config.loader.flip = false;
    config.optimizer.weight_decay = 0.0;
    config.lr.shape = brisk_train::LrShape::OneCycle {
        pct_start: 0.2,
        div: 10.0,
        final_div: 10.0,
        momentum: None,
    };
    let mut trainer = Trainer::new(config)?;
    trainer.set_quiet(true);
    let summary = trainer.run()?;
    assert_eq!(summary.updates, 25 * 4);
    let ds = std::sync::Arc::new(brisk_data::Dataset::open(&data)?);
    let train = train_accuracy(trainer.network(), &ds)?;
    assert_eq!(train.n, 64);
    assert!(
        train.top1 >= 58.0 / 64.0,
        "only {} of 64 learned",
        train.top1 * 64.0
    );

    // The event log tells the story: a start, 25 epochs and evaluations, an end.
    let log = std::fs::read_to_string(dir.path().join("run/metrics.jsonl"))?;
    let events: Vec<serde_json::Value> = log.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(
        (count("start"), count("epoch"), count("eval"), count("end")),
        (1, 25, 25, 1)
    );
    let first_step = events.iter().find(|e| e["event"] == "step").expect("step events");
    assert!(first_step["loss"].as_f64().expect("loss") > 1.5, "{first_step}");
    for key in ["lr", "top1", "img_per_s", "data_wait", "step", "batch_size"] {
        assert!(!first_step[key].is_null(), "step event lacks {key}: {first_step}");
    }
    assert!(dir.path().join("run/model.safetensors").is_file());
    assert!(dir.path().join("run/best/model.safetensors").is_file());
    assert!(dir.path().join("run/summary.json").is_file());
    Ok(())
}

#[test]
fn one_seed_gives_the_same_bits_with_batches_of_one_and_growing_batches() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 24, 8, 16)?;
    let run = |name: &str| -> Result<(Weights, u64)> {
        let mut config = tiny_config(&data, &dir.path().join(name), 3)?;
        // 1, then 4, then 16 images per batch: 24 + 6 + 2 updates.
        config.batch = BatchSchedule::Geometric {
            start: 1,
            factor: 4,
            every: 1,
            max: 16,
        };
        config.lr.base = 0.01;
        let mut trainer = Trainer::new(config)?;
        trainer.set_quiet(true);
        let summary = trainer.run()?;
        Ok((weights(&trainer)?, summary.updates))
    };
    let (a, updates) = run("a")?;
    let (b, _) = run("b")?;
    assert_eq!(updates, 24 + 6 + 2);
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs between two runs with one seed");
    }
    // And the run did change the weights.
    let mut fresh = brisk_train::TrainConfig::default();
    fresh.model.width = Some(0.125);
    let fresh = brisk_models::Network::new(fresh.model_spec(10, 3, 16)?, 0, &candle_core::Device::Cpu)?;
    let w0 = fresh.named_tensors()?;
    assert!(w0.iter().zip(&a).any(|((_, t), (_, x))| {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map(|v| &v != x)
            .unwrap_or(true)
    }));
    Ok(())
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_the_last_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 64, 8, 16)?;
    let mut config = tiny_config(&data, &dir.path().join("run"), 50)?;
    config.lr.base = 1e30;
    config.lr.shape = brisk_train::LrShape::Constant;
    config.checkpoint.every_steps = 1;
    let mut trainer = Trainer::new(config)?;
    trainer.set_quiet(true);
    let e = trainer.run().expect_err("a learning rate of 1e30 must diverge");
    let message = e.to_string();
    // Either the loss or, first, a weight became non-finite; both name the step.
    assert!(
        matches!(
            e,
            brisk_train::Error::NonFiniteLoss { .. } | brisk_train::Error::NonFiniteWeights { .. }
        ),
        "{message}"
    );
    assert!(message.contains("at step"), "{message}");
    // Every checkpoint written holds finite weights: the newest one loads and is finite.
    let root = dir.path().join("run/checkpoints");
    let newest = brisk_train::checkpoint::list(&root)?.pop();
    if let Some((step, path)) = newest {
        assert!(message.contains(&path.display().to_string()), "{message}");
        let ck = brisk_train::checkpoint::read(&path, &candle_core::Device::Cpu)?;
        brisk_train::checkpoint::check_finite(&ck.net, step)?;
    } else {
        assert!(message.contains("No checkpoint"), "{message}");
    }
    Ok(())
}

#[test]
fn missing_folders_and_reused_outputs_are_explained() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let e = Trainer::new(TrainConfig::default())
        .expect_err("no out")
        .to_string();
    assert!(e.contains("out"), "{e}");
    let mut config = TrainConfig {
        out: Some(dir.path().to_path_buf()),
        ..TrainConfig::default()
    };
    let e = Trainer::new(config.clone()).expect_err("no data").to_string();
    assert!(e.contains("data") && e.contains("--data"), "{e}");
    config.data = Some(dir.path().join("nowhere"));
    let e = Trainer::new(config).expect_err("missing data").to_string();
    assert!(e.contains("nowhere"), "{e}");
    let e = Trainer::resume(dir.path(), None)
        .expect_err("nothing to resume")
        .to_string();
    assert!(e.contains("config.toml"), "{e}");
    Ok(())
}

#[test]
fn mixed_precision_learns_as_well_as_f32_with_f32_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    pack_synthetic(&data, 128, 16, 16)?;
    let ds = std::sync::Arc::new(brisk_data::Dataset::open(&data)?);
    let mut accuracy = Vec::new();
    for mode in ["f32", "mixed-bf16", "mixed-f16"] {
        let out = dir.path().join(mode);
        let mut config = tiny_config(&data, &out, 20)?;
        config.loader.crop_padding = 0;
        config.loader.flip = false;
        config.optimizer.weight_decay = 0.0;
        config.precision.mode = mode.parse()?;
        let mut trainer = Trainer::new(config)?;
        trainer.set_quiet(true);
        trainer.run()?;
        for (name, t) in trainer.network().named_tensors()? {
            assert_eq!(t.dtype(), candle_core::DType::F32, "{mode}: {name} must stay f32");
        }
        let train = train_accuracy(trainer.network(), &ds)?;
        accuracy.push((mode, train.top1));
        // The final model is an ordinary f32 checkpoint.
        let back = brisk_models::Network::load(&out.join("model.safetensors"), &candle_core::Device::Cpu)?;
        assert_eq!(back.precision().mode, brisk_precision::Precision::F32);
        if mode == "mixed-f16" {
            let log = std::fs::read_to_string(out.join("metrics.jsonl"))?;
            assert!(log.contains("\"loss_scale\""), "f16 runs log the loss scale");
            let state = std::fs::read_dir(out.join("checkpoints"))?
                .flatten()
                .map(|e| e.path().join("state.json"))
                .next()
                .expect("a checkpoint");
            let state: serde_json::Value = serde_json::from_slice(&std::fs::read(state)?)?;
            assert!(
                state["hooks"]["loss_scaler"]["scale"].as_f64().is_some(),
                "{state}"
            );
        }
    }
    let f32_top1 = accuracy[0].1;
    assert!(f32_top1 > 0.9, "f32 itself must learn the set: {accuracy:?}");
    // "As well as": at most one image of 128 fewer right than f32 (doing better is no
    // failure; the f32 run's own rounding moves it by an image or two).
    for &(mode, top1) in &accuracy[1..] {
        assert!(
            top1 >= f32_top1 - 0.01,
            "{mode} {top1} vs f32 {f32_top1}: {accuracy:?}"
        );
    }
    Ok(())
}
