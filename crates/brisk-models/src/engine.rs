//! `Executor`: a `Network`'s training step — forward with batch statistics, then backward
//! from the logits' gradient — walked block by block over the `ModelSpec`'s plan, each
//! operation run by a [`Backend`] on its own buffers, without candle's autograd.
//! `Engine` is the executor on brisk's CPU kernels ([`CpuBackend`]).
//!
//! Why: candle builds a graph node per op, fills a fresh zero tensor for every gradient
//! it accumulates, and copies between ops; at narrow widths those per-op costs, not the
//! arithmetic, dominated the step. The engine walks the `ModelSpec`'s block plan itself,
//! keeps what backward needs in plain buffers, and writes each gradient once. It computes
//! what the candle graph computes (tested against it to rounding), in f32 with brisk's
//! kernels — or mixed-bf16, values rounded where the graph stores bf16 (the same bits) —
//! with batch statistics shared across MPI ranks or the slices of a split batch when the
//! network says so; anything else (f16, a bf16 classifier, candle's reference ops, a GPU)
//! keeps the candle path — see [`Engine::supports`].

use std::collections::HashMap;
use std::sync::Arc;

use brisk_ops::{BatchNormSync, ConvShape, Products};
use brisk_precision::{Dtype, LayerKind, PrecisionPolicy};
use brisk_spec::{tensor_name, BlockPlan, ConvPlan, ModelSpec, Role, BN_EPS, BN_MOMENTUM};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::backend::{Backend, BnArgs, CpuBackend};
use crate::error::{Error, Result};
use crate::network::Network;
use crate::op_times::{Op, OpTimes};
use crate::resnet::Kernels;

/// An activation: values of `[n, c, h, w]` in a backend buffer `T`.
#[derive(Clone, Debug, Default)]
struct Act<T> {
    v: T,
    c: usize,
    h: usize,
    w: usize,
}

impl<T> Act<T> {
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
    fn new(plan: &ConvPlan) -> Self {
        Conv {
            weight: tensor_name(&plan.layer, Role::ConvWeight),
            cout: plan.cout,
            k: plan.kernel,
            stride: plan.stride,
            pad: plan.padding,
        }
    }

    fn shape<T>(&self, n: usize, x: &Act<T>) -> Result<ConvShape> {
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
struct BnSaved<T> {
    x: Act<T>,
    stats: T,
}

/// A squeeze-and-excitation unit's forward values.
#[derive(Clone, Debug, Default)]
struct SeSaved<T> {
    /// bn2's output, which the unit scales.
    y: Act<T>,
    /// Pooled `[n, c]`, hidden after ReLU `[n, hidden]`, gate after sigmoid `[n, c]`.
    pooled: T,
    hidden: T,
    gate: T,
}

/// A block's forward values, kept for its backward.
#[derive(Clone, Debug, Default)]
struct BlockSaved<T> {
    /// The previous block's output (or the stem's), shared with it.
    input: Arc<Act<T>>,
    bn1: BnSaved<T>,
    /// bn1's output after ReLU: conv2's input.
    y1: Act<T>,
    bn2: BnSaved<T>,
    se: Option<SeSaved<T>>,
    shortcut_bn: Option<BnSaved<T>>,
    /// The block's output (after the final ReLU).
    out: Arc<Act<T>>,
}

/// A layer's output and what its backward needs (batch-norm's by default).
type Normalized<T, S = BnSaved<T>> = (Act<T>, S);

/// Everything the forward pass kept.
#[derive(Clone, Debug, Default)]
struct Saved<T> {
    n: usize,
    image: Act<T>,
    stem_bn: BnSaved<T>,
    /// The stem's batch-norm + ReLU output (the max-pool's input with the ImageNet stem).
    stem_y: Arc<Act<T>>,
    blocks: Vec<BlockSaved<T>>,
    /// The pooled features `[n, C]`.
    features: T,
}

/// Batch statistics and running-statistic updates (training), or the running statistics
/// (evaluation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Eval,
}

/// A network's training step on a backend, without candle's autograd.
#[derive(Debug)]
pub struct Executor<B: Backend> {
    backend: B,
    spec: ModelSpec,
    plan: Vec<BlockPlan>,
    vars: HashMap<String, Var>,
    /// The variables' values on the backend, read at the start of each step.
    values: HashMap<String, B::Buf>,
    saved: Option<Saved<B::Buf>>,
    /// Shares batch-norm's statistics with the other ranks or slices of the batch.
    sync: Option<Arc<dyn BatchNormSync>>,
    /// Whether this executor writes the running statistics (one slice of a split batch
    /// does, for all of them).
    updates_running: bool,
    /// The half format activations are stored in between layers (the precision policy's),
    /// or `None` in f32: values rounded to it where a layer writes them, and gradients
    /// rounded where they reach them, as candle's graph stores them in that format.
    half: Option<Dtype>,
    /// The convolution weights computed in `half` (rounded copies of the f32 masters).
    half_weights: std::collections::HashSet<String>,
    /// Wall time per kind of operation, when asked for (`brisk bench step --profile`).
    times: OpTimes,
}

/// The executor on brisk's CPU kernels: brisk's engine.
pub type Engine = Executor<CpuBackend>;

/// The head of the network.
const FC: &str = brisk_spec::layers::CLASSIFIER;

impl Engine {
    /// An engine for `net` (check [`Executor::supports`] first); it updates `net`'s own
    /// variables (running statistics) and reads its weights at every step.
    pub fn new(net: &Network) -> Result<Self> {
        Executor::with_backend(net, CpuBackend)
    }
}

impl<B: Backend> Executor<B> {
    /// Whether the engine can run `net`'s step, and if not why: it computes in f32 with
    /// brisk's CPU kernels.
    pub fn supports(net: &Network) -> std::result::Result<(), String> {
        if !Kernels::run_on(net.device()) {
            return Err("the network is not on the CPU".into());
        }
        if net.kernels() != Kernels::Brisk {
            return Err("the network runs candle's reference ops".into());
        }
        half_layers(net.spec(), net.precision()).map(|_| ())
    }

    /// An executor for `net` on `backend` (check [`Executor::supports`] first); it
    /// updates `net`'s own variables (running statistics) and reads its weights at every
    /// step.
    pub fn with_backend(net: &Network, backend: B) -> Result<Self> {
        if let Err(why) = Self::supports(net) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "brisk's engine cannot run this network: {why}"
            ))));
        }
        let spec = net.spec().clone();
        let half_weights = half_layers(&spec, net.precision())
            .map_err(|why| Error::Candle(candle_core::Error::Msg(why)))?
            .into_iter()
            .map(|layer| tensor_name(&layer, Role::ConvWeight))
            .collect();
        Ok(Executor {
            half: net.precision().mode.half(),
            half_weights,
            backend,
            plan: spec.blocks(),
            spec,
            vars: net.all_vars()?.into_iter().collect(),
            values: HashMap::new(),
            saved: None,
            sync: net.batch_norm_sync().cloned(),
            updates_running: true,
            times: OpTimes::default(),
        })
    }

    /// This executor as one slice of a split batch: batch-norm's statistics shared through
    /// `sync`, the running statistics written by the `leader` only.
    pub(crate) fn in_slice(mut self, sync: Arc<dyn BatchNormSync>, leader: bool) -> Self {
        self.sync = Some(sync);
        self.updates_running = leader;
        self
    }

    /// This executor without side effects on the network: no running statistics written,
    /// no statistics shared (a memory planner's dry run).
    pub(crate) fn detached(mut self) -> Self {
        self.sync = None;
        self.updates_running = false;
        self
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

    fn value(&self, name: &str) -> Result<&B::Buf> {
        self.values.get(name).ok_or_else(|| Error::MissingTensor {
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
                .map(|(name, var)| {
                    let host = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    let mut buf = self.backend.upload(host)?;
                    if let (Some(half), true) = (self.half, self.half_weights.contains(name)) {
                        self.backend.round_half(&mut buf, half)?;
                    }
                    Ok((name.clone(), buf))
                })
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
        self.backend.download_owned(logits)
    }

    /// The evaluation-mode forward pass (running statistics): the logits `[n, classes]`.
    pub fn forward_eval(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>> {
        self.read_values()?;
        self.saved = None;
        let logits = self.forward(images, n, Mode::Eval)?.0;
        self.backend.download_owned(logits)
    }

    fn forward(&self, images: &[f32], n: usize, mode: Mode) -> Result<(B::Buf, Saved<B::Buf>)> {
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
            v: self.backend.upload(images.to_vec())?,
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
            let features = self.backend.global_average(&x.v, n * x.c, x.hw())?;
            self.linear_forward(&features, n).map(|logits| (features, logits))
        })?;
        saved.features = features;
        Ok((logits, saved))
    }

    /// The stem: convolution, batch-norm + ReLU, and the ImageNet stem's max-pool; returns
    /// the first block's input.
    fn stem_forward(
        &self,
        image: &Act<B::Buf>,
        saved: &mut Saved<B::Buf>,
        mode: Mode,
    ) -> Result<Arc<Act<B::Buf>>> {
        let a = self.conv_forward(&self.stem_conv(), image, saved.n)?;
        let (mut y, bn) = self.bn_forward(brisk_spec::layers::STEM_BN, a, saved.n, mode, (true, None))?;
        saved.stem_bn = bn;
        let pool = self.spec.stem_pool();
        if pool.is_none() {
            y.v = self.stored(y.v)?;
        }
        saved.stem_y = Arc::new(y);
        let Some(pool) = pool else {
            return Ok(saved.stem_y.clone());
        };
        let y = &saved.stem_y;
        let v = self.times.time(Op::PoolAndClassifier, || {
            self.backend.max_pool(&pool, &y.v, saved.n * y.c, (y.h, y.w))
        })?;
        Ok(Arc::new(Act {
            v: self.stored(v)?,
            c: y.c,
            h: pool.out_size(y.h),
            w: pool.out_size(y.w),
        }))
    }

    /// The half format `conv` computes in, if it is a half layer.
    fn half_of(&self, conv: &Conv) -> Option<Dtype> {
        self.half.filter(|_| self.half_weights.contains(&conv.weight))
    }

    /// How `conv` multiplies: in bf16 where it is a bf16 layer (its operands are bf16
    /// values), else in f32.
    fn products(&self, conv: &Conv) -> Products {
        match self.half_of(conv) {
            Some(Dtype::Bf16) => Products::Bf16,
            _ => Products::F32,
        }
    }

    fn stem_conv(&self) -> Conv {
        Conv::new(&self.spec.stem_conv())
    }

    fn conv_forward(&self, conv: &Conv, x: &Act<B::Buf>, n: usize) -> Result<Act<B::Buf>> {
        let g = conv.shape(n, x)?;
        let w = self.value(&conv.weight)?;
        Ok(Act {
            v: self.times.time(Op::ConvForward, || {
                self.backend.conv_forward(&g, &x.v, w, self.products(conv))
            })?,
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
        a: Act<B::Buf>,
        n: usize,
        mode: Mode,
        (relu, residual): (bool, Option<&Act<B::Buf>>),
    ) -> Result<Normalized<B::Buf>> {
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
            Mode::Eval => Some(self.joined(layer, Role::RunningMean, Role::RunningVar)?),
        };
        let affine = self.affine(layer)?;
        let (stats, y, total) = self.times.time(Op::BatchNormForward, || {
            let (stats, total) = match running {
                Some(s) => (s, count),
                None => self.batch_stats(&a.v, (n, c, hw))?,
            };
            let p = BnArgs {
                n,
                c,
                hw,
                stats: &stats,
                affine: &affine,
                eps: BN_EPS,
            };
            let y = self
                .backend
                .bn_normalize(&a.v, &p, relu, residual.map(|r| &r.v))?;
            Ok::<_, Error>((stats, y, total))
        })?;
        if mode == Mode::Train && self.updates_running {
            self.update_running(layer, &stats, total)?;
        }
        let out = Act {
            v: y,
            c,
            h: a.h,
            w: a.w,
        };
        Ok((out, BnSaved { x: a, stats }))
    }

    /// Batch statistics `[mean; var]` of `x` and the count of values they are over: this
    /// batch's, or every rank's and slice's when they are shared.
    fn batch_stats(&self, x: &B::Buf, (n, c, hw): (usize, usize, usize)) -> Result<(B::Buf, usize)> {
        let local = self.backend.bn_stats(x, (n, c, hw))?;
        let Some(sync) = self.shared_sync() else {
            return Ok((local, n * hw));
        };
        let stats = self.backend.download_owned(local)?;
        let (shared, total) = brisk_ops::combine_batch_stats(sync.as_ref(), &stats, (n * hw) as f64)?;
        Ok((self.backend.upload(shared)?, total as usize))
    }

    /// What shares batch-norm's sums with other ranks or slices, when any take part now.
    fn shared_sync(&self) -> Option<&Arc<dyn BatchNormSync>> {
        self.sync.as_ref().filter(|s| s.shared())
    }

    /// `x` rounded to the half format activations are stored in (as it is, in f32).
    fn stored(&self, mut x: B::Buf) -> Result<B::Buf> {
        if let Some(half) = self.half {
            self.backend.round_half(&mut x, half)?;
        }
        Ok(x)
    }

    /// `[γ; β]` of batch-norm `layer`.
    fn affine(&self, layer: &str) -> Result<B::Buf> {
        self.joined(layer, Role::BnWeight { zero: false }, Role::BnBias)
    }

    /// Two per-channel tensors of batch-norm `layer` end to end: `[first; second]`.
    fn joined(&self, layer: &str, first: Role, second: Role) -> Result<B::Buf> {
        let mut v = self.backend.download(self.value(&tensor_name(layer, first))?)?;
        v.extend(self.backend.download(self.value(&tensor_name(layer, second))?)?);
        self.backend.upload(v)
    }

    /// Running statistics: momentum 0.1 and the unbiased variance, as PyTorch.
    fn update_running(&self, layer: &str, stats: &B::Buf, count: usize) -> Result<()> {
        let stats = self.backend.download(stats)?;
        let c = stats.len() / 2;
        let unbias = count as f64 / (count - 1) as f64;
        for (role, batch, scale) in [
            (Role::RunningMean, &stats[..c], 1.0),
            (Role::RunningVar, &stats[c..], unbias),
        ] {
            let var = self.var(&tensor_name(layer, role))?;
            let old = self.backend.download(self.value(&tensor_name(layer, role))?)?;
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
    fn block_forward(
        &self,
        plan: &BlockPlan,
        input: Arc<Act<B::Buf>>,
        n: usize,
        mode: Mode,
    ) -> Result<BlockSaved<B::Buf>> {
        let convs = plan.convs();
        let a1 = self.conv_forward(&Conv::new(&convs.conv1), &input, n)?;
        let (mut y1, bn1) = self.bn_forward(&plan.bn1(), a1, n, mode, (true, None))?;
        y1.v = self.stored(y1.v)?;
        let a2 = self.conv_forward(&Conv::new(&convs.conv2), &y1, n)?;
        let projected = match (&convs.shortcut, plan.downsample_layers()) {
            (Some(conv), Some((_, bn))) => {
                let a = self.conv_forward(&Conv::new(conv), &input, n)?;
                let (mut p, saved) = self.bn_forward(&bn, a, n, mode, (false, None))?;
                p.v = self.stored(p.v)?;
                Some((p, saved))
            }
            _ => None,
        };
        let shortcut: &Act<B::Buf> = projected.as_ref().map_or(&input, |p| &p.0);
        let (mut out, bn2, se) = match plan.se {
            None => {
                let (out, bn2) = self.bn_forward(&plan.bn2(), a2, n, mode, (true, Some(shortcut)))?;
                (out, bn2, None)
            }
            Some(hidden) => {
                let (y2, bn2) = self.bn_forward(&plan.bn2(), a2, n, mode, (false, None))?;
                let (scaled, se) = self.times.time(Op::SqueezeExcitation, || {
                    let (mut scaled, se) = self.se_forward(plan, y2, n, hidden)?;
                    self.backend.add_relu(&mut scaled.v, &shortcut.v)?;
                    Ok::<_, Error>((scaled, se))
                })?;
                (scaled, bn2, Some(se))
            }
        };
        out.v = self.stored(out.v)?;
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
    fn se_forward(
        &self,
        plan: &BlockPlan,
        y: Act<B::Buf>,
        n: usize,
        hidden: usize,
    ) -> Result<Normalized<B::Buf, SeSaved<B::Buf>>> {
        let (fc1, fc2) = plan.se_layers();
        let c = y.c;
        let hw = y.hw();
        let pooled = self.backend.global_average(&y.v, n * c, hw)?;
        let mut h = self.dense(&fc1, &pooled, (n, c, hidden))?;
        self.backend.relu(&mut h)?;
        let mut gate = self.dense(&fc2, &h, (n, hidden, c))?;
        self.backend.sigmoid(&mut gate)?;
        let v = self.backend.scale_planes(&y.v, &gate, hw)?;
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
    fn dense(&self, layer: &str, x: &B::Buf, dims: (usize, usize, usize)) -> Result<B::Buf> {
        let w = self.value(&self.weight_name(layer))?;
        let b = self.value(&self.bias_name(layer))?;
        self.backend.dense(x, w, b, dims)
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

    fn linear_forward(&self, features: &B::Buf, n: usize) -> Result<B::Buf> {
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
        let dlogits = self.backend.upload(dlogits.to_vec())?;
        let mut d = self.times.time(Op::PoolAndClassifier, || {
            let dfeatures = self.dense_backward(
                FC,
                &dlogits,
                &saved.features,
                (n, fin, self.spec.classes),
                &mut grads,
            )?;
            self.backend.spread_average(&dfeatures, n * last.c, last.hw())
        })?;
        // The gradient of a stored (half) activation is stored in its format too.
        d = self.stored(d)?;
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
        dout: &B::Buf,
        x: &B::Buf,
        dims: (usize, usize, usize),
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<B::Buf> {
        let w = self.value(&self.weight_name(layer))?;
        let (dx, dw, db) = self.backend.dense_backward(dout, x, w, dims)?;
        grads.push((self.weight_name(layer), self.backend.download_owned(dw)?));
        grads.push((self.bias_name(layer), self.backend.download_owned(db)?));
        Ok(dx)
    }

    /// Batch-norm `layer`'s backward from the gradient `dz` of its affine output: its
    /// weight and bias gradients go to `grads`; returns its input's, written over `dz`.
    fn bn_backward(
        &self,
        layer: &str,
        saved: &BnSaved<B::Buf>,
        mut dz: B::Buf,
        n: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<B::Buf> {
        let x = &saved.x;
        let (c, hw) = (x.c, x.hw());
        let affine = self.affine(layer)?;
        let sums = self.times.time(Op::BatchNormBackward, || {
            let p = BnArgs {
                n,
                c,
                hw,
                stats: &saved.stats,
                affine: &affine,
                eps: BN_EPS,
            };
            let sums = self.backend.bn_grad_sums(&x.v, &dz, &p)?;
            let shared = match self.shared_sync() {
                None => None,
                Some(sync) => {
                    let local = self.backend.download(&sums)?;
                    let shared = brisk_ops::combine_grad_sums(sync.as_ref(), &local, (n * hw) as f64)?;
                    Some(self.backend.upload(shared)?)
                }
            };
            self.backend
                .bn_input_grad(&x.v, &mut dz, &p, shared.as_ref().unwrap_or(&sums))?;
            Ok::<_, Error>(sums)
        })?;
        let mut dgamma = self.backend.download_owned(sums)?;
        let dbeta = dgamma.split_off(c);
        grads.push((tensor_name(layer, Role::BnWeight { zero: false }), dgamma));
        grads.push((tensor_name(layer, Role::BnBias), dbeta));
        Ok(dz)
    }

    /// A convolution's backward from its output gradient `dy`: its weight gradient goes
    /// to `grads`; returns its input's gradient when asked.
    fn conv_backward(
        &self,
        conv: &Conv,
        x: &Act<B::Buf>,
        mut dy: B::Buf,
        n: usize,
        input_grad: bool,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<Option<B::Buf>> {
        let g = conv.shape(n, x)?;
        let w = self.value(&conv.weight)?;
        // A half convolution rounds its output gradient, as autocast does.
        if let Some(half) = self.half_of(conv) {
            self.backend.round_half(&mut dy, half)?;
        }
        let dw = self.times.time(Op::ConvWeightGrad, || {
            self.backend.conv_weight_grad(&g, &x.v, &dy, self.products(conv))
        })?;
        grads.push((conv.weight.clone(), self.backend.download_owned(dw)?));
        if !input_grad {
            return Ok(None);
        }
        let dx = self.times.time(Op::ConvInputGrad, || {
            self.backend.conv_input_grad(&g, &dy, w, self.products(conv))
        })?;
        // Every convolution's input but the images' is a stored activation.
        Ok(Some(self.stored(dx)?))
    }

    fn block_backward(
        &self,
        plan: &BlockPlan,
        s: &BlockSaved<B::Buf>,
        dout: B::Buf,
        n: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<B::Buf> {
        // Through the final ReLU: the gradient of (branch + shortcut).
        let mut dz = dout;
        self.times
            .time(Op::ReluBackward, || self.backend.relu_backward(&s.out.v, &mut dz))?;
        let through_se = match (&s.se, plan.se) {
            (Some(se), Some(hidden)) => Some(self.times.time(Op::SqueezeExcitation, || {
                self.se_backward(plan, se, &dz, n, hidden, grads)
            })?),
            _ => None,
        };
        // The shortcut still needs dz: bn2 works on a copy unless SE made one. The shortcut
        // is a stored activation: its gradient is stored in its format.
        let dbn2 = through_se.unwrap_or_else(|| dz.clone());
        let dz = self.stored(dz)?;
        let da2 = self.bn_backward(&plan.bn2(), &s.bn2, dbn2, n, grads)?;
        let convs = plan.convs();
        let conv2 = Conv::new(&convs.conv2);
        let dy1 = self
            .conv_backward(&conv2, &s.y1, da2, n, true, grads)?
            .unwrap_or_default();
        let mut dz1 = dy1;
        self.times
            .time(Op::ReluBackward, || self.backend.relu_backward(&s.y1.v, &mut dz1))?;
        let da1 = self.bn_backward(&plan.bn1(), &s.bn1, dz1, n, grads)?;
        let conv1 = Conv::new(&convs.conv1);
        let mut dx = self
            .conv_backward(&conv1, &s.input, da1, n, true, grads)?
            .unwrap_or_default();
        match (&convs.shortcut, plan.downsample_layers(), &s.shortcut_bn) {
            (Some(conv), Some((_, bn)), Some(saved)) => {
                let da = self.bn_backward(&bn, saved, dz, n, grads)?;
                let ds = Conv::new(conv);
                let dsx = self
                    .conv_backward(&ds, &s.input, da, n, true, grads)?
                    .unwrap_or_default();
                self.times
                    .time(Op::ReluBackward, || self.backend.add_assign(&mut dx, &dsx))?;
            }
            _ => self
                .times
                .time(Op::ReluBackward, || self.backend.add_assign(&mut dx, &dz))?,
        }
        // The block's input is a stored activation: its summed gradient is stored too.
        self.stored(dx)
    }

    /// Squeeze-and-excitation's backward from the gradient `dz` of its output: fc1's and
    /// fc2's gradients go to `grads`; returns the gradient of its input (bn2's output).
    fn se_backward(
        &self,
        plan: &BlockPlan,
        se: &SeSaved<B::Buf>,
        dz: &B::Buf,
        n: usize,
        hidden: usize,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<B::Buf> {
        let (fc1, fc2) = plan.se_layers();
        let (c, hw) = (se.y.c, se.y.hw());
        // out = y · g; through the sigmoid, fc2, the ReLU and fc1.
        let dpre2 = self.backend.gate_grad(dz, &se.y.v, &se.gate, hw)?;
        let dh = self.dense_backward(&fc2, &dpre2, &se.hidden, (n, hidden, c), grads)?;
        let dpre1 = self.backend.relu_mask(&dh, &se.hidden)?;
        let dpooled = self.dense_backward(&fc1, &dpre1, &se.pooled, (n, c, hidden), grads)?;
        // Through the scale and the average pool, in one pass.
        self.backend.scale_planes_backward(dz, &se.gate, &dpooled, hw)
    }

    fn stem_backward(
        &self,
        saved: &Saved<B::Buf>,
        d: B::Buf,
        grads: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<()> {
        let n = saved.n;
        let y = &saved.stem_y;
        let dy = match self.spec.stem_pool() {
            Some(pool) => self.times.time(Op::PoolAndClassifier, || {
                self.backend
                    .max_pool_backward(&pool, &y.v, &d, n * y.c, (y.h, y.w))
            })?,
            None => d,
        };
        let mut dz = dy;
        self.times
            .time(Op::ReluBackward, || self.backend.relu_backward(&y.v, &mut dz))?;
        let da = self.bn_backward(brisk_spec::layers::STEM_BN, &saved.stem_bn, dz, n, grads)?;
        // No gradient for the images.
        self.conv_backward(&self.stem_conv(), &saved.image, da, n, false, grads)?;
        Ok(())
    }
}

/// The convolutions `policy` runs in half precision (layer names), or why the executor
/// cannot run `policy`: it stores activations in the policy's half format, so each half
/// layer must compute in that format, and the first convolution and the classifier in
/// f32, as the mixed modes have them.
fn half_layers(spec: &ModelSpec, policy: &PrecisionPolicy) -> std::result::Result<Vec<String>, String> {
    let stored = policy.mode.half();
    if policy.half().is_some() && stored.is_none() {
        return Err("a layer computes in half precision in an f32 network".into());
    }
    // f16's narrow range (gradients in its subnormals before loss scaling) makes where
    // each value is rounded matter more than the executor has been checked for: f16
    // stays on candle's graph.
    if stored == Some(Dtype::F16) {
        return Err("activations are stored in f16".into());
    }
    if policy.compute_dtype(FC, LayerKind::Linear) != Dtype::F32 {
        return Err("the classifier computes in half precision".into());
    }
    if policy.compute_dtype(&spec.stem_conv().layer, LayerKind::FirstConv) != Dtype::F32 {
        return Err("the first convolution computes in half precision".into());
    }
    let mut half = Vec::new();
    for plan in spec.blocks() {
        let convs = plan.convs();
        for conv in [Some(&convs.conv1), Some(&convs.conv2), convs.shortcut.as_ref()]
            .into_iter()
            .flatten()
        {
            match policy.compute_dtype(&conv.layer, LayerKind::Conv) {
                Dtype::F32 => {}
                d if Some(d) == stored => half.push(conv.layer.clone()),
                d => {
                    return Err(format!(
                        "{} computes in {} but activations are stored in {}",
                        conv.layer,
                        d.name(),
                        stored.map_or("f32", Dtype::name)
                    ))
                }
            }
        }
    }
    Ok(half)
}
