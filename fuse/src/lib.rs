//! The FUSE filesystem of sessionfs: a session as a read-write directory.
//!
//! - [`node`]: one inode and its attributes.
//! - [`journal`]: the SQLite journal of the overlay (the tree, xattrs, the
//!   change feed the sync agent consumes).
//! - [`namespace`]: the tree in memory and the POSIX rules of every change.
//! - [`content`]: file bytes, lazily from the object or from the overlay.
//! - [`fs`]: the `fuser::Filesystem` that puts them in front of the kernel.
//! - [`mount`]: opening a session's overlay and mounting it.
//! - [`multi`]: every session of a bucket under one mount root.
//!
//! Dependency direction: fuse → core, never core → fuse.

pub mod content;
pub mod fs;
pub mod journal;
pub mod mount;
pub mod multi;
pub mod namespace;
pub mod node;

use sessionfs_core::store::StoreError;
use sessionfs_core::tarball::TarballError;

/// What can go wrong under the mount; each maps to one errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
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
    #[error("the mount is read-only")]
    ReadOnly,
    #[error("no such open file")]
    BadHandle,
    #[error("overlay journal: {0}")]
    Journal(#[from] rusqlite::Error),
    #[error("overlay I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("session object: {0}")]
    Tarball(#[from] TarballError),
    #[error("overlay journal is inconsistent: {0}")]
    Corrupt(String),
    #[error("the overlay journal {0} is in use by another mount of this session")]
    InUse(String),
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        FsError::Tarball(e.into())
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::BadName => libc::EILSEQ,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NoAttr => libc::ENODATA,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Journal(_) | FsError::Tarball(_) | FsError::Corrupt(_) => libc::EIO,
            FsError::InUse(_) => libc::EBUSY,
        }
    }

    /// Failures of sessionfs itself or its storage (logged), as opposed to
    /// answers about the tree (ENOENT, EEXIST, …) that callers expect.
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            FsError::Journal(_)
                | FsError::Tarball(_)
                | FsError::Corrupt(_)
                | FsError::Io(_)
                | FsError::InUse(_)
        )
    }
}
