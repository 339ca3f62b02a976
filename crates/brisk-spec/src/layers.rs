//! A network's layers as geometry: the torchvision names of the stem and the classifier,
//! and each convolution's and max-pool's kernel, stride and padding (`ConvPlan`,
//! `PoolPlan`), which the model spec plans and the tensor table, MAC count, candle's
//! modules and the engine read.

/// The stem's convolution and batch-norm, and the classifier, as torchvision names them.
pub const STEM_CONV: &str = "conv1";
pub const STEM_BN: &str = "bn1";
pub const CLASSIFIER: &str = "fc";

/// Size of a convolution's output along one spatial axis.
fn conv_out(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (size + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// A convolution of the network: its layer and its geometry. This is the one place a
/// ResNet's kernel sizes, strides and paddings are written; the tensor table, the MAC
/// count, candle's modules and the engine read them from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    /// Layer name as torchvision spells it (`layer2.0.conv1`); the weight is
    /// `{layer}.weight`, `[cout, cin, kernel, kernel]`.
    pub layer: String,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvPlan {
    /// The output's side for an input of side `size`.
    pub fn out_size(&self, size: usize) -> usize {
        conv_out(size, self.kernel, self.stride, self.padding)
    }
}

/// A block's convolutions: two 3x3 (the first carries the block's stride) and the 1x1
/// projection shortcut when the shape changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConvs {
    pub conv1: ConvPlan,
    pub conv2: ConvPlan,
    pub shortcut: Option<ConvPlan>,
}

/// A max-pool's window, stride and padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolPlan {
    /// The output's side for an input of side `size`.
    pub fn out_size(&self, size: usize) -> usize {
        conv_out(size, self.kernel, self.stride, self.padding)
    }
}
