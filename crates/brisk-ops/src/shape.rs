//! `ConvShape`: the sizes of one convolution and the index arithmetic every convolution
//! path shares (im2col rows, valid output columns, the input gradient as a convolution);
//! its own module so that `conv` and `packed` both use it without importing each other.

use candle_core::Result;

/// The sizes of one convolution: input `[n, cin, h, w]`, weight `[cout, cin, k, k]`,
/// output `[n, cout, ho, wo]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvShape {
    /// The shape of convolving `x` dims with `weight` dims; an error names what does not fit.
    pub fn new(x: &[usize], weight: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[n, cin, h, w], &[cout, cin_w, k, k2]) = (x, weight) else {
            candle_core::bail!("brisk conv2d: expected 4-D input and weight, got {x:?} and {weight:?}");
        };
        if cin != cin_w || k != k2 || k == 0 {
            candle_core::bail!(
                "brisk conv2d: input {x:?} does not fit weight {weight:?} (square kernel, same Cin)"
            );
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!(
                "brisk conv2d: input {x:?} with padding {pad} is smaller than the {k}x{k} kernel"
            );
        }
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Ok(ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            ho,
            wo,
        })
    }

    /// Rows of the im2col matrix: Cin * K * K.
    pub(crate) fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }

    pub fn out_hw(&self) -> usize {
        self.ho * self.wo
    }

    /// Values of one input image.
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Values of one output image.
    pub fn out_len(&self) -> usize {
        self.cout * self.out_hw()
    }

    /// A 1x1, stride-1, unpadded convolution reads the image itself as its im2col matrix.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// The convolution whose output is this stride-1 convolution's input gradient: over
    /// the output gradient, padded by `k - 1 - pad`, with the flipped weight (`conv::flipped_weight`). `None` for
    /// other strides, and for 1x1 unpadded convolutions (whose gradient is one product).
    pub(crate) fn input_grad_as_conv(&self) -> Option<ConvShape> {
        (self.stride == 1 && self.pad < self.k && !self.is_pointwise()).then_some(ConvShape {
            cin: self.cout,
            h: self.ho,
            w: self.wo,
            cout: self.cin,
            pad: self.k - 1 - self.pad,
            ho: self.h,
            wo: self.w,
            ..*self
        })
    }

    /// For kernel offset `kj`, the range of output columns whose input column
    /// `ow * stride + kj - pad` lies inside the image.
    pub(crate) fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kj).div_ceil(self.stride);
        let hi = if self.w + self.pad > kj {
            (self.w + self.pad - kj - 1) / self.stride + 1
        } else {
            0
        };
        (lo.min(self.wo), hi.min(self.wo).max(lo.min(self.wo)))
    }

    /// The input row that kernel row `ki` of output row `oh` reads (`None`: padding).
    pub(crate) fn input_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.stride + ki)
            .checked_sub(self.pad)
            .filter(|&ih| ih < self.h)
    }

    /// The kernel tap `ki * k + kj` that makes this convolution a pointwise one: the only
    /// tap that ever reads inside the image, reading each output's own position (stride 1,
    /// output the input's size). A 3x3 convolution of a 1x1 map (the last stage of a CIFAR
    /// ResNet on 8x8 images) is one: its other eight taps multiply padding.
    pub(crate) fn only_tap(&self) -> Option<usize> {
        if self.k == 1 || self.stride != 1 || (self.ho, self.wo) != (self.h, self.w) {
            return None;
        }
        let rows = (0..self.k).filter(|&ki| (0..self.ho).any(|oh| self.input_row(oh, ki).is_some()));
        let cols = (0..self.k).filter(|&kj| {
            let (lo, hi) = self.valid_cols(kj);
            lo < hi
        });
        let (rows, cols): (Vec<usize>, Vec<usize>) = (rows.collect(), cols.collect());
        (rows == [self.pad] && cols == [self.pad]).then_some(self.pad * self.k + self.pad)
    }

    /// This convolution as the pointwise one it is ([`ConvShape::only_tap`]).
    pub(crate) fn pointwise(&self) -> Self {
        ConvShape {
            k: 1,
            pad: 0,
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(hw: usize, k: usize, stride: usize, pad: usize) -> ConvShape {
        ConvShape::new(&[2, 3, hw, hw], &[4, 3, k, k], stride, pad).expect("shape")
    }

    #[test]
    fn only_one_tap_reads_a_1x1_map() {
        assert_eq!(shape(1, 3, 1, 1).only_tap(), Some(4));
        assert_eq!(shape(1, 5, 1, 2).only_tap(), Some(12));
        // Every tap reads the image somewhere, or the output is not the input's size.
        assert_eq!(shape(2, 3, 1, 1).only_tap(), None);
        assert_eq!(shape(8, 3, 1, 1).only_tap(), None);
        assert_eq!(shape(2, 3, 2, 1).only_tap(), None);
        assert_eq!(shape(1, 1, 1, 0).only_tap(), None);
        let p = shape(1, 3, 1, 1).pointwise();
        assert_eq!((p.k, p.pad, p.kdim(), p.ho, p.wo), (1, 0, 3, 1, 1));
    }
}
