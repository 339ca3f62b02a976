//! The `brisk` binary as a user meets it: output, JSON contract, exit codes, errors.

use std::process::Output;

use anyhow::Result;
use brisk_testkit::Brisk;

fn brisk(args: &[&str]) -> Result<Output> {
    Brisk(env!("CARGO_BIN_EXE_brisk")).run(args)
}

#[test]
fn models_table_lists_presets_with_exact_counts() -> Result<()> {
    let out = brisk(&["models"])?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    for (name, params) in [
        ("resnet18 ", "11,689,512"),
        ("resnet34 ", "21,797,672"),
        ("resnet18-cifar ", "11,173,962"),
        ("seresnet18-cifar ", "11,263,042"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{text}"));
        assert!(line.contains(params), "{line}");
    }
    Ok(())
}

#[test]
fn models_json_is_one_object() -> Result<()> {
    let out = brisk(&["models", "--json"])?;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let models = v["models"].as_array().expect("models array");
    let r18 = models.iter().find(|m| m["name"] == "resnet18").expect("resnet18");
    assert_eq!(r18["params"], 11_689_512);
    assert_eq!(r18["macs"], 1_814_073_344u64);
    assert!(r18["bytes"].as_u64().expect("bytes") > 4 * 11_689_512);
    Ok(())
}

#[test]
fn models_reads_a_spec_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("narrow.toml");
    std::fs::write(
        &path,
        "arch = \"resnet18\"\nstem = \"cifar\"\nclasses = 10\nwidth = 0.25\nimage_size = 32\n",
    )?;
    let out = brisk(&["models", "--json", "--spec", path.to_str().expect("utf8")])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["models"][0]["name"], "narrow");
    assert_eq!(v["models"][0]["input"], 32);
    Ok(())
}

#[test]
fn bad_spec_is_a_runtime_error_naming_file_and_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"arch": "resnet50", "classes": 10}"#)?;
    let out = brisk(&["models", "--spec", path.to_str().expect("utf8")])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("bad.json") && err.contains("arch") && err.contains("resnet50"),
        "{err}"
    );
    Ok(())
}

#[test]
fn usage_errors_exit_2() -> Result<()> {
    assert_eq!(brisk(&["models", "--no-such-flag"])?.status.code(), Some(2));
    assert_eq!(brisk(&["models", "--image", "0"])?.status.code(), Some(2));
    assert_eq!(brisk(&["frobnicate"])?.status.code(), Some(2));
    // An unknown kernel path in the environment is refused, naming the variable.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brisk"))
        .arg("models")
        .env("BRISK_ISA", "sse2")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BRISK_ISA=\"sse2\"") && err.contains("avx2") && err.contains("amx"),
        "{err}"
    );
    Ok(())
}

/// The `BRISK_ISA` values this CPU has (`true`) or lacks (`false`).
fn kernel_paths(on_this_cpu: bool) -> Vec<&'static str> {
    brisk_ops::ISA_CHOICES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| brisk_ops::isa_supported(name) == on_this_cpu)
        .collect()
}

/// A kernel path this CPU lacks is refused rather than quietly replaced by f32 products
/// (a comparison would measure another path than the one it names).
#[test]
fn a_kernel_path_the_cpu_lacks_is_refused() -> Result<()> {
    let lacking = kernel_paths(false);
    if lacking.is_empty() {
        brisk_hosts::skipped(
            "cli::a_kernel_path_the_cpu_lacks_is_refused",
            "this CPU has every kernel path brisk knows",
        );
    }
    for isa in lacking {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brisk"))
            .arg("models")
            .env("BRISK_ISA", isa)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{isa}: {err}");
        assert!(
            err.contains(&format!("BRISK_ISA={isa:?}")) && err.contains("lacks"),
            "{err}"
        );
    }
    // What this process runs on is a path the CPU has (or no vector kernels at all).
    let here = brisk_ops::half_products();
    assert!(here == "scalar" || brisk_ops::isa_supported(here), "{here}");
    Ok(())
}

/// A `BRISK_ISA` path the CPU has is the one the step runs on: `bench step --json` names
/// it (so a side-by-side comparison measures what it says), for every path this CPU has.
#[test]
fn a_forced_kernel_path_is_the_one_that_runs() -> Result<()> {
    let here = kernel_paths(true);
    if here.is_empty() {
        brisk_hosts::skipped(
            "cli::a_forced_kernel_path_is_the_one_that_runs",
            "this CPU has none of brisk's kernel paths",
        );
    }
    for isa in here {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["bench", "step", "--json", "--width", "0.0625", "--image", "8"])
            .args(["--batch", "2", "--steps", "1", "--warmup", "0", "--threads", "1"])
            .args(["--dtype", "mixed-bf16"])
            .env("BRISK_ISA", isa)
            .output()?;
        assert!(
            out.status.success(),
            "{isa}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(v["half_products"], isa, "{v}");
    }
    Ok(())
}

/// `--device cuda` (train, eval, bench step) is checked before anything runs: here (no
/// driver) the error names the missing library; on a GPU machine it says the CUDA backend
/// is not built yet. Either way
/// exit 1 and no output folder; a device that is not a name is refused.
#[test]
fn a_gpu_device_is_refused_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    brisk_testkit::pack_synthetic(&data, 32, 16, 8)?;
    let (data, out) = (data.to_string_lossy().into_owned(), dir.path().join("run"));
    let out_s = out.to_string_lossy().into_owned();
    let why = if brisk_cuda::driver_present() {
        "CUDA backend"
    } else {
        "libcuda"
    };
    for args in [
        vec![
            "train", "--data", &data, "--out", &out_s, "--device", "cuda", "--epochs", "1",
        ],
        vec![
            "train",
            "--data",
            &data,
            "--out",
            &out_s,
            "--set",
            "device=\"cuda:1\"",
        ],
        vec![
            "eval",
            "--checkpoint",
            &out_s,
            "--data",
            &data,
            "--device",
            "cuda",
        ],
        vec!["bench", "step", "--device", "cuda:0", "--steps", "1"],
    ] {
        let o = brisk(&args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("device cuda:") && err.contains(why),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    let o = brisk(&["train", "--data", &data, "--out", &out_s, "--device", "gpu"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("\"gpu\" is not a device"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bench_step_json_has_the_contract_keys() -> Result<()> {
    for extra in [&[][..], &["--eval"][..], &["--reference-ops"][..]] {
        let mut args = vec![
            "bench", "step", "--json", "--width", "0.0625", "--image", "8", "--batch", "2",
        ];
        args.extend(["--steps", "2", "--warmup", "0", "--threads", "1"]);
        args.extend(extra);
        let out = brisk(&args)?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for key in [
            "img_per_s",
            "img_per_s_min",
            "img_per_s_max",
            "batch",
            "threads",
            "dtype",
        ] {
            assert!(!v[key].is_null(), "missing {key} in {v}");
        }
        assert_eq!(v["batch"], 2);
        assert_eq!(v["threads"], 1);
        assert_eq!(v["dtype"], "f32");
        let kernels = if extra == ["--reference-ops"] {
            "candle"
        } else {
            "brisk"
        };
        assert_eq!(v["kernels"], kernels, "{v}");
        // The engine's steps carry their memory plan; candle's graph has none.
        let memory = &v["memory"];
        if extra == ["--reference-ops"] {
            assert!(memory.is_null(), "{v}");
        } else {
            let (live, plan) = (memory["live_peak_mib"].as_f64(), memory["plan_mib"].as_f64());
            assert!(
                matches!((live, plan), (Some(l), Some(p)) if l > 0.0 && p >= l),
                "{v}"
            );
        }
    }
    Ok(())
}

#[test]
fn bench_step_rejects_bad_values() -> Result<()> {
    assert_eq!(
        brisk(&["bench", "step", "--dtype", "f64"])?.status.code(),
        Some(2)
    );
    // A named value outside its list is a usage error that lists the names, which come
    // from the owning crate's type.
    let out = brisk(&["bench", "step", "--arch", "resnet50"])?;
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stderr)?;
    assert!(text.contains("resnet18") && text.contains("seresnet34"), "{text}");
    let out = brisk(&[
        "prune",
        "--method",
        "random",
        "--checkpoint",
        "m",
        "--data",
        "d",
        "--out",
        "o",
        "--sparsity",
        "0.5",
    ])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)?.contains("gradual"));
    let out = brisk(&[
        "bench", "step", "--batch", "0", "--width", "0.0625", "--image", "8",
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("batch"));
    Ok(())
}

#[test]
fn pack_inspect_verify_preview_and_bench_loader() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("syn");
    let d = data.to_str().expect("utf8");
    let out = brisk(&[
        "pack",
        "synthetic",
        "--out",
        d,
        "--train",
        "30",
        "--test",
        "10",
        "--size",
        "8",
        "--shard-size",
        "16",
        "--json",
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(m["shards"].as_array().map(Vec::len), Some(3));
    let out = brisk(&["inspect", d, "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((v["train"].as_u64(), v["test"].as_u64()), (Some(30), Some(10)));
    assert_eq!(v["train_per_class"][0], 3);
    assert!(brisk(&["verify", d])?.status.success());
    let png = dir.path().join("grid.png");
    assert!(brisk(&[
        "preview",
        d,
        "--out",
        png.to_str().expect("utf8"),
        "--per-class",
        "2"
    ])?
    .status
    .success());
    assert!(std::fs::metadata(&png)?.len() > 100);
    let out = brisk(&["bench", "loader", "--data", d, "--batch", "8", "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["images"], 30);
    assert!(v["img_per_s"].as_f64().is_some_and(|r| r > 0.0));
    // Packing into the same folder again must not overwrite it.
    let again = brisk(&["pack", "synthetic", "--out", d, "--train", "2", "--test", "0"])?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8(again.stderr)?.contains("already exists"));
    Ok(())
}

#[test]
fn damaged_dataset_fails_verify_naming_the_shard() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().expect("utf8");
    assert!(brisk(&[
        "pack",
        "synthetic",
        "--out",
        d,
        "--train",
        "12",
        "--test",
        "0",
        "--size",
        "8",
        "--shard-size",
        "6"
    ])?
    .status
    .success());
    let shard = dir.path().join("train-00001.safetensors");
    let mut bytes = std::fs::read(&shard)?;
    let at = bytes.len() - 30;
    bytes[at] ^= 1;
    std::fs::write(&shard, bytes)?;
    let out = brisk(&["verify", d])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("train-00001.safetensors") && err.contains("checksum"),
        "{err}"
    );
    Ok(())
}
