//! cuDNN's description of a convolution over NHWC activations, as pure functions (so it is
//! checked without a GPU): the input and output tensors as cuDNN's `*_4d_tensor_ex` takes
//! them (dimensions in N, C, H, W order with the strides of an NHWC buffer), the filter as
//! (K, C, R, S) in NHWC format (each output channel's weights `[R, S, C]`, channels
//! contiguous), padding, stride and dilation, the data type of the operands, and the
//! math mode: strict f32 (`CUDNN_FMA_MATH`, what PyTorch's `allow_tf32 = False` gives), f32
//! on TF32 tensor cores (`CUDNN_DEFAULT_MATH`), or bf16/f16 on tensor cores with f32
//! accumulation (`CUDNN_TENSOR_OP_MATH`).

use crate::error::{Error, Result};

/// A convolution's geometry: a batch of `n` images of `cin` channels, `h`×`w`, into
/// `cout` channels with a square `k`×`k` kernel, `stride`, zero padding `pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

/// The operands' data type (accumulation is f32 in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvData {
    F32,
    Bf16,
    F16,
}

/// How f32 convolutions may multiply: strictly in f32, or on TF32 tensor cores (PyTorch's
/// `torch.backends.cudnn.allow_tf32`, on by default there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Math {
    Strict,
    Tf32,
}

/// cuDNN's math type for the convolution descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MathType {
    /// `CUDNN_FMA_MATH`: f32 FMAs only, no TF32.
    Fma,
    /// `CUDNN_DEFAULT_MATH`: f32 may run on TF32 tensor cores.
    Default,
    /// `CUDNN_TENSOR_OP_MATH`: half operands on tensor cores.
    TensorOp,
}

/// A 4-D tensor for `cudnnSetTensor4dDescriptorEx`: dimensions (N, C, H, W) and the
/// strides of each in an NHWC buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor4d {
    pub dims: [i32; 4],
    pub strides: [i32; 4],
}

impl Tensor4d {
    /// An NHWC buffer of `n` images, `c` channels, `h`×`w`.
    fn nhwc(n: usize, c: usize, h: usize, w: usize) -> Result<Tensor4d> {
        let dims = [int(n)?, int(c)?, int(h)?, int(w)?];
        let (c, hw) = (dims[1], dims[2] * dims[3]);
        Ok(Tensor4d {
            dims,
            strides: [hw * c, 1, dims[3] * c, c],
        })
    }

    /// Values in the buffer.
    pub fn len(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// Whether the tensor holds nothing (never, for a described convolution).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything cuDNN is told about one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudnnConv {
    pub x: Tensor4d,
    /// (K, C, R, S) = (cout, cin, k, k), format NHWC.
    pub filter: [i32; 4],
    pub y: Tensor4d,
    pub pad: [i32; 2],
    pub stride: [i32; 2],
    pub dilation: [i32; 2],
    pub data: ConvData,
    pub math: MathType,
    /// Whether tensor cores can run it: half (or TF32) operands and channel counts that
    /// are multiples of 8 (half) or 4 (TF32), cuDNN's condition for NHWC tensor-core
    /// kernels; otherwise cuDNN falls back to slower kernels (the RGB stem, say).
    pub tensor_cores: bool,
}

/// A size as cuDNN's `int`, or an error naming the limit.
fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{v} does not fit cuDNN's 32-bit sizes")))
}

/// The output side of a convolution over `side` pixels, or an error when the kernel does
/// not fit the padded input.
fn out_side(side: usize, g: &ConvGeometry) -> Result<usize> {
    let padded = side + 2 * g.pad;
    if g.k == 0 || g.stride == 0 || padded < g.k {
        return Err(Error::Shape(format!(
            "a {k}x{k} kernel with stride {s} does not fit {side} pixels padded by {p}",
            k = g.k,
            s = g.stride,
            p = g.pad
        )));
    }
    Ok((padded - g.k) / g.stride + 1)
}

/// cuDNN's description of `g` with operands in `data` (f32 ones multiplied as `f32`
/// says).
pub fn describe(g: &ConvGeometry, data: ConvData, f32_math: F32Math) -> Result<CudnnConv> {
    if [g.n, g.cin, g.h, g.w, g.cout].contains(&0) {
        return Err(Error::Shape(format!("empty convolution {g:?}")));
    }
    let (ho, wo) = (out_side(g.h, g)?, out_side(g.w, g)?);
    let (x, y) = (
        Tensor4d::nhwc(g.n, g.cin, g.h, g.w)?,
        Tensor4d::nhwc(g.n, g.cout, ho, wo)?,
    );
    for t in [&x, &y] {
        int(t.len())?;
    }
    int(g.cout * g.cin * g.k * g.k)?;
    let (math, multiple) = match (data, f32_math) {
        (ConvData::F32, F32Math::Strict) => (MathType::Fma, None),
        (ConvData::F32, F32Math::Tf32) => (MathType::Default, Some(4)),
        (ConvData::Bf16 | ConvData::F16, _) => (MathType::TensorOp, Some(8)),
    };
    Ok(CudnnConv {
        x,
        filter: [int(g.cout)?, int(g.cin)?, int(g.k)?, int(g.k)?],
        y,
        pad: [int(g.pad)?; 2],
        stride: [int(g.stride)?; 2],
        dilation: [1, 1],
        data,
        math,
        tensor_cores: multiple.is_some_and(|m| g.cin.is_multiple_of(m) && g.cout.is_multiple_of(m)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every convolution of CIFAR ResNet-18 and SE-ResNet-18 (widths 1 and 0.125, 32x32,
    /// batch 8) as brisk-spec plans it, with its input side.
    fn resnet_convs() -> Vec<(ConvGeometry, &'static str)> {
        let mut out = Vec::new();
        for spec in [
            brisk_spec::ModelSpec::resnet18_cifar(10),
            brisk_spec::ModelSpec::resnet18_cifar(10).with_width(0.125),
            brisk_spec::ModelSpec::seresnet18_cifar(10),
        ] {
            let mut side = 32;
            let stem = spec.stem_conv();
            let mut plans = vec![(stem.clone(), side)];
            side = stem.out_size(side);
            for block in spec.blocks() {
                let convs = block.convs();
                let first = convs.conv1.out_size(side);
                plans.push((convs.conv1.clone(), side));
                plans.push((convs.conv2.clone(), first));
                if let Some(d) = &convs.shortcut {
                    plans.push((d.clone(), side));
                }
                side = first;
            }
            for (p, s) in plans {
                let g = ConvGeometry {
                    n: 8,
                    cin: p.cin,
                    h: s,
                    w: s,
                    cout: p.cout,
                    k: p.kernel,
                    stride: p.stride,
                    pad: p.padding,
                };
                out.push((g, if p.layer == "conv1" { "stem" } else { "block" }));
            }
        }
        out
    }

    /// The output tensor is brisk-ops' for every ResNet convolution, and the filter
    /// matches the weight's `[cout, cin, k, k]`.
    #[test]
    fn every_resnet_convolution_gets_brisk_ops_output_shape() -> Result<()> {
        let convs = resnet_convs();
        assert!(convs.len() > 40, "{}", convs.len());
        for (g, _) in convs {
            let d = describe(&g, ConvData::Bf16, F32Math::Strict)?;
            let want = brisk_ops::ConvShape::new(
                &[g.n, g.cin, g.h, g.w],
                &[g.cout, g.cin, g.k, g.k],
                g.stride,
                g.pad,
            )
            .map_err(|e| Error::Shape(e.to_string()))?;
            assert_eq!(
                d.y.dims,
                [g.n, g.cout, want.ho, want.wo].map(|v| v as i32),
                "{g:?}"
            );
            assert_eq!(d.y.len(), want.n * want.out_len(), "{g:?}");
            assert_eq!(d.filter, [g.cout, g.cin, g.k, g.k].map(|v| v as i32));
            assert_eq!(
                (d.pad, d.stride, d.dilation),
                ([g.pad as i32; 2], [g.stride as i32; 2], [1, 1])
            );
        }
        Ok(())
    }

    /// The strides address an NHWC buffer: (n, c, h, w) lands at ((n·H + h)·W + w)·C + c,
    /// every offset once.
    #[test]
    fn the_strides_address_every_nhwc_value_once() -> Result<()> {
        let t = Tensor4d::nhwc(2, 3, 4, 5)?;
        let [n, c, h, w] = t.dims.map(|d| d as usize);
        let mut seen = vec![false; t.len()];
        for i in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let at: i32 = [i, ch, y, x]
                            .iter()
                            .zip(t.strides)
                            .map(|(&v, s)| v as i32 * s)
                            .sum();
                        assert_eq!(at as usize, ((i * h + y) * w + x) * c + ch);
                        assert!(!std::mem::replace(&mut seen[at as usize], true));
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        Ok(())
    }

    /// Strict f32 never uses TF32; TF32 and half run on tensor cores where the channel
    /// counts allow (never the RGB stem).
    #[test]
    fn the_math_mode_follows_the_precision() -> Result<()> {
        for (g, kind) in resnet_convs() {
            let strict = describe(&g, ConvData::F32, F32Math::Strict)?;
            assert_eq!((strict.math, strict.tensor_cores), (MathType::Fma, false));
            assert_eq!(
                describe(&g, ConvData::F32, F32Math::Tf32)?.math,
                MathType::Default
            );
            for data in [ConvData::Bf16, ConvData::F16] {
                let half = describe(&g, data, F32Math::Strict)?;
                assert_eq!(half.math, MathType::TensorOp);
                assert_eq!(half.tensor_cores, kind == "block", "{g:?}");
            }
        }
        Ok(())
    }

    /// Shapes cuDNN cannot take are errors that say why.
    #[test]
    fn impossible_shapes_are_errors_naming_the_problem() {
        let g = ConvGeometry {
            n: 1,
            cin: 3,
            h: 2,
            w: 2,
            cout: 8,
            k: 7,
            stride: 1,
            pad: 1,
        };
        let e = describe(&g, ConvData::F32, F32Math::Strict)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("7x7 kernel") && e.contains("2 pixels"), "{e}");
        let huge = ConvGeometry {
            n: 1 << 16,
            h: 256,
            w: 256,
            k: 3,
            ..g
        };
        let e = describe(&huge, ConvData::F16, F32Math::Strict)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("32-bit"), "{e}");
        let e = describe(&ConvGeometry { cin: 0, ..huge }, ConvData::F16, F32Math::Strict)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("empty"), "{e}");
    }
}
