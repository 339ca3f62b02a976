//! Evaluation: loss, top-1/top-5 accuracy, per-class accuracy and the confusion matrix of
//! a network on one split of a packed dataset.

use std::sync::Arc;

use brisk_data::{Batch, Dataset, Loader, LoaderConfig, Split};
use brisk_models::Network;
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loss::cross_entropy;
use crate::stepper::Stepper;

/// What an evaluation measured. Accuracies are fractions in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub top1: f64,
    pub top5: f64,
    /// Mean cross-entropy (no smoothing).
    pub loss: f64,
    /// Images evaluated.
    pub n: u64,
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// What ran the forward passes: "engine" (brisk's) or "graph" (candle's).
    pub path: &'static str,
}

/// Accuracy on the images of one class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassAccuracy {
    pub class: String,
    pub correct: u64,
    pub total: u64,
    pub accuracy: f64,
}

/// The images of a batch `[N, C, H, W]` mirrored left to right.
fn mirrored(images: &[f32], width: usize) -> Vec<f32> {
    images
        .chunks_exact(width)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

/// The evaluation-mode logits `[N, classes]` of `images` (a batch of `b`'s shape).
fn logits_of(net: &Network, stepper: &mut Stepper, b: &Batch, images: &[f32]) -> Result<Tensor> {
    let (c, h, w) = b.shape;
    stepper.forward_eval(
        net,
        &Tensor::from_slice(images, (b.len(), c, h, w), &Device::Cpu)?,
    )
}

/// Adds one batch's loss, counts, top-1/top-5 hits and confusion to `sums`; with `flip`,
/// of the mean of the logits of the images and of their mirror images.
fn add_batch(
    net: &Network,
    stepper: &mut Stepper,
    b: &Batch,
    (classes, flip): (usize, bool),
    sums: &mut [f64],
) -> Result<()> {
    let dev = Device::Cpu;
    let y = Tensor::from_slice(&b.labels, b.len(), &dev)?;
    let mut logits = logits_of(net, stepper, b, &b.images)?;
    if flip {
        let other = logits_of(net, stepper, b, &mirrored(&b.images, b.shape.2))?;
        logits = ((logits + other)? * 0.5)?;
    }
    let loss = cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64;
    sums[0] += loss * b.len() as f64;
    sums[1] += b.len() as f64;
    let rows = logits.to_vec2::<f32>()?;
    for (row, &label) in rows.iter().zip(&b.labels) {
        let target = row[label as usize];
        // Ties count against, as in `top_k_correct`.
        let above = row.iter().filter(|&&v| v > target).count();
        sums[2] += f64::from(u8::from(above < 1));
        sums[3] += f64::from(u8::from(above < 5));
        let predicted = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
        sums[4 + label as usize * classes + predicted] += 1.0;
    }
    Ok(())
}

/// The batch's first `n` images (all of them when it holds no more).
fn first_images(mut b: Batch, n: usize) -> Batch {
    if b.len() > n {
        let per_image = b.images.len() / b.len();
        b.images.truncate(n * per_image);
        b.labels.truncate(n);
    }
    b
}

/// What an evaluation reads: a split, in batches of `batch`, all of it or its first
/// `limit` images (a probe's fixed subset), and whether each image is also classified
/// mirrored (`flip`: test-time augmentation, the two logits averaged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalScope {
    pub split: Split,
    pub batch: usize,
    pub limit: Option<usize>,
    pub flip: bool,
    /// Run the forward passes on brisk's engine when the network allows it (the training
    /// config's `engine`); false: on candle's graph.
    pub engine: bool,
    /// The engine's split of each batch (the training config's `slices`; 0: chosen).
    pub slices: usize,
}

impl EvalScope {
    /// The whole `split`, `batch` images at a time, on the engine where it can run.
    pub fn all(split: Split, batch: usize) -> Self {
        EvalScope {
            split,
            batch,
            limit: None,
            flip: false,
            engine: true,
            slices: 0,
        }
    }
}

/// Evaluates `net` (eval mode: running statistics) on `scope`, on this rank's share
/// (`rank` of `world`); `reduce` sums the per-rank figures across ranks in place (the
/// identity for one process).
pub fn evaluate(
    net: &Network,
    data: &Arc<Dataset>,
    scope: EvalScope,
    (rank, world): (usize, usize),
    reduce: &mut dyn FnMut(&mut [f64]) -> Result<()>,
) -> Result<EvalReport> {
    let EvalScope {
        split,
        batch,
        limit,
        flip,
        engine,
        slices,
    } = scope;
    let m = data.manifest();
    let classes = m.classes.len();
    net.spec()
        .check_fits(classes, m.channels, (m.height, m.width), data.dir())
        .map_err(brisk_models::Error::from)?;
    if data.is_empty(split) {
        return Err(Error::InvalidConfig {
            field: "data",
            problem: format!(
                "{} has no {} images to evaluate",
                data.dir().display(),
                split.name()
            ),
        });
    }
    let config = LoaderConfig {
        split,
        rank,
        world,
        ..LoaderConfig::eval(data)
    };
    let loader = Loader::new(data.clone(), config)?;
    // Sums: loss, n, top-1, top-5, then the confusion matrix row by row.
    let mut sums = vec![0f64; 4 + classes * classes];
    // brisk's engine when asked and the network allows it (the same logits, without the
    // graph): chosen where training chooses it.
    let mut stepper = Stepper::new(net, engine, brisk_models::Slices::from_config(slices))?;
    // This rank's share of a limited scope (ranks read interleaved images).
    let mut left = limit.map_or(usize::MAX, |l| l.div_ceil(world.max(1)));
    for b in loader.epoch(0, batch, 0)? {
        if left == 0 {
            break;
        }
        let b = first_images(b?, left);
        left -= b.len();
        add_batch(net, &mut stepper, &b, (classes, flip), &mut sums)?;
    }
    reduce(&mut sums)?;
    Ok(EvalReport {
        path: stepper.path(),
        ..report_of(&sums, &m.classes)
    })
}

/// The report from the summed figures: loss, n, top-1, top-5, then the confusion
/// matrix row by row (`path` left for the caller).
fn report_of(sums: &[f64], class_names: &[String]) -> EvalReport {
    let classes = class_names.len();
    let n = sums[1];
    let div = |x: f64| if n > 0.0 { x / n } else { 0.0 };
    let confusion: Vec<Vec<u64>> = (0..classes)
        .map(|t| (0..classes).map(|p| sums[4 + t * classes + p] as u64).collect())
        .collect();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(t, row)| {
            let total: u64 = row.iter().sum();
            ClassAccuracy {
                class: class_names[t].clone(),
                correct: row[t],
                total,
                accuracy: if total > 0 {
                    row[t] as f64 / total as f64
                } else {
                    0.0
                },
            }
        })
        .collect();
    EvalReport {
        top1: div(sums[2]),
        top5: div(sums[3]),
        loss: div(sums[0]),
        n: n as u64,
        per_class,
        confusion,
        path: "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirroring_reverses_each_row_and_twice_is_the_identity() {
        // Two images of one channel, 2x3 each.
        let images: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let m = mirrored(&images, 3);
        assert_eq!(m, [2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.]);
        assert_eq!(mirrored(&m, 3), images);
    }
}
