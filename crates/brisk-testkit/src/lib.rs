//! Helpers brisk's tests share, in one place: seeded random tensors (candle's CPU RNG
//! cannot be seeded, and an unlucky unseeded draw makes a test flaky), the relative-error
//! measure numerical tests compare with, tiny synthetic datasets, and runners for the
//! `brisk` binary and `mpirun`. A dev-dependency only; nothing ships it.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A CPU tensor of normal samples (`mean`, `std`) drawn from a ChaCha stream seeded by
/// `seed`: the same seed gives the same values everywhere.
pub fn randn(seed: u64, mean: f32, std: f32, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let normal = Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// A CPU tensor of uniform samples in [`low`, `high`), seeded as [`randn`].
pub fn rand_uniform(seed: u64, low: f32, high: f32, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random_range(low..high))
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// max |a − b| / max |b|: the error of `a` relative to the reference `b`'s scale (a
/// reference of all zeros counts as scale 1e-6). Compared in f32 whatever the dtypes.
pub fn max_rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = b
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(max_rel_values(&a, &b))
}

/// [`max_rel`] of two value lists of one length.
pub fn max_rel_values(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared lists differ in length");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Packs brisk's synthetic set into `dir`: `train` + `test` images of `size`x`size`,
/// seed 1, shards of 64 images.
pub fn pack_synthetic(dir: &Path, train: usize, test: usize, size: usize) -> Result<()> {
    let config = brisk_data::SyntheticConfig {
        train,
        test,
        seed: 1,
        size,
    };
    brisk_data::pack_synthetic(dir, &config, 64)?;
    Ok(())
}

/// The `brisk` binary of the integration tests (`env!("CARGO_BIN_EXE_brisk")`).
#[derive(Clone, Copy, Debug)]
pub struct Brisk(pub &'static str);

impl Brisk {
    pub fn command(&self) -> Command {
        Command::new(self.0)
    }

    /// Runs `brisk ARGS` and returns what it did, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command()
            .args(args)
            .output()
            .with_context(|| format!("cannot run brisk {args:?}"))
    }

    /// Runs `brisk ARGS`, failing with its error output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Result<Output> {
        ok(self.command().args(args))
    }

    /// Runs `brisk ARGS --json`-style commands and parses their stdout as one JSON value.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.ok(args)?;
        let text = String::from_utf8(out.stdout)?;
        serde_json::from_str(text.trim()).with_context(|| format!("brisk {args:?} printed no JSON: {text}"))
    }

    /// `brisk pack synthetic` into `dir`: `train` + `test` images of `size`x`size`.
    pub fn pack(&self, dir: &Path, train: usize, test: usize, size: usize) -> Result<()> {
        let mut c = self.command();
        c.args([
            "pack",
            "synthetic",
            "--train",
            &train.to_string(),
            "--test",
            &test.to_string(),
        ])
        .args(["--size", &size.to_string(), "--out"])
        .arg(dir);
        ok(&mut c)?;
        Ok(())
    }
}

/// Writes an IDX file (MNIST's format: unsigned bytes, big-endian dimensions), gzipped
/// when `gzip`.
pub fn write_idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) -> Result<()> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &bytes)?;
        bytes = enc.finish()?;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Runs `c`, failing with its output unless it succeeds.
pub fn ok(c: &mut Command) -> Result<Output> {
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `brisk train` arguments of the CLI's tests: a narrow ResNet-18 (width 0.0625) on
/// `data` at `batch` images per step, writing to `out`, no progress display; then `extra`.
pub fn train_args(data: &Path, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--width", "0.0625", "--quiet", "--batch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(batch.to_string());
    args.extend(["--data".into(), data.display().to_string()]);
    args.extend(["--out".into(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `mpirun` as a test needs it wherever it runs: root allowed (CI runs as root), more
/// ranks than cores allowed.
pub fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg("--oversubscribe");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_tensors_repeat_and_differ_by_seed() -> candle_core::Result<()> {
        let a = randn(7, 0.0, 1.0, (3, 4))?.to_vec2::<f32>()?;
        assert_eq!(a, randn(7, 0.0, 1.0, (3, 4))?.to_vec2::<f32>()?);
        assert_ne!(a, randn(8, 0.0, 1.0, (3, 4))?.to_vec2::<f32>()?);
        let u = rand_uniform(1, 0.5, 1.5, 100)?.to_vec1::<f32>()?;
        assert!(u.iter().all(|v| (0.5..1.5).contains(v)));
        Ok(())
    }

    #[test]
    fn relative_error_is_scaled_by_the_reference() {
        assert_eq!(max_rel_values(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(max_rel_values(&[0.0], &[0.0]), 0.0);
    }
}
