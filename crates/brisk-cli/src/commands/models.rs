//! `brisk models`: the model zoo's presets (or spec files) with their exact counts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use brisk_models::ModelSpec;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Describe these ModelSpec files (.json or .toml) instead of the presets.
    /// May be given several times.
    #[arg(long, value_name = "FILE")]
    spec: Vec<PathBuf>,

    /// Input height and width for the MAC count. By default, each model's own
    /// `image_size` (224 for the ImageNet presets, 32 for the CIFAR ones).
    #[arg(long, value_name = "PIXELS", value_parser = clap::value_parser!(u32).range(1..))]
    image: Option<u32>,

    /// Print one JSON object `{"models": [{name, params, macs, bytes, ...}]}` on stdout.
    #[arg(long)]
    json: bool,
}

/// One row of the table; the JSON keys are stable.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    arch: &'static str,
    stem: &'static str,
    classes: usize,
    input: usize,
    params: usize,
    buffers: usize,
    macs: u64,
    /// Size of the f32 safetensors checkpoint in bytes.
    bytes: u64,
}

fn row(name: String, spec: &ModelSpec, image: Option<u32>) -> Row {
    let input = image.map_or(spec.image_size, |i| i as usize);
    Row {
        name,
        arch: spec.arch.name(),
        stem: spec.stem.name(),
        classes: spec.classes,
        input,
        params: spec.param_count(),
        buffers: spec.buffer_count(),
        macs: spec.macs(input),
        bytes: spec.checkpoint_bytes(),
    }
}

pub fn run(args: &Args) -> Result<()> {
    let rows: Vec<Row> = if args.spec.is_empty() {
        ModelSpec::presets()
            .into_iter()
            .map(|(n, s)| row(n.to_string(), &s, args.image))
            .collect()
    } else {
        let mut rows = Vec::new();
        for path in &args.spec {
            let spec = ModelSpec::from_file(path)?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .context("spec path has no file name")?;
            rows.push(row(name, &spec, args.image));
        }
        rows
    };
    if args.json {
        println!("{}", serde_json::json!({ "models": rows }));
        return Ok(());
    }
    println!(
        "{:<18} {:<10} {:<8} {:>7} {:>5} {:>12} {:>9} {:>10}",
        "name", "arch", "stem", "classes", "input", "params", "MACs", "f32 size"
    );
    for r in &rows {
        println!(
            "{:<18} {:<10} {:<8} {:>7} {:>5} {:>12} {:>8.3}G {:>7.1} MB",
            r.name,
            r.arch,
            r.stem,
            r.classes,
            r.input,
            group_thousands(r.params),
            r.macs as f64 / 1e9,
            r.bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// 11689512 → "11,689,512".
fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::group_thousands(11_689_512), "11,689,512");
        assert_eq!(super::group_thousands(512), "512");
        assert_eq!(super::group_thousands(1000), "1,000");
    }
}
