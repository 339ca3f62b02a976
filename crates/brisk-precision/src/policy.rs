//! `Precision` (the user's choice) and `PrecisionPolicy` (the dtype each layer computes in).

use std::collections::BTreeMap;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::MixedBf16 => "mixed-bf16",
            Precision::MixedF16 => "mixed-f16",
        }
    }

    /// The half-precision dtype of this mode, if any.
    pub fn half(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 | Precision::MixedBf16 => Some(DType::BF16),
            Precision::F16 | Precision::MixedF16 => Some(DType::F16),
        }
    }

    /// f16's narrow range needs the loss scaled; bf16 has f32's range and needs none.
    pub fn needs_loss_scaling(self) -> bool {
        self.half() == Some(DType::F16)
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
                problem: format!(
                    "unknown precision {s:?}; one of {}",
                    Precision::ALL.map(Precision::name).join(", ")
                ),
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
    pub overrides: BTreeMap<String, String>,
}

fn dtype_named(field: &str, name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(Error::InvalidConfig {
            field: format!("precision.overrides.{field}"),
            problem: format!("unknown dtype {name:?}; one of f32, bf16, f16"),
        }),
    }
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
        for (layer, name) in &self.overrides {
            let dtype = dtype_named(layer, name)?;
            if let (Some(half), true) = (self.mode.half(), dtype != DType::F32) {
                if dtype != half {
                    return Err(Error::InvalidConfig {
                        field: format!("precision.overrides.{layer}"),
                        problem: format!("{name} does not mix with mode {}", self.mode.name()),
                    });
                }
            }
        }
        Ok(())
    }

    /// The dtype layer `name` of kind `kind` computes in.
    pub fn compute_dtype(&self, name: &str, kind: LayerKind) -> DType {
        if let Some(d) = self.overrides.get(name).and_then(|n| dtype_named(name, n).ok()) {
            return d;
        }
        let mixed = matches!(self.mode, Precision::MixedBf16 | Precision::MixedF16);
        match (self.mode.half(), kind) {
            (None, _) => DType::F32,
            (Some(_), LayerKind::FirstConv | LayerKind::Linear) if mixed => DType::F32,
            (Some(half), _) => half,
        }
    }

    /// Whether any layer computes in half precision.
    pub fn uses_half(&self) -> bool {
        self.mode.half().is_some() || self.overrides.values().any(|n| n == "bf16" || n == "f16")
    }

    /// Whether the loss must be scaled (some layer computes in f16).
    pub fn needs_loss_scaling(&self) -> bool {
        self.mode.needs_loss_scaling() || self.overrides.values().any(|n| n == "f16")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_place_layers_as_the_recipe_says() -> Result<()> {
        let check = |mode: &str, first: DType, conv: DType, fc: DType| -> Result<()> {
            let p = PrecisionPolicy::new(mode.parse()?);
            assert_eq!(p.compute_dtype("conv1", LayerKind::FirstConv), first, "{mode}");
            assert_eq!(p.compute_dtype("layer2.0.conv1", LayerKind::Conv), conv, "{mode}");
            assert_eq!(p.compute_dtype("fc", LayerKind::Linear), fc, "{mode}");
            Ok(())
        };
        check("f32", DType::F32, DType::F32, DType::F32)?;
        check("bf16", DType::BF16, DType::BF16, DType::BF16)?;
        check("f16", DType::F16, DType::F16, DType::F16)?;
        check("mixed-bf16", DType::F32, DType::BF16, DType::F32)?;
        check("mixed-f16", DType::F32, DType::F16, DType::F32)?;
        assert!(Precision::MixedF16.needs_loss_scaling() && !Precision::MixedBf16.needs_loss_scaling());
        Ok(())
    }

    #[test]
    fn overrides_name_layers_and_are_checked() -> Result<()> {
        let mut p = PrecisionPolicy::new(Precision::MixedBf16);
        p.overrides.insert("layer4.1.conv2".into(), "f32".into());
        p.overrides.insert("conv1".into(), "bf16".into());
        p.validate()?;
        assert_eq!(p.compute_dtype("layer4.1.conv2", LayerKind::Conv), DType::F32);
        assert_eq!(p.compute_dtype("conv1", LayerKind::FirstConv), DType::BF16);
        p.overrides.insert("fc".into(), "f16".into());
        let e = p.validate().expect_err("bf16 with f16").to_string();
        assert!(e.contains("precision.overrides.fc"), "{e}");
        let mut p = PrecisionPolicy::new(Precision::F32);
        p.overrides.insert("fc".into(), "f8".into());
        assert!(p
            .validate()
            .expect_err("f8")
            .to_string()
            .contains("f32, bf16, f16"));
        let e = "half".parse::<Precision>().expect_err("unknown").to_string();
        assert!(e.contains("mixed-bf16"), "{e}");
        Ok(())
    }
}
