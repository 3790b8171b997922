//! Errors of the format layer. Every variant names the file and, where one exists, the offset
//! and the structure being read, so a message alone tells what went wrong where.

use std::io;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Stable classification of an [`Error`], for the CLI's exit codes and for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// the file could not be opened (missing, permission, a directory ...)
    Open,
    /// an I/O call failed on an open file
    Io,
    /// another process holds a conflicting image lock
    Locked,
    /// the image's own structures are invalid or inconsistent
    Corrupt,
    /// a valid image or request this driver does not support
    Unsupported,
    /// a bad option, size or argument given by the user
    InvalidArgument,
    /// a backing chain that loops or is too deep
    Chain,
}

/// An error from the format layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening a file failed.
    #[error("Could not open '{path}': {}", strerror(.source))]
    Open {
        /// path as given
        path: String,
        /// cause
        #[source]
        source: io::Error,
    },
    /// Creating a file failed.
    #[error("Could not create '{path}': {}", strerror(.source))]
    Create {
        /// path as given
        path: String,
        /// cause
        #[source]
        source: io::Error,
    },
    /// Opening a file failed with a message of our own (a directory, a bad device).
    #[error("Could not open '{path}': {why}")]
    OpenWhy {
        /// path as given
        path: String,
        /// why
        why: String,
    },
    /// An I/O call failed.
    #[error("{what} of '{path}' at offset {off:#x}: {}", strerror(.source))]
    Io {
        /// what was being done ("reading L2 table", "truncating" ...)
        what: String,
        /// file
        path: String,
        /// byte offset in the file
        off: u64,
        /// cause
        #[source]
        source: io::Error,
    },
    /// A conflicting lock is held by another process, worded as qemu-img words it.
    #[error("Failed to get {shared}\"{perm}\" lock\nIs another process using the image [{path}]?")]
    Locked {
        /// image path
        path: String,
        /// "shared " when our *unshared* permission collides with another's held one
        shared: &'static str,
        /// permission name: "consistent read", "write", "write unchanged", "resize"
        perm: &'static str,
    },
    /// The image is malformed.
    #[error("{path}: {what}")]
    Corrupt {
        /// file
        path: String,
        /// what is wrong, where
        what: String,
    },
    /// Not supported (by this format, or by rimg yet).
    #[error("{0}")]
    Unsupported(String),
    /// A bad user-supplied value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A bad backing chain.
    #[error("{0}")]
    Chain(String),
    /// An internal snapshot could not be loaded (`Failed to load snapshot: ...`).
    #[error("Failed to load snapshot: {0}")]
    Snapshot(String),
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Open { .. } | Error::OpenWhy { .. } | Error::Create { .. } => ErrorKind::Open,
            Error::Io { .. } => ErrorKind::Io,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Chain(_) => ErrorKind::Chain,
            Error::Snapshot(_) => ErrorKind::InvalidArgument,
        }
    }

    /// Build an [`Error::Io`].
    pub fn io(what: impl Into<String>, path: &str, off: u64, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            path: path.to_string(),
            off,
            source,
        }
    }
}

/// Describe an `io::Error` the way QEMU's `strerror` wording does ("No such file or
/// directory"), without Rust's " (os error 2)" suffix.
pub fn strerror(e: &io::Error) -> String {
    // std formats OS errors with the C library's strerror text plus " (os error N)".
    let s = e.to_string();
    match e.raw_os_error() {
        Some(code) => s
            .strip_suffix(&format!(" (os error {code})"))
            .map(str::to_string)
            .unwrap_or(s),
        None => s,
    }
}
