//! brisk's engine (the step without candle's autograd) against the candle graph on the
//! same weights: the same logits, every parameter's gradient, the same running
//! statistics, and the same evaluation logits, for the CIFAR and ImageNet stems, SE
//! blocks, projection shortcuts and explicit (filter-pruned) channel counts.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use brisk_models::{Engine, ModelSpec, Network};
use brisk_precision::{Precision, PrecisionPolicy};
use brisk_testkit::{max_rel, randn};
use candle_core::{Device, Tensor};

/// Relative tolerance of values: both sides compute in f32 with the same kernels, but
/// sum in different orders (candle's reductions against the engine's).
const TOL: f32 = 1e-4;
/// Gradients sum many more terms (the stem's batch-norm bias gathers the whole network's):
/// measured up to 1.1e-4 here; brisk's kernels-vs-candle test allows 5e-3.
const GRAD_TOL: f32 = 1e-3;
/// Half precision: both sides round the same values to the same format (measured: the
/// same bits but for SE's gradients, 1.2e-4 norm-wise, where a value near a rounding
/// boundary can round the other way after a different summation order).
const HALF_TOL: f32 = 1e-3;

fn check(spec: ModelSpec, n: usize) -> Result<()> {
    let dev = Device::Cpu;
    let size = spec.image_size;
    let name = format!("{} {} w{}", spec.arch, spec.stem, spec.width);
    let reference = Network::new(spec.clone(), 11, &dev)?;
    let engine_net = Network::new(spec.clone(), 11, &dev)?;
    let mut engine = Engine::new(&engine_net)?;
    let x = randn(5, 0.0, 1.0, (n, spec.in_channels, size, size))?;
    let probe = randn(6, 0.0, 1.0, (n, spec.classes))?;

    // Training mode: logits, then the gradients of sum(logits · probe).
    let want = reference.forward_t(&x, true)?;
    let got = engine.forward_train(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
    let got = Tensor::from_vec(got, (n, spec.classes), &dev)?;
    let err = max_rel(&got, &want)?;
    if err > TOL {
        bail!("{name}: training logits differ by {err}");
    }
    let grads = (want * &probe)?.sum_all()?.backward()?;
    let ours: HashMap<String, Vec<f32>> = engine
        .backward(&probe.flatten_all()?.to_vec1::<f32>()?)?
        .into_iter()
        .collect();
    let trainable = reference.trainable_vars()?;
    if ours.len() != trainable.len() {
        bail!(
            "{name}: {} gradients for {} trainable tensors",
            ours.len(),
            trainable.len()
        );
    }
    for (tensor, var) in &trainable {
        let g = grads
            .get(var)
            .with_context(|| format!("{name}: candle has no gradient for {tensor}"))?;
        let mine = ours
            .get(tensor)
            .with_context(|| format!("{name}: no gradient for {tensor}"))?;
        let mine = Tensor::from_vec(mine.clone(), g.dims(), &dev)?;
        let err = max_rel(&mine, g)?;
        if err > GRAD_TOL {
            bail!("{name}: gradient of {tensor} differs by {err}");
        }
    }
    // Both updated their running statistics from the same batch.
    let (a, b) = (reference.buffer_vars()?, engine_net.buffer_vars()?);
    for ((tensor, va), (_, vb)) in a.iter().zip(&b) {
        let err = max_rel(vb.as_tensor(), va.as_tensor())?;
        if err > TOL {
            bail!("{name}: running statistic {tensor} differs by {err}");
        }
    }
    // Evaluation mode: the running statistics.
    let want = reference.forward_t(&x, false)?;
    let got = engine.forward_eval(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
    let err = max_rel(&Tensor::from_vec(got, (n, spec.classes), &dev)?, &want)?;
    if err > TOL {
        bail!("{name}: evaluation logits differ by {err}");
    }
    Ok(())
}

fn sized(spec: ModelSpec, image: usize) -> ModelSpec {
    ModelSpec {
        image_size: image,
        ..spec
    }
}

#[test]
fn the_engine_computes_what_the_candle_graph_computes() -> Result<()> {
    check(sized(ModelSpec::resnet18_cifar(10).with_width(0.125), 16), 4)?;
    let mut se = sized(ModelSpec::seresnet18_cifar(7).with_width(0.25), 8);
    se.se_ratio = 4;
    check(se, 3)?;
    check(sized(ModelSpec::resnet18(5).with_width(0.0625), 40), 2)?;
    // Explicit channels: a pruned block and a width change inside a stage (a projection
    // shortcut at stride 1).
    let mut pruned = sized(ModelSpec::resnet18_cifar(4).with_width(0.125), 8);
    let mut ch = pruned.resolved_channels();
    ch.blocks[0].mid = 3;
    ch.blocks[1].out = 12;
    pruned.channels = Some(ch);
    check(pruned, 2)?;
    Ok(())
}

/// The engine's training step under `engine_mode` against candle's graph under
/// `graph_mode` (same weights, same batch): the largest relative error of the logits, of
/// any gradient, and of the evaluation logits.
fn errors(spec: &ModelSpec, n: usize, engine_mode: Precision, graph_mode: Precision) -> Result<[f32; 3]> {
    let dev = Device::Cpu;
    let size = spec.image_size;
    let mut reference = Network::new(spec.clone(), 11, &dev)?;
    reference.set_precision(PrecisionPolicy::new(graph_mode))?;
    let mut engine_net = Network::new(spec.clone(), 11, &dev)?;
    engine_net.set_precision(PrecisionPolicy::new(engine_mode))?;
    let mut engine = Engine::new(&engine_net)?;
    let x = randn(5, 0.0, 1.0, (n, spec.in_channels, size, size))?;
    let probe = randn(6, 0.0, 1.0, (n, spec.classes))?;
    let want = reference.forward_t(&x, true)?;
    let got = engine.forward_train(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
    let logits = max_rel(&Tensor::from_vec(got, (n, spec.classes), &dev)?, &want)?;
    let grads = (want * &probe)?.sum_all()?.backward()?;
    let ours: HashMap<String, Vec<f32>> = engine
        .backward(&probe.flatten_all()?.to_vec1::<f32>()?)?
        .into_iter()
        .collect();
    // Over all gradients together, norm-wise: a value that rounds the other way (a
    // summation order apart) moves it little, a rounding left out moves every value.
    let (mut diff, mut norm) = (0f64, 0f64);
    for (tensor, var) in &reference.trainable_vars()? {
        let g = grads
            .get(var)
            .with_context(|| format!("no graph gradient for {tensor}"))?;
        let mine = ours
            .get(tensor)
            .with_context(|| format!("no engine gradient for {tensor}"))?;
        for (a, b) in mine.iter().zip(g.flatten_all()?.to_vec1::<f32>()?) {
            diff += f64::from(a - b).powi(2);
            norm += f64::from(b).powi(2);
        }
    }
    let worst = (diff / norm.max(f64::MIN_POSITIVE)).sqrt() as f32;
    let want = reference.forward_t(&x, false)?;
    let got = engine.forward_eval(&x.flatten_all()?.to_vec1::<f32>()?, n)?;
    let eval = max_rel(&Tensor::from_vec(got, (n, spec.classes), &dev)?, &want)?;
    Ok([logits, worst, eval])
}

#[test]
fn mixed_precision_on_the_engine_computes_what_the_graph_computes() -> Result<()> {
    let mut se = sized(ModelSpec::seresnet18_cifar(7).with_width(0.25), 8);
    se.se_ratio = 4;
    for spec in [
        sized(ModelSpec::resnet18_cifar(10).with_width(0.125), 16),
        se,
        sized(ModelSpec::resnet18(5).with_width(0.0625), 40),
    ] {
        for mode in [Precision::MixedBf16] {
            let half = errors(&spec, 8, mode, mode)?;
            // The same step in f32 on the engine: what the rounding changes.
            let f32 = errors(&spec, 8, Precision::F32, mode)?;
            let name = format!("{} {} w{} {}", spec.arch, spec.stem, spec.width, mode.name());
            println!("{name}: engine {mode:?} vs graph {half:?}; engine f32 vs graph {f32:?}");
            for (what, h) in ["logits", "gradients", "evaluation logits"].iter().zip(half) {
                assert!(h <= HALF_TOL, "{name}: {what} differ by {h}");
            }
            // The rounding shows: the engine must follow it.
            for (what, (h, f)) in ["logits", "gradients", "evaluation logits"]
                .iter()
                .zip(half.iter().zip(&f32))
            {
                assert!(
                    *h * 4.0 <= *f,
                    "{name}: {what}: the engine's {mode:?} ({h}) is not much closer to the graph's than f32 ({f})"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_engine_says_what_it_cannot_run() -> Result<()> {
    let mut spec = ModelSpec::resnet18_cifar(3).with_width(0.0625);
    spec.image_size = 8;
    let mut net = Network::new(spec, 1, &Device::Cpu)?;
    assert!(Engine::supports(&net).is_ok());
    net.set_precision(PrecisionPolicy::new(Precision::MixedBf16))?;
    assert!(
        Engine::supports(&net).is_ok(),
        "mixed precision runs on the engine"
    );
    // All-bf16 computes the classifier in bf16, which the engine does not.
    net.set_precision(PrecisionPolicy::new(Precision::Bf16))?;
    let why = Engine::supports(&net).expect_err("a bf16 classifier");
    assert!(why.contains("classifier"), "{why}");
    net.set_precision(PrecisionPolicy::new(Precision::MixedF16))?;
    let why = Engine::supports(&net).expect_err("f16 activations");
    assert!(why.contains("f16"), "{why}");
    assert!(Engine::new(&net).is_err());
    net.set_precision(PrecisionPolicy::default())?;
    net.set_kernels(brisk_models::Kernels::Candle)?;
    assert!(Engine::supports(&net).is_err());
    net.set_kernels(brisk_models::Kernels::Brisk)?;
    let mut engine = Engine::new(&net)?;
    assert!(engine.backward(&[0.0; 6]).is_err(), "backward before forward");
    assert!(engine.forward_train(&[0.0; 7], 2).is_err(), "not whole images");
    Ok(())
}
