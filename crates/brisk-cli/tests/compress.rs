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

/// Runs `brisk distill ARGS COMMON` and checks the student has fewer parameters.
fn distills_a_smaller_student<'a>(mut args: Vec<&'a str>, common: &[&'a str]) -> Result<()> {
    args.extend(common);
    let v = json(&args)?;
    assert!(
        v["after"]["params"].as_u64() < v["before"]["params"].as_u64(),
        "{v}"
    );
    Ok(())
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
    let args = vec![
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
    distills_a_smaller_student(args, &common)?;

    // With --config the student trains on that recipe (the flags over it): the run's
    // own config.toml says so.
    let recipe = dir.path().join("student.toml");
    std::fs::write(
        &recipe,
        "epochs = 1\nseed = 5\n[model]\npreset = \"resnet18-cifar\"\nwidth = 0.0625\n\
         [batch]\nkind = \"fixed\"\nsize = 16\n[lr]\nbase = 0.05\nshape = { kind = \"one_cycle\" }\n",
    )?;
    let out = dir.path().join("student-recipe");
    let args = vec![
        "distill",
        "--teacher",
        s(&run),
        "--config",
        s(&recipe),
        "--out",
        s(&out),
        "--json",
    ];
    distills_a_smaller_student(args, &common)?;
    let used = brisk_schema::TrainConfig::from_file(&out.join("config.toml"))?;
    assert_eq!((used.epochs, used.seed, used.model.width), (1, 5, Some(0.0625)));
    assert_eq!(used.batch, brisk_schema::BatchSchedule::Fixed { size: 16 });
    assert_eq!(used.lr.base, 0.05);
    assert!(
        matches!(used.lr.shape, brisk_schema::LrShape::OneCycle { .. }),
        "{:?}",
        used.lr.shape
    );
    assert_eq!(used.data.as_deref(), Some(data.as_path()));

    // Neither a student nor a config: a usage error naming the flag.
    let e = BRISK.run(&[
        "distill",
        "--teacher",
        s(&run),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ])?;
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--student"), "{stderr}");
    Ok(())
}
