//! `Precision` (the user's choice) and `PrecisionPolicy` (the dtype each layer computes in).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The number formats a layer computes in. The tensor library's own dtype is chosen from
/// this where the layer is built (brisk-models).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// The precision modes of `--precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// Every convolution and the final linear layer in bf16.
    #[serde(rename = "bf16")]
    Bf16,
    /// Every convolution and the final linear layer in f16 (with loss scaling).
    #[serde(rename = "f16")]
    F16,
    /// The seed's recipe: the first convolution and the final linear layer in f32, the
    /// other convolutions in bf16.
    #[serde(rename = "mixed-bf16")]
    MixedBf16,
    /// As `mixed-bf16` with f16 (with loss scaling).
    #[serde(rename = "mixed-f16")]
    MixedF16,
}

impl Precision {
    pub const ALL: [Precision; 5] = [
        Precision::F32,
        Precision::Bf16,
        Precision::F16,
        Precision::MixedBf16,
        Precision::MixedF16,
    ];

    /// Every name, in the order of [`Precision::ALL`] (`--precision`'s values).
    pub const NAMES: [&'static str; 5] = [
        Precision::ALL[0].name(),
        Precision::ALL[1].name(),
        Precision::ALL[2].name(),
        Precision::ALL[3].name(),
        Precision::ALL[4].name(),
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::MixedBf16 => "mixed-bf16",
            Precision::MixedF16 => "mixed-f16",
        }
    }

    /// The half-precision dtype of this mode, if any.
    pub fn half(self) -> Option<Dtype> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 | Precision::MixedBf16 => Some(Dtype::Bf16),
            Precision::F16 | Precision::MixedF16 => Some(Dtype::F16),
        }
    }

    /// f16's narrow range needs the loss scaled; bf16 has f32's range and needs none.
    pub fn needs_loss_scaling(self) -> bool {
        self.half() == Some(Dtype::F16)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "precision".into(),
                problem: format!("unknown precision {s:?}; one of {}", Precision::NAMES.join(", ")),
            })
    }
}

/// The kinds of layer a policy distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// The stem's convolution (`conv1`).
    FirstConv,
    /// Any other convolution, including shortcut projections.
    Conv,
    /// The classifier (`fc`).
    Linear,
}

/// Which dtype each layer computes in. Batch-norm statistics, the loss, the optimiser
/// and the master weights are always f32; squeeze-and-excitation units compute in f32.
/// `overrides` name layers explicitly (`"layer1.0.conv1" = "f32"`) and win over the mode.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionPolicy {
    pub mode: Precision,
    /// Layer name (as in checkpoints, without `.weight`) → "f32", "bf16" or "f16".
    pub overrides: BTreeMap<String, Dtype>,
}

impl PrecisionPolicy {
    pub fn new(mode: Precision) -> Self {
        PrecisionPolicy {
            mode,
            overrides: BTreeMap::new(),
        }
    }

    /// Checks the overrides' dtypes; mixing bf16 and f16 in one model is refused.
    pub fn validate(&self) -> Result<()> {
        // The mode's half format, else the first half-precision override's, sets the rule.
        let Some(half) = self.half() else {
            return Ok(());
        };
        if let Some((layer, dtype)) = self
            .overrides
            .iter()
            .find(|(_, d)| **d != Dtype::F32 && **d != half)
        {
            return Err(Error::InvalidConfig {
                field: format!("precision.overrides.{layer}"),
                problem: format!(
                    "{} does not mix with the other half-precision layers (mode {}): use bf16 or f16 throughout",
                    dtype.name(),
                    self.mode.name()
                ),
            });
        }
        Ok(())
    }

    /// The dtype layer `name` of kind `kind` computes in.
    pub fn compute_dtype(&self, name: &str, kind: LayerKind) -> Dtype {
        if let Some(d) = self.overrides.get(name) {
            return *d;
        }
        let mixed = matches!(self.mode, Precision::MixedBf16 | Precision::MixedF16);
        match (self.mode.half(), kind) {
            (None, _) => Dtype::F32,
            (Some(_), LayerKind::FirstConv | LayerKind::Linear) if mixed => Dtype::F32,
            (Some(half), _) => half,
        }
    }

    /// The half-precision format the policy's layers use, if any (bf16 and f16 never mix).
    pub fn half(&self) -> Option<Dtype> {
        self.mode
            .half()
            .or_else(|| self.overrides.values().copied().find(|d| *d != Dtype::F32))
    }

    /// Whether the loss must be scaled (some layer computes in f16).
    pub fn needs_loss_scaling(&self) -> bool {
        self.half() == Some(Dtype::F16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_place_layers_as_the_recipe_says() -> Result<()> {
        let check = |mode: &str, first: Dtype, conv: Dtype, fc: Dtype| -> Result<()> {
            let p = PrecisionPolicy::new(mode.parse()?);
            assert_eq!(p.compute_dtype("conv1", LayerKind::FirstConv), first, "{mode}");
            assert_eq!(p.compute_dtype("layer2.0.conv1", LayerKind::Conv), conv, "{mode}");
            assert_eq!(p.compute_dtype("fc", LayerKind::Linear), fc, "{mode}");
            Ok(())
        };
        check("f32", Dtype::F32, Dtype::F32, Dtype::F32)?;
        check("bf16", Dtype::Bf16, Dtype::Bf16, Dtype::Bf16)?;
        check("f16", Dtype::F16, Dtype::F16, Dtype::F16)?;
        check("mixed-bf16", Dtype::F32, Dtype::Bf16, Dtype::F32)?;
        check("mixed-f16", Dtype::F32, Dtype::F16, Dtype::F32)?;
        assert!(Precision::MixedF16.needs_loss_scaling() && !Precision::MixedBf16.needs_loss_scaling());
        Ok(())
    }

    #[test]
    fn overrides_name_layers_and_are_checked() -> Result<()> {
        let mut p = PrecisionPolicy::new(Precision::MixedBf16);
        p.overrides.insert("layer4.1.conv2".into(), Dtype::F32);
        p.overrides.insert("conv1".into(), Dtype::Bf16);
        p.validate()?;
        assert_eq!(p.compute_dtype("layer4.1.conv2", LayerKind::Conv), Dtype::F32);
        assert_eq!(p.compute_dtype("conv1", LayerKind::FirstConv), Dtype::Bf16);
        assert!(!p.needs_loss_scaling());
        p.overrides.insert("fc".into(), Dtype::F16);
        let e = p.validate().expect_err("bf16 with f16").to_string();
        assert!(e.contains("precision.overrides.fc"), "{e}");
        // An f32 model with one f16 layer needs the loss scaled.
        let mut p = PrecisionPolicy::new(Precision::F32);
        p.overrides.insert("fc".into(), Dtype::F16);
        p.validate()?;
        assert!(p.needs_loss_scaling() && p.half() == Some(Dtype::F16));
        // Names are checked where the policy is read.
        let e = serde_json::from_str::<PrecisionPolicy>(r#"{"overrides": {"fc": "f8"}}"#)
            .expect_err("f8")
            .to_string();
        assert!(e.contains("f8") && e.contains("bf16"), "{e}");
        let e = "half".parse::<Precision>().expect_err("unknown").to_string();
        assert!(e.contains("mixed-bf16"), "{e}");
        Ok(())
    }
}
