//! Memory plans: where each buffer of a training step lives in one workspace, found once
//! per (model, batch, precision) by running the executor on [`Planner`], a backend that
//! computes nothing and records when each buffer is made and dropped.
//!
//! The executor makes its buffers in the same order every step (it walks the same block
//! plan), so the k-th buffer of the trace is the k-th buffer of every step. A backend
//! whose allocations are costly or must stay put — a GPU, where a captured CUDA graph
//! replays fixed addresses — takes buffer k at [`MemoryPlan::offset`]`(k)` of one
//! workspace of [`MemoryPlan::peak`] values. On the CPU, glibc's heap already reuses freed
//! blocks from step to step (`brisk_ops::keep_freed_memory`; about a dozen page faults a
//! step), so the CPU backend allocates as before and the plan serves as its memory
//! report: the values a step holds at once, and what one workspace needs for them.

use std::sync::{Arc, Mutex};

use brisk_ops::ConvShape;
use brisk_precision::Dtype;
use brisk_spec::PoolPlan;

use crate::backend::{Backend, BnArgs};
use crate::engine::Executor;
use crate::error::{Error, Result};
use crate::network::Network;

/// One buffer of a step: its length in f32 values and the span of the trace in which it
/// is live, `[start, end)` in allocation/free events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub len: usize,
    pub start: usize,
    pub end: usize,
}

impl Lifetime {
    /// Whether two buffers are live at the same moment.
    pub fn overlaps(&self, other: &Lifetime) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Offsets in one workspace for buffers with known lifetimes, so that no two buffers
/// live at the same moment share memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    lifetimes: Vec<Lifetime>,
    offsets: Vec<usize>,
    peak: usize,
}

impl MemoryPlan {
    /// Places `lifetimes` "greedy by size" (Pisarchyk & Lee, 2020, "Efficient Memory
    /// Management for Deep Neural Net Inference"): largest first, each in the lowest gap
    /// between the buffers already placed that are live with it and where it fits.
    pub fn new(lifetimes: Vec<Lifetime>) -> Self {
        let mut order: Vec<usize> = (0..lifetimes.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(lifetimes[i].len), lifetimes[i].start));
        let mut offsets = vec![0usize; lifetimes.len()];
        let mut placed: Vec<usize> = Vec::with_capacity(lifetimes.len());
        let mut peak = 0;
        for i in order {
            let me = lifetimes[i];
            // The placed buffers live with this one, by offset.
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&j| lifetimes[j].overlaps(&me))
                .map(|&j| (offsets[j], offsets[j] + lifetimes[j].len))
                .collect();
            busy.sort_unstable();
            let mut at = 0;
            for (lo, hi) in busy {
                if lo >= at + me.len {
                    break;
                }
                at = at.max(hi);
            }
            offsets[i] = at;
            peak = peak.max(at + me.len);
            placed.push(i);
        }
        MemoryPlan {
            lifetimes,
            offsets,
            peak,
        }
    }

    /// The buffers, in the order they are made.
    pub fn lifetimes(&self) -> &[Lifetime] {
        &self.lifetimes
    }

    /// Where buffer `k` starts in the workspace (in values).
    pub fn offset(&self, k: usize) -> usize {
        self.offsets[k]
    }

    /// The workspace's length in values: the plan's peak.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// The most values live at one moment: what allocating each buffer on its own needs
    /// at least, and a lower bound for any plan.
    pub fn live_peak(&self) -> usize {
        let mut events: Vec<(usize, isize)> = self
            .lifetimes
            .iter()
            .flat_map(|l| [(l.start, l.len as isize), (l.end, -(l.len as isize))])
            .collect();
        // Frees before allocations at the same event index: `end` is exclusive.
        events.sort_unstable_by_key(|&(at, delta)| (at, delta));
        let (mut live, mut most) = (0isize, 0isize);
        for (_, delta) in events {
            live += delta;
            most = most.max(live);
        }
        most as usize
    }

    /// Two buffers live at the same moment whose memory overlaps, if the plan has any
    /// (it never should: the property the tests check).
    pub fn conflict(&self) -> Option<(usize, usize)> {
        let n = self.lifetimes.len();
        (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .find(|&(i, j)| {
                let (a, b) = (&self.lifetimes[i], &self.lifetimes[j]);
                let (oa, ob) = (self.offsets[i], self.offsets[j]);
                a.len > 0 && b.len > 0 && a.overlaps(b) && oa < ob + b.len && ob < oa + a.len
            })
    }
}

/// What the planner records: each buffer's length and the events at which it was made
/// and dropped.
#[derive(Debug, Default)]
struct Trace {
    events: usize,
    buffers: Vec<(usize, usize, Option<usize>)>,
}

impl Trace {
    fn alloc(&mut self, len: usize) -> usize {
        let id = self.buffers.len();
        self.buffers.push((len, self.events, None));
        self.events += 1;
        id
    }

    fn free(&mut self, id: usize) {
        if let Some(b) = self.buffers.get_mut(id) {
            b.2 = Some(self.events);
            self.events += 1;
        }
    }
}

/// A [`Planner`] buffer: its length and its entry in the trace. Cloning makes a new
/// buffer; dropping frees it.
#[derive(Debug, Default)]
pub struct PlannedBuf {
    len: usize,
    id: usize,
    trace: Option<Arc<Mutex<Trace>>>,
}

impl Clone for PlannedBuf {
    fn clone(&self) -> Self {
        match &self.trace {
            Some(trace) => new_buf(trace, self.len),
            None => PlannedBuf::default(),
        }
    }
}

impl Drop for PlannedBuf {
    fn drop(&mut self) {
        if let Some(trace) = &self.trace {
            if let Ok(mut t) = trace.lock() {
                t.free(self.id);
            }
        }
    }
}

fn new_buf(trace: &Arc<Mutex<Trace>>, len: usize) -> PlannedBuf {
    let id = trace.lock().map(|mut t| t.alloc(len)).unwrap_or(usize::MAX);
    PlannedBuf {
        len,
        id,
        trace: Some(trace.clone()),
    }
}

/// A backend that computes nothing: each operation makes buffers of the lengths the CPU
/// backend's would have, and the trace says when each was made and dropped.
#[derive(Debug, Default)]
pub struct Planner {
    trace: Arc<Mutex<Trace>>,
}

impl Planner {
    fn buf(&self, len: usize) -> PlannedBuf {
        new_buf(&self.trace, len)
    }

    /// The buffers made so far and dropped since: every buffer still held (the weights,
    /// read once per step and kept) is left out.
    fn lifetimes(&self) -> Result<Vec<Lifetime>> {
        let trace = self.trace.lock().map_err(|_| {
            Error::Candle(candle_core::Error::Msg(
                "memory planner: a thread panicked while recording".into(),
            ))
        })?;
        Ok(trace
            .buffers
            .iter()
            .filter_map(|&(len, start, end)| {
                Some(Lifetime {
                    len,
                    start,
                    end: end?,
                })
            })
            .collect())
    }
}

impl Backend for Planner {
    type Buf = PlannedBuf;

    fn name(&self) -> &'static str {
        "planner"
    }
    fn upload(&self, values: Vec<f32>) -> Result<PlannedBuf> {
        Ok(self.buf(values.len()))
    }
    fn download(&self, buf: &PlannedBuf) -> Result<Vec<f32>> {
        Ok(vec![0.0; buf.len])
    }
    fn download_owned(&self, buf: PlannedBuf) -> Result<Vec<f32>> {
        Ok(vec![0.0; buf.len])
    }
    fn conv_forward(
        &self,
        g: &ConvShape,
        _: &PlannedBuf,
        _: &PlannedBuf,
        _: brisk_ops::Products,
    ) -> Result<PlannedBuf> {
        Ok(self.buf(g.n * g.out_len()))
    }
    fn conv_input_grad(
        &self,
        g: &ConvShape,
        _: &PlannedBuf,
        _: &PlannedBuf,
        _: brisk_ops::Products,
    ) -> Result<PlannedBuf> {
        Ok(self.buf(g.n * g.in_len()))
    }
    fn conv_weight_grad(
        &self,
        g: &ConvShape,
        _: &PlannedBuf,
        _: &PlannedBuf,
        _: brisk_ops::Products,
    ) -> Result<PlannedBuf> {
        Ok(self.buf(g.cout * g.cin * g.k * g.k))
    }
    fn bn_stats(&self, _: &PlannedBuf, (_, c, _): (usize, usize, usize)) -> Result<PlannedBuf> {
        Ok(self.buf(2 * c))
    }
    fn bn_normalize(
        &self,
        x: &PlannedBuf,
        _: &BnArgs<PlannedBuf>,
        _: bool,
        _: Option<&PlannedBuf>,
    ) -> Result<PlannedBuf> {
        Ok(self.buf(x.len))
    }
    fn bn_grad_sums(&self, _: &PlannedBuf, _: &PlannedBuf, p: &BnArgs<PlannedBuf>) -> Result<PlannedBuf> {
        Ok(self.buf(2 * p.c))
    }
    fn bn_input_grad(
        &self,
        _: &PlannedBuf,
        _: &mut PlannedBuf,
        _: &BnArgs<PlannedBuf>,
        _: &PlannedBuf,
    ) -> Result<()> {
        Ok(())
    }
    fn relu_backward(&self, _: &PlannedBuf, _: &mut PlannedBuf) -> Result<()> {
        Ok(())
    }
    fn add_assign(&self, _: &mut PlannedBuf, _: &PlannedBuf) -> Result<()> {
        Ok(())
    }
    fn round_half(&self, _: &mut PlannedBuf, _: Dtype) -> Result<()> {
        Ok(())
    }
    fn add_relu(&self, _: &mut PlannedBuf, _: &PlannedBuf) -> Result<()> {
        Ok(())
    }
    fn relu(&self, _: &mut PlannedBuf) -> Result<()> {
        Ok(())
    }
    fn sigmoid(&self, _: &mut PlannedBuf) -> Result<()> {
        Ok(())
    }
    fn relu_mask(&self, d: &PlannedBuf, _: &PlannedBuf) -> Result<PlannedBuf> {
        Ok(self.buf(d.len))
    }
    fn max_pool(
        &self,
        pool: &PoolPlan,
        _: &PlannedBuf,
        planes: usize,
        (h, w): (usize, usize),
    ) -> Result<PlannedBuf> {
        Ok(self.buf(planes * pool.out_size(h) * pool.out_size(w)))
    }
    fn max_pool_backward(
        &self,
        _: &PoolPlan,
        x: &PlannedBuf,
        _: &PlannedBuf,
        _: usize,
        _: (usize, usize),
    ) -> Result<PlannedBuf> {
        Ok(self.buf(x.len))
    }
    fn global_average(&self, _: &PlannedBuf, planes: usize, _: usize) -> Result<PlannedBuf> {
        Ok(self.buf(planes))
    }
    fn spread_average(&self, _: &PlannedBuf, planes: usize, hw: usize) -> Result<PlannedBuf> {
        Ok(self.buf(planes * hw))
    }
    fn dense(
        &self,
        _: &PlannedBuf,
        _: &PlannedBuf,
        _: &PlannedBuf,
        (n, _, fout): (usize, usize, usize),
    ) -> Result<PlannedBuf> {
        Ok(self.buf(n * fout))
    }
    fn dense_backward(
        &self,
        _: &PlannedBuf,
        _: &PlannedBuf,
        _: &PlannedBuf,
        (n, fin, fout): (usize, usize, usize),
    ) -> Result<(PlannedBuf, PlannedBuf, PlannedBuf)> {
        Ok((self.buf(n * fin), self.buf(fout * fin), self.buf(fout)))
    }
    fn scale_planes(&self, y: &PlannedBuf, _: &PlannedBuf, _: usize) -> Result<PlannedBuf> {
        Ok(self.buf(y.len))
    }
    fn gate_grad(&self, _: &PlannedBuf, _: &PlannedBuf, gate: &PlannedBuf, _: usize) -> Result<PlannedBuf> {
        Ok(self.buf(gate.len))
    }
    fn scale_planes_backward(
        &self,
        _: &PlannedBuf,
        gate: &PlannedBuf,
        _: &PlannedBuf,
        hw: usize,
    ) -> Result<PlannedBuf> {
        Ok(self.buf(gate.len * hw))
    }
}

/// What a step of `net` on a batch of `n` holds: the memory plan of a training step
/// (forward, then backward from the logits' gradient) or of an eval forward, found by
/// running the executor on the [`Planner`]. Nothing of `net` changes.
pub fn plan_step(net: &Network, n: usize, train: bool) -> Result<MemoryPlan> {
    let planner = Planner::default();
    let trace = planner.trace.clone();
    let mut exec = Executor::with_backend(net, planner)?.detached();
    let spec = net.spec();
    let images = vec![0f32; n * spec.in_channels * spec.image_size * spec.image_size];
    if train {
        let logits = exec.forward_train(&images, n)?;
        drop(exec.backward(&logits)?);
    } else {
        drop(exec.forward_eval(&images, n)?);
    }
    let lifetimes = Planner { trace }.lifetimes()?;
    drop(exec);
    Ok(MemoryPlan::new(lifetimes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_spec::ModelSpec;
    use candle_core::Device;

    /// A small deterministic generator (SplitMix64) for random lifetimes.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn random_plans_never_overlap_two_live_buffers() {
        let mut state = 7;
        for case in 0..300 {
            let count = 1 + (next(&mut state) % 60) as usize;
            let span = 1 + (next(&mut state) % 100) as usize;
            let lifetimes: Vec<Lifetime> = (0..count)
                .map(|_| {
                    let start = (next(&mut state) % span as u64) as usize;
                    let end = start + 1 + (next(&mut state) % 20) as usize;
                    // Some equal sizes, some zero-length: the ties and edges.
                    let len = (next(&mut state) % 9) as usize * [1, 7, 64, 1000][case % 4];
                    Lifetime { len, start, end }
                })
                .collect();
            let plan = MemoryPlan::new(lifetimes.clone());
            assert_eq!(plan.conflict(), None, "case {case}: {lifetimes:?}");
            let total: usize = lifetimes.iter().map(|l| l.len).sum();
            assert!(
                plan.live_peak() <= plan.peak() && plan.peak() <= total,
                "case {case}"
            );
            for (k, l) in lifetimes.iter().enumerate() {
                assert!(plan.offset(k) + l.len <= plan.peak());
            }
        }
    }

    #[test]
    fn the_conflict_check_finds_an_overlap() {
        // Two buffers live together, forced to one offset: the check must see it.
        let a = Lifetime {
            len: 4,
            start: 0,
            end: 2,
        };
        let b = Lifetime {
            len: 4,
            start: 1,
            end: 3,
        };
        let mut plan = MemoryPlan::new(vec![a, b]);
        assert_eq!(plan.conflict(), None);
        assert_eq!(plan.peak(), 8);
        plan.offsets = vec![0, 2];
        assert_eq!(plan.conflict(), Some((0, 1)));
        // Buffers live one after the other share memory.
        let c = Lifetime {
            len: 4,
            start: 3,
            end: 5,
        };
        assert_eq!(MemoryPlan::new(vec![a, c]).peak(), 4);
    }

    #[test]
    fn a_step_plan_holds_every_buffer_without_overlap() -> anyhow::Result<()> {
        for spec in [
            ModelSpec::resnet18_cifar(10).with_width(0.125),
            ModelSpec::seresnet18_cifar(10).with_width(0.125),
        ] {
            let net = Network::new(spec.clone(), 0, &Device::Cpu)?;
            let values = |net: &Network| -> anyhow::Result<Vec<Vec<f32>>> {
                net.all_vars()?
                    .iter()
                    .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
                    .collect()
            };
            let before = values(&net)?;
            let n = 4;
            let plan = plan_step(&net, n, true)?;
            assert_eq!(plan.conflict(), None);
            // At least the image, the first activation and the logits are in it, and the
            // plan is no larger than allocating each buffer alone would be at its worst.
            let side = spec.image_size;
            assert!(plan.live_peak() >= n * 3 * side * side + n * spec.classes);
            let total: usize = plan.lifetimes().iter().map(|l| l.len).sum();
            assert!(plan.live_peak() <= plan.peak() && plan.peak() < total);
            // The same trace twice (the executor's order is fixed), and a smaller one for
            // evaluation, which keeps nothing for a backward pass.
            assert_eq!(plan_step(&net, n, true)?, plan);
            let eval = plan_step(&net, n, false)?;
            assert!(eval.peak() < plan.peak());
            // Planning changed nothing in the network (running statistics included).
            assert!(before == values(&net)?, "planning changed the network");
        }
        Ok(())
    }
}
