//! How brisk writes the files it later reads: atomically (a temporary file in the same
//! folder, fsync, rename), so a crash or a full disk leaves the old file or the new one,
//! never a torn one; folder syncs that make a rename durable; and checksums (`checksum`)
//! that every read verifies.

use std::io::Write;
use std::path::{Path, PathBuf};

pub mod checksum;

pub use checksum::Checksum;

/// A file could not be written or read, or its content is not what was written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with the action and the path.
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The content is damaged or not what brisk wrote.
    #[error("{path} is damaged: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

impl Error {
    /// An I/O error of `action` on `path`.
    pub fn new(action: &'static str, path: &Path, cause: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.to_path_buf(),
            cause,
        }
    }

    /// Damaged content of `path`.
    pub fn corrupt(path: &Path, problem: String) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            problem,
        }
    }
}

/// The result type of brisk-files.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` atomically: a hidden temporary file in the same folder,
/// fsync, rename. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::new("cannot write", path, e)
    })
}

/// Makes the entries of `dir` (a rename into it, say) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::new("cannot sync folder", dir, e))
}

/// The folder a file is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one")?;
        write_atomic(&path, b"two")?;
        assert_eq!(std::fs::read(&path)?, b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        sync_dir(dir.path())?;
        Ok(())
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_what_was_there(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("missing-folder").join("a.json");
        let e = write_atomic(&path, b"x").expect_err("no such folder");
        assert!(e.to_string().contains("missing-folder"), "{e}");
        // A folder in the file's place cannot be replaced: it stays, with no temporary beside it.
        let taken = dir.path().join("taken");
        std::fs::create_dir(&taken)?;
        std::fs::write(taken.join("inside"), b"kept")?;
        write_atomic(&taken, b"x").expect_err("a folder is in the way");
        assert_eq!(std::fs::read(taken.join("inside"))?, b"kept");
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }
}
