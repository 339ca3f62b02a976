//! The tensor table of a spec (torchvision names, layers, shapes, roles), the conv →
//! batch-norm pairs, and the counts derived from them: parameters, buffers,
//! multiply-accumulates and checkpoint bytes. What a tensor is for is asked here, never
//! guessed from its name elsewhere.

use crate::layers::{ConvPlan, CLASSIFIER, STEM_BN, STEM_CONV};
use crate::spec::ModelSpec;

/// What a tensor is for; decides its initialisation and whether it is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    ConvWeight,
    /// A convolution's bias; `fan_in` sets its default initialisation range.
    ConvBias {
        fan_in: usize,
    },
    BnWeight {
        /// Initialised to zero rather than one (`zero_init_residual`).
        zero: bool,
    },
    BnBias,
    RunningMean,
    RunningVar,
    LinearWeight,
    /// The linear head's bias; `fan_in` sets its default initialisation range.
    LinearBias {
        fan_in: usize,
    },
}

impl Role {
    /// Buffers are state, not parameters: they are saved but never trained.
    pub fn is_buffer(self) -> bool {
        matches!(self, Role::RunningMean | Role::RunningVar)
    }

    /// The weight matrices of convolutions (squeeze-and-excitation's included) and of the
    /// classifier: what magnitude pruning and int8 quantisation act on.
    pub fn is_weight_matrix(self) -> bool {
        matches!(self, Role::ConvWeight | Role::LinearWeight)
    }

    /// The tensor's name within its layer, as torchvision's `state_dict` spells it.
    pub fn suffix(self) -> &'static str {
        match self {
            Role::ConvWeight | Role::BnWeight { .. } | Role::LinearWeight => "weight",
            Role::ConvBias { .. } | Role::BnBias | Role::LinearBias { .. } => "bias",
            Role::RunningMean => "running_mean",
            Role::RunningVar => "running_var",
        }
    }
}

/// The roles of a batch-norm layer's four tensors, in `state_dict` order.
pub const BATCH_NORM_ROLES: [Role; 4] = [
    Role::BnWeight { zero: false },
    Role::BnBias,
    Role::RunningMean,
    Role::RunningVar,
];

/// The checkpoint name of the tensor of `role` in `layer`: `tensor_name("layer1.0.bn1",
/// Role::RunningVar)` is `layer1.0.bn1.running_var`.
pub fn tensor_name(layer: &str, role: Role) -> String {
    format!("{layer}.{}", role.suffix())
}

/// One named tensor of the model, as stored in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The checkpoint name (`layer1.0.conv1.weight`).
    pub name: String,
    /// The layer it belongs to (`layer1.0.conv1`).
    pub layer: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A convolution and the batch-norm that normalises its output (the pair batch-norm
/// folding and filter pruning act on), as layer names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvBnPair {
    pub conv: String,
    pub bn: String,
}

/// torchvision's per-batch-norm counter, which brisk accepts on load and does not keep.
pub fn is_ignored_name(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}

struct Table(Vec<TensorInfo>);

impl Table {
    fn push(&mut self, layer: &str, shape: Vec<usize>, role: Role) {
        self.0.push(TensorInfo {
            name: tensor_name(layer, role),
            layer: layer.to_string(),
            shape,
            role,
        });
    }

    fn conv(&mut self, layer: &str, cout: usize, cin: usize, k: usize) {
        self.push(layer, vec![cout, cin, k, k], Role::ConvWeight);
    }

    fn conv_plan(&mut self, c: &ConvPlan) {
        self.conv(&c.layer, c.cout, c.cin, c.kernel);
    }

    fn bn(&mut self, layer: &str, c: usize, zero: bool) {
        for role in BATCH_NORM_ROLES {
            let role = match role {
                Role::BnWeight { .. } => Role::BnWeight { zero },
                r => r,
            };
            self.push(layer, vec![c], role);
        }
    }
}

impl ModelSpec {
    /// Every tensor of the model in torchvision's `state_dict` order (without
    /// `num_batches_tracked`). Call after `validate`.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let ch = self.resolved_channels();
        let mut t = Table(Vec::new());
        t.conv_plan(&self.stem_conv());
        t.bn(STEM_BN, ch.stem, false);
        for b in self.blocks() {
            let convs = b.convs();
            t.conv_plan(&convs.conv1);
            t.bn(&b.bn1(), b.mid, false);
            t.conv_plan(&convs.conv2);
            t.bn(&b.bn2(), b.out, self.zero_init_residual);
            if let Some(h) = b.se {
                let (fc1, fc2) = b.se_layers();
                t.conv(&fc1, h, b.out, 1);
                t.push(&fc1, vec![h], Role::ConvBias { fan_in: b.out });
                t.conv(&fc2, b.out, h, 1);
                t.push(&fc2, vec![b.out], Role::ConvBias { fan_in: h });
            }
            if let (Some(conv), Some((_, bn))) = (&convs.shortcut, b.downsample_layers()) {
                t.conv_plan(conv);
                t.bn(&bn, b.out, false);
            }
        }
        let feat = self.feature_channels();
        t.push(CLASSIFIER, vec![self.classes, feat], Role::LinearWeight);
        t.push(CLASSIFIER, vec![self.classes], Role::LinearBias { fan_in: feat });
        t.0
    }

    /// Every convolution followed by a batch-norm (all of them but SE's), stem first, in
    /// block order.
    pub fn conv_bn_pairs(&self) -> Vec<ConvBnPair> {
        let pair = |conv: String, bn: String| ConvBnPair { conv, bn };
        let mut pairs = vec![pair(STEM_CONV.into(), STEM_BN.into())];
        for b in self.blocks() {
            pairs.push(pair(b.conv1(), b.bn1()));
            pairs.push(pair(b.conv2(), b.bn2()));
            if let Some((conv, bn)) = b.downsample_layers() {
                pairs.push(pair(conv, bn));
            }
        }
        pairs
    }

    /// Trainable parameters (what PyTorch's `sum(p.numel() for p in model.parameters())` gives).
    pub fn param_count(&self) -> usize {
        self.tensors()
            .iter()
            .filter(|t| !t.role.is_buffer())
            .map(TensorInfo::numel)
            .sum()
    }

    /// Batch-norm running statistics (without torchvision's `num_batches_tracked`).
    pub fn buffer_count(&self) -> usize {
        self.tensors()
            .iter()
            .filter(|t| t.role.is_buffer())
            .map(TensorInfo::numel)
            .sum()
    }

    /// Multiply-accumulates of one forward pass of one image of `size`x`size`: every
    /// convolution (SE's included) and the linear head; batch-norm, ReLU and pooling,
    /// which are not multiply-accumulates, are left out as in the usual ResNet figures.
    pub fn macs(&self, size: usize) -> u64 {
        // A convolution's MACs at output side `hw`.
        let conv = |c: &ConvPlan, hw: usize| (c.cout * c.cin * c.kernel * c.kernel * hw * hw) as u64;
        let stem = self.stem_conv();
        let h = stem.out_size(size);
        let mut macs = conv(&stem, h);
        let mut hw = self.stem_pool().map_or(h, |p| p.out_size(h));
        for b in self.blocks() {
            let convs = b.convs();
            let out = convs.conv1.out_size(hw);
            macs += conv(&convs.conv1, out) + conv(&convs.conv2, out);
            if let Some(h) = b.se {
                macs += 2 * (h * b.out) as u64;
            }
            if let Some(shortcut) = &convs.shortcut {
                macs += conv(shortcut, out);
            }
            hw = out;
        }
        macs + (self.feature_channels() * self.classes) as u64
    }

    /// Exact size in bytes of the model's f32 safetensors checkpoint as brisk writes it.
    pub fn checkpoint_bytes(&self) -> u64 {
        // The safetensors layout: an 8-byte header length, a compact JSON header padded
        // with spaces to a multiple of 8, then the data. Tensors of one dtype are laid out
        // in name order, which fixes the offsets written in the header; the metadata holds
        // brisk's checksums (brisk-files), each `crc32:` and 8 hex digits.
        let mut tensors = self.tensors();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let mut header = serde_json::Map::new();
        let mut metadata = serde_json::Map::new();
        let checksum = serde_json::Value::from("crc32:00000000");
        metadata.insert("brisk.crc32.header".into(), checksum.clone());
        let mut offset = 0usize;
        for t in &tensors {
            let end = offset + 4 * t.numel();
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
            );
            metadata.insert(format!("brisk.crc32.{}", t.name), checksum.clone());
            offset = end;
        }
        header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
        let header_len = serde_json::Value::Object(header).to_string().len().div_ceil(8) * 8;
        (8 + header_len + offset) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: ModelSpec, params: usize) {
        assert_eq!(spec.param_count(), params, "{spec:?}");
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        check(ModelSpec::resnet18(1000), 11_689_512);
        check(ModelSpec::resnet34(1000), 21_797_672);
        check(ModelSpec::resnet18_cifar(10), 11_173_962);
        check(ModelSpec::seresnet18_cifar(10), 11_263_042);
    }

    #[test]
    fn buffers_are_two_per_bn_channel() {
        // ResNet-18: bn1 64 + blocks (64*2*2 + 128*2*2 + 256*2*2 + 512*2*2) + downsample BNs (128+256+512).
        let bn_channels = 64 + 4 * (64 + 128 + 256 + 512) + (128 + 256 + 512);
        assert_eq!(ModelSpec::resnet18(1000).buffer_count(), 2 * bn_channels);
    }

    #[test]
    fn resnet18_macs_at_224_are_1_82_g() {
        let macs = ModelSpec::resnet18(1000).macs(224);
        // Computed independently (Python, same rules): 1,814,073,344.
        assert_eq!(macs, 1_814_073_344, "{macs}");
        // CIFAR ResNet-18 at 32x32 is the well-known 0.56 G.
        let cifar = ModelSpec::resnet18_cifar(10).macs(32);
        assert!((550_000_000..560_000_000).contains(&cifar), "{cifar}");
    }

    #[test]
    fn names_follow_torchvision() {
        let names: Vec<String> = ModelSpec::seresnet18_cifar(10)
            .tensors()
            .into_iter()
            .map(|t| t.name)
            .collect();
        for n in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv1.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var",
            "layer4.1.se.fc2.bias",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(names.iter().any(|x| x == n), "missing {n}");
        }
        assert!(!names.iter().any(|x| x == "layer1.0.downsample.0.weight"));
    }

    #[test]
    fn roles_layers_and_pairs_agree_with_the_names() {
        let spec = ModelSpec::seresnet18_cifar(10).with_width(0.25);
        let table = spec.tensors();
        for t in &table {
            assert_eq!(t.name, tensor_name(&t.layer, t.role), "{t:?}");
            let buffer = t.name.ends_with(".running_mean") || t.name.ends_with(".running_var");
            assert_eq!(t.role.is_buffer(), buffer, "{}", t.name);
            let matrix = t.name.ends_with(".weight") && t.shape.len() >= 2;
            assert_eq!(t.role.is_weight_matrix(), matrix, "{}", t.name);
        }
        let pairs = spec.conv_bn_pairs();
        // Stem, two per block, and three projection shortcuts.
        assert_eq!(pairs.len(), 1 + 2 * 8 + 3);
        assert_eq!(
            pairs[0],
            ConvBnPair {
                conv: "conv1".into(),
                bn: "bn1".into()
            }
        );
        for p in &pairs {
            let conv = table
                .iter()
                .find(|t| t.layer == p.conv && t.role == Role::ConvWeight);
            let bn = table
                .iter()
                .find(|t| t.layer == p.bn && t.role == Role::RunningVar);
            let (Some(conv), Some(bn)) = (conv, bn) else {
                panic!("{p:?} is not in the table");
            };
            assert_eq!(
                conv.shape[0], bn.shape[0],
                "{p:?}: the batch-norm normalises the conv's output"
            );
        }
        assert!(pairs
            .iter()
            .any(|p| p.conv == "layer2.0.downsample.0" && p.bn == "layer2.0.downsample.1"));
    }
}
