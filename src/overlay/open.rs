//! Opening one session: its object (lazily, through the block cache) and
//! its overlay directory — `journal.db` (the tree and the change feed) and
//! `data/` (changed files).
//!
//! The first open starts the journal from the object's TOC. Later opens
//! reconcile what a crash may have left: overlay files longer than the
//! journal knew, files created and written but never flushed, inodes
//! unlinked while open. An overlay whose pending changes were made against
//! another version of the object than the one now stored is refused rather
//! than silently mixed; one without pending changes starts again from the
//! new object.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::content::Content;
use super::journal::{Journal, WRITEBACK_ID_KEY};
use super::live::LiveSession;
use super::namespace::Namespace;
use super::node::Time;
use super::OverlayError;
use crate::session::SessionPath;
use crate::store::{ObjectStore, StoreError};
use crate::tarball::index::TocIndex;
use crate::tarball::reader::SessionReader;
use crate::tarball::TarballError;

pub struct OpenSpec {
    pub store: Arc<dyn ObjectStore>,
    pub index: Option<TocIndex>,
    pub session: SessionPath,
    /// This session's overlay directory.
    pub overlay: PathBuf,
    pub read_only: bool,
    /// Whether the session may open from this host's cached TOC when the
    /// store cannot be reached.
    pub offline: Offline,
}

/// Opening a session without the store: read-only, on the version whose
/// TOC the local index kept, its bytes from the block cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offline {
    /// The store must answer (the API, write-back tools).
    Never,
    /// Fall back to the cached version when the store is unreachable.
    WhenUnreachable,
    /// Never ask the store (`mount --offline`).
    Always,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(
        "the overlay at {overlay} holds changes not yet written back, made against object \
         version {journal}, but the stored object is now {stored}; write them back or move \
         the overlay away"
    )]
    Diverged {
        overlay: String,
        journal: String,
        stored: String,
    },
    #[error(
        "no cached version of session {session} to serve offline, and the store cannot be \
         reached"
    )]
    Unreachable {
        session: String,
        #[source]
        cause: StoreError,
    },
}

/// The name of the journal inside an overlay directory.
pub const JOURNAL: &str = "journal.db";
/// Its write-ahead log.
const WAL: &str = "journal.db-wal";
/// The journal's redo log ([`super::journal::redo_path`]).
const REDO: &str = "journal.redo";

/// Opens the session's object and overlay. Blocks on `rt`: call it from a
/// thread that is not one of the runtime's.
pub fn open(spec: &OpenSpec, rt: &tokio::runtime::Handle) -> Result<LiveSession, OpenError> {
    open_with(spec, rt, None)
}

/// [`open`], on `object` when it is given: the session's object, opened
/// already (a session read as its object until now), so the store is not
/// asked for it again.
pub fn open_with(
    spec: &OpenSpec,
    rt: &tokio::runtime::Handle,
    object: Option<Arc<SessionReader>>,
) -> Result<LiveSession, OpenError> {
    std::fs::create_dir_all(&spec.overlay).map_err(OverlayError::from)?;
    let key = spec.session.object_key();
    // The version pending changes were made against, from the local index,
    // read before opening the stored object refreshes the index (in case
    // another writer replaced it: see below).
    let pending_base = pending_base(&spec.overlay.join(JOURNAL))?;
    let old_version = match (&pending_base, &spec.index) {
        (Some(base), Some(index)) if !base.is_empty() => rt
            .block_on(SessionReader::from_index(
                spec.store.clone(),
                &key,
                base,
                index,
            ))
            .unwrap_or_else(|e| {
                tracing::warn!("the local index of {key} at {base}: {e}");
                None
            }),
        _ => None,
    };
    let mut offline = false;
    let mut reader = match object {
        Some(r) => Some(r),
        None => {
            let opened = match spec.offline {
                Offline::Always => Err(TarballError::Store(StoreError::Transient {
                    op: "open",
                    key: key.clone(),
                    message: "--offline: the store is not asked".into(),
                })),
                _ => rt.block_on(SessionReader::open(
                    spec.store.clone(),
                    &key,
                    spec.index.as_ref(),
                )),
            };
            match opened {
                Ok(r) => Some(Arc::new(r)),
                Err(TarballError::Store(StoreError::NotFound { .. })) => None,
                Err(TarballError::Store(e))
                    if e.is_unavailable() && spec.offline != Offline::Never =>
                {
                    let Some(r) = offline_reader(spec, &key, rt)? else {
                        return Err(OpenError::Unreachable {
                            session: spec.session.to_string(),
                            cause: e,
                        });
                    };
                    tracing::warn!(
                        "session {}: the store cannot be reached ({e}); serving it read-only from \
                         this host's cache, as of version {} (files whose blocks are not cached fail \
                         with EIO)",
                        spec.session,
                        r.meta().etag
                    );
                    offline = true;
                    Some(Arc::new(r))
                }
                Err(e) => return Err(OverlayError::from(e).into()),
            }
        }
    };
    let mut etag = reader.as_ref().map(|r| r.meta().etag.clone());
    let journal_path = spec.overlay.join(JOURNAL);
    if journal_path.exists() {
        // Offline, whether an interrupted write-back completed cannot be
        // known; the next open with the store finishes the recovery.
        if !offline {
            let stored = reader.as_ref().map(|r| r.meta());
            recover_writeback(&journal_path, spec, stored, rt)?;
        }
        match check_version(&journal_path, &spec.overlay, etag.as_deref()) {
            // Changes pending against a version another writer replaced:
            // the session opens on that version (its TOC from the local
            // index), and the write-back loop then moves it onto the stored
            // one, merging, so nothing is stranded.
            // Made here from nothing while someone else stored the session:
            // no old version to read; every file is in the overlay.
            Err(OpenError::Diverged { journal, .. }) if journal.is_empty() => {
                etag = None;
                reader = None;
            }
            Err(OpenError::Diverged {
                journal,
                stored,
                overlay,
            }) => match old_version {
                Some(r) => {
                    tracing::warn!(
                        "session {}: changes pending against {journal}, which another writer \
                         replaced; opening that version to merge them onto the stored one",
                        spec.session
                    );
                    etag = Some(journal);
                    reader = Some(Arc::new(r));
                }
                None => {
                    return Err(OpenError::Diverged {
                        overlay,
                        journal,
                        stored,
                    })
                }
            },
            other => other?,
        }
    }
    let entries = reader.as_ref().map_or(&[][..], |r| r.entries());
    let (mut ns, orphans) = Namespace::open(&journal_path, etag.as_deref(), entries)?;
    let content = Content::new(&spec.overlay, reader.clone(), rt.clone())?;
    // Copy-ups and staged writes a crash interrupted (`{ino}.copy`,
    // `put.{pid}.{n}`), never put in place, and the old bytes a PUT's
    // exchange left under a staged name for the removal thread: never part
    // of the tree.
    if let Ok(dir) = std::fs::read_dir(content.dir()) {
        for e in dir.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.contains('.')) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for ino in orphans {
        content.remove(ino);
    }
    // Overlay files a write-back adopted into the object, left by a crash
    // between its commit and their removal; chunk maps of files no longer
    // copied up chunk by chunk (held whole since, adopted, or a copy-up the
    // journal never recorded).
    let local: std::collections::HashSet<u64> = ns.local_files().into_iter().collect();
    let unjournaled: std::collections::HashSet<u64> = ns.unjournaled_local().into_iter().collect();
    if let Ok(dir) = std::fs::read_dir(content.dir()) {
        for e in dir.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(ino) = Content::map_of(&name) {
                if !ns
                    .get(ino)
                    .is_ok_and(|n| matches!(n.data, super::node::Data::Partial(_)))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if let Ok(ino) = name.parse::<u64>() {
                // Also the files of inodes freed with their removal still
                // queued when the process ended (`removals`).
                if !local.contains(&ino) && !unjournaled.contains(&ino) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    // Chunk maps, loaded now: a file whose map is unreadable fails the open
    // rather than reading the object's bytes where writes were.
    for ino in ns.local_files() {
        if matches!(
            ns.get(ino).map(|n| &n.data),
            Ok(super::node::Data::Partial(_))
        ) {
            content.chunk_map(ino)?;
        }
    }
    // Files created and written whose journal entry had not caught up.
    for ino in ns.unjournaled_local() {
        if content.stat(ino).is_some() {
            ns.mark_local(ino);
            ns.flush(ino)?;
        }
    }
    // Writes that reached overlay files after the journal last caught up.
    for ino in ns.local_files() {
        if let Some(md) = content.stat(ino) {
            let mtime = md.modified().map(Time::from_system).unwrap_or_default();
            ns.adopt_local(ino, md.len(), mtime)?;
        }
    }
    crate::memory::trim();
    Ok(LiveSession::new(
        spec.session.clone(),
        ns,
        content,
        journal_path,
        spec.read_only || offline,
    ))
}

/// The version of the session this host last opened, from the local index.
fn offline_reader(
    spec: &OpenSpec,
    key: &str,
    rt: &tokio::runtime::Handle,
) -> Result<Option<SessionReader>, OpenError> {
    let Some(index) = &spec.index else {
        return Ok(None);
    };
    rt.block_on(async {
        let Some(etag) = index.latest(&spec.store.describe(), key).await? else {
            return Ok(None);
        };
        SessionReader::from_index(spec.store.clone(), key, &etag, index).await
    })
    .map_err(|e| OpenError::Overlay(e.into()))
}

/// A write-back a crash interrupted: if the stored object carries its id,
/// it completed, and is adopted as the base (not taken for someone else's
/// change); otherwise its multipart upload, if any, is aborted.
fn recover_writeback(
    journal: &Path,
    spec: &OpenSpec,
    stored: Option<&crate::store::ObjectMeta>,
    rt: &tokio::runtime::Handle,
) -> Result<(), OpenError> {
    let j = Journal::open(journal)?;
    let Some(attempt) = j.attempt()? else {
        return Ok(());
    };
    let ours = stored.filter(|m| {
        m.metadata.get(WRITEBACK_ID_KEY).map(String::as_str) == Some(attempt.id.as_str())
    });
    match ours {
        Some(meta) => {
            tracing::info!(
                "session {}: the write-back {} completed before the last stop; adopting it",
                spec.session,
                attempt.id
            );
            j.recover_completed(&attempt, &meta.etag)?;
        }
        None => {
            // The attempt's upload, and any of the key begun since it
            // started (created, but killed before it was recorded). Another
            // writer's upload caught here only has to try again.
            let key = spec.session.object_key();
            let since = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(attempt.started.saturating_sub(5));
            let mut ids: Vec<String> = attempt.upload.iter().cloned().collect();
            match rt.block_on(spec.store.list_multipart(&key)) {
                Ok(uploads) => ids.extend(
                    uploads
                        .into_iter()
                        .filter(|u| u.initiated >= since)
                        .map(|u| u.upload_id),
                ),
                Err(e) => tracing::warn!("listing the uploads of {key}: {e}"),
            }
            ids.sort();
            ids.dedup();
            for upload in ids {
                match rt.block_on(spec.store.abort_multipart(&key, &upload)) {
                    Ok(()) | Err(StoreError::UploadNotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!("aborting the interrupted upload {upload} of {key}: {e}")
                    }
                }
            }
            let tx = j.begin()?;
            tx.set_attempt(None)?;
            tx.commit()?;
        }
    }
    Ok(())
}

/// The base ETag of an overlay whose journal holds pending changes.
fn pending_base(journal: &Path) -> Result<Option<String>, OpenError> {
    if !journal.exists() {
        return Ok(None);
    }
    let j = Journal::open(journal)?;
    if !j.has_changes()? {
        return Ok(None);
    }
    Ok(j.meta("base_etag")?)
}

/// Refuses an overlay with pending changes against another object version;
/// one without pending changes is simply started again from the object.
fn check_version(journal: &Path, overlay: &Path, etag: Option<&str>) -> Result<(), OpenError> {
    let j = Journal::open(journal)?;
    let Some(recorded) = j.meta("base_etag")? else {
        return Ok(());
    };
    let stored = etag.unwrap_or("");
    if recorded == stored {
        return Ok(());
    }
    if j.has_changes()? {
        return Err(OpenError::Diverged {
            overlay: overlay.display().to_string(),
            journal: recorded,
            stored: stored.to_owned(),
        });
    }
    drop(j);
    tracing::info!("the object changed and the overlay has no pending changes: starting afresh");
    discard(overlay);
    Ok(())
}

/// Removes an overlay's journal and files (the directory itself stays).
pub fn discard(overlay: &Path) {
    for name in [JOURNAL, WAL, "journal.db-shm", REDO] {
        let _ = std::fs::remove_file(overlay.join(name));
    }
    let _ = std::fs::remove_dir_all(overlay.join("data"));
}
