//! What can go wrong making simulated hosts: unavailable here, or a set-up step failing.

use std::path::PathBuf;

/// Why simulated hosts are not available, or a set-up step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This machine cannot make namespaces (not root, a tool missing, the kernel refuses).
    #[error("simulated hosts are not available here: {0}")]
    Unavailable(String),
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
