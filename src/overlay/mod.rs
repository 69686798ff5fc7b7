//! A session's overlay: the live, writable tree of a session, kept on local
//! disk beside its object until the changes are written back.
//!
//! The mounts (FUSE) and the HTTP API both work on it, so a change made
//! through one is what the other reads.
//!
//! - [`node`]: one inode and its attributes.
//! - [`journal`]: the SQLite journal (the tree, xattrs, the change feed the
//!   write-back consumes).
//! - [`namespace`]: the tree in memory and the POSIX rules of every change.
//! - [`content`]: file bytes, lazily from the object or from the overlay.
//! - [`partial`]: large files copied up chunk by chunk, as they are written.
//! - [`live`]: one open session (tree + bytes) and the whole-file operations
//!   the API makes on it.
//! - [`open`]: opening a session's overlay, reconciling what a crash left.
//! - [`removals`]: overlay files of freed inodes, removed off the FUSE thread.
//! - [`registry`]: the open sessions of a bucket, shared by mounts and API.
//! - [`export`]: the merged view (object + overlay) packed as a tarball.
//! - [`follow`]: moving onto an object another writer stored, merging.
//! - [`writeback`]: the merged view made the stored object, incrementally
//!   and conditionally, then adopted as the new base.

pub mod content;
pub mod export;
pub mod follow;
pub mod journal;
pub mod live;
pub mod namespace;
pub mod node;
pub mod open;
pub mod partial;
pub mod registry;
pub mod removals;
pub mod reserve;
pub mod writeback;

use crate::store::StoreError;
use crate::tarball::TarballError;

/// What can go wrong in an overlay; callers map each to an errno (FUSE) or
/// an HTTP status (API).
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("names must be UTF-8 (they are stored in a tar archive)")]
    BadName,
    #[error("invalid: {0}")]
    Invalid(&'static str),
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("no such attribute")]
    NoAttr,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("the session is read-only here")]
    ReadOnly,
    #[error("overlay journal: {0}")]
    Journal(#[from] rusqlite::Error),
    #[error("overlay I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("session object: {0}")]
    Tarball(#[from] TarballError),
    #[error("overlay journal is inconsistent: {0}")]
    Corrupt(String),
    #[error("the overlay journal {0} is in use by another process (a mount or the API serving this session)")]
    InUse(String),
    /// The session was closed for deletion or replacement while the
    /// operation waited: open it again.
    #[error("the session was deleted or replaced meanwhile")]
    Retired,
}

impl From<StoreError> for OverlayError {
    fn from(e: StoreError) -> Self {
        OverlayError::Tarball(e.into())
    }
}

impl OverlayError {
    /// The overlay's disk (or quota) is full: ENOSPC, whichever layer hit it.
    pub fn no_space(&self) -> bool {
        match self {
            OverlayError::Journal(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            OverlayError::Io(e) => matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)),
            _ => false,
        }
    }

    /// The object store did not answer in time (or at all); the operation
    /// may work once it is back.
    pub fn store_unavailable(&self) -> bool {
        matches!(self, OverlayError::Tarball(crate::tarball::TarballError::Store(e)) if e.is_unavailable())
    }

    /// Failures of sessionfs itself or its storage (logged), as opposed to
    /// answers about the tree (ENOENT, EEXIST, …) that callers expect.
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            OverlayError::Journal(_)
                | OverlayError::Tarball(_)
                | OverlayError::Corrupt(_)
                | OverlayError::Io(_)
                | OverlayError::InUse(_)
        )
    }
}
