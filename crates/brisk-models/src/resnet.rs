//! The ResNet itself: BasicBlocks, batch-norm, squeeze-and-excitation, stems and head,
//! built from a `ModelSpec` and a candle `VarBuilder` under torchvision's tensor names.

use std::sync::Arc;

use brisk_ops::BatchNormSync;
use brisk_precision::{Dtype, LayerKind, PrecisionPolicy};
use candle_core::{DType, Module, ModuleT, Tensor, Var, D};
use candle_nn::VarBuilder;

use brisk_spec::{BlockPlan, ConvPlan, ModelSpec, PoolPlan, BN_EPS, BN_MOMENTUM};

use crate::error::{Error, Result};

/// Which implementation runs the convolutions and batch-norms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// brisk-ops' CPU kernels (im2col + AVX-512 GEMM convolution, fused batch-norm + ReLU,
    /// each with its own backward). By default on the CPU.
    #[default]
    Brisk,
    /// candle's own ops: the reference, and the only choice on a GPU.
    Candle,
}

impl Kernels {
    /// Whether brisk's kernels (brisk-ops: convolution, batch-norm, max-pool, the fused
    /// SGD update, the engine's step) can run on tensors of `device`: the one place the
    /// device decides, which every such choice asks.
    pub fn run_on(device: &candle_core::Device) -> bool {
        device.is_cpu()
    }

    /// The kernels for `device`: brisk's where they run unless the reference is asked
    /// for, candle's elsewhere.
    pub fn for_device(device: &candle_core::Device, reference: bool) -> Self {
        if Kernels::run_on(device) && !reference {
            Kernels::Brisk
        } else {
            Kernels::Candle
        }
    }

    /// "brisk" or "candle", as `brisk bench step` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Brisk => "brisk",
            Kernels::Candle => "candle",
        }
    }
}

/// candle's dtype for a precision policy's.
pub fn candle_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
    }
}

/// A 2-D convolution without bias (every ResNet convolution but SE's).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    kernels: Kernels,
    /// The dtype the convolution computes in (the precision policy's choice).
    compute: DType,
}

impl Conv2d {
    /// The convolution `plan` describes; `b` is at its layer's prefix.
    fn new(b: &Builder, kind: LayerKind, plan: &ConvPlan) -> Result<Self> {
        let weight =
            b.vb.get((plan.cout, plan.cin, plan.kernel, plan.kernel), "weight")?;
        Ok(Self {
            weight,
            stride: plan.stride,
            padding: plan.padding,
            kernels: b.kernels,
            compute: candle_dtype(b.policy.compute_dtype(&b.vb.prefix(), kind)),
        })
    }

    /// The weight tensor, `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    /// The output is f32 whatever the compute dtype (batch-norm follows in f32).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.compute)?;
        match self.kernels {
            // brisk's op computes in its input's dtype, from the f32 master weight.
            Kernels::Brisk => brisk_ops::conv2d(&x, &self.weight, self.stride, self.padding),
            Kernels::Candle => x
                .conv2d(
                    &self.weight.to_dtype(self.compute)?,
                    self.padding,
                    self.stride,
                    1,
                    1,
                )?
                .to_dtype(DType::F32),
        }
    }
}

/// A `VarBuilder` at some prefix, with the kernel choice carried along.
#[derive(Clone)]
struct Builder<'a> {
    vb: VarBuilder<'a>,
    kernels: Kernels,
    policy: &'a PrecisionPolicy,
    sync: Option<&'a Arc<dyn BatchNormSync>>,
}

impl Builder<'_> {
    fn pp(&self, name: &str) -> Self {
        Builder {
            vb: self.vb.pp(name),
            kernels: self.kernels,
            policy: self.policy,
            sync: self.sync,
        }
    }

    /// The dtype activations are kept in between layers: the policy's half format
    /// when it has one, else f32.
    fn activations(&self) -> DType {
        self.policy.mode.half().map_or(DType::F32, candle_dtype)
    }
}

/// Batch normalisation over (N, H, W) per channel, with PyTorch's semantics: training
/// normalises with the batch's biased variance and updates the running statistics with
/// the unbiased one; evaluation uses the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    name: String,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    kernels: Kernels,
    /// The output's dtype (statistics and arithmetic are f32).
    out: DType,
    /// Synchronised batch-norm across ranks (brisk's kernels only).
    sync: Option<Arc<dyn BatchNormSync>>,
}

impl BatchNorm2d {
    fn new(b: &Builder, c: usize, out: DType) -> Result<Self> {
        let vb = &b.vb;
        let name = vb.prefix();
        let weight = vb.get(c, "weight")?;
        let bias = vb.get(c, "bias")?;
        let running_mean = Var::from_tensor(&vb.get(c, "running_mean")?)?;
        let running_var = Var::from_tensor(&vb.get(c, "running_var")?)?;
        Ok(Self {
            name,
            weight,
            bias,
            running_mean,
            running_var,
            kernels: b.kernels,
            out,
            sync: b.sync.cloned(),
        })
    }

    /// Normalises `x`, then adds `residual` and applies ReLU when asked (fused into the
    /// same pass with brisk's kernels).
    fn forward_t(&self, x: &Tensor, train: bool, relu: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let count = n * h * w;
        if train && count < 2 {
            return Err(Error::BatchTooSmall {
                layer: self.name.clone(),
                shape: x.dims().to_vec(),
            });
        }
        let (y, batch_stats) = match self.kernels {
            Kernels::Brisk => {
                let running = if train {
                    None
                } else {
                    Some(Tensor::stack(
                        &[self.running_mean.as_tensor(), self.running_var.as_tensor()],
                        0,
                    )?)
                };
                let epilogue = brisk_ops::Epilogue {
                    residual,
                    relu,
                    out: self.out,
                    sync: if train { self.sync.as_ref() } else { None },
                };
                let out =
                    brisk_ops::batch_norm(x, &self.weight, &self.bias, running.as_ref(), BN_EPS, epilogue)?;
                let stats = train.then(|| (out.stats.get(0), out.stats.get(1), out.count));
                (out.y, stats)
            }
            Kernels::Candle => {
                if self.sync.is_some() {
                    return Err(Error::Candle(candle_core::Error::Msg(
                        "synchronised batch-norm needs brisk's kernels, not candle's reference ones".into(),
                    )));
                }
                let (mean, var) = if train {
                    let mean = x.mean_keepdim((0, 2, 3))?;
                    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
                    (mean, var)
                } else {
                    (
                        self.running_mean.as_tensor().reshape((1, c, 1, 1))?,
                        self.running_var.as_tensor().reshape((1, c, 1, 1))?,
                    )
                };
                // y = (x - mean) * (weight / sqrt(var + eps)) + bias.
                let scale = self
                    .weight
                    .reshape((1, c, 1, 1))?
                    .broadcast_div(&(&var + BN_EPS)?.sqrt()?)?;
                let y = x.broadcast_sub(&mean)?.broadcast_mul(&scale)?;
                let y = y.broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
                let y = match residual {
                    Some(r) => (y + r.to_dtype(DType::F32)?)?,
                    None => y,
                };
                let y = if relu { y.relu()? } else { y };
                let y = y.to_dtype(self.out)?;
                let stats = train.then(|| (mean.detach().flatten_all(), var.detach().flatten_all(), count));
                (y, stats)
            }
        };
        if let Some((mean, var, count)) = batch_stats {
            // Running statistics: momentum 0.1, and the unbiased variance, as PyTorch.
            let unbiased = (var? * (count as f64 / (count - 1) as f64))?;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - BN_MOMENTUM))? + (mean? * BN_MOMENTUM)?)?;
            let new_var =
                ((self.running_var.as_tensor() * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
        }
        Ok(y)
    }
}

/// Squeeze-and-excitation (Hu et al.): global average pool, 1x1 conv C→h with bias, ReLU,
/// 1x1 conv h→C with bias, sigmoid, channel-wise scale.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
}

impl SqueezeExcite {
    fn new(b: &Builder, c: usize, hidden: usize) -> Result<Self> {
        let vb = &b.vb;
        // The 1x1 convolutions act on a 1x1 map: they are linear layers, stored with
        // torchvision's conv shapes and applied as matrix products.
        let fc1 = vb.pp("fc1");
        let fc2 = vb.pp("fc2");
        Ok(Self {
            fc1_weight: fc1.get((hidden, c, 1, 1), "weight")?.reshape((hidden, c))?,
            fc1_bias: fc1.get(hidden, "bias")?,
            fc2_weight: fc2.get((c, hidden, 1, 1), "weight")?.reshape((c, hidden))?,
            fc2_bias: fc2.get(c, "bias")?,
        })
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let s = x.mean((2, 3))?;
        let s = s
            .matmul(&self.fc1_weight.t()?)?
            .broadcast_add(&self.fc1_bias)?
            .relu()?;
        let s = s.matmul(&self.fc2_weight.t()?)?.broadcast_add(&self.fc2_bias)?;
        let s = candle_nn::ops::sigmoid(&s)?.reshape((n, c, 1, 1))?;
        x.broadcast_mul(&s)
    }
}

/// A ResNet BasicBlock: two 3x3 convolutions with batch-norm, an optional SE unit, and
/// an identity or projection (1x1 conv + BN) shortcut.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    se: Option<SqueezeExcite>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
    /// The dtype of the block's output.
    act: DType,
}

impl BasicBlock {
    fn new(vb: &Builder, plan: &BlockPlan) -> Result<Self> {
        let se = match plan.se {
            Some(h) => Some(SqueezeExcite::new(&vb.pp("se"), plan.out, h)?),
            None => None,
        };
        let act = vb.activations();
        let convs = plan.convs();
        let downsample = match &convs.shortcut {
            Some(conv) => {
                let d = vb.pp("downsample");
                Some((
                    Conv2d::new(&d.pp("0"), LayerKind::Conv, conv)?,
                    BatchNorm2d::new(&d.pp("1"), plan.out, act)?,
                ))
            }
            None => None,
        };
        // Squeeze-and-excitation computes in f32, so bn2 feeds it f32.
        let bn2_out = if se.is_some() { DType::F32 } else { act };
        Ok(Self {
            conv1: Conv2d::new(&vb.pp("conv1"), LayerKind::Conv, &convs.conv1)?,
            bn1: BatchNorm2d::new(&vb.pp("bn1"), plan.mid, act)?,
            conv2: Conv2d::new(&vb.pp("conv2"), LayerKind::Conv, &convs.conv2)?,
            bn2: BatchNorm2d::new(&vb.pp("bn2"), plan.out, bn2_out)?,
            se,
            downsample,
            act,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, train, true, None)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train, false, None)?,
            None => x.clone(),
        };
        let z = self.conv2.forward(&y)?;
        match &self.se {
            // The SE scale sits between bn2 and the shortcut, so only bn2 is fused.
            Some(se) => {
                let y = se.forward(&self.bn2.forward_t(&z, train, false, None)?)?;
                Ok((y + shortcut.to_dtype(DType::F32)?)?.relu()?.to_dtype(self.act)?)
            }
            None => self.bn2.forward_t(&z, train, true, Some(&shortcut)),
        }
    }
}

/// A BasicBlock ResNet (18 or 34 layers, optionally with SE) as described by a `ModelSpec`.
#[derive(Debug, Clone)]
pub struct ResNet {
    /// The classifier's compute dtype.
    fc_compute: DType,
    /// The dtype of the stem's output after pooling.
    act: DType,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    max_pool: Option<PoolPlan>,
    blocks: Vec<BasicBlock>,
    fc_weight: Tensor,
    fc_bias: Tensor,
}

impl ResNet {
    /// Builds the network; every tensor is fetched from `vb` under its torchvision name.
    /// Convolutions run on brisk's kernels on the CPU and candle's elsewhere.
    pub fn new(spec: &ModelSpec, vb: VarBuilder) -> Result<Self> {
        let kernels = Kernels::for_device(vb.device(), false);
        Self::build(spec, vb, kernels, &PrecisionPolicy::default(), None)
    }

    /// Builds the network with an explicit choice of convolution kernels, precision
    /// policy and, for data-parallel training, synchronised batch-norm.
    pub fn build(
        spec: &ModelSpec,
        vb: VarBuilder,
        kernels: Kernels,
        policy: &PrecisionPolicy,
        sync: Option<&Arc<dyn BatchNormSync>>,
    ) -> Result<Self> {
        spec.validate()?;
        policy.validate()?;
        let vb = Builder {
            vb,
            kernels,
            policy,
            sync,
        };
        let act = vb.activations();
        let stem = spec.resolved_channels().stem;
        let conv1 = Conv2d::new(&vb.pp("conv1"), LayerKind::FirstConv, &spec.stem_conv())?;
        let max_pool = spec.stem_pool();
        let blocks = spec
            .blocks()
            .iter()
            .map(|plan| BasicBlock::new(&vb.pp(&plan.name), plan))
            .collect::<Result<Vec<_>>>()?;
        let fc = vb.vb.pp("fc");
        let feat = spec.feature_channels();
        Ok(Self {
            fc_compute: candle_dtype(policy.compute_dtype("fc", LayerKind::Linear)),
            act,
            conv1,
            // The max-pool runs in f32; the stem's output is converted after it.
            bn1: BatchNorm2d::new(
                &vb.pp("bn1"),
                stem,
                if max_pool.is_some() { DType::F32 } else { act },
            )?,
            max_pool,
            blocks,
            fc_weight: fc.get((spec.classes, feat), "weight")?,
            fc_bias: fc.get(spec.classes, "bias")?,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.fc_weight.device()
    }

    /// The stem's output (the first block's input), in the activations' dtype.
    pub fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.dtype() != DType::F32 {
            return Err(
                candle_core::Error::Msg(format!("model input must be f32, got {:?}", x.dtype())).into(),
            );
        }
        let mut x = self.bn1.forward_t(&self.conv1.forward(x)?, train, true, None)?;
        if let Some(p) = self.max_pool {
            // On the CPU brisk's op, which has a backward (candle has none for a window
            // larger than its stride). Elsewhere candle's forward on a zero-padded input:
            // the input is post-ReLU (>= 0), so zero padding gives the same maxima as
            // PyTorch's -inf padding.
            x = if Kernels::run_on(x.device()) {
                brisk_ops::max_pool2d(&x, p.kernel, p.stride, p.padding)?
            } else {
                x.pad_with_zeros(D::Minus2, p.padding, p.padding)?
                    .pad_with_zeros(D::Minus1, p.padding, p.padding)?
                    .max_pool2d_with_stride(p.kernel, p.stride)?
            };
            x = x.to_dtype(self.act)?;
        }
        Ok(x)
    }

    /// Logits `[N, classes]` for images `[N, C, H, W]` (f32). In training mode batch-norm
    /// uses batch statistics and updates its running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.stem(x, train)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        let mut pooled = x.to_dtype(DType::F32)?.mean((2, 3))?;
        let mut weight = self.fc_weight.clone();
        if self.fc_compute != DType::F32 {
            // A half-precision classifier: operands rounded, products summed in f32.
            let round = |t: &Tensor| t.to_dtype(self.fc_compute)?.to_dtype(DType::F32);
            pooled = round(&pooled)?;
            weight = round(&weight)?;
        }
        Ok(pooled.matmul(&weight.t()?)?.broadcast_add(&self.fc_bias)?)
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ResNet::forward_t(self, x, train).map_err(|e| match e {
            Error::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        })
    }
}
