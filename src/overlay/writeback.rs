//! Writing a session back: the merged view becomes the stored object, at
//! the cost of what changed, without losing anyone's update.
//!
//! One write-back:
//! 1. **Snapshot** the tree under the namespace lock ([`export::snapshot`]):
//!    the entries, where each one's bytes are, the change-feed sequence it
//!    covers and the ETag it is based on.
//! 2. **Record** the attempt in the journal (an id that also goes into the
//!    object's metadata, the sequence, the base ETag, and the files whose
//!    base path the snapshot moves), so a restart can tell its own
//!    completed upload from someone else's.
//! 3. **Pack**: incrementally when the base is a sessionfs object larger
//!    than [`WriteBackOptions::small_object`] and not too fragmented
//!    ([`repack::plan`]): unchanged runs are copied server-side
//!    (`UploadPartCopy`, conditional on the base ETag), the rest is packed
//!    into a spool file. Otherwise the whole view is packed afresh (which
//!    also converts a foreign object).
//! 4. **Upload**, conditional on the base ETag (`If-Match`; `If-None-Match`
//!    for a session with no object yet). A 412 is a [`WriteBackError::Conflict`]:
//!    nothing is written, every change stays pending.
//! 5. **Adopt** the new object in one journal transaction: files whose
//!    bytes it now holds point at it, overlay files no longer needed are
//!    deleted (after the commit), the covered changes are confirmed.
//!    Changes made meanwhile stay pending for the next write-back; a file
//!    changed since the snapshot, or held (open, or known to a mount's
//!    kernel, which may write to it without asking), keeps its overlay file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::export::{self, Origin, Snapshot};
use super::journal::{Attempt, WRITEBACK_ID_KEY};
use super::live::LiveSession;
use super::namespace::WrittenBack;
use super::node::Data;
use super::OverlayError;
use crate::store::{
    ByteRange, CompletedPart, CopySource, GetOptions, ObjectMeta, ObjectStore, Precondition,
    PutOptions, StoreError, MAX_PARTS, MIN_PART_SIZE,
};
use crate::tarball::deflate::GZIP_HEADER;
use crate::tarball::reader::SessionReader;
use crate::tarball::repack::{self, Plan};
use crate::tarball::toc::DIGEST_KEY;
use crate::tarball::tree::TreeEntry;
use crate::tarball::writer::{pack_after, PackOptions, Prefix, Reused};
use crate::tarball::TarballError;

/// Size of the parts copied server-side. Large: the test server copies the
/// bytes itself, and measured faster with few large copies (1 GiB session:
/// one copy per run ~4.5 s; 2 x 256 MiB at once 5.9 s; 8 x 64 MiB 8.1 s);
/// several runs are still copied at once.
const COPY_PART: u64 = 1 << 30;
/// Server-side copies in flight at once.
const COPY_CONCURRENCY: usize = 4;

#[derive(Clone, Debug)]
pub struct WriteBackOptions {
    pub pack: PackOptions,
    /// Objects up to this size are packed in full and sent in one PUT.
    pub small_object: u64,
    /// Size of the uploaded parts of a multipart upload.
    pub part_size: u64,
    /// Share of the object in short segments past which the next write-back
    /// packs in full.
    pub max_fragmentation: f64,
}

impl Default for WriteBackOptions {
    fn default() -> Self {
        WriteBackOptions {
            pack: PackOptions::default(),
            small_object: 16 << 20,
            part_size: 32 << 20,
            max_fragmentation: 0.25,
        }
    }
}

/// What one write-back did.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub etag: String,
    /// Packed in full (not incremental).
    pub full: bool,
    /// Changes of the feed it covered.
    pub changes: u64,
    pub object_size: u64,
    /// Bytes sent to the store.
    pub uploaded: u64,
    /// Bytes copied server-side from the old object.
    pub copied: u64,
    /// Requests made to the store (reads of moved bytes included).
    pub requests: u64,
    pub seconds: f64,
    pub at: SystemTime,
}

impl Report {
    /// The figures as the API's session metadata and `sessionfs status` show them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "at": humantime::format_rfc3339_millis(self.at).to_string(),
            "etag": self.etag,
            "full": self.full,
            "changes": self.changes,
            "objectSize": self.object_size,
            "uploadedBytes": self.uploaded,
            "copiedBytes": self.copied,
            "requests": self.requests,
            "seconds": self.seconds,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteBackError {
    /// The stored object is no longer the one the changes were made
    /// against: another writer replaced or deleted it.
    #[error("the stored object changed since this overlay's base {base:?} (another writer); the changes stay pending")]
    Conflict { base: String },
    /// Moving onto another writer's object needs bytes of the object it
    /// replaced: a file changed here still reads some (a large file copied
    /// up chunk by chunk) and the other writer changed it too. Neither the store nor the block cache has
    /// them any more.
    #[error("{path} was changed here and by another writer, and its version here still reads bytes of the object that writer replaced, which neither the store nor the block cache has any more: it cannot be kept beside theirs. Every change here stays pending until it goes: delete it here (their version comes back) to let the rest be written back")]
    BaseBytesGone { path: String },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error("packing: {0}")]
    Pack(#[from] TarballError),
    #[error("spool file: {0}")]
    Spool(#[from] std::io::Error),
}

impl WriteBackError {
    /// Worth trying again soon by itself (a passing fault, a file changed
    /// while packed), as opposed to a conflict that needs a rebase.
    pub fn is_conflict(&self) -> bool {
        matches!(self, WriteBackError::Conflict { .. })
    }

    /// A conflict when the failure was a read of the base object that
    /// found it replaced (another writer stored a newer one while the
    /// unchanged files were being packed from it): only moving onto the
    /// new object lets the write-back go on. Taken for a passing fault,
    /// every retry would read the old object again and fail the same way,
    /// and a stop's final write-back would leave the changes pending.
    fn or_conflict(self, base: &str) -> WriteBackError {
        if self.is_conflict() || !read_a_replaced_object(&self) {
            return self;
        }
        WriteBackError::Conflict {
            base: base.to_owned(),
        }
    }
}

/// Whether `e`, or an error it wraps (an I/O error included: the packer
/// reads the object through `std::io::Read`), says the object read was
/// replaced.
pub(super) fn read_a_replaced_object(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        let replaced = match e.downcast_ref::<TarballError>() {
            Some(TarballError::ObjectChanged) => true,
            Some(TarballError::Store(s)) => s.is_precondition_failed(),
            _ => e
                .downcast_ref::<StoreError>()
                .is_some_and(StoreError::is_precondition_failed),
        };
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|inner| read_a_replaced_object(inner));
        if replaced || inner {
            return true;
        }
        at = e.source();
    }
    false
}

/// Process-wide write-back counters, for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub writebacks: AtomicU64,
    pub failures: AtomicU64,
    pub conflicts: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    writebacks: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
    uploaded_bytes: AtomicU64::new(0),
    copied_bytes: AtomicU64::new(0),
};

/// Writes the session back if it has pending changes. Blocks (the store is
/// reached through the session's runtime): call it off the runtime.
pub fn write_back(
    live: &LiveSession,
    store: &Arc<dyn ObjectStore>,
    opts: &WriteBackOptions,
) -> Result<Option<Report>, WriteBackError> {
    let mut entries = 0;
    let done = write_back_pending(live, store, opts, &mut entries);
    // The snapshot and the pack's tables were the size of the tree: worth
    // handing back when the tree is large, not after every small session's
    // write-back (a server writes back many, every few seconds).
    if entries >= TRIM_AFTER_ENTRIES {
        crate::memory::trim();
    }
    done
}

/// Snapshots of at least this many entries are followed by a trim.
const TRIM_AFTER_ENTRIES: usize = 10_000;

/// [`write_back`]; `entries` learns the size of the snapshot taken.
fn write_back_pending(
    live: &LiveSession,
    store: &Arc<dyn ObjectStore>,
    opts: &WriteBackOptions,
    entries: &mut usize,
) -> Result<Option<Report>, WriteBackError> {
    let _one_at_a_time = live.writeback_lock();
    let _in = live.enter()?;
    live.writable()?;
    // Nothing pending (a `flush` with nothing to do): no snapshot, which
    // is the size of the tree (tens of MB for 100,000 entries), to learn it.
    // Changes only go at an adoption, under the lock held here, so the
    // snapshot below has some too.
    if live.ns.lock().journal().last_seq()? == 0 {
        return Ok(None);
    }
    let started = Instant::now();
    let mut snap = export::snapshot(live)?;
    *entries = snap.tree.len();
    let changes = live.ns.lock().journal().pending_count()?;
    let key = live.name.object_key();
    let attempt = Attempt {
        id: new_id(),
        seq: snap.seq,
        base: snap.base_etag.clone(),
        upload: None,
        started: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    // What the session must point at the new object once the tree has gone
    // into the pack: files whose bytes come from the overlay, and unchanged
    // files moved since the base object (read from their old path until
    // then). The others read the new object at the path they read now.
    let moving: Vec<(usize, String)> = snap
        .tree
        .iter()
        .zip(&snap.origin)
        .enumerate()
        .filter_map(|(i, (t, o))| match o {
            Origin::Base {
                moved_from: Some(_),
                ..
            } => Some((i, t.entry.p.to_string())),
            Origin::Local { .. } => Some((i, t.entry.p.to_string())),
            _ => None,
        })
        .collect();
    // Files copied up chunk by chunk are remapped too: the chunks they do
    // not hold are read from their path in the new object (a crash
    // recovery that adopts it applies this; a file held whole ignores it).
    let remap: Vec<(u64, String)> = moving
        .iter()
        .filter_map(|(i, p)| match &snap.origin[*i] {
            Origin::Base { ino, .. } | Origin::Local { ino, .. } => Some((*ino, p.clone())),
            _ => None,
        })
        .collect();
    {
        let ns = live.ns.lock();
        let tx = ns.journal().begin()?;
        tx.begin_attempt(&attempt, &remap)?;
        tx.commit()?;
    }
    let rt = live.content.runtime().clone();
    let result = pack_and_upload(live, store, opts, &mut snap, attempt, &rt);
    let outcome = match result {
        Ok(done) => done,
        Err(e) => {
            let e = e.or_conflict(&snap.base_etag);
            // Nothing was stored: the attempt is void.
            let ns = live.ns.lock();
            if let Ok(tx) = ns.journal().begin() {
                let _ = tx.set_attempt(None).and_then(|()| tx.commit());
            }
            COUNTERS.failures.fetch_add(1, Ordering::Relaxed);
            if e.is_conflict() {
                COUNTERS.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
    };
    let Uploaded {
        meta,
        toc,
        uploaded,
        copied,
        requests,
        full,
    } = outcome;
    let etag = meta.etag.clone();
    let object_size = meta.size;
    let reader = Arc::new(SessionReader::written(store.clone(), &key, meta, toc));
    let freed = adopt(live, &snap, &moving, &etag, reader)?;
    // The journal now points those files at the object: that must survive a
    // power loss before their overlay copies go. Left in place on a failed
    // sync, they are removed at the next open.
    match if freed.is_empty() {
        Ok(())
    } else {
        live.durable()
    } {
        Ok(()) => remove_freed(live, &freed),
        Err(e) => tracing::warn!("syncing the journal after a write-back: {e}"),
    }
    let report = Report {
        etag,
        full,
        changes,
        object_size,
        uploaded,
        copied,
        requests,
        seconds: started.elapsed().as_secs_f64(),
        at: SystemTime::now(),
    };
    COUNTERS.writebacks.fetch_add(1, Ordering::Relaxed);
    COUNTERS
        .uploaded_bytes
        .fetch_add(uploaded, Ordering::Relaxed);
    COUNTERS.copied_bytes.fetch_add(copied, Ordering::Relaxed);
    Ok(Some(report))
}

/// A random id for one write-back.
fn new_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

struct Uploaded {
    meta: ObjectMeta,
    toc: crate::tarball::toc::Toc,
    uploaded: u64,
    copied: u64,
    requests: u64,
    full: bool,
}

/// One piece of the new object, in order.
enum Piece {
    /// Bytes of the old object, copied server-side when the part rules allow.
    Copy(Range<u64>),
    /// Bytes we have: the spool file from `offset`, `len` bytes.
    Spool { offset: u64, len: u64 },
}

/// The spool from `from` to `to`, with the old segments the pack laid in
/// (`reused`, counted from `packed_at`) copied at their places; adjacent
/// ones in one copy.
fn spool_pieces(from: u64, to: u64, packed_at: u64, reused: &[Reused]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = from;
    for r in reused {
        let here = packed_at + r.at;
        if here > at {
            out.push(Piece::Spool {
                offset: at,
                len: here - at,
            });
            at = here;
        }
        match out.last_mut() {
            Some(Piece::Copy(c)) if c.end == r.range.start => c.end = r.range.end,
            _ => out.push(Piece::Copy(r.range.clone())),
        }
    }
    if to > at {
        out.push(Piece::Spool {
            offset: at,
            len: to - at,
        });
    }
    out
}

fn pack_and_upload(
    live: &LiveSession,
    store: &Arc<dyn ObjectStore>,
    opts: &WriteBackOptions,
    snap: &mut Snapshot,
    mut attempt: Attempt,
    rt: &tokio::runtime::Handle,
) -> Result<Uploaded, WriteBackError> {
    let key = live.name.object_key();
    let plan = incremental_plan(snap, opts);
    let spool_path = live
        .content
        .dir()
        .join(format!("writeback.{}.spool", attempt.id));
    let spool = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&spool_path)?;
    // The spool file is only ever ours; gone whatever happens next.
    let _ = std::fs::remove_file(&spool_path);
    let mut out = BufWriter::new(spool);
    let mut requests = 0u64;
    let mut pieces = Vec::new();
    // Where the packed part starts in the spool (after the gzip header and
    // the moved runs), and the old segments laid into it unwritten.
    let mut packed_at = 0u64;
    let (digest, stats_toc, full, reused) = match &plan {
        Some(plan) => {
            if !plan.header_copied() {
                out.write_all(&GZIP_HEADER)?;
                packed_at += GZIP_HEADER.len() as u64;
            }
            for r in &plan.moved {
                let bytes =
                    rt.block_on(read_old(store.as_ref(), &key, &snap.base_etag, r.clone()))?;
                requests += 1;
                out.write_all(&bytes)?;
                packed_at += bytes.len() as u64;
            }
            let fresh = take_fresh(&mut snap.tree, &plan.fresh);
            let (stats, toc) = pack_after(
                plan.prefix.clone(),
                fresh,
                &mut out,
                &opts.pack,
                true,
                &|_| {},
            )?;
            (stats.digest, toc, false, stats.reused)
        }
        None => {
            out.write_all(&GZIP_HEADER)?;
            packed_at += GZIP_HEADER.len() as u64;
            let tree = std::mem::take(&mut snap.tree);
            let (stats, toc) =
                pack_after(Prefix::default(), tree, &mut out, &opts.pack, true, &|_| {})?;
            (stats.digest, toc, true, stats.reused)
        }
    };
    let mut spool = out.into_inner().map_err(|e| e.into_error())?;
    let spool_len = spool.seek(SeekFrom::End(0))?;
    let mut object_size = spool_len
        + reused
            .iter()
            .map(|r| r.range.end - r.range.start)
            .sum::<u64>();
    match &plan {
        Some(plan) if !plan.header_copied() => {
            // The header is the spool's first bytes; the copies follow it.
            pieces.push(Piece::Spool {
                offset: 0,
                len: GZIP_HEADER.len() as u64,
            });
            pieces.extend(plan.copies.iter().cloned().map(Piece::Copy));
            let rest = GZIP_HEADER.len() as u64;
            pieces.extend(spool_pieces(rest, spool_len, packed_at, &reused));
            object_size += plan.copied_bytes();
        }
        Some(plan) => {
            pieces.extend(plan.copies.iter().cloned().map(Piece::Copy));
            pieces.extend(spool_pieces(0, spool_len, packed_at, &reused));
            object_size += plan.copied_bytes();
        }
        None => pieces.extend(spool_pieces(0, spool_len, packed_at, &reused)),
    }

    let mut metadata = BTreeMap::new();
    metadata.insert(WRITEBACK_ID_KEY.to_owned(), attempt.id.clone());
    metadata.insert(DIGEST_KEY.to_owned(), digest);
    let precondition = if snap.base_etag.is_empty() {
        Precondition::IfNoneMatch
    } else {
        Precondition::IfMatch(snap.base_etag.clone())
    };
    let put_opts = PutOptions {
        precondition: precondition.clone(),
        content_type: Some("application/gzip".into()),
        metadata: metadata.clone(),
    };
    let conflict = conflict_or(&snap.base_etag);

    let (etag, uploaded, copied) =
        if object_size <= opts.small_object.max(opts.part_size) && pieces.len() == 1 {
            let mut body = Vec::with_capacity(spool_len as usize);
            spool.seek(SeekFrom::Start(0))?;
            spool.read_to_end(&mut body)?;
            requests += 1;
            let etag = match rt.block_on(store.put(&key, Bytes::from(body), put_opts)) {
                Ok(put) => put.etag,
                Err(e) => stored_anyway(store.as_ref(), &key, &attempt.id, rt, &mut requests)
                    .ok_or_else(|| conflict(e))?,
            };
            (etag, spool_len, 0)
        } else {
            let id = rt.block_on(store.create_multipart(&key, put_opts))?;
            requests += 1;
            attempt.upload = Some(id.clone());
            {
                let ns = live.ns.lock();
                let tx = ns.journal().begin()?;
                tx.set_attempt(Some(&attempt))?;
                tx.commit()?;
            }
            let sent = Multipart {
                store: store.as_ref(),
                key: &key,
                id: &id,
                base_etag: &snap.base_etag,
                part_size: opts.part_size,
                rt,
            }
            .send(&pieces, &mut spool, &mut requests);
            let done = sent.and_then(|(parts, uploaded, copied)| {
                requests += 1;
                match rt.block_on(store.complete_multipart(&key, &id, &parts, precondition)) {
                    Ok(put) => Ok((put.etag, uploaded, copied)),
                    Err(e) => stored_anyway(store.as_ref(), &key, &attempt.id, rt, &mut requests)
                        .map(|etag| (etag, uploaded, copied))
                        .ok_or_else(|| conflict(e)),
                }
            });
            match done {
                Ok(done) => done,
                Err(e) => {
                    let _ = rt.block_on(store.abort_multipart(&key, &id));
                    return Err(e);
                }
            }
        };
    let meta = ObjectMeta {
        key: key.clone(),
        size: object_size,
        etag,
        last_modified: SystemTime::now(),
        content_type: Some("application/gzip".into()),
        metadata,
    };
    Ok(Uploaded {
        meta,
        toc: stats_toc,
        uploaded,
        copied,
        requests,
        full,
    })
}

/// The ETag of the object stored at `key` when it is this write-back's
/// own (`id` in its metadata) although the request storing it failed: the
/// answer was lost (a timeout, a dropped connection), or the client's
/// retry of a request that had succeeded met its own object and was
/// refused (412). Taken for a failure, the next write-back would conflict
/// with this one and keep each changed file twice.
fn stored_anyway(
    store: &dyn ObjectStore,
    key: &str,
    id: &str,
    rt: &tokio::runtime::Handle,
    requests: &mut u64,
) -> Option<String> {
    *requests += 1;
    let meta = rt.block_on(store.head(key)).ok()?;
    (meta.metadata.get(WRITEBACK_ID_KEY).map(String::as_str) == Some(id)).then_some(meta.etag)
}

/// A failed precondition (or the object gone) means another writer got
/// there first.
fn conflict_or(base: &str) -> impl Fn(StoreError) -> WriteBackError + '_ {
    move |e| match e {
        StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. } => {
            WriteBackError::Conflict {
                base: base.to_owned(),
            }
        }
        other => WriteBackError::Store(other),
    }
}

/// The incremental plan, when the base allows one.
fn incremental_plan(snap: &Snapshot, opts: &WriteBackOptions) -> Option<Plan> {
    let reader = snap.reader.as_ref()?;
    if reader.is_foreign() || reader.meta().size <= opts.small_object {
        return None;
    }
    let toc = reader.toc();
    if repack::fragmentation(toc, opts.pack.segment_min) > opts.max_fragmentation {
        tracing::info!(
            "{}: fragmented past {:.0} %: packing in full",
            reader.meta().key,
            opts.max_fragmentation * 100.0
        );
        return None;
    }
    let same: Vec<bool> = (0..snap.tree.len()).map(|i| snap.same_bytes(i)).collect();
    let plan = repack::plan(toc, &snap.tree, &same)?;
    // Enough requests left for the uploaded parts too.
    let copy_parts: u64 = plan
        .copies
        .iter()
        .map(|r| (r.end - r.start).div_ceil(COPY_PART))
        .sum();
    if copy_parts + 64 > u64::from(MAX_PARTS) {
        return None;
    }
    Some(plan)
}

/// The snapshot's entries at `indices` (ascending), for the packer: their
/// sources can be read once, so they are taken out of the snapshot.
fn take_fresh(tree: &mut Vec<TreeEntry>, indices: &[usize]) -> Vec<TreeEntry> {
    let mut wanted = vec![false; tree.len()];
    for &i in indices {
        wanted[i] = true;
    }
    std::mem::take(tree)
        .into_iter()
        .zip(wanted)
        .filter_map(|(t, w)| w.then_some(t))
        .collect()
}

/// The parts of one multipart upload.
struct Multipart<'a> {
    store: &'a dyn ObjectStore,
    key: &'a str,
    id: &'a str,
    base_etag: &'a str,
    part_size: u64,
    rt: &'a tokio::runtime::Handle,
}

impl Multipart<'_> {
    /// Sends `pieces` as parts: copies of at least [`MIN_PART_SIZE`] go
    /// server-side when nothing smaller is waiting before them; other bytes
    /// are gathered into uploaded parts of at least that size (the last may
    /// be smaller). Returns the parts and the bytes uploaded and copied.
    fn send(
        &self,
        pieces: &[Piece],
        spool: &mut File,
        requests: &mut u64,
    ) -> Result<(Vec<CompletedPart>, u64, u64), WriteBackError> {
        let mut parts = Vec::new();
        // Copies are numbered in place and sent together at the end.
        let mut copies: Vec<(u32, Range<u64>)> = Vec::new();
        let mut next = 1u32;
        let mut buf: Vec<u8> = Vec::new();
        let (mut uploaded, mut copied) = (0u64, 0u64);
        for piece in pieces {
            match piece {
                Piece::Copy(range) => {
                    let mut range = range.clone();
                    if !buf.is_empty() && (buf.len() as u64) < MIN_PART_SIZE {
                        // Too little to stand alone: fill it from the copy.
                        let take = (MIN_PART_SIZE - buf.len() as u64).min(range.end - range.start);
                        let take = if range.end - range.start - take < MIN_PART_SIZE {
                            range.end - range.start
                        } else {
                            take
                        };
                        let bytes = self.rt.block_on(read_old(
                            self.store,
                            self.key,
                            self.base_etag,
                            range.start..range.start + take,
                        ))?;
                        *requests += 1;
                        buf.extend_from_slice(&bytes);
                        range.start += take;
                    }
                    if range.is_empty() {
                        continue;
                    }
                    if range.end - range.start < MIN_PART_SIZE {
                        // Too little to be a part of its own: sent as bytes.
                        let bytes = self.rt.block_on(read_old(
                            self.store,
                            self.key,
                            self.base_etag,
                            range.clone(),
                        ))?;
                        *requests += 1;
                        buf.extend_from_slice(&bytes);
                        continue;
                    }
                    if !buf.is_empty() {
                        uploaded += self.upload(&mut parts, &mut next, std::mem::take(&mut buf))?;
                        *requests += 1;
                    }
                    while range.start < range.end {
                        let left = range.end - range.start;
                        // The last piece of a run takes the remainder, so
                        // no copied part falls under the minimum.
                        let len = if left >= COPY_PART + MIN_PART_SIZE {
                            COPY_PART
                        } else {
                            left
                        };
                        copies.push((next, range.start..range.start + len));
                        next += 1;
                        copied += len;
                        range.start += len;
                    }
                }
                Piece::Spool { offset, len } => {
                    spool.seek(SeekFrom::Start(*offset))?;
                    let mut left = *len;
                    while left > 0 {
                        let room = self.part_size.saturating_sub(buf.len() as u64).max(1);
                        let n = room.min(left) as usize;
                        let at = buf.len();
                        buf.resize(at + n, 0);
                        spool.read_exact(&mut buf[at..])?;
                        left -= n as u64;
                        if buf.len() as u64 >= self.part_size && left > 0 {
                            uploaded +=
                                self.upload(&mut parts, &mut next, std::mem::take(&mut buf))?;
                            *requests += 1;
                        }
                    }
                }
            }
        }
        if !buf.is_empty() || next == 1 {
            uploaded += self.upload(&mut parts, &mut next, buf)?;
            *requests += 1;
        }
        *requests += copies.len() as u64;
        let copied_parts = self.rt.block_on(async {
            use futures::{StreamExt, TryStreamExt};
            futures::stream::iter(copies.into_iter().map(|(number, range)| async move {
                self.store
                    .upload_part_copy(
                        self.key,
                        self.id,
                        number,
                        CopySource {
                            key: self.key.to_owned(),
                            range,
                            if_match: Some(self.base_etag.to_owned()),
                        },
                    )
                    .await
                    .map_err(conflict_or(self.base_etag))
            }))
            .buffer_unordered(COPY_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await
        })?;
        parts.extend(copied_parts);
        parts.sort_by_key(|p| p.part_number);
        Ok((parts, uploaded, copied))
    }

    fn upload(
        &self,
        parts: &mut Vec<CompletedPart>,
        next: &mut u32,
        body: Vec<u8>,
    ) -> Result<u64, WriteBackError> {
        let len = body.len() as u64;
        let number = *next;
        *next += 1;
        parts.push(self.rt.block_on(self.store.upload_part(
            self.key,
            self.id,
            number,
            Bytes::from(body),
        ))?);
        Ok(len)
    }
}

/// Bytes `range` of the base object, pinned to its ETag.
async fn read_old(
    store: &dyn ObjectStore,
    key: &str,
    etag: &str,
    range: Range<u64>,
) -> Result<Bytes, WriteBackError> {
    let got = store
        .get(
            key,
            GetOptions::range(ByteRange::Bounded {
                start: range.start,
                end: range.end,
            })
            .if_match(etag.to_owned()),
        )
        .await
        .map_err(conflict_or(etag))?;
    if got.body.len() as u64 != range.end - range.start {
        return Err(WriteBackError::Pack(TarballError::Corrupt(
            "the base object is shorter than its index says".into(),
        )));
    }
    Ok(got.body)
}

/// Points the session at its new object: files whose bytes it holds read
/// from it, the changes it covers are confirmed. Returns the overlay files
/// to delete (after the commit).
fn adopt(
    live: &LiveSession,
    snap: &Snapshot,
    moving: &[(usize, String)],
    etag: &str,
    reader: Arc<SessionReader>,
) -> Result<Vec<u64>, OverlayError> {
    let _no_copy_up = live.content.exclusive();
    let mut ns = live.ns.lock();
    let changed = ns.journal().changed_since(snap.seq)?;
    let mut data = Vec::new();
    let mut freed = Vec::new();
    let mut kept = std::collections::HashMap::new();
    for (i, path) in moving {
        match &snap.origin[*i] {
            Origin::Base { ino, .. } => {
                // Wherever the file is now, its bytes are at `path` in the new
                // object: all of them, or (copied up chunk by chunk since)
                // those of the chunks it does not hold.
                if let Ok(n) = ns.get(*ino) {
                    match n.data {
                        Data::Base(_) => data.push((*ino, Data::Base(path.as_str().into()))),
                        Data::Partial(_) => data.push((*ino, Data::Partial(path.as_str().into()))),
                        _ => {}
                    }
                }
            }
            Origin::Local {
                ino, size, mtime, ..
            } => {
                let Ok(n) = ns.get(*ino) else { continue };
                let packed = n.data.in_overlay()
                    && n.size == *size
                    && n.mtime == *mtime
                    && !changed.contains(ino);
                if packed && !ns.is_held(*ino) {
                    data.push((*ino, Data::Base(path.as_str().into())));
                    freed.push(*ino);
                } else if packed && n.data == Data::Local {
                    // Held: it stays here, and the object holds it too.
                    kept.insert(*ino, path.as_str().into());
                } else if let Data::Partial(_) = n.data {
                    // Chunks it does not hold now, it held none of while
                    // packed: they went in from the old object, unchanged.
                    data.push((*ino, Data::Partial(path.as_str().into())));
                    if packed {
                        kept.insert(*ino, path.as_str().into());
                    }
                }
            }
            Origin::Meta | Origin::Zeros { .. } => {}
        }
    }
    ns.adopt_object(&data, etag, snap.seq)?;
    ns.set_written_back((!kept.is_empty()).then(|| WrittenBack {
        etag: etag.to_owned(),
        seq: snap.seq,
        paths: kept,
    }));
    live.content.set_reader(reader);
    Ok(freed)
}

/// Deletes the overlay files of files that [`adopt`] pointed at the new
/// object, unless new bytes went there since: a PUT or a copy-up between
/// the adoption and this (the journal's sync lies between them) made the
/// file local again, and its overlay file is then the only copy of an
/// acknowledged write. Every such writer holds a share of
/// [`Content::exclusive`](super::content::Content::exclusive), so none can
/// start while the check and the deletions run.
pub(super) fn remove_freed(live: &LiveSession, freed: &[u64]) {
    // Nothing to delete: no wait for the copy-ups under way.
    if freed.is_empty() {
        return;
    }
    let _no_copy_up = live.content.exclusive();
    let still_in_object: Vec<u64> = {
        let ns = live.ns.lock();
        freed
            .iter()
            .copied()
            .filter(|ino| ns.get(*ino).map_or(true, |n| !n.data.in_overlay()))
            .collect()
    };
    for ino in still_in_object {
        live.content.remove(ino);
    }
}

/// How long to wait before trying a failed write-back again.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.min(6);
    Duration::from_secs(secs.min(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::namespace::{RenameMode, SetAttr};
    use crate::overlay::node::Time;
    use crate::overlay::registry::{Registry, RegistrySpec};
    use crate::session::SessionPath;
    use crate::store::local::LocalStore;

    /// A registry of the store in `dir`, with overlays of its own (`host`).
    fn host(dir: &std::path::Path, host: &str, rt: &tokio::runtime::Runtime) -> Registry {
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::open(dir.join("store"), "bucket").unwrap());
        let spec = RegistrySpec {
            store,
            index: None,
            overlays: dir.join(host),
            read_only: false,
            recheck: Duration::from_secs(60),
        };
        Registry::new(spec, rt.handle().clone())
    }

    fn read(live: &LiveSession, path: &str) -> Vec<u8> {
        let (_, version) = live.open_version(path).unwrap();
        live.read_version(&version, 0, 1 << 20).unwrap()
    }

    /// A PUT that lands between a write-back's adoption and the deletion
    /// of the overlay files it freed keeps its bytes: the deletion skips
    /// files made local again (CI saw `data/3: No such file or directory`
    /// and an acknowledged PUT lost, under a slow journal sync).
    #[test]
    fn freed_files_written_again_meanwhile_keep_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let registry = host(dir.path(), "overlays", &rt);
        let store = registry.store().clone();
        let name = SessionPath::parse("one").unwrap();
        let live = registry.open(&name, true).unwrap();
        live.put_file("workspace/a.txt", b"version 0").unwrap();
        let ino = live.resolve("workspace/a.txt").unwrap().ino;
        assert!(write_back(&live, &store, &WriteBackOptions::default())
            .unwrap()
            .is_some());
        // Adopted: the object holds the bytes, the overlay file went.
        assert!(live.content.stat(ino).is_none());

        live.put_file("workspace/a.txt", b"version 1").unwrap();
        remove_freed(&live, &[ino]);
        assert_eq!(read(&live, "workspace/a.txt"), b"version 1");

        // A file that still reads from the object loses its overlay copy.
        assert!(write_back(&live, &store, &WriteBackOptions::default())
            .unwrap()
            .is_some());
        std::fs::write(live.content.path(ino), b"stale").unwrap();
        remove_freed(&live, &[ino]);
        assert!(live.content.stat(ino).is_none());
    }

    /// With nothing pending (a `flush` after the last write-back), no
    /// snapshot of the tree is taken: on a large session it is tens of MB.
    #[test]
    fn nothing_pending_takes_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let registry = host(dir.path(), "overlays", &rt);
        let store = registry.store().clone();
        let live = registry
            .open(&SessionPath::parse("idle").unwrap(), true)
            .unwrap();
        live.put_file("workspace/a.txt", b"a").unwrap();
        let opts = WriteBackOptions::default();
        assert!(write_back(&live, &store, &opts).unwrap().is_some());
        let taken = live.ns.lock().snapshots();
        assert!(write_back(&live, &store, &opts).unwrap().is_none());
        assert_eq!(live.ns.lock().snapshots(), taken);
    }

    /// Bytes no deflate shrinks: an object of a few files is several
    /// segments and parts, as a large session is.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// What the stored object itself holds at `path` (not the overlay).
    fn stored(
        rt: &tokio::runtime::Runtime,
        store: &Arc<dyn ObjectStore>,
        live: &LiveSession,
        path: &str,
    ) -> Vec<u8> {
        rt.block_on(async {
            let reader = SessionReader::open(store.clone(), &live.name.object_key(), None)
                .await
                .unwrap();
            reader.read_all(path).await.unwrap().to_vec()
        })
    }

    /// Files a mount's kernel holds stay in the overlay after a write-back
    /// packed them (it may write to them without asking). The object holds
    /// them too: later write-backs copy their bytes from it instead of
    /// packing the whole session again, until a file changes, or its path
    /// does (directories swapped over it), and what they store is always
    /// what the files hold.
    #[test]
    fn held_files_written_back_are_copied_again_not_packed_until_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let registry = host(dir.path(), "overlays", &rt);
        let store = registry.store().clone();
        let name = SessionPath::parse("held").unwrap();
        let live = registry.open(&name, true).unwrap();
        let opts = WriteBackOptions {
            small_object: 0,
            ..WriteBackOptions::default()
        };
        // Same names, sizes and times in both directories: only the bytes
        // tell `a/one` from `b/one`.
        let mtime = Time {
            s: 1_700_000_000,
            ns: 0,
        };
        let mut files = Vec::new();
        for (k, path) in ["workspace/a/one", "workspace/a/two", "workspace/b/one"]
            .into_iter()
            .enumerate()
        {
            let bytes = noise(k as u64 + 1, 6 << 20);
            live.put_file(path, &bytes).unwrap();
            let ino = live.resolve(path).unwrap().ino;
            let mut ns = live.ns.lock();
            ns.hold(ino);
            let set = SetAttr {
                mtime: Some(mtime),
                ..SetAttr::default()
            };
            ns.setattr(ino, &set).unwrap();
            files.push((path, ino, bytes));
        }
        let first = write_back(&live, &store, &opts).unwrap().unwrap();
        assert!(first.full, "{first:?}");
        for (path, ino, bytes) in &files {
            assert!(live.content.stat(*ino).is_some(), "{path}: held, so kept");
            assert!(stored(&rt, &store, &live, path) == *bytes, "{path}");
        }

        // An unrelated change: the held files' bytes are copied, not sent.
        live.put_file("workspace/small.txt", b"small").unwrap();
        let second = write_back(&live, &store, &opts).unwrap().unwrap();
        assert!(!second.full, "{second:?}");
        assert!(second.copied >= 12 << 20, "{second:?}");
        assert!(second.uploaded < 6 << 20, "{second:?}");
        for (path, _, bytes) in &files {
            assert!(stored(&rt, &store, &live, path) == *bytes, "{path}");
        }

        // A held file changed: its new bytes are stored.
        let changed = noise(99, 6 << 20);
        live.put_file("workspace/a/two", &changed).unwrap();
        let third = write_back(&live, &store, &opts).unwrap().unwrap();
        assert!(third.uploaded >= 6 << 20, "{third:?}");
        assert!(stored(&rt, &store, &live, "workspace/a/two") == changed);
        assert!(stored(&rt, &store, &live, "workspace/a/one") == files[0].2);

        // The directories swapped: no file changed, and each `one` is where
        // the object holds the other one, under the same header.
        let ws = live.resolve("workspace").unwrap().ino;
        live.ns
            .lock()
            .rename(ws, "a", ws, "b", RenameMode::Exchange)
            .unwrap();
        write_back(&live, &store, &opts).unwrap().unwrap();
        assert!(stored(&rt, &store, &live, "workspace/b/one") == files[0].2);
        assert!(stored(&rt, &store, &live, "workspace/a/one") == files[2].2);
        assert!(stored(&rt, &store, &live, "workspace/b/two") == changed);
        assert!(!live.has_pending_changes().unwrap());
    }

    /// Another host replaced the object while this one packed unchanged
    /// files from the old one: a conflict (move onto the new object, pack
    /// again), not a failure that every retry repeats. A stop's final
    /// write-back left its changes pending that way in CI.
    #[test]
    fn a_base_replaced_under_the_pack_is_a_conflict_and_the_retry_stores_both() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (a, b) = (host(dir.path(), "a", &rt), host(dir.path(), "b", &rt));
        let store = a.store().clone();
        let name = SessionPath::parse("shared").unwrap();
        let on_a = a.open(&name, true).unwrap();
        on_a.put_file("workspace/kept.txt", b"unchanged").unwrap();
        write_back(&on_a, &store, &WriteBackOptions::default()).unwrap();

        let on_b = b.open(&name, false).unwrap();
        on_b.put_file("workspace/from-b.txt", b"b").unwrap();
        on_a.put_file("workspace/from-a.txt", b"a").unwrap();
        write_back(&on_a, &store, &WriteBackOptions::default()).unwrap();

        // B packs kept.txt from the object it opened, which is gone.
        let e = write_back(&on_b, &store, &WriteBackOptions::default()).unwrap_err();
        assert!(e.is_conflict(), "{e}");
        let followed = crate::overlay::follow::follow(&on_b, &store).unwrap();
        assert!(
            matches!(followed, crate::overlay::follow::Followed::Rebased { .. }),
            "{followed:?}"
        );
        assert!(write_back(&on_b, &store, &WriteBackOptions::default())
            .unwrap()
            .is_some());
        for (path, bytes) in [
            ("workspace/kept.txt", &b"unchanged"[..]),
            ("workspace/from-a.txt", b"a"),
            ("workspace/from-b.txt", b"b"),
        ] {
            assert_eq!(read(&on_b, path), bytes, "{path}");
        }
        assert!(!on_b.has_pending_changes().unwrap());
    }
}
