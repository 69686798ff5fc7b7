//! Following the stored object when another writer replaced it (another
//! server's write-back, a `push`, an upload): the open session moves onto
//! the new version without a remount, keeping every local change (the
//! merge rules are the namespace's, [`super::namespace::Rebased`]).
//!
//! Files that still read the old object's bytes at a path the new version
//! changed are copied up first, from the old version's cached blocks (the
//! store no longer has it). Then, under the copy-up and namespace locks,
//! the tree is rebased and the new object becomes the one unchanged files
//! read from; a mount is told what its kernel may have cached.

use std::sync::Arc;

use super::live::{Invalidation, LiveSession};
use super::namespace::Rebased;
use super::namespace::ROOT;
use super::writeback::{read_a_replaced_object, remove_freed, WriteBackError, COUNTERS};
use super::OverlayError;
use crate::store::{ObjectStore, StoreError};
use crate::tarball::reader::SessionReader;
use crate::tarball::toc::Entry;
use crate::tarball::TarballError;

/// What following the stored object found.
#[derive(Debug)]
pub enum Followed {
    /// The stored object is the session's base already.
    Unchanged,
    /// The session now rests on the stored object.
    Rebased { etag: String, rebased: Rebased },
    /// The object is gone from the store (deleted by another server).
    Gone,
}

/// Moves `live` onto the object now stored, if it changed. Blocks: call it
/// off the runtime.
pub fn follow(
    live: &LiveSession,
    store: &Arc<dyn ObjectStore>,
) -> Result<Followed, WriteBackError> {
    let _one_at_a_time = live.writeback_lock();
    let _in = live.enter()?;
    let rt = live.content.runtime().clone();
    let key = live.name.object_key();
    let remote = match rt.block_on(SessionReader::open(store.clone(), &key, None)) {
        Ok(r) => Arc::new(r),
        Err(TarballError::Store(StoreError::NotFound { .. })) => return Ok(Followed::Gone),
        Err(e) => return Err(e.into()),
    };
    let etag = remote.meta().etag.clone();
    let base_etag = live
        .ns
        .lock()
        .journal()
        .meta("base_etag")?
        .unwrap_or_default();
    if etag == base_etag {
        return Ok(Followed::Unchanged);
    }
    let base: Vec<Entry> = live
        .reader()
        .map(|r| r.entries().to_vec())
        .unwrap_or_default();
    let tag: String = etag
        .trim_matches('"')
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    for _ in 0..3 {
        let copy_ups = live.ns.lock().rebase_copy_ups(&base, remote.entries())?;
        for ino in copy_ups {
            if let Err(e) = live.ensure_local(ino, false) {
                if !read_a_replaced_object(&e) {
                    return Err(e.into());
                }
                let path = live
                    .ns
                    .lock()
                    .walk(ROOT)
                    .into_iter()
                    .find(|(_, i)| *i == ino);
                return Err(WriteBackError::BaseBytesGone {
                    path: path
                        .map_or_else(|| format!("an unlinked file (inode {ino})"), |(p, _)| p),
                });
            }
        }
        let rebased = {
            let _no_copy_up = live.content.exclusive();
            let mut ns = live.ns.lock();
            match ns.rebase(&base, remote.entries(), &etag, &tag) {
                Ok(r) => {
                    live.content.set_reader(remote.clone());
                    r
                }
                // A file was changed meanwhile and needs its copy-up too.
                Err(OverlayError::Invalid(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // As after a write-back: the journal's new pointers survive a power
        // loss before the overlay copies go (left in place otherwise, they
        // are removed at the next open).
        if !rebased.freed.is_empty() {
            match live.durable() {
                Ok(()) => remove_freed(live, &rebased.freed),
                Err(e) => tracing::warn!("syncing the journal after a rebase: {e}"),
            }
        }
        let mut told: Vec<Invalidation> = rebased
            .entries
            .iter()
            .map(|(parent, name)| Invalidation::Entry {
                parent: *parent,
                name: name.clone(),
            })
            .collect();
        told.extend(rebased.inodes.iter().map(|i| Invalidation::Inode(*i)));
        live.tell_detached(told);
        if !rebased.conflicts.is_empty() {
            COUNTERS.conflicts.fetch_add(
                rebased.conflicts.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut status = live.writeback.lock();
            status.conflicts += rebased.conflicts.len() as u64;
            for (path, copy) in &rebased.conflicts {
                tracing::warn!(
                    session = %live.name,
                    "conflict: {path} changed here and in the store; the local version stays{}",
                    copy.as_ref()
                        .map(|c| format!(", the stored one is kept as {c}"))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(Followed::Rebased { etag, rebased });
    }
    Err(WriteBackError::Overlay(OverlayError::Corrupt(
        "the tree kept changing during the rebase; trying again later".into(),
    )))
}
