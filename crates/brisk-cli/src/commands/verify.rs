//! `brisk verify PATH`: a packed dataset (every shard's CRC-32 and the manifest), a model
//! file (dense, sparse or int8, with its sidecar), or a run, checkpoint or `best/` folder
//! (every file brisk reads back) — each checked against the checksums brisk wrote.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use brisk_data::{Dataset, Split, MANIFEST_FILE};
use brisk_files::Checksum;
use brisk_train::verify::{verify_run, FileCheck};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// A dataset folder (with manifest.json), a model file (.safetensors), or a run,
    /// checkpoint or `best/` folder.
    path: PathBuf,
    /// Print one JSON object on stdout: `ok` and, per file, `path` and `status`
    /// ("verified", "no checksum" or the problem).
    #[arg(long)]
    json: bool,
}

pub fn verify(a: &VerifyArgs) -> Result<()> {
    if a.path.join(MANIFEST_FILE).is_file() {
        return dataset(&a.path, a.json);
    }
    let checks = if a.path.is_dir() {
        verify_run(&a.path)?
    } else if a.path.exists() {
        let result = brisk_models::verify_model_file(&a.path).map_err(|e| e.to_string());
        vec![FileCheck {
            path: a.path.clone(),
            result,
        }]
    } else {
        bail!("{} does not exist", a.path.display());
    };
    report(&a.path, &checks, a.json)
}

fn status(r: &std::result::Result<Checksum, String>) -> String {
    match r {
        Ok(Checksum::Verified) => "verified".into(),
        Ok(Checksum::Absent) => "no checksum (not written by brisk): read unverified".into(),
        Err(e) => e.clone(),
    }
}

fn report(path: &Path, checks: &[FileCheck], json: bool) -> Result<()> {
    let failed = checks.iter().filter(|c| c.result.is_err()).count();
    if json {
        let files: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| serde_json::json!({"path": c.path, "ok": c.result.is_ok(), "status": status(&c.result)}))
            .collect();
        println!("{}", serde_json::json!({"ok": failed == 0, "files": files}));
    } else {
        for c in checks {
            let mark = if c.result.is_ok() { "ok" } else { "DAMAGED" };
            println!("{mark:<8} {}: {}", c.path.display(), status(&c.result));
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} files under {} failed verification",
            checks.len(),
            path.display()
        );
    }
    if !json {
        println!(
            "{}: {} files, every checksum matches",
            path.display(),
            checks.len()
        );
    }
    Ok(())
}

fn dataset(dir: &Path, json: bool) -> Result<()> {
    let d = Dataset::open(dir)?;
    d.verify()?;
    let m = d.manifest();
    if json {
        let images = m.count(Split::Train) + m.count(Split::Test);
        println!(
            "{}",
            serde_json::json!({"ok": true, "shards": m.shards.len(), "images": images})
        );
    } else {
        println!(
            "{}: {} shards, every checksum matches",
            dir.display(),
            m.shards.len()
        );
    }
    Ok(())
}
