//! Structured (filter) pruning: removes output channels of each block's first
//! convolution — the block-internal channels — and the matching input channels of its
//! second, producing a smaller dense `ModelSpec` and weights that load and run as an
//! ordinary model.
//!
//! Why only block-internal channels: the channels a block outputs are added to its
//! shortcut, so every block of a stage (and the projection shortcuts) shares them;
//! removing one means removing it from the whole residual stream at once. The
//! block-internal channels (`mid`: conv1 → bn1 → conv2) are free of that coupling, and
//! in a BasicBlock both convolutions scale with them, so keeping half of them removes
//! about half of the model's multiply-accumulates.

use std::collections::HashMap;
use std::path::Path;

use brisk_models::{Network, Role};
use brisk_spec::tensor_name;
use brisk_spec::tensors::BATCH_NORM_ROLES;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How filters are ranked (the lowest go).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterCriterion {
    /// L1 norm of the filter's weights (Li et al., "Pruning Filters for Efficient ConvNets").
    #[default]
    L1,
    /// |γ| of the batch-norm after the filter (Liu et al., "Network Slimming").
    BnScale,
}

impl FilterCriterion {
    pub const ALL: [FilterCriterion; 2] = [FilterCriterion::L1, FilterCriterion::BnScale];
    pub const NAMES: [&'static str; 2] = [FilterCriterion::L1.name(), FilterCriterion::BnScale.name()];

    /// The name `--criterion` takes.
    pub const fn name(self) -> &'static str {
        match self {
            FilterCriterion::L1 => "l1",
            FilterCriterion::BnScale => "bn-scale",
        }
    }
}

impl std::str::FromStr for FilterCriterion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        FilterCriterion::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "criterion",
                problem: format!("{s:?} is not one of {}", FilterCriterion::NAMES.join(", ")),
            })
    }
}

/// The indices of the `keep` highest `scores`, in ascending index order.
fn top(scores: &[f32], keep: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<u32> = order[..keep].iter().map(|&i| i as u32).collect();
    kept.sort_unstable();
    kept
}

/// The channel indices each block kept, by block name (`layer2.1`).
pub type KeptChannels = Vec<(String, Vec<u32>)>;

/// A copy of `net` keeping the fraction `keep` (at least one) of each block's internal
/// channels, ranked by `criterion`. Returns the smaller network (its spec lists the
/// channel counts explicitly) and, per block, the indices kept.
pub fn prune_filters(
    net: &Network,
    keep: f64,
    criterion: FilterCriterion,
) -> Result<(Network, KeptChannels)> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(Error::InvalidConfig {
            field: "keep",
            problem: format!("the fraction of channels kept must be in (0, 1], got {keep}"),
        });
    }
    let mut tensors: HashMap<String, Tensor> = net.named_tensors()?.into_iter().collect();
    let take = |t: &HashMap<String, Tensor>, n: &str| {
        t.get(n).cloned().ok_or_else(|| Error::InvalidConfig {
            field: "model",
            problem: format!("tensor `{n}` is missing"),
        })
    };
    let mut spec = net.spec().clone();
    let mut channels = spec.resolved_channels();
    let mut kept_all = Vec::new();
    for (i, plan) in spec.blocks().iter().enumerate() {
        let (conv1, bn1, conv2) = (
            tensor_name(&plan.conv1(), Role::ConvWeight),
            plan.bn1(),
            tensor_name(&plan.conv2(), Role::ConvWeight),
        );
        let conv1_weight = take(&tensors, &conv1)?;
        let scores: Vec<f32> = match criterion {
            FilterCriterion::L1 => conv1_weight.abs()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()?,
            FilterCriterion::BnScale => take(&tensors, &tensor_name(&bn1, Role::BnWeight { zero: false }))?
                .abs()?
                .to_vec1::<f32>()?,
        };
        let k = ((plan.mid as f64 * keep).round() as usize).clamp(1, plan.mid);
        let kept = top(&scores, k);
        let idx = Tensor::new(kept.as_slice(), &Device::Cpu)?;
        let select = |t: Tensor, dim: usize| t.to_device(&Device::Cpu)?.index_select(&idx, dim);
        tensors.insert(conv1, select(conv1_weight, 0)?);
        for role in BATCH_NORM_ROLES {
            let name = tensor_name(&bn1, role);
            let t = take(&tensors, &name)?;
            tensors.insert(name, select(t, 0)?);
        }
        let conv2_weight = take(&tensors, &conv2)?;
        tensors.insert(conv2, select(conv2_weight, 1)?);
        channels.blocks[i].mid = k;
        kept_all.push((plan.name.clone(), kept));
    }
    spec.channels = Some(channels);
    let pruned = Network::from_named(
        spec,
        tensors.into_iter().collect(),
        Path::new("filter pruning"),
        &Device::Cpu,
    )?;
    Ok((pruned, kept_all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use brisk_testkit::randn;

    /// The pruned model computes exactly what the original computes with the removed
    /// channels silenced: their conv1 filters and their bn1 γ and β set to zero (so the
    /// batch-norm shift cannot leak a constant through them).
    #[test]
    fn a_pruned_model_equals_the_original_with_those_channels_silenced() -> Result<()> {
        let dev = Device::Cpu;
        for (spec, criterion) in [
            (
                ModelSpec::resnet18_cifar(10).with_width(0.25),
                FilterCriterion::L1,
            ),
            (
                ModelSpec::seresnet18_cifar(10).with_width(0.25),
                FilterCriterion::BnScale,
            ),
        ] {
            let mut spec = spec;
            spec.image_size = 16;
            let net = Network::new(spec, 6, &dev)?;
            let x = randn(1, 0.0, 1.0, (4, 3, 16, 16))?;
            for _ in 0..2 {
                net.forward_t(&x, true)?; // non-trivial running statistics
            }
            let (pruned, kept) = prune_filters(&net, 0.5, criterion)?;
            // Silence the removed channels in a copy of the original.
            let mut silenced = Vec::new();
            let kept: HashMap<String, Vec<u32>> = kept.into_iter().collect();
            for (name, t) in net.named_tensors()? {
                let block = name.split(".conv1.").next().filter(|_| name.contains(".conv1."));
                let block = block.or_else(|| {
                    name.split(".bn1.").next().filter(|_| {
                        name.contains(".bn1.") && (name.ends_with("weight") || name.ends_with("bias"))
                    })
                });
                let t = match block.and_then(|b| kept.get(b)) {
                    Some(keep) => {
                        let rows = t.dim(0)?;
                        let mask: Vec<f32> = (0..rows)
                            .map(|r| if keep.contains(&(r as u32)) { 1.0 } else { 0.0 })
                            .collect();
                        let mut shape = vec![rows];
                        shape.extend(std::iter::repeat_n(1, t.rank() - 1));
                        t.broadcast_mul(&Tensor::from_vec(mask, shape, &dev)?)?
                    }
                    None => t,
                };
                silenced.push((name, t));
            }
            let silenced = Network::from_named(net.spec().clone(), silenced, Path::new("test"), &dev)?;
            let want = silenced.forward_t(&x, false)?;
            let got = pruned.forward_t(&x, false)?;
            let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let err = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{criterion:?}: {err} (scale {scale})"
            );
            // Half the block-internal channels: markedly fewer MACs and parameters.
            let (before, after) = (net.spec().macs(16), pruned.spec().macs(16));
            assert!((after as f64) < 0.6 * before as f64, "MACs {before} -> {after}");
            assert!(pruned.spec().param_count() < net.spec().param_count());
        }
        assert!(prune_filters(
            &Network::new(ModelSpec::resnet18_cifar(10).with_width(0.0625), 0, &dev)?,
            0.0,
            FilterCriterion::L1
        )
        .is_err());
        Ok(())
    }
}
