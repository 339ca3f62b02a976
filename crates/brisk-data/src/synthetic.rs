//! The built-in synthetic dataset: ten classes of shapes and patterns drawn procedurally
//! with random colours, position, scale, rotation, clutter and noise. Image i of a split
//! depends only on (seed, split, i), so packing is reproducible whatever the machine.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, Split};
use crate::writer::{DatasetWriter, ImageShape};

/// Class names, in label order.
pub const CLASSES: [&str; 10] = [
    "disc",
    "square",
    "triangle",
    "ring",
    "plus",
    "horizontal-stripes",
    "vertical-stripes",
    "checkerboard",
    "two-dots",
    "diagonal-cross",
];

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Training images. By default, 20,000.
    pub train: usize,
    /// Test images. By default, 4,000.
    pub test: usize,
    /// By default, 0.
    pub seed: u64,
    /// Image side in pixels (RGB, square). By default, 32.
    pub size: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            train: 20_000,
            test: 4_000,
            seed: 0,
            size: 32,
        }
    }
}

/// Whether the point (x, y) of the shape's own frame (about [-1, 1]²) is inside class `c`.
fn inside(c: usize, x: f32, y: f32) -> bool {
    let r2 = x * x + y * y;
    let in_patch = x.abs() < 0.85 && y.abs() < 0.85;
    match c {
        0 => r2 < 0.64,
        1 => x.abs() < 0.65 && y.abs() < 0.65,
        2 => y > -0.55 && y < 0.85 - 1.8 * x.abs(),
        3 => (0.25..0.72).contains(&r2),
        4 => (x.abs() < 0.22 && y.abs() < 0.85) || (y.abs() < 0.22 && x.abs() < 0.85),
        5 => in_patch && ((y + 1.0) * 3.0).floor() as i32 % 2 == 0,
        6 => in_patch && ((x + 1.0) * 3.0).floor() as i32 % 2 == 0,
        7 => in_patch && (((x + 1.0) * 2.5).floor() as i32 + ((y + 1.0) * 2.5).floor() as i32) % 2 == 0,
        8 => (x - 0.5).powi(2) + y * y < 0.1 || (x + 0.5).powi(2) + y * y < 0.1,
        _ => r2 < 0.8 && ((x - y).abs() < 0.3 || (x + y).abs() < 0.3),
    }
}

/// A random colour, and another at least `min` apart from it in summed channel distance.
fn colours(rng: &mut ChaCha8Rng, min: i32) -> ([u8; 3], [u8; 3]) {
    let fg: [u8; 3] = [rng.random(), rng.random(), rng.random()];
    loop {
        let bg: [u8; 3] = [rng.random(), rng.random(), rng.random()];
        let d: i32 = fg
            .iter()
            .zip(&bg)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .sum();
        if d >= min {
            return (fg, bg);
        }
    }
}

/// Draws one `size`x`size` RGB image (HWC) of class `class`.
pub fn render(class: usize, size: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (fg, bg) = colours(rng, 150);
    // Rotation is limited to ±30° so that horizontal and vertical stripes, and the plus
    // and the diagonal cross, stay different classes.
    let angle: f32 = rng.random_range(-0.52..0.52);
    let scale: f32 = rng.random_range(0.45..0.8);
    let (cx, cy): (f32, f32) = (rng.random_range(-0.3..0.3), rng.random_range(-0.3..0.3));
    let (sin, cos) = angle.sin_cos();
    let mut img = vec![0u8; size * size * 3];
    for py in 0..size {
        for px in 0..size {
            let u = (px as f32 + 0.5) / size as f32 * 2.0 - 1.0 - cx;
            let v = (py as f32 + 0.5) / size as f32 * 2.0 - 1.0 - cy;
            let (x, y) = ((cos * u + sin * v) / scale, (-sin * u + cos * v) / scale);
            let colour = if inside(class, x, y) { fg } else { bg };
            img[(py * size + px) * 3..][..3].copy_from_slice(&colour);
        }
    }
    // Clutter: a few small rectangles of random colours anywhere.
    for _ in 0..rng.random_range(0..4) {
        let colour: [u8; 3] = [rng.random(), rng.random(), rng.random()];
        let (w, h) = (
            rng.random_range(1..=size / 8 + 1),
            rng.random_range(1..=size / 8 + 1),
        );
        let (x0, y0) = (
            rng.random_range(0..size - w + 1),
            rng.random_range(0..size - h + 1),
        );
        for py in y0..y0 + h {
            for px in x0..x0 + w {
                img[(py * size + px) * 3..][..3].copy_from_slice(&colour);
            }
        }
    }
    for v in &mut img {
        *v = (*v as i32 + rng.random_range(-24..=24)).clamp(0, 255) as u8;
    }
    img
}

/// The generator of image `index` of `split`: a stream of its own, keyed by the seed.
fn image_rng(seed: u64, split: Split, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((split as u64) << 48) | index as u64);
    rng
}

/// Packs the synthetic set into `dir`. Labels cycle through the classes, so every class
/// has the same number of images (±1).
pub fn pack_synthetic(dir: &Path, config: &SyntheticConfig, shard_size: usize) -> Result<Manifest> {
    if config.size < 8 {
        return Err(Error::InvalidConfig {
            field: "size",
            problem: format!("must be at least 8 pixels, got {}", config.size),
        });
    }
    if config.train == 0 {
        return Err(Error::InvalidConfig {
            field: "train",
            problem: "must be at least 1".into(),
        });
    }
    let classes = CLASSES.iter().map(|s| s.to_string()).collect();
    let shape = ImageShape {
        height: config.size,
        width: config.size,
        channels: 3,
    };
    let mut writer = DatasetWriter::create(dir, "synthetic", classes, shape, shard_size)?;
    for (split, count) in [(Split::Train, config.train), (Split::Test, config.test)] {
        for i in 0..count {
            let label = i % CLASSES.len();
            let image = render(label, config.size, &mut image_rng(config.seed, split, i));
            writer.push(split, &image, label as u32)?;
        }
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_depend_only_on_seed_split_and_index() {
        let a = render(3, 16, &mut image_rng(7, Split::Train, 5));
        let b = render(3, 16, &mut image_rng(7, Split::Train, 5));
        let c = render(3, 16, &mut image_rng(7, Split::Test, 5));
        let d = render(3, 16, &mut image_rng(8, Split::Train, 5));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn every_class_draws_a_visible_shape() {
        // In the shape's own frame each class covers a real part of the patch, and no
        // two classes cover exactly the same points.
        let grid: Vec<(f32, f32)> = (0..40)
            .flat_map(|i| (0..40).map(move |j| (i as f32 / 20.0 - 1.0, j as f32 / 20.0 - 1.0)))
            .collect();
        let masks: Vec<Vec<bool>> = (0..CLASSES.len())
            .map(|c| grid.iter().map(|&(x, y)| inside(c, x, y)).collect())
            .collect();
        for (c, m) in masks.iter().enumerate() {
            let covered = m.iter().filter(|&&b| b).count();
            assert!(
                covered > 100 && covered < 1500,
                "{} covers {covered} of 1600",
                CLASSES[c]
            );
        }
        for a in 0..masks.len() {
            for b in a + 1..masks.len() {
                assert_ne!(masks[a], masks[b], "{} and {}", CLASSES[a], CLASSES[b]);
            }
        }
    }
}
