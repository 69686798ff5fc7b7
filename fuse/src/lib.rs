//! The FUSE filesystem of sessionfs: a session as a read-write directory.
//!
//! The session itself (tree, bytes, journal) is the core's overlay
//! (`sessionfs_core::overlay`); this crate puts it in front of the kernel.
//!
//! - [`attr`]: inodes as the kernel sees them.
//! - [`fs`]: the `fuser::Filesystem` of one session.
//! - [`mount`]: opening a session for mounting and mounting it.
//! - [`multi`]: every session of a bucket under one mount root.
//! - [`requests`]: how many requests of each kind the kernel sent.
//!
//! Dependency direction: fuse → core, never core → fuse.

pub mod attr;
pub mod fs;
pub mod mount;
pub mod multi;
pub mod requests;

use sessionfs_core::overlay::OverlayError;

/// The errno the kernel is given for an overlay error.
pub fn errno(e: &OverlayError) -> i32 {
    if e.no_space() {
        return libc::ENOSPC;
    }
    match e {
        OverlayError::NotFound => libc::ENOENT,
        OverlayError::Exists => libc::EEXIST,
        OverlayError::NotDir => libc::ENOTDIR,
        OverlayError::IsDir => libc::EISDIR,
        OverlayError::NotEmpty => libc::ENOTEMPTY,
        OverlayError::NameTooLong => libc::ENAMETOOLONG,
        OverlayError::BadName => libc::EILSEQ,
        OverlayError::Invalid(_) => libc::EINVAL,
        OverlayError::NotPermitted(_) => libc::EPERM,
        OverlayError::NoAttr => libc::ENODATA,
        OverlayError::NotSupported(_) => libc::EOPNOTSUPP,
        OverlayError::ReadOnly => libc::EROFS,
        OverlayError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        OverlayError::Journal(_) | OverlayError::Tarball(_) | OverlayError::Corrupt(_) => libc::EIO,
        OverlayError::InUse(_) => libc::EBUSY,
        OverlayError::Retired => libc::ESTALE,
    }
}
