//! Unstructured magnitude pruning: `Masks` (the smallest-magnitude weights of the
//! prunable layers set to zero, chosen globally or layer by layer), `MaskHook` (re-applies
//! them after every optimiser step, so pruned weights stay exactly zero while the rest
//! fine-tune) and `GradualPruning` (Zhu & Gupta's cubic sparsity schedule, as a hook).

use brisk_models::{Network, Role};
use brisk_spec::layers::{CLASSIFIER, STEM_CONV};
use brisk_spec::tensor_name;
use brisk_train::{Hook, StepContext};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How thresholds are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One threshold over every prunable weight: layers end up with different sparsities.
    #[default]
    Global,
    /// The target sparsity in every prunable layer.
    Layer,
}

/// The layers pruning leaves alone by default: the stem convolution and the classifier,
/// which are small and sensitive.
pub fn default_exclusions() -> Vec<String> {
    vec![
        tensor_name(STEM_CONV, Role::ConvWeight),
        tensor_name(CLASSIFIER, Role::LinearWeight),
    ]
}

/// The prunable weights: convolution kernels and the classifier's matrix (the tensor
/// table's weight matrices; not biases or batch-norm parameters), minus the excluded
/// names. A name in `exclude` matches a tensor exactly or as a prefix (`layer1` excludes
/// every weight of the first stage).
pub fn prunable(net: &Network, exclude: &[String]) -> Result<Vec<(String, Var)>> {
    let excluded = |name: &str| {
        exclude
            .iter()
            .any(|e| name == e || name.starts_with(&format!("{e}.")))
    };
    Ok(net.vars_where(|t| t.role.is_weight_matrix() && !excluded(&t.name))?)
}

/// A 0/1 mask per pruned tensor.
#[derive(Debug, Clone)]
pub struct Masks {
    layers: Vec<(String, Var, Tensor)>,
}

fn abs_values(var: &Var) -> Result<Vec<f32>> {
    Ok(var.as_tensor().abs()?.flatten_all()?.to_vec1::<f32>()?)
}

/// The magnitude at or below which the `fraction` smallest of `values` fall.
fn threshold(mut values: Vec<f32>, fraction: f64) -> Option<f32> {
    let k = ((values.len() as f64) * fraction).floor() as usize;
    if k == 0 {
        return None;
    }
    let (_, nth, _) = values.select_nth_unstable_by(k - 1, f32::total_cmp);
    Some(*nth)
}

impl Masks {
    /// Masks that zero the `sparsity` fraction of smallest-magnitude weights of `net`'s
    /// prunable layers (weights already zero count among them, so pruning is monotonic).
    pub fn magnitude(net: &Network, sparsity: f64, scope: Scope, exclude: &[String]) -> Result<Self> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(Error::InvalidConfig {
                field: "sparsity",
                problem: format!("must be in [0, 1), got {sparsity}"),
            });
        }
        let layers = prunable(net, exclude)?;
        if layers.is_empty() {
            return Err(Error::InvalidConfig {
                field: "exclude",
                problem: "every prunable layer is excluded".into(),
            });
        }
        let global = match scope {
            Scope::Global => {
                let mut all = Vec::new();
                for (_, v) in &layers {
                    all.extend(abs_values(v)?);
                }
                Some(threshold(all, sparsity))
            }
            Scope::Layer => None,
        };
        let mut out = Vec::with_capacity(layers.len());
        for (name, var) in layers {
            let t = match global {
                Some(t) => t,
                None => threshold(abs_values(&var)?, sparsity),
            };
            let mask = match t {
                Some(t) => var.as_tensor().abs()?.gt(t)?.to_dtype(DType::F32)?,
                None => var.as_tensor().ones_like()?,
            };
            out.push((name, var, mask));
        }
        Ok(Masks { layers: out })
    }

    /// Masks keeping exactly the non-zero weights of the prunable layers: how a pruned
    /// checkpoint's masks are recovered.
    pub fn from_zeros(net: &Network, exclude: &[String]) -> Result<Self> {
        let layers = prunable(net, exclude)?
            .into_iter()
            .map(|(name, var)| {
                let mask = var.as_tensor().ne(0f32)?.to_dtype(DType::F32)?;
                Ok((name, var, mask))
            })
            .collect::<Result<_>>()?;
        Ok(Masks { layers })
    }

    /// Zeroes the masked weights.
    pub fn apply(&self) -> Result<()> {
        for (_, var, mask) in &self.layers {
            var.set(&(var.as_tensor() * mask)?)?;
        }
        Ok(())
    }

    /// (name, zeros, total) per masked tensor.
    pub fn layer_sparsity(&self) -> Result<Vec<(String, usize, usize)>> {
        self.layers
            .iter()
            .map(|(name, _, mask)| {
                let total = mask.elem_count();
                let kept = mask.sum_all()?.to_scalar::<f32>()? as usize;
                Ok((name.clone(), total - kept, total))
            })
            .collect()
    }

    /// The fraction of masked-out weights over every masked tensor.
    pub fn sparsity(&self) -> Result<f64> {
        let (zeros, total) = self
            .layer_sparsity()?
            .iter()
            .fold((0, 0), |(z, t), (_, lz, lt)| (z + lz, t + lt));
        Ok(if total == 0 {
            0.0
        } else {
            zeros as f64 / total as f64
        })
    }
}

/// Keeps pruned weights at zero during fine-tuning: applies the masks before training
/// and after every optimiser step (momentum would otherwise revive them).
#[derive(Debug)]
pub struct MaskHook {
    masks: Masks,
}

impl MaskHook {
    pub fn new(masks: Masks) -> Self {
        MaskHook { masks }
    }
}

impl Hook for MaskHook {
    fn name(&self) -> &'static str {
        "pruning_masks"
    }

    fn on_start(&mut self, _net: &Network) -> brisk_train::Result<()> {
        self.masks.apply().map_err(to_train)
    }

    fn after_step(&mut self, _ctx: &StepContext) -> brisk_train::Result<()> {
        self.masks.apply().map_err(to_train)
    }
}

fn to_train(e: Error) -> brisk_train::Error {
    match e {
        Error::Train(e) => e,
        Error::Candle(e) => brisk_train::Error::Candle(e),
        Error::Model(e) => brisk_train::Error::Model(e),
        other => brisk_train::Error::State {
            problem: other.to_string(),
        },
    }
}

/// Zhu & Gupta's gradual pruning schedule: from step `start`, every `every` steps, for
/// `count` pruning steps, the sparsity follows
/// `s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³`, reaching `final_sparsity` at
/// `start + count·every` and staying there.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneSchedule {
    pub initial: f64,
    pub final_sparsity: f64,
    pub start: u64,
    pub every: u64,
    pub count: u64,
}

impl PruneSchedule {
    pub fn validate(&self) -> Result<()> {
        let ok = (0.0..1.0).contains(&self.initial)
            && (0.0..1.0).contains(&self.final_sparsity)
            && self.initial <= self.final_sparsity
            && self.every > 0
            && self.count > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                field: "prune_schedule",
                problem: format!("need 0 <= initial <= final < 1, every >= 1, count >= 1; got {self:?}"),
            })
        }
    }

    /// The target sparsity at step `t` (0 before `start`).
    pub fn sparsity_at(&self, t: u64) -> f64 {
        if t < self.start {
            return 0.0;
        }
        let span = (self.count * self.every) as f64;
        let progress = ((t - self.start) as f64 / span).min(1.0);
        self.final_sparsity + (self.initial - self.final_sparsity) * (1.0 - progress).powi(3)
    }

    /// Whether the masks are recomputed after step `t`.
    pub fn prunes_at(&self, t: u64) -> bool {
        t >= self.start
            && (t - self.start).is_multiple_of(self.every)
            && t <= self.start + self.count * self.every
    }
}

/// Gradual magnitude pruning during training, as a hook: at each pruning step the masks
/// are recomputed at the schedule's sparsity; between them they are re-applied.
#[derive(Debug)]
pub struct GradualPruning {
    schedule: PruneSchedule,
    scope: Scope,
    exclude: Vec<String>,
    masks: Option<Masks>,
    current: f64,
}

impl GradualPruning {
    pub fn new(schedule: PruneSchedule, scope: Scope, exclude: Vec<String>) -> Result<Self> {
        schedule.validate()?;
        Ok(GradualPruning {
            schedule,
            scope,
            exclude,
            masks: None,
            current: 0.0,
        })
    }
}

impl Hook for GradualPruning {
    fn name(&self) -> &'static str {
        "gradual_pruning"
    }

    fn after_step(&mut self, ctx: &StepContext) -> brisk_train::Result<()> {
        if self.schedule.prunes_at(ctx.step) {
            let target = self.schedule.sparsity_at(ctx.step);
            let masks = Masks::magnitude(ctx.net, target, self.scope, &self.exclude).map_err(to_train)?;
            self.current = target;
            self.masks = Some(masks);
        }
        match &self.masks {
            Some(m) => m.apply().map_err(to_train),
            None => Ok(()),
        }
    }

    fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![("sparsity", self.current)]
    }

    fn state(&self) -> brisk_train::Result<serde_json::Value> {
        Ok(serde_json::json!({ "sparsity": self.current, "masked": self.masks.is_some() }))
    }

    fn load_state(&mut self, state: &serde_json::Value) -> brisk_train::Result<()> {
        self.current = state["sparsity"].as_f64().unwrap_or(0.0);
        Ok(())
    }

    fn on_start(&mut self, net: &Network) -> brisk_train::Result<()> {
        // After a resume the checkpoint's zeros are the masks in force.
        if self.current > 0.0 {
            self.masks = Some(Masks::from_zeros(net, &self.exclude).map_err(to_train)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use candle_core::Device;

    fn tiny() -> Result<Network> {
        let mut spec = ModelSpec::resnet18_cifar(4).with_width(0.0625);
        spec.image_size = 8;
        Ok(Network::new(spec, 5, &Device::Cpu)?)
    }

    #[test]
    fn magnitude_masks_hit_the_target_and_spare_exclusions() -> Result<()> {
        for scope in [Scope::Global, Scope::Layer] {
            let net = tiny()?;
            let masks = Masks::magnitude(&net, 0.8, scope, &default_exclusions())?;
            masks.apply()?;
            let s = masks.sparsity()?;
            assert!((s - 0.8).abs() < 0.01, "{scope:?}: {s}");
            let layers = masks.layer_sparsity()?;
            assert!(layers
                .iter()
                .all(|(n, _, _)| n != "conv1.weight" && n != "fc.weight"));
            if scope == Scope::Layer {
                for (name, zeros, total) in &layers {
                    let f = *zeros as f64 / *total as f64;
                    assert!((f - 0.8).abs() < 0.05, "{name}: {f}");
                }
            }
            // The kept weights are the largest: every kept magnitude >= every pruned one
            // (checked globally for the global scope).
            let named = net.named_tensors()?;
            let first = named.iter().find(|(n, _)| n == "conv1.weight").expect("stem");
            assert_eq!(
                first
                    .1
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .filter(|v| **v == 0.0)
                    .count(),
                0
            );
        }
        Ok(())
    }

    #[test]
    fn the_cubic_schedule_gives_zhu_and_guptas_values() -> Result<()> {
        let s = PruneSchedule {
            initial: 0.0,
            final_sparsity: 0.8,
            start: 100,
            every: 10,
            count: 10,
        };
        s.validate()?;
        let check = |t: u64, want: f64| {
            let got = s.sparsity_at(t);
            assert!((got - want).abs() < 1e-12, "t={t}: {got} vs {want}");
        };
        check(0, 0.0);
        check(100, 0.0);
        // Half-way: 0.8 − 0.8·(1 − 0.5)³ = 0.7.
        check(150, 0.7);
        check(110, 0.8 - 0.8 * 0.9f64.powi(3));
        check(200, 0.8);
        check(1000, 0.8);
        assert!(s.prunes_at(100) && s.prunes_at(130) && s.prunes_at(200));
        assert!(!s.prunes_at(105) && !s.prunes_at(210) && !s.prunes_at(99));
        assert!(PruneSchedule { every: 0, ..s }.validate().is_err());
        assert!(PruneSchedule { initial: 0.9, ..s }.validate().is_err());
        Ok(())
    }

    #[test]
    fn bad_targets_are_errors() -> Result<()> {
        let net = tiny()?;
        let e = Masks::magnitude(&net, 1.0, Scope::Global, &[])
            .expect_err("100%")
            .to_string();
        assert!(e.contains("sparsity"), "{e}");
        let e = Masks::magnitude(
            &net,
            0.5,
            Scope::Global,
            &[
                "layer1".into(),
                "layer2".into(),
                "layer3".into(),
                "layer4".into(),
                "conv1".into(),
                "fc".into(),
            ],
        )
        .expect_err("all excluded")
        .to_string();
        assert!(e.contains("excluded"), "{e}");
        Ok(())
    }
}
