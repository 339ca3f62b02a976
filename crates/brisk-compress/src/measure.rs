//! The figures the compression commands report for a model: non-zero parameters, MACs,
//! file size and test accuracy (brisk-schema's `Figures`).

use std::path::Path;
use std::sync::Arc;

use brisk_data::{Dataset, Split};
use brisk_models::Network;
use brisk_schema::Figures;

use crate::error::Result;

/// Images per evaluation batch when measuring.
const EVAL_BATCH: usize = 256;

/// Trainable parameters that are not exactly zero (what pruning removes).
pub fn nonzero_params(net: &Network) -> Result<u64> {
    let mut n = 0;
    for (_, v) in net.trainable_vars()? {
        let values = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        n += values.iter().filter(|x| **x != 0.0).count() as u64;
    }
    Ok(n)
}

/// `net`'s figures: evaluated on `data`'s test split, its size read from `file` (0 when
/// the file is absent).
pub fn measure(net: &Network, data: &Arc<Dataset>, file: &Path, flip: bool) -> Result<Figures> {
    let scope = brisk_train::EvalScope {
        flip,
        ..brisk_train::EvalScope::all(Split::Test, EVAL_BATCH)
    };
    let r = brisk_train::evaluate(net, data, scope, (0, 1), &mut |_| Ok(()))?;
    let spec = net.spec();
    Ok(Figures {
        params: nonzero_params(net)?,
        macs: spec.macs(spec.image_size),
        bytes: std::fs::metadata(file).map_or(0, |m| m.len()),
        top1: r.top1,
        top5: r.top5,
        loss: r.loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_models::ModelSpec;
    use candle_core::Device;

    #[test]
    fn zeros_are_not_counted() -> Result<()> {
        let mut spec = ModelSpec::resnet18_cifar(3).with_width(0.0625);
        spec.image_size = 8;
        let net = Network::new(spec.clone(), 1, &Device::Cpu)?;
        // Freshly initialised: batch-norm biases are zero, everything else is not.
        let bn_biases: usize = spec
            .tensors()
            .iter()
            .filter(|t| t.role == brisk_models::Role::BnBias)
            .map(|t| t.numel())
            .sum();
        assert_eq!(nonzero_params(&net)?, (spec.param_count() - bn_biases) as u64);
        let Some((_, w)) = net
            .trainable_vars()?
            .into_iter()
            .find(|(n, _)| n == "conv1.weight")
        else {
            panic!("the stem convolution is missing");
        };
        w.set(&w.as_tensor().zeros_like()?)?;
        assert_eq!(
            nonzero_params(&net)?,
            (spec.param_count() - bn_biases - w.as_tensor().elem_count()) as u64
        );
        Ok(())
    }
}
