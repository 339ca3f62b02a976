//! Batch-norm's slice kernels over NCHW f32 data, parallel over channels: statistics,
//! the normalisation with its epilogue, and the two gradient passes. No candle here: the
//! engine calls them on its own buffers and batchnorm.rs wraps them as candle ops.

use rayon::prelude::*;

use crate::fill::par_build;

/// What batch-norm's kernels read besides their data: the layout of `x` `[n, c, hw]`,
/// the statistics `[mean; var]` and the affine parameters `[γ; β]` (each `c` long), and
/// ε.
#[derive(Clone, Copy, Debug)]
pub struct BnParams<'a> {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub stats: &'a [f32],
    pub affine: &'a [f32],
    pub eps: f64,
}

impl BnParams<'_> {
    /// Per-channel constants: mean, 1/σ, γ, β.
    fn channels(&self) -> Vec<Channel> {
        let c = self.c;
        (0..c)
            .map(|ch| Channel {
                mean: self.stats[ch],
                inv_std: (1.0 / (self.stats[c + ch] as f64 + self.eps).sqrt()) as f32,
                gamma: self.affine[ch],
                beta: self.affine[c + ch],
            })
            .collect()
    }
}

/// The N contiguous `H*W` segments of channel `ch`.
fn channel_segments(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    ch: usize,
) -> impl Iterator<Item = &[f32]> + '_ {
    (0..n).map(move |i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// `Σ f(v)` over `s` in 16 independent f32 lanes, so the compiler can vectorise it.
#[inline]
fn lane_sum(s: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = s.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Per channel of `x` `[n, c, hw]`: the sum, the (f32) mean m, and the sum of squares
/// about m — sums in 16 f32 lanes within a plane (vectorised), f64 across planes.
pub(super) fn channel_moments(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f32, f64)> {
    let count = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = channel_segments(x, n, c, hw, ch)
                .map(|s| lane_sum(s, |v| v) as f64)
                .sum();
            let m = (sum / count) as f32;
            let sq: f64 = channel_segments(x, n, c, hw, ch)
                .map(|s| lane_sum(s, |v| (v - m) * (v - m)) as f64)
                .sum();
            (sum, m, sq)
        })
        .collect()
}

/// `[mean(c); biased var(c)]` from [`channel_moments`] over `count` values a channel.
pub(super) fn moments_to_stats(per_channel: &[(f64, f32, f64)], count: f64) -> Vec<f32> {
    let mut out: Vec<f32> = per_channel.iter().map(|p| p.1).collect();
    out.extend(per_channel.iter().map(|p| (p.2 / count) as f32));
    out
}

/// Per-channel mean and biased variance of `x` `[n, c, hw]` (f32 slices): `[mean(c);
/// var(c)]`, as batch-norm's training statistics.
pub fn bn_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    moments_to_stats(&channel_moments(x, n, c, hw), (n * hw) as f64)
}

/// `relu?(γ (x − mean) / sqrt(var + eps) + β + residual?)` over `x`, with the constants
/// of `p`.
pub fn bn_normalize(x: &[f32], p: &BnParams, relu: bool, residual: Option<&[f32]>) -> Vec<f32> {
    let (c, hw) = (p.c, p.hw);
    let ch = p.channels();
    par_build(x.len(), hw, |i, yo| {
        let xi = &x[i * hw..][..yo.len()];
        let p = &ch[i % c];
        let scale = p.gamma * p.inv_std;
        let shift = p.beta - p.mean * scale;
        let act = |v: f32| if relu { v.max(0.0) } else { v };
        match residual {
            Some(r) => {
                for ((o, &v), &rv) in yo.iter_mut().zip(xi).zip(&r[i * hw..(i + 1) * hw]) {
                    *o = act(v * scale + shift + rv);
                }
            }
            None => {
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = act(v * scale + shift);
                }
            }
        }
    })
}

/// Batch-norm's weight and bias gradients from the gradient `dz` reaching its affine
/// output: `[Σ dz·x̂ (c); Σ dz (c)]` over `x`, f64 accumulation (`p.affine` is not read).
pub fn bn_grad_sums(x: &[f32], dz: &[f32], p: &BnParams) -> Vec<f32> {
    let (n, c, hw) = (p.n, p.c, p.hw);
    let ch = BnParams {
        affine: &vec![1f32; 2 * c],
        ..*p
    }
    .channels();
    let sums: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|k| {
            let p = &ch[k];
            let (mut dg, mut db) = (0f64, 0f64);
            for (xs, gs) in channel_segments(x, n, c, hw, k).zip(channel_segments(dz, n, c, hw, k)) {
                // 16 independent lanes, so the compiler can vectorise.
                let (mut la, mut lb) = ([0f32; 16], [0f32; 16]);
                let (xc, gc) = (xs.chunks_exact(16), gs.chunks_exact(16));
                let (mut a, mut b) = (0f32, 0f32);
                for (&v, &g) in xc.remainder().iter().zip(gc.remainder()) {
                    a += g * (v - p.mean);
                    b += g;
                }
                for (xk, gk) in xc.zip(gc) {
                    for i in 0..16 {
                        la[i] += gk[i] * (xk[i] - p.mean);
                        lb[i] += gk[i];
                    }
                }
                dg += ((a + la.iter().sum::<f32>()) * p.inv_std) as f64;
                db += (b + lb.iter().sum::<f32>()) as f64;
            }
            (dg as f32, db as f32)
        })
        .collect();
    let mut out: Vec<f32> = sums.iter().map(|s| s.0).collect();
    out.extend(sums.iter().map(|s| s.1));
    out
}

/// Batch-norm's input gradient from `dz` (the gradient reaching its affine output):
/// training (`batch_stats`) `γ σ⁻¹ (dz − mean(dz) − x̂ · mean(dz · x̂))`, where the means
/// come from `sums` = [`bn_grad_sums`] over the n·hw values of a channel; evaluation
/// `γ σ⁻¹ dz`. A new buffer; [`bn_input_grad_in_place`] writes over `dz` instead.
pub fn bn_input_grad(x: &[f32], dz: &[f32], p: &BnParams, sums: &[f32], batch_stats: bool) -> Vec<f32> {
    let mut g = dz.to_vec();
    bn_input_grad_in_place(x, &mut g, p, sums, batch_stats);
    g
}

/// [`bn_input_grad`] written over its input: `g` holds `dz` on entry and the input
/// gradient on return (no buffer to allocate and zero; each value is read once and
/// written once).
pub fn bn_input_grad_in_place(x: &[f32], g: &mut [f32], p: &BnParams, sums: &[f32], batch_stats: bool) {
    assert_eq!(
        x.len(),
        g.len(),
        "bn_input_grad: input and gradient lengths differ"
    );
    let (c, hw) = (p.c, p.hw);
    let ch = p.channels();
    let (dgamma, dbeta) = (&sums[..c], &sums[c..2 * c]);
    let m = (p.n * hw) as f32;
    g.par_chunks_mut(hw).enumerate().for_each(|(i, gs)| {
        let k = i % c;
        let p = &ch[k];
        let xs = &x[i * hw..(i + 1) * hw];
        let a = p.gamma * p.inv_std;
        let (mean_dz, mean_dzx) = if batch_stats {
            (dbeta[k] / m, dgamma[k] / m)
        } else {
            (0.0, 0.0)
        };
        for (g, &v) in gs.iter_mut().zip(xs) {
            let xh = (v - p.mean) * p.inv_std;
            *g = a * (*g - mean_dz - xh * mean_dzx);
        }
    });
}

/// Per-channel constants of the normalisation: y = x * scale + shift.
struct Channel {
    mean: f32,
    inv_std: f32,
    gamma: f32,
    beta: f32,
}
