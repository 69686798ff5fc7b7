//! The session object: a seekable tar.gz that every reader still extracts.
//!
//! - [`writer`] packs a tree into one gzip member cut into independently
//!   inflatable segments, with a table of contents ([`toc`]) and a locator at
//!   the end ([`deflate`] holds the framing, [`tar_header`] the headers,
//!   [`tree`] the directory walk; [`toc_codec`] the TOC's stored form).
//! - [`reader`] opens an object with one suffix GET (one HEAD when the TOC
//!   is in the local [`index`]) and reads any byte range of any file by
//!   fetching only the segments that hold it, verifying each.
//! - [`foreign`] indexes tarballs other tools wrote in one streaming pass,
//!   with [`zran`] access points, so they read lazily too.
//! - [`segments`] fetches, checks and inflates segments for the readers of
//!   one version, in parallel and ahead of sequential reads.
//! - [`repack`] plans a write-back that keeps an old object's unchanged
//!   segments where they are.
//! - [`path`] decides which entry names are safe; [`by_path`] finds entries
//!   by path; [`plain`] tells a TOC a mount shows entry for entry.

pub mod by_path;
pub mod deflate;
pub mod foreign;
pub mod index;
pub mod path;
pub mod plain;
pub mod reader;
pub mod repack;
pub mod segments;
pub mod sparse;
pub mod tar_header;
pub mod toc;
pub mod toc_codec;
pub mod tree;
pub mod writer;
pub mod zran;

use std::io;
use std::path::Path;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TarballError {
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The object has no sessionfs locator: a tarball some other tool wrote.
    #[error("not a sessionfs seekable object (no locator at its end)")]
    NotSeekable,

    /// The object, its TOC or its locator do not hold together.
    #[error("corrupt session object: {0}")]
    Corrupt(String),

    /// A segment's bytes do not match its digest, CRC or length.
    #[error("segment {index} (object bytes {start}..{end}) failed verification: {what}")]
    BadSegment {
        index: usize,
        start: u64,
        end: u64,
        what: String,
    },

    /// The object was replaced while it was being read.
    #[error("the session object changed while it was being read; open it again")]
    ObjectChanged,

    #[error("unsafe path {path:?}: {reason}")]
    UnsafePath { path: String, reason: String },

    #[error("no such file in the session: {0}")]
    NoSuchPath(String),

    #[error("{0}: is a directory")]
    IsADirectory(String),

    #[error("{0}: not a regular file")]
    NotAFile(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },

    #[error("writing the session object: {0}")]
    Write(#[source] io::Error),

    #[error("{0} changed while it was being packed; pack again")]
    Changed(String),

    #[error("session index database: {0}")]
    Index(#[from] rusqlite::Error),
}

impl TarballError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        TarballError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn write(source: io::Error) -> Self {
        TarballError::Write(source)
    }
}
