//! Checksums for the files brisk writes and later reads, so a damaged byte is an error
//! naming the file and what is wrong, never silently different weights or settings.
//!
//! - safetensors files (models, optimizer state): a CRC-32 of every tensor's bytes in the
//!   header's metadata (`brisk.crc32.NAME`), and one over the header's own content
//!   (`brisk.crc32.header`: every tensor's name, dtype, shape and offsets and every other
//!   metadata entry), so a flipped byte anywhere — data or header — is caught. Python's
//!   safetensors reads these files unchanged.
//! - JSON files (checkpoint state, summary, model sidecar, dataset manifest): a top-level
//!   `"checksum": "crc32:xxxxxxxx"` over the compact JSON of everything else.
//! - TOML files (a run's config): a first line `# checksum crc32:xxxxxxxx` over the rest.
//!
//! A file without checksums (written by another tool: a torchvision state dict saved as
//! safetensors, a hand-written config) reads as [`Checksum::Absent`]; the caller decides
//! whether to say so.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Whether a file's content was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// Every checksum the file carries matched.
    Verified,
    /// The file carries none (not written by brisk): read unverified.
    Absent,
}

/// The CRC-32 (IEEE) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn tag(crc: u32) -> String {
    format!("crc32:{crc:08x}")
}

const TENSOR_PREFIX: &str = "brisk.crc32.";
const HEADER_KEY: &str = "brisk.crc32.header";

/// A tensor's header entry: name, dtype, shape, data offsets.
type Entry = (String, String, Vec<usize>, (usize, usize));

/// The text the header checksum covers: tensors (name, dtype, shape, offsets) in name
/// order, then the other metadata entries in key order.
fn header_text(tensors: &[Entry], metadata: &BTreeMap<&str, &str>) -> String {
    let mut text = String::new();
    for (name, dtype, shape, (a, b)) in tensors {
        text.push_str(&format!("{name}:{dtype}:{shape:?}:{a}-{b};"));
    }
    for (k, v) in metadata {
        text.push_str(&format!("{k}={v};"));
    }
    text
}

/// Serialises `tensors` as a safetensors file with `metadata` and brisk's checksums.
pub fn safetensors_with_checksums<V: safetensors::View + Clone>(
    tensors: Vec<(String, V)>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    // Every checksum needs the serialised file (the tensors' bytes at their offsets, the
    // header's layout): serialise once with placeholders of the same length, then write
    // the real values into the header.
    let mut meta = metadata;
    for (name, _) in &tensors {
        meta.insert(format!("{TENSOR_PREFIX}{name}"), tag(0));
    }
    meta.insert(HEADER_KEY.to_string(), tag(0));
    let mut bytes = safetensors::serialize(tensors.iter().map(|(n, v)| (n.as_str(), v.clone())), Some(meta))
        .map_err(|e| Error::corrupt(path, format!("cannot encode: {e}")))?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::corrupt(path, format!("cannot encode: {e}")))?;
    let data = &bytes[8 + header_len..];
    let crcs: Vec<(String, String)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (a, b) = info.data_offsets;
            (format!("{TENSOR_PREFIX}{name}"), tag(crc32(&data[a..b])))
        })
        .collect();
    set_header_entries(&mut bytes, &crcs, path)?;
    let header = layout_checksum(&bytes, path)?;
    set_header_entries(&mut bytes, &[(HEADER_KEY.to_string(), header)], path)?;
    Ok(bytes)
}

/// Sets `entries` of the header's metadata (each the same length as its placeholder) and
/// rewrites the header with its keys in sorted order: safetensors writes metadata in a
/// hash map's (random) order, and brisk's files should be the same bytes for the same
/// content (a resumed run's model equals an uninterrupted one's, byte for byte).
fn set_header_entries(bytes: &mut [u8], entries: &[(String, String)], path: &Path) -> Result<()> {
    let bad = |what: &str| Error::corrupt(path, format!("cannot finish the header: {what}"));
    let len = u64::from_le_bytes(
        bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("too short"))?,
    ) as usize;
    let header = bytes.get(8..8 + len).ok_or_else(|| bad("too short"))?;
    // serde_json's maps are ordered by key: parsing and printing sorts every level.
    let mut value: serde_json::Value = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let meta = value
        .get_mut("__metadata__")
        .and_then(|m| m.as_object_mut())
        .ok_or_else(|| bad("no metadata"))?;
    for (k, v) in entries {
        meta.insert(k.clone(), v.as_str().into());
    }
    let sorted = serde_json::to_vec(&value).map_err(|e| bad(&e.to_string()))?;
    if sorted.len() > len {
        return Err(bad("it grew"));
    }
    let padded = &mut bytes[8..8 + len];
    padded[..sorted.len()].copy_from_slice(&sorted);
    padded[sorted.len()..].fill(b' ');
    Ok(())
}

/// The header checksum of a serialised safetensors file (the header entry itself left out).
fn layout_checksum(bytes: &[u8], path: &Path) -> Result<String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::corrupt(path, format!("not a safetensors file: {e}")))?;
    let mut tensors: Vec<Entry> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            (
                name,
                format!("{:?}", info.dtype),
                info.shape.clone(),
                info.data_offsets,
            )
        })
        .collect();
    tensors.sort();
    let entries = meta.metadata().clone().unwrap_or_default();
    let others: BTreeMap<&str, &str> = entries
        .iter()
        .filter(|(k, _)| k.as_str() != HEADER_KEY)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Ok(tag(crc32(header_text(&tensors, &others).as_bytes())))
}

/// Checks a safetensors file's checksums: every tensor's and the header's. An error names
/// the file and the tensor (or the header) that differs.
pub fn verify_safetensors(bytes: &[u8], path: &Path) -> Result<Checksum> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::corrupt(path, format!("not a safetensors file: {e}")))?;
    let entries = meta.metadata().clone().unwrap_or_default();
    if !entries.keys().any(|k| k.starts_with(TENSOR_PREFIX)) {
        return Ok(Checksum::Absent);
    }
    let want_header = entries
        .get(HEADER_KEY)
        .ok_or_else(|| Error::corrupt(path, "its header checksum is missing".into()))?;
    if &layout_checksum(bytes, path)? != want_header {
        return Err(Error::corrupt(
            path,
            "its header (tensor names, shapes, offsets or metadata) differs from what was written".into(),
        ));
    }
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::corrupt(path, format!("not a safetensors file: {e}")))?;
    for name in file.names() {
        let view = file
            .tensor(name)
            .map_err(|e| Error::corrupt(path, format!("tensor `{name}`: {e}")))?;
        let want = entries
            .get(&format!("{TENSOR_PREFIX}{name}"))
            .ok_or_else(|| Error::corrupt(path, format!("tensor `{name}` has no checksum")))?;
        if &tag(crc32(view.data())) != want {
            return Err(Error::corrupt(
                path,
                format!("tensor `{name}` differs from what was written (checksum mismatch)"),
            ));
        }
    }
    Ok(Checksum::Verified)
}

/// The key of a JSON file's checksum.
const JSON_KEY: &str = "checksum";

/// `value` as pretty JSON carrying its checksum.
pub fn json_with_checksum<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>> {
    let mut v =
        serde_json::to_value(value).map_err(|e| Error::corrupt(path, format!("cannot encode: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::corrupt(path, "only a JSON object can carry a checksum".into()))?;
    obj.remove(JSON_KEY);
    let crc = crc32(&serde_json::to_vec(&v).map_err(|e| Error::corrupt(path, e.to_string()))?);
    if let Some(obj) = v.as_object_mut() {
        obj.insert(JSON_KEY.into(), tag(crc).into());
    }
    serde_json::to_vec_pretty(&v).map_err(|e| Error::corrupt(path, format!("cannot encode: {e}")))
}

/// Parses JSON written by [`json_with_checksum`] (or without a checksum, by another
/// tool) into `T`; a checksum that does not match is an error naming the file. The
/// error of a field `T` rejects names the field.
pub fn json_checked<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<(T, Checksum)> {
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt(path, format!("not JSON: {e}")))?;
    let status = match v.as_object_mut().and_then(|o| o.remove(JSON_KEY)) {
        None => Checksum::Absent,
        Some(want) => {
            let crc = crc32(&serde_json::to_vec(&v).map_err(|e| Error::corrupt(path, e.to_string()))?);
            if want.as_str() != Some(tag(crc).as_str()) {
                return Err(Error::corrupt(
                    path,
                    "its content differs from what was written (checksum mismatch)".into(),
                ));
            }
            Checksum::Verified
        }
    };
    let value = serde_path_to_error::deserialize(v)
        .map_err(|e| Error::corrupt(path, format!("at `{}`: {}", e.path(), e.inner())))?;
    Ok((value, status))
}

/// The first line of a checksummed TOML file.
const TOML_PREFIX: &str = "# checksum ";

/// `text` (TOML) with a first line carrying its checksum.
pub fn toml_with_checksum(text: &str) -> String {
    format!("{TOML_PREFIX}{}\n{text}", tag(crc32(text.as_bytes())))
}

/// The TOML text of a file written by [`toml_with_checksum`] (or without a checksum),
/// checked.
pub fn toml_checked<'a>(text: &'a str, path: &Path) -> Result<(&'a str, Checksum)> {
    let Some(rest) = text.strip_prefix(TOML_PREFIX) else {
        return Ok((text, Checksum::Absent));
    };
    let (want, body) = rest.split_once('\n').unwrap_or((rest, ""));
    if want.trim() != tag(crc32(body.as_bytes())) {
        return Err(Error::corrupt(
            path,
            "its content differs from what was written (checksum mismatch); was it edited?".into(),
        ));
    }
    Ok((body, Checksum::Verified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        step: u64,
        loss: f64,
        name: String,
        #[serde(default)]
        mean: Vec<f32>,
    }

    /// Every single-bit flip of `bytes` is an error or a different, still-checked value
    /// never accepted as the original: returns how many flips were accepted unchanged.
    fn silent_flips(bytes: &[u8], read: impl Fn(&[u8]) -> bool) -> usize {
        let mut silent = 0;
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.to_vec();
                b[i] ^= 1 << bit;
                if read(&b) {
                    silent += 1;
                }
            }
        }
        silent
    }

    #[test]
    fn json_round_trips_and_every_flip_is_caught() -> Result<()> {
        let path = Path::new("state.json");
        // 31/255 printed as f64 reads back one ulp off without serde_json's exact
        // float parsing (`float_roundtrip`): the checksum would then fail on a good file.
        let s = State {
            step: 7,
            loss: 0.1 + 0.2,
            name: "a run".into(),
            mean: vec![31.0 / 255.0, 0.0, 0.003_201_947_3],
        };
        let bytes = json_with_checksum(&s, path)?;
        assert_eq!(json_checked::<State>(&bytes, path)?, (s, Checksum::Verified));
        // A flip either breaks the JSON, the checksum or the field types; whitespace flips
        // that leave the same JSON are harmless (same value), so only count changed values.
        let original = json_checked::<State>(&bytes, path)?.0;
        let silent = silent_flips(&bytes, |b| {
            json_checked::<State>(b, path).is_ok_and(|(v, _)| v != original)
        });
        assert_eq!(silent, 0);
        // Without a checksum: read, and said so.
        let plain = br#"{"step": 1, "loss": 2.0, "name": "x"}"#;
        assert_eq!(json_checked::<State>(plain, path)?.1, Checksum::Absent);
        Ok(())
    }

    #[test]
    fn safetensors_checksums_catch_every_flip() -> Result<()> {
        let path = Path::new("m.safetensors");
        let a: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [7.0f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "a.weight".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &a)
                    .map_err(|e| Error::corrupt(path, e.to_string()))?,
            ),
            (
                "b.bias".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &b)
                    .map_err(|e| Error::corrupt(path, e.to_string()))?,
            ),
        ];
        let meta = HashMap::from([("format".to_string(), "brisk-test".to_string())]);
        let bytes = safetensors_with_checksums(views.clone(), meta.clone(), path)?;
        assert_eq!(verify_safetensors(&bytes, path)?, Checksum::Verified);
        // The same content gives the same bytes (metadata order is fixed).
        for _ in 0..5 {
            assert_eq!(
                safetensors_with_checksums(views.clone(), meta.clone(), path)?,
                bytes
            );
        }
        let silent = silent_flips(&bytes, |b| {
            verify_safetensors(b, path).is_ok() && b != bytes.as_slice()
        });
        // The header is JSON padded with spaces: flipping padding to another space-like
        // byte is harmless only if it still parses the same; count what verifies.
        assert_eq!(silent, 0, "flips accepted silently");
        Ok(())
    }

    #[test]
    fn toml_checksums_catch_edits() -> Result<()> {
        let path = Path::new("config.toml");
        let text = toml_with_checksum("epochs = 3\n[lr]\nbase = 0.1\n");
        assert_eq!(
            toml_checked(&text, path)?,
            ("epochs = 3\n[lr]\nbase = 0.1\n", Checksum::Verified)
        );
        let edited = text.replace("epochs = 3", "epochs = 4");
        assert!(toml_checked(&edited, path).is_err());
        assert_eq!(toml_checked("epochs = 3\n", path)?.1, Checksum::Absent);
        Ok(())
    }
}
