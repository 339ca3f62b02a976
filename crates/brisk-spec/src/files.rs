//! The model file's name and its JSON sidecar: `model.safetensors` holds the weights
//! under torchvision's names, `model.json` beside it the `ModelSpec` they belong to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::ModelSpec;

/// The model file of a run, a checkpoint or `best/`.
pub const MODEL_FILE: &str = "model.safetensors";

const SIDECAR_FORMAT: &str = "brisk-model";

/// What the JSON sidecar beside a model file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    format: String,
    version: u32,
    spec: ModelSpec,
}

/// The model file a path names: the file itself, or [`MODEL_FILE`] in a folder (a run's
/// output folder, `best/`, a checkpoint folder).
pub fn model_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(MODEL_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The sidecar path of a model file: `model.safetensors` → `model.json`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// Writes the sidecar holding `spec` for the model file `path`, atomically.
pub fn write_sidecar(path: &Path, spec: &ModelSpec) -> Result<()> {
    let sidecar = Sidecar {
        format: SIDECAR_FORMAT.into(),
        version: 1,
        spec: spec.clone(),
    };
    let sidecar_file = sidecar_path(path);
    let json = brisk_files::checksum::json_with_checksum(&sidecar, &sidecar_file)?;
    Ok(brisk_files::write_atomic(&sidecar_file, &json)?)
}

/// Reads the `ModelSpec` from a model file's sidecar, checked.
pub fn read_sidecar(model: &Path) -> Result<ModelSpec> {
    let path = sidecar_path(model);
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io("cannot read model sidecar", &path, e))?;
    let (sidecar, _): (Sidecar, _) = brisk_files::checksum::json_checked(text.as_bytes(), &path)?;
    if sidecar.format != SIDECAR_FORMAT {
        return Err(Error::SpecParse {
            path,
            field: "format".into(),
            message: format!("expected \"{SIDECAR_FORMAT}\", found {:?}", sidecar.format),
        });
    }
    sidecar.spec.validate()?;
    Ok(sidecar.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_round_trips_and_names_a_bad_field() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let model = dir.path().join(MODEL_FILE);
        let spec = ModelSpec::seresnet18_cifar(7).with_width(0.5);
        write_sidecar(&model, &spec)?;
        assert_eq!(read_sidecar(&model)?, spec);
        assert_eq!(model_file(dir.path()), model);
        assert_eq!(model_file(&model), model);
        std::fs::write(
            sidecar_path(&model),
            r#"{"format":"brisk-model","version":1,"spec":{"arch":"vgg","classes":3}}"#,
        )
        .map_err(|e| Error::io("write", &model, e))?;
        let e = read_sidecar(&model).expect_err("unknown arch").to_string();
        assert!(e.contains("model.json") && e.contains("arch"), "{e}");
        Ok(())
    }
}
