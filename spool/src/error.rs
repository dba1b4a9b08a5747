//! The spool's one error type.

use std::path::{Path, PathBuf};

/// `Result` with [`SpoolError`] as the default error.
pub type Result<T, E = SpoolError> = std::result::Result<T, E>;

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file system refused: disk full, permissions, I/O error. Names the file.
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// [`crate::FullPolicy::Block`] refused a record; retry after acknowledgements free space.
    #[error("spool full ({bytes} of {max_bytes} bytes): policy block_polling")]
    Full { bytes: u64, max_bytes: u64 },
    /// A record can never be stored: it does not fit in one segment.
    #[error("record of {0} bytes is larger than a segment")]
    TooLarge(usize),
    /// The directory holds something the spool cannot repair without guessing: a ledger of a
    /// newer format, or segments whose record ids overlap. Everything repairable (torn or
    /// garbage tails, a lost or damaged ledger) is repaired with a warning instead.
    #[error("spool {path}: corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// Wraps an I/O error with the path it concerns, for `map_err`.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}
