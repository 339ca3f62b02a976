//! Per-image transforms from u8 HWC to normalised f32 CHW: random crop with padding,
//! horizontal flip and cutout for training; normalisation alone for evaluation.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The transform applied to each image on its way into a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Random crop of the original size from the image zero-padded by this many pixels on
    /// each side (torchvision's `RandomCrop(size, padding)`); 0 disables it.
    pub crop_padding: usize,
    /// Mirror left-right with probability ½.
    pub flip: bool,
    /// Side of a square set to 0 after normalisation, centred anywhere in the image
    /// (DeVries & Taylor's cutout); 0 disables it.
    pub cutout: usize,
    /// Per-channel mean and std of pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Augment {
    /// The usual CIFAR training transform: crop with 4-pixel padding and flip.
    pub fn train(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Augment {
            crop_padding: 4,
            flip: true,
            cutout: 0,
            mean,
            std,
        }
    }

    /// Normalisation only.
    pub fn eval(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Augment {
            crop_padding: 0,
            flip: false,
            cutout: 0,
            mean,
            std,
        }
    }

    /// Transforms one image (`h`x`w`x`c` bytes, HWC) into `out` (`c*h*w` floats, CHW),
    /// drawing its random choices from `rng`.
    pub fn apply(&self, img: &[u8], (h, w, c): (usize, usize, usize), rng: &mut ChaCha8Rng, out: &mut [f32]) {
        let p = self.crop_padding as i64;
        let (dy, dx) = if p > 0 {
            (
                (rng.random_range(0..=2 * p) - p) as isize,
                (rng.random_range(0..=2 * p) - p) as isize,
            )
        } else {
            (0, 0)
        };
        let flip = self.flip && rng.random_bool(0.5);
        // Lookup tables: u8 value → normalised value, per channel.
        for ch in 0..c {
            let scale = 1.0 / (255.0 * self.std[ch]);
            let shift = -self.mean[ch] / self.std[ch];
            let zero = shift;
            let plane = &mut out[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let sy = y as isize + dy;
                let row = &mut plane[y * w..(y + 1) * w];
                if sy < 0 || sy >= h as isize {
                    row.fill(zero);
                    continue;
                }
                let src = &img[sy as usize * w * c..(sy as usize + 1) * w * c];
                for (x, o) in row.iter_mut().enumerate() {
                    let xx = if flip { w - 1 - x } else { x } as isize;
                    let sx = xx + dx;
                    *o = if sx < 0 || sx >= w as isize {
                        zero
                    } else {
                        src[sx as usize * c + ch] as f32 * scale + shift
                    };
                }
            }
        }
        if self.cutout > 0 {
            let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
            let half = self.cutout / 2;
            let (y0, y1) = (cy.saturating_sub(half), (cy + self.cutout - half).min(h));
            let (x0, x1) = (cx.saturating_sub(half), (cx + self.cutout - half).min(w));
            for ch in 0..c {
                for y in y0..y1 {
                    out[ch * h * w + y * w + x0..ch * h * w + y * w + x1].fill(0.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn check(aug: &Augment, img: &[u8], dims: (usize, usize, usize), seed: u64) -> Vec<f32> {
        let mut out = vec![f32::NAN; dims.0 * dims.1 * dims.2];
        aug.apply(img, dims, &mut ChaCha8Rng::seed_from_u64(seed), &mut out);
        out
    }

    #[test]
    fn eval_transform_normalises_and_transposes() {
        // 1x2 image, 2 channels: pixel 0 = (0, 255), pixel 1 = (51, 102).
        let aug = Augment::eval(vec![0.5, 0.0], vec![0.5, 1.0]);
        let out = check(&aug, &[0, 255, 51, 102], (1, 2, 2), 0);
        let want = [-1.0, (0.2 - 0.5) / 0.5, 1.0, 0.4];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn crop_and_flip_move_pixels_and_pad_with_zero() {
        let (h, w) = (4, 5);
        let img: Vec<u8> = (0..h * w).map(|i| i as u8 + 1).collect();
        let aug = Augment {
            crop_padding: 2,
            flip: true,
            cutout: 0,
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        };
        let mut saw_shift = false;
        for seed in 0..50 {
            let out = check(&aug, &img, (h, w, 1), seed);
            // Every output value is a padded zero or an input pixel; the multiset of the
            // kept pixels is a contiguous window (possibly mirrored).
            assert!(
                out.iter().all(|&v| v == 0.0 || (1.0..=20.0).contains(&v)),
                "{out:?}"
            );
            saw_shift |= out.contains(&0.0);
        }
        assert!(saw_shift, "some crops must reach into the padding");
        // Same seed, same result.
        assert_eq!(check(&aug, &img, (h, w, 1), 7), check(&aug, &img, (h, w, 1), 7));
    }

    #[test]
    fn cutout_zeroes_a_square() {
        let img = vec![200u8; 8 * 8];
        let aug = Augment {
            crop_padding: 0,
            flip: false,
            cutout: 4,
            mean: vec![0.0],
            std: vec![1.0],
        };
        let out = check(&aug, &img, (8, 8, 1), 3);
        let zeros = out.iter().filter(|&&v| v == 0.0).count();
        assert!((4..=16).contains(&zeros), "{zeros}");
    }
}
