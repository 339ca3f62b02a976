//! `GradientAllReduce`: the training hook of a data-parallel run (Horovod's recipe), and
//! `CommBatchNormSync`, synchronised batch-norm over a communicator.

use std::sync::Arc;

use brisk_models::Network;
use brisk_ops::BatchNormSync;
use brisk_train::{Hook, StepAction, StepContext};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::comm::Communicator;
use crate::fusion::all_reduce_mean_fused;

/// Synchronised batch-norm's per-channel sums, all-reduced over `comm`.
#[derive(Debug)]
pub struct CommBatchNormSync(pub Arc<dyn Communicator>);

impl BatchNormSync for CommBatchNormSync {
    fn all_reduce_sum(&self, values: &mut [f64]) -> candle_core::Result<()> {
        self.0
            .all_reduce_sum_f64(values)
            .map_err(|e| candle_core::Error::Msg(format!("synchronised batch-norm: {e}")))
    }
}

/// Horovod's default tensor-fusion buffer: 64 MiB.
pub const DEFAULT_FUSION_BYTES: usize = 64 << 20;

/// Averages gradients across ranks after every backward pass, packing them into fused
/// buffers of at most `fusion_bytes` (a larger tensor goes alone) so that a step makes
/// few large all-reduces rather than one per tensor; broadcasts rank 0's weights and
/// running statistics when training starts; averages the running statistics before
/// evaluations and checkpoints; sums evaluation figures across ranks.
#[derive(Debug)]
pub struct GradientAllReduce {
    comm: Arc<dyn Communicator>,
    fusion_bytes: usize,
    /// Seconds spent averaging gradients so far (packing and the all-reduces).
    comm_s: f64,
}

impl GradientAllReduce {
    pub fn new(comm: Arc<dyn Communicator>, fusion_bytes: usize) -> Self {
        GradientAllReduce {
            comm,
            fusion_bytes: fusion_bytes.max(4),
            comm_s: 0.0,
        }
    }

    fn err(&self, e: crate::Error) -> brisk_train::Error {
        brisk_train::Error::State {
            problem: format!(
                "distributed (rank {} of {}): {e}",
                self.comm.rank(),
                self.comm.world()
            ),
        }
    }
}

impl Hook for GradientAllReduce {
    fn name(&self) -> &'static str {
        "gradient_all_reduce"
    }

    fn on_start(&mut self, net: &Network) -> brisk_train::Result<()> {
        for (_, var) in net.all_vars()? {
            let t = var.as_tensor();
            let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.comm.broadcast(&mut values, 0).map_err(|e| self.err(e))?;
            var.set(&Tensor::from_vec(values, t.dims(), t.device())?)?;
        }
        Ok(())
    }

    fn synchronize(&mut self, net: &Network) -> brisk_train::Result<()> {
        if self.comm.world() == 1 {
            return Ok(());
        }
        // Batch-norm running statistics, which each rank updated from its own batches.
        let stats = net.buffer_vars()?;
        let mut fused = Vec::new();
        for (_, var) in &stats {
            fused.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        self.comm.all_reduce_sum(&mut fused).map_err(|e| self.err(e))?;
        let inv = 1.0 / self.comm.world() as f32;
        let mut offset = 0;
        for (_, var) in &stats {
            let t = var.as_tensor();
            let n = t.elem_count();
            let mean: Vec<f32> = fused[offset..offset + n].iter().map(|v| v * inv).collect();
            offset += n;
            var.set(&Tensor::from_vec(mean, t.dims(), t.device())?)?;
        }
        Ok(())
    }

    fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![("allreduce_s_total", self.comm_s)]
    }

    fn after_backward(
        &mut self,
        ctx: &StepContext,
        grads: &mut GradStore,
    ) -> brisk_train::Result<StepAction> {
        let start = std::time::Instant::now();
        // Every rank contributes every parameter, zeros where it has no gradient, so the
        // buffers line up.
        let mut values = Vec::with_capacity(ctx.params.len());
        for (_, var) in ctx.params {
            values.push(match grads.get(var) {
                Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0f32; var.as_tensor().elem_count()],
            });
        }
        all_reduce_mean_fused(self.comm.as_ref(), &mut values, self.fusion_bytes).map_err(|e| self.err(e))?;
        for ((_, var), mean) in ctx.params.iter().zip(values) {
            let t = var.as_tensor();
            grads.insert(t, Tensor::from_vec(mean, t.dims(), t.device())?);
        }
        self.comm_s += start.elapsed().as_secs_f64();
        Ok(StepAction::Apply)
    }

    fn reduce_sums(&mut self, sums: &mut [f64]) -> brisk_train::Result<()> {
        self.comm.all_reduce_sum_f64(sums).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Local;
    use crate::testing::run_ranks;
    use brisk_models::ModelSpec;
    use brisk_testkit::randn;
    use candle_core::Device;

    /// A rank's gradients before and after the all-reduce, and its first weight tensor
    /// after the start-of-training broadcast.
    type RankResult = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<f32>);

    fn net(seed: u64) -> crate::Result<Network> {
        let mut spec = ModelSpec::resnet18_cifar(3).with_width(0.0625);
        spec.image_size = 8;
        Ok(Network::new(spec, seed, &Device::Cpu)?)
    }

    /// Every parameter's gradient as a flat vector, in parameter order.
    fn grad_values(
        params: &[(String, candle_core::Var)],
        grads: &GradStore,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        params
            .iter()
            .map(|(_, v)| grads.get(v).expect("grad").flatten_all()?.to_vec1::<f32>())
            .collect()
    }

    /// Each rank's gradients of its own batch, before any reduction.
    fn local_grads(net: &Network, seed: u64) -> anyhow::Result<(Vec<(String, candle_core::Var)>, GradStore)> {
        let x = randn(1, 0.0, 1.0, (2, 3, 8, 8))?.affine(1.0, seed as f64)?;
        let loss = net.forward_t(&x, true)?.sqr()?.mean_all()?;
        Ok((net.trainable_vars()?, loss.backward()?))
    }

    #[test]
    fn ranks_agree_on_weights_and_average_gradients_in_any_fusion() -> anyhow::Result<()> {
        for fusion in [DEFAULT_FUSION_BYTES, 4096] {
            let results = run_ranks(2, move |comm| -> anyhow::Result<RankResult> {
                let rank = comm.rank();
                let mut hook = GradientAllReduce::new(comm, fusion);
                // Different initial weights per rank: rank 0's must win.
                let net = net(10 + rank as u64)?;
                hook.on_start(&net)?;
                let weights = net.named_tensors()?[0].1.flatten_all()?.to_vec1::<f32>()?;
                let (params, mut grads) = local_grads(&net, rank as u64)?;
                let before = grad_values(&params, &grads)?;
                let ctx = StepContext {
                    net: &net,
                    params: &params,
                    step: 0,
                    epoch: 0,
                    progress: 0.0,
                };
                hook.after_backward(&ctx, &mut grads)?;
                let after = grad_values(&params, &grads)?;
                let mut sums = [rank as f64 + 1.0, 10.0];
                hook.reduce_sums(&mut sums)?;
                assert_eq!(sums, [3.0, 20.0]);
                Ok((before, after, weights))
            })?;
            let (b0, a0, w0) = &results[0];
            let (b1, a1, w1) = &results[1];
            assert_eq!(w0, w1, "rank 1 must start from rank 0's weights");
            assert_eq!(
                w0,
                &net(10)?.named_tensors()?[0].1.flatten_all()?.to_vec1::<f32>()?
            );
            // Both ranks hold the same averaged gradient, the mean of their own.
            for t in 0..a0.len() {
                for i in 0..a0[t].len() {
                    let want = (b0[t][i] + b1[t][i]) / 2.0;
                    assert!(
                        (a0[t][i] - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "fusion {fusion}"
                    );
                    assert_eq!(a0[t][i], a1[t][i]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_single_process_is_left_as_it_is() -> anyhow::Result<()> {
        let net = net(1)?;
        let (params, mut grads) = local_grads(&net, 0)?;
        let before = grad_values(&params, &grads)?.remove(0);
        let mut hook = GradientAllReduce::new(Arc::new(Local), DEFAULT_FUSION_BYTES);
        let ctx = StepContext {
            net: &net,
            params: &params,
            step: 0,
            epoch: 0,
            progress: 0.0,
        };
        hook.after_backward(&ctx, &mut grads)?;
        assert_eq!(grad_values(&params, &grads)?.remove(0), before);
        Ok(())
    }
}
