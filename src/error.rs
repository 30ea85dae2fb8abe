//! The library's error type: every variant names the path or peer it concerns, so the CLI
//! can print one clear line. Never carries a backtrace or prints anything itself.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A root that must be a directory is something else.
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
    /// Source and destination overlap; syncing would feed on its own output.
    #[error("{0} and {1} overlap: one is inside the other")]
    Overlap(PathBuf, PathBuf),
    /// The run would expunge more than the delete guard allows.
    #[error(
        "refusing to expunge {would} of {total} destination messages (limit {limit}); \
         is the source mounted? pass --max-delete to allow"
    )]
    TooManyDeletes {
        /// Messages the plan expunges.
        would: u64,
        /// Messages on the destination.
        total: u64,
        /// The limit in force.
        limit: u64,
    },
    /// An option has a value we cannot use.
    #[error("{0}")]
    Usage(String),
    /// The far side of a remote replica failed, or the connection to it did.
    #[error("{location}: {message}")]
    Remote {
        /// The remote location (`host:path`).
        location: String,
        /// What went wrong.
        message: String,
    },
    /// A file does not hold what its format promises (a truncated `m.N`, a torn index).
    #[error("{path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The run was interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
