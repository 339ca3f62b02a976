//! Classification losses and accuracy: cross-entropy with optional label smoothing (as
//! PyTorch's `cross_entropy(label_smoothing=ε)`) and top-k correct counts.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Mean cross-entropy of `logits` `[N, C]` against `labels` `[N]` (u32), with targets
/// smoothed to `(1 − ε)·onehot + ε/C`:
/// `loss = (1 − ε)·(−log p_y) + ε·mean_c(−log p_c)`, averaged over the batch.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&smoothing) {
        return Err(Error::InvalidConfig {
            field: "label_smoothing",
            problem: format!("must be in [0, 1), got {smoothing}"),
        });
    }
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let loss = if smoothing > 0.0 {
        let uniform = log_p.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?
    } else {
        nll
    };
    Ok(loss.mean_all()?)
}

/// How many of the `N` rows of `logits` have their label among the `k` highest scores
/// (ties count against: a label must beat all but k − 1 classes strictly).
pub fn top_k_correct(logits: &Tensor, labels: &Tensor, k: usize) -> Result<usize> {
    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.to_vec1::<u32>()?;
    Ok(logits
        .iter()
        .zip(&labels)
        .filter(|(row, &y)| {
            let target = row[y as usize];
            row.iter().filter(|&&v| v > target).count() < k
        })
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(logits: &[[f32; 3]], labels: &[u32], eps: f64) -> Result<()> {
        let dev = Device::Cpu;
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (logits.len(), 3), &dev)?;
        let y = Tensor::new(labels, &dev)?;
        let got = cross_entropy(&t, &y, eps)?.to_scalar::<f32>()? as f64;
        // By hand in f64.
        let mut want = 0.0;
        for (row, &l) in logits.iter().zip(labels) {
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let nll = lse - row[l as usize] as f64;
            let uniform = row.iter().map(|&v| lse - v as f64).sum::<f64>() / row.len() as f64;
            want += (1.0 - eps) * nll + eps * uniform;
        }
        want /= logits.len() as f64;
        assert!((got - want).abs() < 1e-5, "eps {eps}: {got} vs {want}");
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_hand_computation() -> Result<()> {
        let logits = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]];
        for eps in [0.0, 0.1, 0.5] {
            check(&logits, &[0, 2, 1], eps)?;
        }
        assert!(cross_entropy(
            &Tensor::new(&logits, &Device::Cpu)?,
            &Tensor::new(&[0u32, 1, 2], &Device::Cpu)?,
            1.0
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn top_k_counts() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0.9f32, 0.05, 0.05], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]], &dev)?;
        let labels = Tensor::new(&[0u32, 2, 0], &dev)?;
        assert_eq!(top_k_correct(&logits, &labels, 1)?, 1);
        assert_eq!(top_k_correct(&logits, &labels, 2)?, 2);
        assert_eq!(top_k_correct(&logits, &labels, 3)?, 3);
        Ok(())
    }
}
