//! `brisk prune | distill | quantize | inspect-model` on a tiny trained model: each writes
//! a model `brisk eval` reads and reports before → after with the promised direction.

use std::path::Path;

use anyhow::Result;
use brisk_testkit::Brisk;

const BRISK: Brisk = Brisk(env!("CARGO_BIN_EXE_brisk"));

fn brisk(args: &[&str]) -> Result<String> {
    Ok(String::from_utf8(BRISK.ok(args)?.stdout)?)
}

fn json(args: &[&str]) -> Result<serde_json::Value> {
    BRISK.json(args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn every_compression_command_shrinks_a_model_that_eval_can_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    brisk(&[
        "pack",
        "synthetic",
        "--out",
        s(&data),
        "--train",
        "128",
        "--test",
        "32",
        "--size",
        "16",
    ])?;
    let run = dir.path().join("run");
    brisk(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--width",
        "0.125",
        "--epochs",
        "1",
        "--batch",
        "32",
        "--quiet",
    ])?;
    let common = ["--data", s(&data), "--threads", "2"];

    let out = dir.path().join("pruned");
    let mut args = vec![
        "prune",
        "--checkpoint",
        s(&run),
        "--out",
        s(&out),
        "--method",
        "global",
        "--sparsity",
        "0.8",
        "--finetune-epochs",
        "1",
        "--json",
    ];
    args.extend(common);
    let v = json(&args)?;
    assert!(
        v["after"]["params"].as_u64() < v["before"]["params"].as_u64().map(|p| p / 2),
        "{v}"
    );
    assert!(
        v["after"]["bytes"].as_u64() < v["before"]["bytes"].as_u64().map(|b| b / 2),
        "{v}"
    );
    let sparse = out.join("model-sparse.safetensors");
    let e = json(&["eval", "--checkpoint", s(&sparse), "--data", s(&data), "--json"])?;
    assert_eq!(e["top1"], v["after"]["top1"]);
    let m = json(&["inspect-model", s(&sparse), "--json"])?;
    assert_eq!(m["format"], "brisk-sparse");
    assert!(m["nonzero"].as_u64() < m["params"].as_u64().map(|p| p / 2), "{m}");

    let out = dir.path().join("filter");
    let mut args = vec![
        "prune",
        "--checkpoint",
        s(&run),
        "--out",
        s(&out),
        "--method",
        "filter",
        "--sparsity",
        "0.5",
        "--finetune-epochs",
        "1",
        "--json",
    ];
    args.extend(common);
    let v = json(&args)?;
    let (mb, ma) = (
        v["before"]["macs"].as_f64().unwrap_or(0.0),
        v["after"]["macs"].as_f64().unwrap_or(0.0),
    );
    assert!(ma < 0.65 * mb, "filter pruning kept {ma} of {mb} MACs");
    json(&["eval", "--checkpoint", s(&out), "--data", s(&data), "--json"])?;

    let q = dir.path().join("q.safetensors");
    let mut args = vec!["quantize", "--checkpoint", s(&run), "--out", s(&q), "--json"];
    args.extend(common);
    let v = json(&args)?;
    let ratio = v["after"]["bytes"].as_f64().unwrap_or(1.0) / v["before"]["bytes"].as_f64().unwrap_or(1.0);
    assert!(ratio <= 0.27, "int8 file ratio {ratio}");
    assert_eq!(json(&["inspect-model", s(&q), "--json"])?["format"], "brisk-int8");

    let out = dir.path().join("student");
    let mut args = vec![
        "distill",
        "--teacher",
        s(&run),
        "--student",
        "resnet18-cifar",
        "--width",
        "0.0625",
        "--out",
        s(&out),
        "--epochs",
        "1",
        "--batch",
        "32",
        "--json",
    ];
    args.extend(common);
    let v = json(&args)?;
    assert!(
        v["after"]["params"].as_u64() < v["before"]["params"].as_u64(),
        "{v}"
    );
    Ok(())
}
