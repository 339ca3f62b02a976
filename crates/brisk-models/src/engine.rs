//! `Engine`: a `Network`'s training step — forward with batch statistics, then backward
//! from the logits' gradient — run directly on brisk's CPU kernels over f32 slices,
//! block by block, without candle's autograd.
//!
//! Why: candle builds a graph node per op, fills a fresh zero tensor for every gradient
//! it accumulates, and copies between ops; at narrow widths those per-op costs, not the
//! arithmetic, dominated the step. The engine walks the `ModelSpec`'s block plan itself,
//! keeps what backward needs in plain buffers, and writes each gradient once. It computes
//! what the candle graph computes (tested against it to rounding), in f32 with brisk's
//! kernels and per-rank batch statistics; anything else (half precision, synchronised
//! batch-norm, candle's reference ops, a GPU) keeps the candle path — see
//! [`Engine::supports`].

use std::collections::HashMap;
use std::sync::Arc;

use brisk_ops::{
    add_assign, bn_grad_sums, bn_input_grad_in_place, bn_normalize, bn_stats, conv_forward, conv_input_grad,
    conv_weight_grad, matmul_f32, par_build, relu_backward, BnParams, ConvShape, Mat, MaxPool,
};
use brisk_spec::{tensor_name, BlockPlan, ModelSpec, Role, Stem, BN_EPS, BN_MOMENTUM};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::network::Network;
use crate::op_times::{Op, OpTimes};
use crate::resnet::Kernels;

/// An activation: values of `[n, c, h, w]`.
#[derive(Clone, Debug, Default)]
struct Act {
    v: Vec<f32>,
    c: usize,
    h: usize,
    w: usize,
}

impl Act {
    fn hw(&self) -> usize {
        self.h * self.w
    }
}

/// A convolution of the plan: its weight's name and geometry.
#[derive(Clone, Debug)]
struct Conv {
    weight: String,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn new(layer: &str, cout: usize, k: usize, stride: usize, pad: usize) -> Self {
        Conv {
            weight: tensor_name(layer, Role::ConvWeight),
            cout,
            k,
            stride,
            pad,
        }
    }

    fn shape(&self, n: usize, x: &Act) -> Result<ConvShape> {
        Ok(ConvShape::new(
            &[n, x.c, x.h, x.w],
            &[self.cout, x.c, self.k, self.k],
            self.stride,
            self.pad,
        )?)
    }
}

/// What a batch-norm's backward needs: its input and the batch statistics used.
#[derive(Clone, Debug, Default)]
struct BnSaved {
    x: Act,
    stats: Vec<f32>,
}

/// A squeeze-and-excitation unit's forward values.
#[derive(Clone, Debug, Default)]
struct SeSaved {
    /// bn2's output, which the unit scales.
    y: Act,
    /// Pooled `[n, c]`, hidden after ReLU `[n, hidden]`, gate after sigmoid `[n, c]`.
    pooled: Vec<f32>,
    hidden: Vec<f32>,
    gate: Vec<f32>,
}

/// A block's forward values, kept for its backward.
#[derive(Clone, Debug, Default)]
struct BlockSaved {
    /// The previous block's output (or the stem's), shared with it.
    input: Arc<Act>,
    bn1: BnSaved,
    /// bn1's output after ReLU: conv2's input.
    y1: Act,
    bn2: BnSaved,
    se: Option<SeSaved>,
    shortcut_bn: Option<BnSaved>,
    /// The block's output (after the final ReLU).
    out: Arc<Act>,
}

/// Everything the forward pass kept.
#[derive(Clone, Debug, Default)]
struct Saved {
    n: usize,
    image: Act,
    stem_bn: BnSaved,
    /// The stem's batch-norm + ReLU output (the max-pool's input with the ImageNet stem).
    stem_y: Arc<Act>,
    blocks: Vec<BlockSaved>,
    /// The pooled features `[n, C]`.
    features: Vec<f32>,
}

/// Batch statistics and running-statistic updates (training), or the running statistics
/// (evaluation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Eval,
}

/// A network's training step on brisk's CPU kernels without candle's autograd.
#[derive(Debug)]
pub struct Engine {
    spec: ModelSpec,
    plan: Vec<BlockPlan>,
    vars: HashMap<String, Var>,
    /// The variables' values, read at the start of each step.
    values: HashMap<String, Vec<f32>>,
    saved: Option<Saved>,
    /// Wall time per kind of operation, when asked for (`brisk bench step --profile`).
    times: OpTimes,
}

/// The head of the network.
const FC: &str = brisk_spec::tensors::CLASSIFIER;

impl Engine {
    /// Whether the engine can run `net`'s step, and if not why: it computes in f32 with
    /// brisk's CPU kernels and per-rank batch statistics.
    pub fn supports(net: &Network) -> std::result::Result<(), String> {
        if !net.device().is_cpu() {
            return Err("the network is not on the CPU".into());
        }
        if net.kernels() != Kernels::Brisk {
            return Err("the network runs candle's reference ops".into());
        }
        if net.precision().half().is_some() {
            return Err("a layer computes in half precision".into());
        }
        if net.has_batch_norm_sync() {
            return Err("batch-norm is synchronised across ranks".into());
        }
        Ok(())
    }

    /// An engine for `net` (check [`Engine::supports`] first); it updates `net`'s own
    /// variables (running statistics) and reads its weights at every step.
    pub fn new(net: &Network) -> Result<Self> {
        if let Err(why) = Self::supports(net) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "brisk's engine cannot run this network: {why}"
            ))));
        }
        let spec = net.spec().clone();
        Ok(Engine {
            plan: spec.blocks(),
            spec,
            vars: net.all_vars()?.into_iter().collect(),
            values: HashMap::new(),
            saved: None,
            times: OpTimes::default(),
        })
    }

    /// Where the steps' time goes, by kind of operation: call `op_times().enable()` to
    /// start recording.
    pub fn op_times(&self) -> &OpTimes {
        &self.times
    }

    fn var(&self, name: &str) -> Result<&Var> {
        self.vars.get(name).ok_or_else(|| Error::MissingTensor {
            path: "brisk's engine".into(),
            name: name.to_string(),
            expected: Vec::new(),
        })
    }

    fn value(&self, name: &str) -> Result<&[f32]> {
        self.values
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingTensor {
                path: "brisk's engine".into(),
                name: name.to_string(),
                expected: Vec::new(),
            })
    }

    /// Reads every variable's current value (the optimiser changed them since last time).
    fn read_values(&mut self) -> Result<()> {
        let values = self.times.time(Op::ReadWeights, || {
            // In parallel: one large copy per tensor (45 MB at width 1).
            self.vars
                .par_iter()
                .map(|(name, var)| Ok((name.clone(), var.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
                .collect::<Result<HashMap<_, _>>>()
        })?;
        self.values = values;
        Ok(())
    }

    /// The training-mode forward pass of a batch of `n` images (`images`: `[n, C, H, W]`
    /// f32, square): returns the logits `[n, classes]`, updates the batch-norms' running
    /// statistics as PyTorch does, and keeps what [`Engine::backward`] needs.
    pub fn forward_train(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.read_values()?;
        let (logits, saved) = self.forward(images, n, Mode::Train)?;
        self.saved = Some(saved);
        Ok(logits)
    }

    /// The evaluation-mode forward pass (running statistics): the logits `[n, classes]`.
    pub fn forward_eval(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.read_values()?;
        self.saved = None;
        Ok(self.forward(images, n, Mode::Eval)?.0)
    }

    fn forward(&self, images: &[f32], n: usize, mode: Mode) -> Result<(Vec<f32>, Saved)> {
        let c = self.spec.in_channels;
        let hw = images.len() / (n * c).max(1);
        let side = (hw as f64).sqrt().round() as usize;
        if n == 0 || images.len() != n * c * side * side {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "brisk's engine: {} values are not {n} square {c}-channel images",
                images.len()
            ))));
        }
        let image = Act {
            v: images.to_vec(),
            c,
            h: side,
            w: side,
        };
        let mut saved = Saved {
            n,
            ..Saved::default()
        };
        let mut x = self.stem_forward(&image, &mut saved, mode)?;
        saved.image = image;
        for plan in &self.plan {
            let block = self.block_forward(plan, x, n, mode)?;
            x = block.out.clone();
            saved.blocks.push(block);
        }
        let (features, logits) = self.times.time(Op::PoolAndClassifier, || {
            let features = global_average(&x, n);
            self.linear_forward(&features, n).map(|logits| (features, logits))
        })?;
        saved.features = features;
        Ok((logits, saved))
    }

    /// The stem: convolution, batch-norm + ReLU, and the ImageNet stem's max-pool; returns
    /// the first block's input.
    fn stem_forward(&self, image: &Act, saved: &mut Saved, mode: Mode) -> Result<Arc<Act>> {
        let a = self.conv_forward(&self.stem_conv(), image, saved.n)?;
        let (y, bn) = self.bn_forward(brisk_spec::tensors::STEM_BN, a, saved.n, mode, (true, None))?;
        saved.stem_bn = bn;
        saved.stem_y = Arc::new(y);
        if self.spec.stem == Stem::Cifar {
            return Ok(saved.stem_y.clone());
        }
        let (y, pool) = (&saved.stem_y, stem_pool());
        let v = self.times.time(Op::PoolAndClassifier, || {
            pool.forward(&y.v, saved.n * y.c, (y.h, y.w))
        })?;
        Ok(Arc::new(Act {
            v,
            c: y.c,
            h: pool.out_size(y.h)?,
            w: pool.out_size(y.w)?,
        }))
    }

    fn stem_conv(&self) -> Conv {
        let c = self.spec.resolved_channels().stem;
        match self.spec.stem {
            Stem::Cifar => Conv::new(brisk_spec::tensors::STEM_CONV, c, 3, 1, 1),
            Stem::Imagenet => Conv::new(brisk_spec::tensors::STEM_CONV, c, 7, 2, 3),
        }
    }

    fn conv_forward(&self, conv: &Conv, x: &Act, n: usize) -> Result<Act> {
        let g = conv.shape(n, x)?;
        let w = self.value(&conv.weight)?;
        Ok(Act {
            v: self.times.time(Op::ConvForward, || conv_forward(&g, &x.v, w)),
            c: g.cout,
            h: g.ho,
            w: g.wo,
        })
    }

    /// Batch-norm `layer` over `a` (then the residual added and ReLU, as `(relu,
    /// residual)` say): with batch statistics, updating the running ones, in training;
    /// with the running statistics in evaluation. Returns the output and what backward
    /// needs.
    fn bn_forward(
        &self,
        layer: &str,
        a: Act,
        n: usize,
        mode: Mode,
        (relu, residual): (bool, Option<&Act>),
    ) -> Result<(Act, BnSaved)> {
        let (c, hw) = (a.c, a.hw());
        let count = n * hw;
        if mode == Mode::Train && count < 2 {
            return Err(Error::BatchTooSmall {
                layer: layer.to_string(),
                shape: vec![n, c, a.h, a.w],
            });
        }
        let running = match mode {
            Mode::Train => None,
            Mode::Eval => {
                let mut s = self.value(&tensor_name(layer, Role::RunningMean))?.to_vec();
                s.extend_from_slice(self.value(&tensor_name(layer, Role::RunningVar))?);
                Some(s)
            }
        };
        let affine = self.affine(layer)?;
        let (stats, y) = self.times.time(Op::BatchNormForward, || {
            let stats = running.unwrap_or_else(|| bn_stats(&a.v, n, c, hw));
            let p = BnParams {
                n,
                c,
                hw,
                stats: &stats,
                affine: &affine,
                eps: BN_EPS,
            };
            let y = bn_normalize(&a.v, &p, relu, residual.map(|r| r.v.as_slice()));
            (stats, y)
        });
        if mode == Mode::Train {
            self.update_running(layer, &stats, count)?;
        }
        let out = Act {
            v: y,
            c,
            h: a.h,
            w: a.w,
        };
        Ok((out, BnSaved { x: a, stats }))
    }

    /// `[γ; β]` of batch-norm `layer`.
    fn affine(&self, layer: &str) -> Result<Vec<f32>> {
        let mut affine = self
            .value(&tensor_name(layer, Role::BnWeight { zero: false }))?
            .to_vec();
        affine.extend_from_slice(self.value(&tensor_name(layer, Role::BnBias))?);
        Ok(affine)
    }

    /// Running statistics: momentum 0.1 and the unbiased variance, as PyTorch.
    fn update_running(&self, layer: &str, stats: &[f32], count: usize) -> Result<()> {
        let c = stats.len() / 2;
        let unbias = count as f64 / (count - 1) as f64;
        for (role, batch, scale) in [
            (Role::RunningMean, &stats[..c], 1.0),
            (Role::RunningVar, &stats[c..], unbias),
        ] {
            let var = self.var(&tensor_name(layer, role))?;
            let old = self.value(&tensor_name(layer, role))?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(&o, &b)| {
                    ((1.0 - BN_MOMENTUM) * f64::from(o) + BN_MOMENTUM * f64::from(b) * scale) as f32
                })
                .collect();
            var.set(&Tensor::from_vec(new, c, &candle_core::Device::Cpu)?)?;
        }
        Ok(())
    }

    /// One BasicBlock's forward: conv → BN+ReLU → conv → BN (→ SE) (+ shortcut) → ReLU.
    fn block_forward(&self, plan: &BlockPlan, input: Arc<Act>, n: usize, mode: Mode) -> Result<BlockSaved> {
        let a1 = self.conv_forward(&Conv::new(&plan.conv1(), plan.mid, 3, plan.stride, 1), &input, n)?;
        let (y1, bn1) = self.bn_forward(&plan.bn1(), a1, n, mode, (true, None))?;
        let a2 = self.conv_forward(&Conv::new(&plan.conv2(), plan.out, 3, 1, 1), &y1, n)?;
        let projected = match plan.downsample_layers() {
            Some((conv, bn)) => {
                let a = self.conv_forward(&Conv::new(&conv, plan.out, 1, plan.stride, 0), &input, n)?;
                Some(self.bn_forward(&bn, a, n, mode, (false, None))?)
            }
            None => None,
        };
        let shortcut: &Act = projected.as_ref().map_or(&input, |p| &p.0);
        let (out, bn2, se) = match plan.se {
            None => {
                let (out, bn2) = self.bn_forward(&plan.bn2(), a2, n, mode, (true, Some(shortcut)))?;
                (out, bn2, None)
            }
            Some(hidden) => {
                let (y2, bn2) = self.bn_forward(&plan.bn2(), a2, n, mode, (false, None))?;
                let (scaled, se) = self.times.time(Op::SqueezeExcitation, || {
                    let (mut scaled, se) = self.se_forward(plan, y2, n, hidden)?;
                    scaled
                        .v
                        .iter_mut()
                        .zip(&shortcut.v)
                        .for_each(|(a, b)| *a = (*a + b).max(0.0));
                    Ok::<_, Error>((scaled, se))
                })?;
                (scaled, bn2, Some(se))
            }
        };
        Ok(BlockSaved {
            input,
            bn1,
            y1,
            bn2,
            se,
            shortcut_bn: projected.map(|p| p.1),
            out: Arc::new(out),
        })
    }

    /// Squeeze-and-excitation: pool, fc1 + ReLU, fc2 + sigmoid, scale `y` per channel.
    fn se_forward(&self, plan: &BlockPlan, y: Act, n: usize, hidden: usize) -> Result<(Act, SeSaved)> {
        let (fc1, fc2) = plan.se_layers();
        let c = y.c;
        let pooled = global_average(&y, n);
        let mut h = self.dense(&fc1, &pooled, (n, c, hidden))?;
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut gate = self.dense(&fc2, &h, (n, hidden, c))?;
        gate.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        let hw = y.hw();
        let v = par_build(n * c * hw, hw, |i, plane| {
            for (o, &x) in plane.iter_mut().zip(&y.v[i * hw..]) {
                *o = x * gate[i];
            }
        });
        let out = Act {
            v,
            c: y.c,
            h: y.h,
            w: y.w,
        };
        Ok((
            out,
            SeSaved {
                y,
                pooled,
                hidden: h,
                gate,
            },
        ))
    }

    /// `x` `[n, fin]` times the transposed weight of `layer` `[fout, fin]` plus its bias.
    fn dense(&self, layer: &str, x: &[f32], (n, fin, fout): (usize, usize, usize)) -> Result<Vec<f32>> {
        let w = self.value(&self.weight_name(layer))?;
        let b = self.value(&self.bias_name(layer))?;
        let mut out: Vec<f32> = (0..n).flat_map(|_| b.iter().copied()).collect();
        matmul_f32(
            (n, fout, fin),
            &mut out,
            Mat::rows(x, fin),
            Mat::transposed(w, fin),
            true,
        );
        Ok(out)
    }

    /// The weight of a dense layer: the classifier's, or a squeeze-and-excitation 1x1
    /// convolution's (applied to a 1x1 map, it is a dense layer).
    fn weight_name(&self, layer: &str) -> String {
        let role = if layer == FC {
            Role::LinearWeight
        } else {
            Role::ConvWeight
        };
        tensor_name(layer, role)
    }

    /// The bias of a dense layer (`fan_in` plays no part in the name).
    fn bias_name(&self, layer: &str) -> String {
        let role = if layer == FC {
            Role::LinearBias { fan_in: 0 }
        } else {
            Role::ConvBias { fan_in: 0 }
        };
        tensor_name(layer, role)
    }

    fn linear_forward(&self, features: &[f32], n: usize) -> Result<Vec<f32>> {
        let fin = self.spec.feature_channels();
        self.dense(FC, features, (n, fin, self.spec.classes))
    }

    /// The backward pass from the logits' gradient `[n, classes]` (of the loss the caller
    /// computed from [`Engine::forward_train`]'s logits): every trainable variable's
    /// gradient, by name.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<Vec<(String, Vec<f32>)>> {
        let saved = self.saved.take().ok_or_else(|| {
            Error::Candle(candle_core::Error::Msg(
                "brisk's engine: backward without a forward pass".into(),
            ))
        })?;
        let n = saved.n;
        if dlogits.len() != n * self.spec.classes {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "brisk's engine: {} logit gradients for {n} images of {} classes",
                dlogits.len(),
                self.spec.classes
            ))));
        }
        let mut grads = Vec::new();
        let fin = self.spec.feature_channels();
        let last = saved.blocks.last().map_or(&saved.stem_y, |b| &b.out);
        let mut d = self.times.time(Op::PoolAndClassifier, || {
            let dfeatures = self.dense_backward(
                FC,
                dlogits,
                &saved.features,
                (n, fin, self.spec.classes),
                &mut grads,
            )?;
            Ok::<_, Error>(spread_average(&dfeatures, last, n))
        })?;
        for (plan, block) in self.plan.iter().zip(&saved.blocks).rev() {
            d = self.block_backward(plan, block, d, n, &mut grads)?;
        }
        self.stem_backward(&saved, d, &mut grads)?;
        Ok(grads)
    }

    /// Gradients of `out = x · Wᵀ + b` (`x` `[n, fin]`): the weight's and bias's go to
    /// `grads`; returns the input's `[n, fin]`.
    fn dense_backward(
        &self,
        layer: &str,
        dout: &[f32],
        x: &[f32],
        (n, fin, fout): (usize, usize, usize),
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        let mut dw = vec![0f32; fout * fin];
        matmul_f32(
            (fout, fin, n),
            &mut dw,
            Mat::transposed(dout, fout),
            Mat::rows(x, fin),
            false,
        );
        let mut db = vec![0f32; fout];
        for row in dout.chunks(fout) {
            db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
        let w = self.value(&self.weight_name(layer))?;
        let mut dx = vec![0f32; n * fin];
        matmul_f32(
            (n, fin, fout),
            &mut dx,
            Mat::rows(dout, fout),
            Mat::rows(w, fin),
            false,
        );
        grads.push((self.weight_name(layer), dw));
        grads.push((self.bias_name(layer), db));
        Ok(dx)
    }

    /// Batch-norm `layer`'s backward from the gradient `dz` of its affine output: its
    /// weight and bias gradients go to `grads`; returns its input's, written over `dz`.
    fn bn_backward(
        &self,
        layer: &str,
        saved: &BnSaved,
        mut dz: Vec<f32>,
        n: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        let x = &saved.x;
        let (c, hw) = (x.c, x.hw());
        let affine = self.affine(layer)?;
        let sums = self.times.time(Op::BatchNormBackward, || {
            let p = BnParams {
                n,
                c,
                hw,
                stats: &saved.stats,
                affine: &affine,
                eps: BN_EPS,
            };
            let sums = bn_grad_sums(&x.v, &dz, &p);
            bn_input_grad_in_place(&x.v, &mut dz, &p, &sums, true);
            sums
        });
        grads.push((
            tensor_name(layer, Role::BnWeight { zero: false }),
            sums[..c].to_vec(),
        ));
        grads.push((tensor_name(layer, Role::BnBias), sums[c..].to_vec()));
        Ok(dz)
    }

    /// A convolution's backward from its output gradient `dy`: its weight gradient goes
    /// to `grads`; returns its input's gradient when asked.
    fn conv_backward(
        &self,
        conv: &Conv,
        x: &Act,
        dy: &[f32],
        n: usize,
        input_grad: bool,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Option<Vec<f32>>> {
        let g = conv.shape(n, x)?;
        let w = self.value(&conv.weight)?;
        let dw = self
            .times
            .time(Op::ConvWeightGrad, || conv_weight_grad(&g, &x.v, dy));
        grads.push((conv.weight.clone(), dw));
        Ok(input_grad.then(|| self.times.time(Op::ConvInputGrad, || conv_input_grad(&g, dy, w))))
    }

    fn block_backward(
        &self,
        plan: &BlockPlan,
        s: &BlockSaved,
        dout: Vec<f32>,
        n: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        // Through the final ReLU: the gradient of (branch + shortcut).
        let mut dz = dout;
        self.times
            .time(Op::ReluBackward, || relu_backward(&s.out.v, &mut dz));
        let through_se = match (&s.se, plan.se) {
            (Some(se), Some(hidden)) => Some(self.times.time(Op::SqueezeExcitation, || {
                self.se_backward(plan, se, &dz, n, hidden, grads)
            })?),
            _ => None,
        };
        // The shortcut still needs dz: bn2 works on a copy unless SE made one.
        let dbn2 = through_se.unwrap_or_else(|| dz.clone());
        let da2 = self.bn_backward(&plan.bn2(), &s.bn2, dbn2, n, grads)?;
        let conv2 = Conv::new(&plan.conv2(), plan.out, 3, 1, 1);
        let dy1 = self
            .conv_backward(&conv2, &s.y1, &da2, n, true, grads)?
            .unwrap_or_default();
        let mut dz1 = dy1;
        self.times
            .time(Op::ReluBackward, || relu_backward(&s.y1.v, &mut dz1));
        let da1 = self.bn_backward(&plan.bn1(), &s.bn1, dz1, n, grads)?;
        let conv1 = Conv::new(&plan.conv1(), plan.mid, 3, plan.stride, 1);
        let mut dx = self
            .conv_backward(&conv1, &s.input, &da1, n, true, grads)?
            .unwrap_or_default();
        match (plan.downsample_layers(), &s.shortcut_bn) {
            (Some((conv, bn)), Some(saved)) => {
                let da = self.bn_backward(&bn, saved, dz, n, grads)?;
                let ds = Conv::new(&conv, plan.out, 1, plan.stride, 0);
                let dsx = self
                    .conv_backward(&ds, &s.input, &da, n, true, grads)?
                    .unwrap_or_default();
                self.times.time(Op::ReluBackward, || add_assign(&mut dx, &dsx));
            }
            _ => self.times.time(Op::ReluBackward, || add_assign(&mut dx, &dz)),
        }
        Ok(dx)
    }

    /// Squeeze-and-excitation's backward from the gradient `dz` of its output: fc1's and
    /// fc2's gradients go to `grads`; returns the gradient of its input (bn2's output).
    fn se_backward(
        &self,
        plan: &BlockPlan,
        se: &SeSaved,
        dz: &[f32],
        n: usize,
        hidden: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Vec<f32>> {
        let (fc1, fc2) = plan.se_layers();
        let (c, hw) = (se.y.c, se.y.hw());
        // out = y · g: dy = dz · g, dg = Σ_hw dz · y.
        let dgate: Vec<f32> = dz[..n * c * hw]
            .par_chunks(hw)
            .zip(se.y.v.par_chunks(hw))
            .map(|(dplane, yplane)| dplane.iter().zip(yplane).map(|(d, y)| d * y).sum())
            .collect();
        // Through the sigmoid, fc2, the ReLU and fc1.
        let dpre2: Vec<f32> = dgate
            .iter()
            .zip(&se.gate)
            .map(|(d, g)| d * g * (1.0 - g))
            .collect();
        let dh = self.dense_backward(&fc2, &dpre2, &se.hidden, (n, hidden, c), grads)?;
        let dpre1: Vec<f32> = dh
            .iter()
            .zip(&se.hidden)
            .map(|(d, h)| if *h > 0.0 { *d } else { 0.0 })
            .collect();
        let dpooled = self.dense_backward(&fc1, &dpre1, &se.pooled, (n, c, hidden), grads)?;
        // Through the scale and the average pool, in one pass.
        let inv = 1.0 / hw as f32;
        Ok(par_build(n * c * hw, hw, |i, dplane| {
            let (g, spread) = (se.gate[i], dpooled[i] * inv);
            for (d, &z) in dplane.iter_mut().zip(&dz[i * hw..]) {
                *d = z * g + spread;
            }
        }))
    }

    fn stem_backward(&self, saved: &Saved, d: Vec<f32>, grads: &mut Vec<(String, Vec<f32>)>) -> Result<()> {
        let n = saved.n;
        let y = &saved.stem_y;
        let dy = match self.spec.stem {
            Stem::Imagenet => self.times.time(Op::PoolAndClassifier, || {
                stem_pool().backward(&y.v, &d, n * y.c, (y.h, y.w))
            })?,
            Stem::Cifar => d,
        };
        let mut dz = dy;
        self.times.time(Op::ReluBackward, || relu_backward(&y.v, &mut dz));
        let da = self.bn_backward(brisk_spec::tensors::STEM_BN, &saved.stem_bn, dz, n, grads)?;
        // No gradient for the images.
        self.conv_backward(&self.stem_conv(), &saved.image, &da, n, false, grads)?;
        Ok(())
    }
}

/// The ImageNet stem's 3x3 stride-2 max-pool with padding 1.
fn stem_pool() -> MaxPool {
    MaxPool {
        k: 3,
        stride: 2,
        padding: 1,
    }
}

/// The mean of each `[h, w]` plane: `[n, c]`.
fn global_average(x: &Act, n: usize) -> Vec<f32> {
    let hw = x.hw();
    let inv = 1.0 / hw as f32;
    x.v[..n * x.c * hw]
        .par_chunks(hw)
        .map(|plane| plane.iter().sum::<f32>() * inv)
        .collect()
}

/// The gradient of [`global_average`]: each plane's value spread over its `h·w` inputs.
fn spread_average(d: &[f32], like: &Act, n: usize) -> Vec<f32> {
    let hw = like.hw();
    let inv = 1.0 / hw as f32;
    par_build(n * like.c * hw, hw, |i, plane| plane.fill(d[i] * inv))
}
