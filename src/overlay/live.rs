//! One open session: its tree ([`Namespace`]) and its bytes ([`Content`]),
//! shared by everything in this process that works on the session — the
//! FUSE mount and the HTTP API hold the same `Arc<LiveSession>`.
//!
//! The FUSE layer drives the tree call by call (lookup, open, write, …); the
//! API works on whole files by path (read, replace, delete, list), through
//! the methods here. Either way the change lands in the same journal and
//! overlay, and so in the same write-back.
//!
//! A mount caches names and attributes in the kernel. When the API changes
//! the tree, the mount must drop what it cached: a mount registers a
//! [`Watcher`], and every API change reports the inodes and names it touched
//! to it, after the namespace lock is released (the kernel may call back
//! into the mount while it invalidates).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::content::Content;
use super::journal::Writes;
use super::namespace::{check_name, Namespace, SetAttr, ROOT};
use super::node::{Data, Node, NodeKind, Time};
use super::partial;
use super::OverlayError;
use crate::session::SessionPath;
use crate::tarball::reader::SessionReader;

/// Something the kernel may have cached that a change made stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// The attributes and data of an inode (for a directory, its listing).
    Inode(u64),
    /// One name in a directory.
    Entry { parent: u64, name: String },
}

/// Told about every change made outside the mount that registered it.
pub type Watcher = Arc<dyn Fn(&[Invalidation]) + Send + Sync>;

/// Answers requests about the session's write-back (`flush`, `status`),
/// registered by the write-back loop: a mount hands `sessionfs flush` and
/// `sessionfs status` to it. The answer is text (JSON for `status`).
pub type Control = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

pub struct LiveSession {
    pub name: SessionPath,
    pub ns: Mutex<Namespace>,
    pub content: Content,
    /// The journal's database file.
    journal: std::path::PathBuf,
    /// What reached the journal's files (a sync skips one left alone).
    journal_writes: Arc<Writes>,
    read_only: bool,
    watcher: Mutex<Option<Watcher>>,
    control: Mutex<Option<Control>>,
    group: GroupCommit,
    /// When the object was last found unchanged in the store.
    checked: Mutex<std::time::Instant>,
    /// When a request last asked the registry for this session.
    used: Mutex<std::time::Instant>,
    /// One write-back at a time.
    writing: Mutex<()>,
    /// Whole-file operations hold it shared; retiring the session (before
    /// it is deleted or replaced) holds it exclusively and marks it, so no
    /// operation is half done when the overlay goes.
    retired: parking_lot::RwLock<bool>,
    /// What the write-backs of this session did, for status reports.
    pub writeback: Mutex<WriteBackStatus>,
}

/// The write-back state of a session, as `status` and the API report it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteBackStatus {
    pub last: Option<super::writeback::Report>,
    pub last_error: Option<String>,
    pub conflicts: u64,
}

/// The rounds of [`LiveSession::durable`].
#[derive(Default)]
struct GroupCommit {
    state: Mutex<Rounds>,
    turn: Condvar,
}

#[derive(Default)]
struct Rounds {
    /// Callers so far, numbered.
    asked: u64,
    /// Every caller up to this number is durable.
    done: u64,
    running: bool,
    /// The journal's write counts the last sync covered.
    synced: (u64, u64),
}

/// Bytes fetched per request, and synced together, when a partial file is
/// filled whole.
const COPY_RUN: u64 = 32 << 20;

/// Chunks of a partial file a write covers wholly (see
/// [`LiveSession::prepare_write`]).
#[derive(Default)]
pub struct Covered<'a> {
    held: Option<(super::content::FileGuard<'a>, Arc<partial::ChunkMap>)>,
    chunks: Vec<u64>,
}

impl Covered<'_> {
    /// The write landed: its chunks are the overlay file's now.
    pub fn written(self) -> Result<(), OverlayError> {
        match &self.held {
            Some((_, m)) if !self.chunks.is_empty() => Ok(m.mark(&self.chunks)?),
            _ => Ok(()),
        }
    }
}

/// One version of a file's bytes, pinned (see [`LiveSession::open_version`]).
pub enum FileVersion {
    /// The overlay file as it was opened (a replacement renames a new one
    /// over the name; this handle keeps the old).
    Local(Arc<std::fs::File>),
    /// A file of an object version (objects never change).
    Base(Arc<SessionReader>, Arc<str>),
    /// A file copied up chunk by chunk (its overlay file as it was opened,
    /// and the object version its other chunks are read from).
    Partial(super::partial::PartialFile),
    /// A file that has no bytes stored (reads as zeros up to its size).
    Zeros,
}

impl FileVersion {
    /// `len` bytes from `offset` if an overlay file's page cache holds them
    /// all: read without waiting on the disk (`RWF_NOWAIT`), so a thread
    /// that must not block can serve a hot file. `None` otherwise.
    pub fn read_cached(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let FileVersion::Local(f) = self else {
            return None;
        };
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is alive and writable for
        // the whole call; `f` is an open descriptor owned by `f`.
        let n = unsafe {
            libc::preadv2(
                f.as_raw_fd(),
                &iov,
                1,
                i64::try_from(offset).ok()?,
                libc::RWF_NOWAIT,
            )
        };
        // Short (not all cached, or the file shrank) or failed: the caller
        // reads the usual way, which also answers the error.
        (u64::try_from(n).ok()? == len).then_some(buf)
    }
}

/// A regular file of the session, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
}

impl LiveSession {
    pub fn new(
        name: SessionPath,
        ns: Namespace,
        content: Content,
        journal: std::path::PathBuf,
        read_only: bool,
    ) -> LiveSession {
        LiveSession {
            name,
            journal_writes: ns.journal().writes(),
            ns: Mutex::new(ns),
            content,
            journal,
            read_only,
            watcher: Mutex::new(None),
            control: Mutex::new(None),
            group: GroupCommit::default(),
            checked: Mutex::new(std::time::Instant::now()),
            used: Mutex::new(std::time::Instant::now()),
            writing: Mutex::new(()),
            writeback: Mutex::new(WriteBackStatus::default()),
            retired: parking_lot::RwLock::new(false),
        }
    }

    /// Enters an operation that must not overlap the session's retirement;
    /// [`OverlayError::Retired`] once it is retired.
    pub fn enter(&self) -> Result<parking_lot::RwLockReadGuard<'_, bool>, OverlayError> {
        // Recursive: a caller inside an operation may enter again without
        // queueing behind a retirement that waits for that operation.
        let g = self.retired.read_recursive();
        if *g {
            return Err(OverlayError::Retired);
        }
        Ok(g)
    }

    /// Waits for the operations in flight, then refuses every later one.
    pub fn retire(&self) {
        *self.retired.write() = true;
    }

    /// Lets operations in again (the deletion it was retired for failed).
    pub fn unretire(&self) {
        *self.retired.write() = false;
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.read()
    }

    /// Held for the whole of a write-back.
    pub fn writeback_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writing.lock()
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn reader(&self) -> Option<Arc<SessionReader>> {
        self.content.reader()
    }

    pub fn writable(&self) -> Result<(), OverlayError> {
        if self.read_only {
            Err(OverlayError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The session's overlay directory (where its journal is).
    pub fn overlay_dir(&self) -> &std::path::Path {
        self.journal.parent().unwrap_or(std::path::Path::new("/"))
    }

    /// Registers the mount that must hear of changes made elsewhere.
    pub fn set_watcher(&self, watcher: Option<Watcher>) {
        *self.watcher.lock() = watcher;
    }

    /// Registers what answers `flush` and `status` (once).
    pub fn set_control_once(&self, make: impl FnOnce() -> Control) {
        let mut c = self.control.lock();
        if c.is_none() {
            *c = Some(make());
        }
    }

    /// Asks the write-back loop `what` (`flush` or `status`); `None` when
    /// no loop runs for this session.
    pub fn control(&self, what: &str) -> Option<Result<String, String>> {
        let c = self.control.lock().clone();
        c.map(|c| c(what))
    }

    /// Whether the object should be checked again (`every` since the last
    /// time); counts as checked from now.
    /// Whether the store was asked about this session less than `every` ago.
    pub fn checked_within(&self, every: std::time::Duration) -> bool {
        self.checked.lock().elapsed() < every
    }

    pub fn due_for_check(&self, every: std::time::Duration) -> bool {
        let mut at = self.checked.lock();
        if at.elapsed() < every {
            return false;
        }
        *at = std::time::Instant::now();
        true
    }

    /// Marks the session as used now.
    pub fn touch(&self) {
        *self.used.lock() = std::time::Instant::now();
    }

    /// How long since the session was last used.
    pub fn idle(&self) -> std::time::Duration {
        self.used.lock().elapsed()
    }

    /// Whether a mount is watching (the session is mounted in this process).
    pub fn is_watched(&self) -> bool {
        self.watcher.lock().is_some()
    }

    /// Tells the mount, from a thread of its own, what its kernel may have
    /// cached. For callers that may run inside a kernel request to the
    /// mount (a read that found the object replaced): invalidating a page
    /// waits for that request's page lock, so telling from the caller's
    /// thread would wait for itself.
    pub fn tell_detached(&self, changes: Vec<Invalidation>) {
        let Some(w) = self.watcher.lock().clone() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || w(&changes));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread to invalidate the kernel's caches: {e}");
        }
    }

    /// Tells the mount (if one watches) what its kernel may have cached.
    pub fn tell(&self, changes: &[Invalidation]) {
        let watcher = self.watcher.lock().clone();
        if let Some(w) = watcher {
            w(changes);
        }
    }

    /// Changes not yet written back to the object.
    pub fn has_pending_changes(&self) -> Result<bool, OverlayError> {
        self.ns.lock().journal().has_changes()
    }

    /// Journals and syncs everything.
    pub fn sync(&self) -> Result<(), OverlayError> {
        self.content.sync_dir()?;
        self.ns.lock().sync()
    }

    /// Returns once everything done before the call is durable: the
    /// overlay directory and the journal (file bytes are the caller's to
    /// sync, before). Callers
    /// that arrive together share one sync (group commit): the first runs
    /// it for all who came before it started; those arriving meanwhile wait
    /// for the next round.
    pub fn durable(&self) -> Result<(), OverlayError> {
        let mut g = self.group.state.lock();
        g.asked += 1;
        let mine = g.asked;
        loop {
            if g.done >= mine {
                return Ok(());
            }
            if !g.running {
                g.running = true;
                let covers = g.asked;
                let synced = g.synced;
                drop(g);
                // Counted before the syncs: what is counted is in the files.
                let writes = (
                    self.journal_writes.wal.load(Ordering::SeqCst),
                    self.journal_writes.redo.load(Ordering::SeqCst),
                );
                // The journal's files are synced through descriptors of their
                // own, so the namespace stays unlocked meanwhile: what SQLite
                // committed and what the redo log took are already in the
                // files (neither buffers), a checkpoint syncs the database
                // before it resets the WAL, and the redo log is cut back only
                // after one. The WAL holds transactions too large for the log.
                let r = self
                    .content
                    .sync_dir()
                    .and_then(|()| {
                        if writes.0 == synced.0 {
                            return Ok(());
                        }
                        sync_file(&wal_path(&self.journal))
                    })
                    .and_then(|()| {
                        if writes.1 == synced.1 {
                            return Ok(());
                        }
                        sync_file(&super::journal::redo_path(&self.journal))
                    });
                // Space freed on a full disk goes back to the reserve first.
                super::reserve::take_back();
                g = self.group.state.lock();
                g.running = false;
                if r.is_ok() {
                    g.done = g.done.max(covers);
                    g.synced = writes;
                }
                self.group.turn.notify_all();
                r?;
                continue;
            }
            self.group.turn.wait(&mut g);
        }
    }

    /// Makes a file writable in the overlay: a large unchanged one starts a
    /// block-level copy-up (nothing fetched), a small one is copied up
    /// whole; `truncate` empties it instead.
    pub fn ensure_writable(&self, ino: u64, truncate: bool) -> Result<(), OverlayError> {
        {
            let _this_file = self.content.file_lock(ino);
            let node = self.ns.lock().get(ino)?.clone();
            match &node.data {
                Data::Partial(_) if !truncate => return Ok(()),
                Data::Base(path) if !truncate && node.size >= partial::MIN_SIZE => {
                    self.content
                        .begin_partial(ino, node.size, node.mtime.system())?;
                    self.ns
                        .lock()
                        .set_data(ino, Data::Partial(path.clone()), None)?;
                    return Ok(());
                }
                _ => {}
            }
        }
        self.ensure_local(ino, truncate)
    }

    /// Whether a write of `len` bytes at `offset` may wait on the store
    /// (a copy-up, or chunks of a partial file to fill first).
    pub fn write_fetches(&self, ino: u64, offset: u64, len: u64) -> bool {
        let partial = match self.ns.lock().get(ino).map(|n| &n.data) {
            Ok(Data::Base(_)) => return true,
            Ok(Data::Partial(_)) => true,
            _ => false,
        };
        partial
            && self
                .content
                .chunk_map(ino)
                .map_or(true, |m| !m.to_fill(offset, len).is_empty())
    }

    /// Readies `[offset, offset + len)` of a file for a write: copied up if
    /// it is not yet, and the chunks of a partial file that the write does
    /// not cover wholly filled from the object first. Returns the chunks the
    /// write covers wholly: the caller marks them held once it has written
    /// them (not before, or a failed write would leave holes), and holds
    /// the file meanwhile (or a concurrent fill could write the object's
    /// bytes over the write).
    pub fn prepare_write(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<Covered<'_>, OverlayError> {
        let data = self.ns.lock().get(ino)?.data.clone();
        match data {
            Data::Local => Ok(Covered::default()),
            Data::Partial(_) => {
                let map = self.content.chunk_map(ino)?;
                if map.to_fill(offset, len).is_empty() {
                    return Ok(Covered::default());
                }
                let this_file = self.content.file_lock(ino);
                // The node and the object its chunks are read from, as one
                // pair (a write-back may have moved both meanwhile).
                let (node, reader) = {
                    let ns = self.ns.lock();
                    (ns.get(ino)?.clone(), self.content.reader())
                };
                let Data::Partial(path) = &node.data else {
                    return Ok(Covered::default());
                };
                let file = self.content.partial_file(ino, reader, path)?;
                let mut chunks = file.map.to_fill(offset, len);
                // Chunks the write covers whole need no bytes of the object;
                // they are marked once written (below).
                let end = offset.saturating_add(len);
                let whole = |c: &u64| {
                    let (s, e) = file.map.object_range(*c);
                    offset <= s && e <= end
                };
                let covered: Vec<u64> = chunks.iter().copied().filter(whole).collect();
                chunks.retain(|c| !whole(c));
                self.content.fill(&file, &chunks)?;
                Ok(Covered {
                    held: Some((this_file, file.map)),
                    chunks: covered,
                })
            }
            // Copied up first (whole, or as a partial file whose chunks
            // this write touches are then filled as above).
            Data::Base(_) => {
                self.ensure_writable(ino, false)?;
                self.prepare_write(ino, offset, len)
            }
            Data::None | Data::Target(_) => self
                .ensure_writable(ino, false)
                .map(|()| Covered::default()),
        }
    }

    /// Sets a file's size in the overlay (a truncate or an extension).
    pub fn resize(&self, ino: u64, size: u64) -> Result<(), OverlayError> {
        self.ensure_writable(ino, size == 0)?;
        let _this_file = self.content.file_lock(ino);
        if let Data::Partial(_) = self.ns.lock().get(ino)?.data {
            self.content.chunk_map(ino)?.limit(size)?;
        }
        self.content.local(ino)?.set_len(size)?;
        Ok(())
    }

    /// Brings a file's bytes into the overlay whole (once); `truncate` skips the fetch.
    pub fn ensure_local(&self, ino: u64, truncate: bool) -> Result<(), OverlayError> {
        let _this_file = self.content.file_lock(ino);
        let node = self.ns.lock().get(ino)?.clone();
        if node.kind != NodeKind::File {
            return Err(OverlayError::Invalid("not a regular file"));
        }
        match &node.data {
            Data::Local | Data::Partial(_) if truncate => {
                if let Data::Partial(_) = node.data {
                    // First: a crash after the cut must not read the
                    // object's bytes back into the emptied file.
                    self.content.chunk_map(ino)?.limit(0)?;
                }
                if node.size > 0 {
                    self.content.local(ino)?.set_len(0)?;
                    let set = SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    };
                    self.ns.lock().setattr(ino, &set)?;
                }
                if matches!(node.data, Data::Partial(_)) {
                    self.ns.lock().set_data(ino, Data::Local, None)?;
                    self.content.drop_map(ino);
                }
            }
            Data::Local => {}
            Data::Partial(path) => {
                let file = self
                    .content
                    .partial_file(ino, self.content.reader(), path)?;
                let missing = file.map.missing();
                for run in missing.chunks((COPY_RUN / partial::CHUNK) as usize) {
                    self.content.fill(&file, run)?;
                }
                // Not a write (see `Namespace::adopt_local`).
                file.data.set_modified(node.mtime.system())?;
                file.data.sync_all()?;
                self.ns.lock().set_data(ino, Data::Local, None)?;
                self.content.drop_map(ino);
            }
            Data::Base(path) => {
                let len = if truncate { 0 } else { node.size };
                self.content.copy_up(ino, path, len, node.mtime.system())?;
                self.ns.lock().set_data(ino, Data::Local, Some(len))?;
            }
            Data::None | Data::Target(_) => {
                // An empty file: nothing to fetch. The journal learns it is
                // local at the next flush; a crash before that is repaired at
                // mount from the overlay file itself.
                // Truncated only when a crash left bytes there: ext4 flushes
                // a file truncated to 0 at its close, which a new file
                // (the common case) must not pay.
                let f = self.content.local(ino)?;
                if f.metadata()?.len() > 0 {
                    f.set_len(0)?;
                }
                // Not a write either (see `Namespace::adopt_local`).
                f.set_modified(node.mtime.system())?;
                self.ns.lock().mark_local(ino);
            }
        }
        Ok(())
    }

    /// Up to `size` bytes of a file from `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u64) -> Result<Vec<u8>, OverlayError> {
        match self.read_once(ino, offset, size) {
            // Another writer replaced the object (its old bytes are gone from
            // the store and not cached): move onto the new one, read again.
            Err(OverlayError::Tarball(crate::tarball::TarballError::ObjectChanged)) => {
                match self.control("follow") {
                    Some(Ok(_)) => self.read_once(ino, offset, size),
                    _ => Err(OverlayError::Tarball(
                        crate::tarball::TarballError::ObjectChanged,
                    )),
                }
            }
            other => other,
        }
    }

    fn read_once(&self, ino: u64, offset: u64, size: u64) -> Result<Vec<u8>, OverlayError> {
        // The node and the object it points into, as one pair: a write-back
        // swaps both under the namespace lock.
        let (node, reader) = {
            let ns = self.ns.lock();
            (ns.get(ino)?.clone(), self.content.reader())
        };
        let end = offset.saturating_add(size).min(node.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        match node.data {
            Data::Local => self.content.read_local(ino, offset, end - offset),
            Data::Partial(path) => self.content.partial_file(ino, reader, &path)?.read_at(
                self.content.runtime(),
                offset,
                end - offset,
            ),
            Data::Base(path) => Ok(self
                .content
                .read_base_from(reader.as_ref(), &path, offset, end - offset)?
                .to_vec()),
            Data::None | Data::Target(_) => Ok(vec![0u8; (end - offset) as usize]),
        }
    }

    /// The file at `path` and its bytes as one version: later replacements
    /// (an API PUT renames a new overlay file into place; a write-back
    /// swaps the object) do not change what the returned version reads.
    pub fn open_version(&self, path: &str) -> Result<(Node, FileVersion), OverlayError> {
        let _installs_wait = self.content.shared();
        let ns = self.ns.lock();
        self.version_in(&ns, path)
    }

    /// [`LiveSession::open_version`] if nothing holds the locks it takes
    /// (`None`: something does; ask again where waiting is allowed). For
    /// callers on the runtime's threads.
    pub fn try_open_version(
        &self,
        path: &str,
    ) -> Option<Result<(Node, FileVersion), OverlayError>> {
        let _installs_wait = self.content.try_shared()?;
        let ns = self.ns.try_lock()?;
        Some(self.version_in(&ns, path))
    }

    fn version_in(&self, ns: &Namespace, path: &str) -> Result<(Node, FileVersion), OverlayError> {
        let mut at = ROOT;
        for part in components(path)? {
            at = ns.lookup(at, part)?.ino;
        }
        let node = ns.get(at)?.clone();
        let version = match &node.data {
            _ if node.kind != NodeKind::File => FileVersion::Zeros,
            Data::Local => FileVersion::Local(self.content.local(node.ino)?),
            Data::Partial(p) => FileVersion::Partial(self.content.partial_file(
                node.ino,
                self.content.reader(),
                p,
            )?),
            Data::Base(p) => match self.content.reader() {
                Some(r) => FileVersion::Base(r, p.clone()),
                None => return Err(OverlayError::Corrupt(format!("{p}: no session object"))),
            },
            Data::None | Data::Target(_) => FileVersion::Zeros,
        };
        Ok((node, version))
    }

    /// Up to `len` bytes of `version` from `offset` (fewer only at its end).
    pub fn read_version(
        &self,
        version: &FileVersion,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, OverlayError> {
        match version {
            FileVersion::Local(f) => {
                let mut buf = vec![0u8; len as usize];
                let mut got = 0;
                while got < buf.len() {
                    let n = std::os::unix::fs::FileExt::read_at(
                        f.as_ref(),
                        &mut buf[got..],
                        offset + got as u64,
                    )?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                buf.truncate(got);
                Ok(buf)
            }
            FileVersion::Base(reader, path) => Ok(self
                .content
                .read_base_from(Some(reader), path, offset, len)?
                .to_vec()),
            FileVersion::Partial(file) => file.read_at(self.content.runtime(), offset, len),
            FileVersion::Zeros => Ok(vec![0u8; len as usize]),
        }
    }

    /// The node at a session-relative path (`a/b/c`).
    pub fn resolve(&self, path: &str) -> Result<Node, OverlayError> {
        let ns = self.ns.lock();
        let mut at = ROOT;
        for part in components(path)? {
            at = ns.lookup(at, part)?.ino;
        }
        Ok(ns.get(at)?.clone())
    }

    /// Every regular file with its size, in path order.
    pub fn list_files(&self) -> Vec<FileInfo> {
        let ns = self.ns.lock();
        ns.walk(ROOT)
            .into_iter()
            .filter_map(|(path, ino)| {
                let n = ns.get(ino).ok()?;
                (n.kind == NodeKind::File).then_some(FileInfo { path, size: n.size })
            })
            .collect()
    }

    /// Replaces (or creates) the file at `path` with `bytes`, creating the
    /// directories above it. Readers see the old bytes or the new ones,
    /// never a mix: the new bytes are written aside, synced, then renamed
    /// over the overlay file, and the journal records the new size in the
    /// same step. Durable when it returns (group-committed with concurrent
    /// callers). Returns the size written.
    pub fn put_file(&self, path: &str, bytes: &[u8]) -> Result<u64, OverlayError> {
        self.writable()?;
        let _live = self.enter()?;
        let parts = components(path)?;
        let Some((file_name, dirs)) = parts.split_last() else {
            return Err(OverlayError::Invalid("empty path"));
        };
        // The bytes are written and synced outside every lock, so writers
        // of different files (or the same one) overlap; the last rename wins.
        let staged = self.content.stage(bytes)?;
        let mut told = Vec::new();
        let installed = (|| {
            // Resolving, creating what is missing and installing are one
            // step: a DELETE of the file (or its directory) in between
            // cannot turn this write into a 404.
            let _one_at_a_time = self.content.exclusive();
            let mut ns = self.ns.lock();
            let mut at = ROOT;
            for dir in dirs {
                let n = child(&mut ns, at, dir, NodeKind::Dir, &mut told)?;
                if n.kind != NodeKind::Dir {
                    return Err(OverlayError::NotDir);
                }
                at = n.ino;
            }
            let n = child(&mut ns, at, file_name, NodeKind::File, &mut told)?;
            let ino = match n.kind {
                NodeKind::File => n.ino,
                NodeKind::Dir => return Err(OverlayError::IsDir),
                _ => return Err(OverlayError::Invalid("not a regular file")),
            };
            self.content.install(ino, &staged)?;
            let mut node = ns.get(ino)?.clone();
            let now = Time::now();
            node.data = Data::Local;
            node.size = bytes.len() as u64;
            node.mtime = now;
            node.ctime = now;
            ns.save(node, "write")?;
            Ok(ino)
        })();
        let ino = match installed {
            Ok(ino) => ino,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        };
        self.durable()?;
        told.push(Invalidation::Inode(ino));
        self.tell(&told);
        Ok(bytes.len() as u64)
    }

    /// Removes the file (or symlink, or other non-directory) at `path`.
    pub fn delete_file(&self, path: &str) -> Result<(), OverlayError> {
        self.writable()?;
        let _live = self.enter()?;
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(OverlayError::Invalid("empty path"));
        };
        let (parent, ino, freed) = {
            let mut ns = self.ns.lock();
            let mut at = ROOT;
            for dir in dirs {
                at = ns.lookup(at, dir)?.ino;
            }
            let ino = ns.lookup(at, name)?.ino;
            let freed = ns.remove(at, name, false)?;
            (at, ino, freed)
        };
        for f in freed {
            self.content.remove(f);
        }
        self.durable()?;
        self.tell(&[
            Invalidation::Entry {
                parent,
                name: (*name).to_owned(),
            },
            Invalidation::Inode(parent),
            Invalidation::Inode(ino),
        ]);
        Ok(())
    }
}

/// SQLite's write-ahead log beside its database.
fn wal_path(journal: &std::path::Path) -> std::path::PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// fsync of the file at `path`, if it exists.
fn sync_file(path: &std::path::Path) -> Result<(), OverlayError> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(f.sync_data()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The entry `name` of directory `dir`, created as `kind` when missing
/// (owned by the directory's owner, as the API has no user of its own);
/// a creation is added to `told`.
fn child(
    ns: &mut Namespace,
    dir: u64,
    name: &str,
    kind: NodeKind,
    told: &mut Vec<Invalidation>,
) -> Result<Node, OverlayError> {
    match ns.lookup(dir, name) {
        Ok(n) => Ok(n.clone()),
        Err(OverlayError::NotFound) => {
            let (uid, gid) = {
                let d = ns.get(dir)?;
                (d.uid, d.gid)
            };
            let perm = if kind == NodeKind::Dir { 0o755 } else { 0o644 };
            let n = ns.create(dir, name, kind, perm, uid, gid, 0, None)?;
            told.push(Invalidation::Inode(dir));
            told.push(Invalidation::Entry {
                parent: dir,
                name: name.to_owned(),
            });
            Ok(n)
        }
        Err(e) => Err(e),
    }
}

/// The names of a session-relative path, each checked as a directory entry.
/// `.`, `..` and empty components are refused, never resolved.
pub fn components(path: &str) -> Result<Vec<&str>, OverlayError> {
    let parts: Vec<&str> = path.split('/').collect();
    if path.is_empty() || parts.is_empty() {
        return Err(OverlayError::Invalid("empty path"));
    }
    for p in &parts {
        check_name(p)?;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_what_could_escape() {
        assert_eq!(components("a/b/c.txt").unwrap(), ["a", "b", "c.txt"]);
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", "./a", "a/.", "a\0b",
        ] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            components(&"x".repeat(256)),
            Err(OverlayError::NameTooLong)
        ));
    }
}
