//! `ModelSpec`: the serde description of a ResNet from which the network, its tensor
//! names and its counts are all derived.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layers::{BlockConvs, ConvPlan, PoolPlan};

/// Base channel widths of the four stages of a torchvision ResNet.
const STAGE_WIDTHS: [usize; 4] = [64, 128, 256, 512];

/// The network family: BasicBlock ResNets, with or without squeeze-and-excitation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Seresnet18,
    Seresnet34,
}

impl Arch {
    /// Every architecture, in the order `brisk models` lists them.
    pub const ALL: [Arch; 4] = [Arch::Resnet18, Arch::Resnet34, Arch::Seresnet18, Arch::Seresnet34];

    /// Number of BasicBlocks in each of the four stages.
    pub fn blocks_per_stage(self) -> [usize; 4] {
        match self {
            Arch::Resnet18 | Arch::Seresnet18 => [2, 2, 2, 2],
            Arch::Resnet34 | Arch::Seresnet34 => [3, 4, 6, 3],
        }
    }

    /// Whether each block carries a squeeze-and-excitation unit.
    pub fn has_se(self) -> bool {
        matches!(self, Arch::Seresnet18 | Arch::Seresnet34)
    }

    /// The lowercase name used in specs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Seresnet18 => "seresnet18",
            Arch::Seresnet34 => "seresnet34",
        }
    }

    /// Every name, in the order of [`Arch::ALL`].
    pub const NAMES: [&'static str; 4] = [
        Arch::ALL[0].name(),
        Arch::ALL[1].name(),
        Arch::ALL[2].name(),
        Arch::ALL[3].name(),
    ];
}

impl std::str::FromStr for Arch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::spec("arch", format!("{s:?} is not one of {}", Arch::NAMES.join(", "))))
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The first layers of the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// 3x3 stride-1 convolution, no max-pool: for 32x32 images such as CIFAR.
    Cifar,
    /// 7x7 stride-2 convolution and a 3x3 stride-2 max-pool, as torchvision.
    #[default]
    Imagenet,
}

impl Stem {
    pub const ALL: [Stem; 2] = [Stem::Cifar, Stem::Imagenet];
    pub const NAMES: [&'static str; 2] = [Stem::Cifar.name(), Stem::Imagenet.name()];

    /// The lowercase name used in specs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Stem::Cifar => "cifar",
            Stem::Imagenet => "imagenet",
        }
    }

    /// The input size the stem is made for: 32 (CIFAR) or 224 (ImageNet).
    pub const fn default_image_size(self) -> usize {
        match self {
            Stem::Cifar => 32,
            Stem::Imagenet => 224,
        }
    }
}

impl std::str::FromStr for Stem {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Stem::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::spec("stem", format!("{s:?} is not one of {}", Stem::NAMES.join(", "))))
    }
}

impl std::fmt::Display for Stem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Channel counts of one BasicBlock. `out` is the block's output (the residual width),
/// `mid` the output of its first convolution, `se` the hidden width of its
/// squeeze-and-excitation unit (SE architectures only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockChannels {
    pub mid: usize,
    pub out: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se: Option<usize>,
}

/// Explicit per-layer channel counts, so that a structurally pruned network can be
/// rebuilt from its spec alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    /// Output channels of the stem convolution.
    pub stem: usize,
    /// One entry per BasicBlock, stage by stage (`layer1.0`, `layer1.1`, `layer2.0`, …).
    pub blocks: Vec<BlockChannels>,
}

/// Everything needed to build a ResNet, count it and name its tensors.
///
/// By default the channel counts derive from `width` exactly as the PyTorch reference
/// does (`max(1, round(c * width))`, rounding half to even); `channels` overrides them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    #[serde(default)]
    pub stem: Stem,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    pub classes: usize,
    /// Width multiplier applied to the stage widths 64/128/256/512. By default, 1.0.
    #[serde(default = "default_width")]
    pub width: f64,
    /// Squeeze-and-excitation reduction ratio r (hidden width = max(1, C / r)). By default, 16.
    #[serde(default = "default_se_ratio")]
    pub se_ratio: usize,
    /// Initialise each block's last batch-norm weight to zero. By default, false.
    #[serde(default)]
    pub zero_init_residual: bool,
    /// The input height and width the counts (MACs) refer to. By default, 224.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Explicit channel counts; derived from `width` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Channels>,
}

fn default_in_channels() -> usize {
    3
}
fn default_width() -> f64 {
    1.0
}
fn default_se_ratio() -> usize {
    16
}
fn default_image_size() -> usize {
    224
}

/// One BasicBlock as built: its torchvision name prefix and resolved shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// Name prefix, e.g. `layer2.0`.
    pub name: String,
    pub in_channels: usize,
    pub mid: usize,
    pub out: usize,
    pub stride: usize,
    /// Hidden width of the SE unit, if the block has one.
    pub se: Option<usize>,
    /// Whether the shortcut is a 1x1 convolution + batch-norm (shape changes).
    pub downsample: bool,
}

impl BlockPlan {
    /// The block's convolutions and their geometry.
    pub fn convs(&self) -> BlockConvs {
        let conv = |layer: String, cin, cout, kernel, stride, padding| ConvPlan {
            layer,
            cin,
            cout,
            kernel,
            stride,
            padding,
        };
        BlockConvs {
            conv1: conv(self.conv1(), self.in_channels, self.mid, 3, self.stride, 1),
            conv2: conv(self.conv2(), self.mid, self.out, 3, 1, 1),
            shortcut: self
                .downsample_layers()
                .map(|(layer, _)| conv(layer, self.in_channels, self.out, 1, self.stride, 0)),
        }
    }
}

/// The block's layer names, as torchvision's `state_dict` spells them.
impl BlockPlan {
    pub fn conv1(&self) -> String {
        format!("{}.conv1", self.name)
    }

    pub fn bn1(&self) -> String {
        format!("{}.bn1", self.name)
    }

    pub fn conv2(&self) -> String {
        format!("{}.conv2", self.name)
    }

    pub fn bn2(&self) -> String {
        format!("{}.bn2", self.name)
    }

    /// The squeeze-and-excitation unit's two 1x1 convolutions (`se.fc1`, `se.fc2`).
    pub fn se_layers(&self) -> (String, String) {
        (format!("{}.se.fc1", self.name), format!("{}.se.fc2", self.name))
    }

    /// The projection shortcut's convolution and batch-norm, when the block has one.
    pub fn downsample_layers(&self) -> Option<(String, String)> {
        self.downsample.then(|| {
            (
                format!("{}.downsample.0", self.name),
                format!("{}.downsample.1", self.name),
            )
        })
    }
}

impl ModelSpec {
    /// A spec at width 1 with the stem's usual input size (32 or 224), 3 input channels,
    /// SE ratio 16.
    pub fn new(arch: Arch, stem: Stem, classes: usize) -> Self {
        ModelSpec {
            arch,
            stem,
            in_channels: 3,
            classes,
            width: 1.0,
            se_ratio: 16,
            zero_init_residual: false,
            image_size: stem.default_image_size(),
            channels: None,
        }
    }

    /// torchvision's `resnet18`: ImageNet stem, 224x224 input.
    pub fn resnet18(classes: usize) -> Self {
        Self::new(Arch::Resnet18, Stem::Imagenet, classes)
    }

    /// torchvision's `resnet34`: ImageNet stem, 224x224 input.
    pub fn resnet34(classes: usize) -> Self {
        Self::new(Arch::Resnet34, Stem::Imagenet, classes)
    }

    /// SE-ResNet-18 with the ImageNet stem, r = 16.
    pub fn seresnet18(classes: usize) -> Self {
        Self::new(Arch::Seresnet18, Stem::Imagenet, classes)
    }

    /// ResNet-18 with the CIFAR stem, 32x32 input.
    pub fn resnet18_cifar(classes: usize) -> Self {
        Self::new(Arch::Resnet18, Stem::Cifar, classes)
    }

    /// SE-ResNet-18 with the CIFAR stem, r = 16, 32x32 input.
    pub fn seresnet18_cifar(classes: usize) -> Self {
        Self::new(Arch::Seresnet18, Stem::Cifar, classes)
    }

    /// The named presets `brisk models` lists, with their names.
    pub fn presets() -> Vec<(&'static str, ModelSpec)> {
        vec![
            ("resnet18", Self::resnet18(1000)),
            ("resnet34", Self::resnet34(1000)),
            ("seresnet18", Self::seresnet18(1000)),
            ("resnet18-cifar", Self::resnet18_cifar(10)),
            ("seresnet18-cifar", Self::seresnet18_cifar(10)),
        ]
    }

    /// Looks a preset up by its name (as listed by [`ModelSpec::presets`]).
    pub fn preset_named(name: &str) -> Option<ModelSpec> {
        Self::presets()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
    }

    /// Returns the spec with a different width multiplier.
    pub fn with_width(mut self, width: f64) -> Self {
        self.width = width;
        self
    }

    /// Reads a spec from a `.json` or `.toml` file; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
        let is_toml = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let spec = if is_toml {
            Self::from_toml_str(&text)
        } else {
            Self::from_json_str(&text)
        };
        let spec = spec.map_err(|(field, message)| Error::SpecParse {
            path: path.to_path_buf(),
            field,
            message,
        })?;
        spec.validate().map_err(|e| match e {
            Error::InvalidSpec { field, problem } => Error::SpecParse {
                path: path.to_path_buf(),
                field,
                message: problem,
            },
            other => other,
        })?;
        Ok(spec)
    }

    fn from_json_str(text: &str) -> std::result::Result<Self, (String, String)> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }

    fn from_toml_str(text: &str) -> std::result::Result<Self, (String, String)> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| (e.path().to_string(), e.inner().message().to_string()))
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.classes == 0 {
            return Err(Error::spec("classes", "must be at least 1"));
        }
        if self.in_channels == 0 {
            return Err(Error::spec("in_channels", "must be at least 1"));
        }
        if !(self.width.is_finite() && self.width > 0.0) {
            return Err(Error::spec(
                "width",
                format!("must be a positive number, got {}", self.width),
            ));
        }
        if self.se_ratio == 0 {
            return Err(Error::spec("se_ratio", "must be at least 1"));
        }
        if self.image_size == 0 {
            return Err(Error::spec("image_size", "must be at least 1"));
        }
        if let Some(ch) = &self.channels {
            let expected: usize = self.arch.blocks_per_stage().iter().sum();
            if ch.stem == 0 {
                return Err(Error::spec("channels.stem", "must be at least 1"));
            }
            if ch.blocks.len() != expected {
                return Err(Error::spec(
                    "channels.blocks",
                    format!(
                        "has {} entries but {} has {} blocks",
                        ch.blocks.len(),
                        self.arch.name(),
                        expected
                    ),
                ));
            }
            for (i, b) in ch.blocks.iter().enumerate() {
                if b.mid == 0 {
                    return Err(Error::spec(
                        format!("channels.blocks[{i}].mid"),
                        "must be at least 1",
                    ));
                }
                if b.out == 0 {
                    return Err(Error::spec(
                        format!("channels.blocks[{i}].out"),
                        "must be at least 1",
                    ));
                }
                match (self.arch.has_se(), b.se) {
                    (true, Some(0)) => {
                        return Err(Error::spec(
                            format!("channels.blocks[{i}].se"),
                            "must be at least 1",
                        ))
                    }
                    (false, Some(_)) => {
                        return Err(Error::spec(
                            format!("channels.blocks[{i}].se"),
                            format!("is set but {} has no squeeze-and-excitation", self.arch.name()),
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Channel counts: the explicit ones, or those derived from `width`.
    pub fn resolved_channels(&self) -> Channels {
        if let Some(ch) = &self.channels {
            let mut ch = ch.clone();
            for b in &mut ch.blocks {
                if self.arch.has_se() && b.se.is_none() {
                    b.se = Some(self.se_hidden(b.out));
                }
            }
            return ch;
        }
        let widths = STAGE_WIDTHS.map(|c| scaled(c, self.width));
        let blocks = self
            .arch
            .blocks_per_stage()
            .iter()
            .zip(widths)
            .flat_map(|(&n, w)| {
                std::iter::repeat_n(
                    BlockChannels {
                        mid: w,
                        out: w,
                        se: self.arch.has_se().then(|| self.se_hidden(w)),
                    },
                    n,
                )
            })
            .collect();
        Channels {
            stem: widths[0],
            blocks,
        }
    }

    fn se_hidden(&self, channels: usize) -> usize {
        (channels / self.se_ratio).max(1)
    }

    /// The stem's convolution: 3x3 stride 1 (CIFAR) or 7x7 stride 2 (ImageNet).
    pub fn stem_conv(&self) -> ConvPlan {
        let (kernel, stride, padding) = match self.stem {
            Stem::Cifar => (3, 1, 1),
            Stem::Imagenet => (7, 2, 3),
        };
        ConvPlan {
            layer: crate::layers::STEM_CONV.into(),
            cin: self.in_channels,
            cout: self.resolved_channels().stem,
            kernel,
            stride,
            padding,
        }
    }

    /// The ImageNet stem's max-pool after its batch-norm + ReLU (3x3, stride 2, padding
    /// 1); the CIFAR stem has none.
    pub fn stem_pool(&self) -> Option<PoolPlan> {
        (self.stem == Stem::Imagenet).then_some(PoolPlan {
            kernel: 3,
            stride: 2,
            padding: 1,
        })
    }

    /// The blocks as built, with names, strides and shortcut kinds. Call after `validate`.
    pub fn blocks(&self) -> Vec<BlockPlan> {
        let ch = self.resolved_channels();
        let mut plans = Vec::with_capacity(ch.blocks.len());
        let mut in_channels = ch.stem;
        let mut next = ch.blocks.iter();
        for (stage, &n) in self.arch.blocks_per_stage().iter().enumerate() {
            for i in 0..n {
                let Some(b) = next.next() else { break };
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                plans.push(BlockPlan {
                    name: format!("layer{}.{}", stage + 1, i),
                    in_channels,
                    mid: b.mid,
                    out: b.out,
                    stride,
                    se: b.se,
                    downsample: stride != 1 || in_channels != b.out,
                });
                in_channels = b.out;
            }
        }
        plans
    }

    /// Checks that the model fits a dataset of `classes` classes and `channels`x`height`x
    /// `width` images (square, any size: the network pools globally); the error names
    /// both. The one place this is decided, for training, fine-tuning and evaluation.
    pub fn check_fits(
        &self,
        classes: usize,
        channels: usize,
        (height, width): (usize, usize),
        dataset: &Path,
    ) -> Result<()> {
        let problem = if self.classes != classes {
            Some(format!(
                "the model predicts {} classes, the dataset has {classes}",
                self.classes
            ))
        } else if self.in_channels != channels {
            Some(format!(
                "the model takes {}-channel images, the dataset's are {channels}-channel",
                self.in_channels
            ))
        } else if height != width {
            Some(format!(
                "the images are {height}x{width}; brisk's models need square images"
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::DoesNotFit {
                model: format!("{} width {}", self.arch, self.width),
                dataset: dataset.to_path_buf(),
                problem,
            }),
            None => Ok(()),
        }
    }

    /// Output channels of the last block: the width the linear head reads.
    pub fn feature_channels(&self) -> usize {
        let ch = self.resolved_channels();
        ch.blocks.last().map_or(ch.stem, |b| b.out)
    }
}

/// `max(1, round(c * width))` with Python's round-half-to-even, as the reference does.
fn scaled(c: usize, width: f64) -> usize {
    ((c as f64 * width).round_ties_even() as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_parse_error(json: &str, field: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.json");
        std::fs::write(&path, json).expect("write");
        let err = ModelSpec::from_file(&path).expect_err("spec must be rejected");
        let msg = err.to_string();
        assert!(msg.contains(field), "error `{msg}` should name `{field}`");
        assert!(msg.contains("spec.json"), "error `{msg}` should name the file");
    }

    #[test]
    fn bad_specs_name_the_field() {
        check_parse_error(r#"{"arch": "resnet50", "classes": 10}"#, "arch");
        check_parse_error(r#"{"arch": "resnet18", "classes": 0}"#, "classes");
        check_parse_error(r#"{"arch": "resnet18", "classes": 10, "width": -1}"#, "width");
        check_parse_error(r#"{"arch": "resnet18", "classes": 10, "colour": 1}"#, "colour");
        check_parse_error(
            r#"{"arch": "resnet18", "classes": 10, "channels": {"stem": 0, "blocks": []}}"#,
            "channels.stem",
        );
        let mut blocks = [r#"{"mid": 8, "out": 8}"#; 8];
        blocks[3] = r#"{"mid": 0, "out": 8}"#;
        check_parse_error(
            &format!(
                r#"{{"arch": "resnet18", "classes": 10, "channels": {{"stem": 8, "blocks": [{}]}}}}"#,
                blocks.join(",")
            ),
            "channels.blocks[3].mid",
        );
    }

    #[test]
    fn toml_and_json_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml_path = dir.path().join("s.toml");
        std::fs::write(
            &toml_path,
            "arch = \"seresnet18\"\nstem = \"cifar\"\nclasses = 10\nwidth = 0.5\n",
        )
        .expect("write");
        let json_path = dir.path().join("s.json");
        std::fs::write(
            &json_path,
            r#"{"arch":"seresnet18","stem":"cifar","classes":10,"width":0.5}"#,
        )
        .expect("write");
        let a = ModelSpec::from_file(&toml_path).expect("toml");
        let b = ModelSpec::from_file(&json_path).expect("json");
        assert_eq!(a, b);
        assert_eq!(a.resolved_channels().stem, 32);
    }

    #[test]
    fn widths_round_like_python() {
        // 64 * 0.125 = 8; 128 * 0.3 = 38.4 -> 38; 64 * 0.0078125 = 0.5 -> 0, clamped to 1.
        assert_eq!(scaled(64, 0.125), 8);
        assert_eq!(scaled(128, 0.3), 38);
        assert_eq!(scaled(64, 0.0078125), 1);
        // 80 * 0.03125 = 2.5 exactly: half to even gives 2, as Python's round().
        assert_eq!(scaled(80, 0.03125), 2);
    }

    #[test]
    fn a_model_that_does_not_fit_a_dataset_says_why() {
        let spec = ModelSpec::resnet18_cifar(10);
        let data = Path::new("data/mnist");
        assert!(spec.check_fits(10, 3, (32, 32), data).is_ok());
        assert!(spec.check_fits(10, 3, (8, 8), data).is_ok(), "any square size");
        for (classes, channels, hw, want) in [
            (100, 3, (32, 32), "100"),
            (10, 1, (28, 28), "1-channel"),
            (10, 3, (32, 24), "32x24"),
        ] {
            let e = spec
                .check_fits(classes, channels, hw, data)
                .expect_err("does not fit")
                .to_string();
            assert!(e.contains(want) && e.contains("data/mnist"), "{e}");
        }
    }

    #[test]
    fn explicit_channels_rebuild_blocks() {
        let mut spec = ModelSpec::resnet18_cifar(10);
        let mut ch = spec.resolved_channels();
        ch.blocks[0].mid = 13;
        ch.blocks[1].out = 60;
        spec.channels = Some(ch);
        spec.validate().expect("valid");
        let blocks = spec.blocks();
        assert_eq!(blocks[0].mid, 13);
        assert!(!blocks[0].downsample);
        // layer1.1 changes width: it needs a projection shortcut, and layer2.0 reads 60 channels.
        assert!(blocks[1].downsample);
        assert_eq!(blocks[2].in_channels, 60);
    }
}
