//! Whether a TOC is a plain tree: one that a mount shows entry for entry,
//! so the object can be read as it is, without an overlay's journal and
//! namespace, and look exactly as it would through them.
//!
//! The namespace that starts a mount from a TOC skips what a tree cannot
//! hold (an entry under a file, the second of two equal paths, a hard link
//! to a directory) and gives an entry a new inode number when the one it
//! recorded where it was packed cannot be kept. A TOC where none of that
//! happens — what sessionfs writes from a real tree — is plain: every entry
//! is shown at its path, with its recorded inode number, so a file's
//! attributes (and the API's ETag made from them) are the same read either
//! way. Anything else is served through the namespace.

use std::collections::HashSet;

use super::by_path::ByPath;
use super::toc::{Entry, Kind};

/// Recorded inode numbers at or above this are not kept: kernel inode
/// numbers carry a mount root's session slot above them.
const MAX_RECORDED_INO: u64 = 1 << 39;

/// Whether an inode number recorded where the entry was packed may stand
/// in a mount (1 is a mount's root).
pub fn usable_recorded_ino(i: u64) -> bool {
    i > 1 && i < MAX_RECORDED_INO
}

pub fn is_plain(entries: &[Entry], by_path: &ByPath) -> bool {
    if by_path.repeated() {
        return false;
    }
    let kind_at = |p: &str| by_path.get(entries, p).map(|i| entries[i].t);
    let mut inos = HashSet::with_capacity(entries.len());
    entries.iter().all(|e| {
        let parent_is_dir = match e.p.rsplit_once('/') {
            Some((parent, _)) => kind_at(parent) == Some(Kind::Dir),
            None => true,
        };
        let shown = match e.t {
            Kind::HardLink => e
                .lt()
                .and_then(kind_at)
                .is_some_and(|t| t != Kind::Dir && t != Kind::HardLink),
            _ => {
                e.sd.get()
                    .is_some_and(|sd| usable_recorded_ino(sd.i) && inos.insert(sd.i))
            }
        };
        parent_is_dir && shown
    })
}
