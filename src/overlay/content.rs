//! File bytes for the mount: unchanged files read lazily from the session
//! object (through the block cache), changed ones from the overlay.
//!
//! The overlay keeps one plain file per inode under `data/`. A file is
//! copied up the first time it is opened for writing or truncated. One
//! under [`super::partial::MIN_SIZE`] is copied in full: fetched from the
//! object into a temporary file, synced, then renamed into place, so a
//! crash during a copy-up leaves the object's version in force. A larger
//! one is copied chunk by chunk as it is written ([`super::partial`]).
//! Writes then go straight to the overlay file with `pwrite`, which makes
//! them visible to every reader of the mount at once and lets a killed
//! process keep them (the kernel has them).
//!
//! The FUSE threads are not tokio threads: they hand object reads to the
//! runtime with `Handle::block_on`, which never stalls the runtime itself.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::tarball::reader::{Pace, SessionReader};
use parking_lot::Mutex;

use super::partial::{ChunkMap, PartialFile};
use super::OverlayError;

/// What a chunk map's name adds to its file's (no dot: the next open keeps
/// it, see `open.rs`).
const MAP_SUFFIX: &str = "-map";

/// Bytes fetched per request during a copy-up.
const COPY_CHUNK: u64 = 8 << 20;

/// Overlay file descriptors kept open beyond those in use.
const OPEN_FILES: usize = 256;

pub struct Content {
    dir: PathBuf,
    /// Open overlay files, most recently used last. Bounded: descriptors
    /// are not one per file open in the mount (thousands may be), only
    /// those in use at this instant beyond [`OPEN_FILES`].
    files: Mutex<lru::LruCache<u64, Arc<File>>>,
    /// Replaced when a write-back makes a new object the base.
    reader: parking_lot::RwLock<Option<Arc<SessionReader>>>,
    rt: tokio::runtime::Handle,
    copy_ups: CopyUps,
    /// Chunk maps of the files copied up chunk by chunk, loaded once.
    maps: Mutex<std::collections::HashMap<u64, Arc<ChunkMap>>>,
}

/// Who may change which overlay file: a copy-up (or a truncation, or a
/// first write of an empty file) holds its own file only, so one copy-up
/// waiting on a stalled store holds up nothing but that file; steps over
/// the whole session (a write-back adopting its object, a rebase, an API
/// PUT installing a file under the namespace lock) wait for them all.
#[derive(Default)]
struct CopyUps {
    session: parking_lot::RwLock<()>,
    busy: Mutex<std::collections::HashSet<u64>>,
    freed: parking_lot::Condvar,
}

/// Held while one file's overlay bytes are being replaced.
pub struct FileGuard<'a> {
    copy_ups: &'a CopyUps,
    ino: u64,
    _session: parking_lot::RwLockReadGuard<'a, ()>,
}

impl Drop for FileGuard<'_> {
    fn drop(&mut self) {
        self.copy_ups.busy.lock().remove(&self.ino);
        self.copy_ups.freed.notify_all();
    }
}

impl Content {
    pub fn new(
        overlay: &Path,
        reader: Option<Arc<SessionReader>>,
        rt: tokio::runtime::Handle,
    ) -> Result<Content, OverlayError> {
        let dir = overlay.join("data");
        std::fs::create_dir_all(&dir)?;
        Ok(Content {
            dir,
            files: Mutex::new(lru::LruCache::unbounded()),
            reader: parking_lot::RwLock::new(reader),
            rt,
            copy_ups: CopyUps::default(),
            maps: Mutex::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The session object the unchanged files are read from (none for a
    /// session that has no object yet).
    pub fn reader(&self) -> Option<Arc<SessionReader>> {
        self.reader.read().clone()
    }

    /// Makes `reader` the object unchanged files are read from. The caller
    /// re-points every [`super::node::Data::Base`] at the new object's paths
    /// in the same step, under the namespace lock.
    pub fn set_reader(&self, reader: Arc<SessionReader>) {
        *self.reader.write() = Some(reader);
    }

    /// The runtime object reads are handed to.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// The overlay file of `ino`'s path, for packing.
    pub fn path_of(&self, ino: u64) -> PathBuf {
        self.path(ino)
    }

    pub(crate) fn path(&self, ino: u64) -> PathBuf {
        let path = self.dir.join(ino.to_string());
        // Never a freed inode's file still waiting for its removal.
        super::removals::settle(&path);
        path
    }

    /// The overlay file of `ino`, opened once and shared by every handle.
    pub fn local(&self, ino: u64) -> Result<Arc<File>, OverlayError> {
        let mut files = self.files.lock();
        if let Some(f) = files.get(&ino) {
            return Ok(f.clone());
        }
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path(ino))
        };
        let f = match open() {
            // Out of descriptors (a limit lowered under us, or many files
            // in use): the idle ones go first.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                let idle: Vec<u64> = files
                    .iter()
                    .filter(|(_, f)| Arc::strong_count(f) == 1)
                    .map(|(ino, _)| *ino)
                    .collect();
                for ino in idle {
                    files.pop(&ino);
                }
                open()?
            }
            r => r?,
        };
        let f = Arc::new(f);
        files.put(ino, f.clone());
        // Over the bound, the least recently used descriptors nobody holds
        // right now are closed (opened again when next needed).
        let excess = files.len().saturating_sub(OPEN_FILES);
        if excess > 0 {
            let idle: Vec<u64> = files
                .iter()
                .rev()
                .filter(|(_, f)| Arc::strong_count(f) == 1)
                .map(|(ino, _)| *ino)
                .take(excess)
                .collect();
            for ino in idle {
                files.pop(&ino);
            }
        }
        Ok(f)
    }

    /// Forgets the shared handle (the file stays).
    pub fn close(&self, ino: u64) {
        self.files.lock().pop(&ino);
    }

    pub fn remove(&self, ino: u64) {
        self.close(ino);
        match std::fs::remove_file(self.path(ino)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(ino, "could not remove an overlay file: {e}"),
        }
        self.drop_map(ino);
    }

    /// [`Content::remove`], the file itself removed soon by another thread
    /// ([`super::removals`]): for a freed inode, whose number is not used
    /// again.
    pub fn remove_later(&self, ino: u64) {
        self.close(ino);
        super::removals::queue(self.dir.join(ino.to_string()));
        self.drop_map(ino);
    }

    /// The chunk map of `ino`'s overlay file, beside it.
    pub fn map_path(&self, ino: u64) -> PathBuf {
        self.dir.join(format!("{ino}{MAP_SUFFIX}"))
    }

    /// The inode whose chunk map a file of the overlay directory is.
    pub fn map_of(name: &str) -> Option<u64> {
        name.strip_suffix(MAP_SUFFIX)?.parse().ok()
    }

    /// Forgets `ino`'s chunk map, which its overlay file no longer needs
    /// (held whole, replaced, or gone). Journal first, then this: a map
    /// left by a crash is removed at the next open. Every map is loaded
    /// (at its creation, or at open), so an inode not loaded has none.
    pub fn drop_map(&self, ino: u64) {
        if self.maps.lock().remove(&ino).is_none() {
            return;
        }
        match std::fs::remove_file(self.map_path(ino)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(ino, "could not remove a chunk map: {e}"),
        }
    }

    /// The chunk map of a file copied up chunk by chunk.
    pub fn chunk_map(&self, ino: u64) -> Result<Arc<ChunkMap>, OverlayError> {
        let mut maps = self.maps.lock();
        if let Some(m) = maps.get(&ino) {
            return Ok(m.clone());
        }
        let m = Arc::new(ChunkMap::open(&self.map_path(ino))?);
        maps.insert(ino, m.clone());
        Ok(m)
    }

    /// `ino` as a file copied up chunk by chunk, whose other chunks are
    /// `path` in `reader`'s object.
    pub fn partial_file(
        &self,
        ino: u64,
        reader: Option<Arc<SessionReader>>,
        path: &str,
    ) -> Result<PartialFile, OverlayError> {
        Ok(PartialFile {
            data: self.local(ino)?,
            map: self.chunk_map(ino)?,
            reader,
            path: path.to_owned(),
            pace: Pace::Ahead,
        })
    }

    /// Starts a block-level copy-up of `ino` (`size` bytes, none fetched):
    /// a sparse overlay file of that size and an empty chunk map, both
    /// synced and renamed into place; the caller then journals the file as
    /// [`super::node::Data::Partial`]. A crash before that leaves files the
    /// next open removes.
    pub fn begin_partial(
        &self,
        ino: u64,
        size: u64,
        mtime: std::time::SystemTime,
    ) -> Result<(), OverlayError> {
        let tmp = self.dir.join(format!("{ino}.copy"));
        let out = File::create(&tmp)?;
        out.set_len(size)?;
        out.set_modified(mtime)?;
        out.sync_all()?;
        let map_tmp = self.dir.join(format!("{ino}.map"));
        let map = ChunkMap::create(&map_tmp, size)?;
        std::fs::rename(&map_tmp, self.map_path(ino))?;
        self.maps.lock().insert(ino, Arc::new(map));
        self.close(ino);
        std::fs::rename(&tmp, self.path(ino))?;
        Ok(())
    }

    /// Fetches `chunks` of a partial file into its overlay file, syncs it,
    /// then marks them held. The caller holds [`Content::file_lock`].
    pub fn fill(&self, file: &PartialFile, chunks: &[u64]) -> Result<(), OverlayError> {
        let mut filled = Vec::with_capacity(chunks.len());
        // Neighbouring chunks are fetched together: fewer requests.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &c in chunks {
            let (start, end) = file.map.object_range(c);
            if start >= end {
                continue;
            }
            filled.push(c);
            match runs.last_mut() {
                Some(r) if r.1 == start && r.1 - r.0 < COPY_CHUNK => r.1 = end,
                _ => runs.push((start, end)),
            }
        }
        for (start, end) in runs {
            let bytes = read_object(
                &self.rt,
                file.reader.as_ref(),
                &file.path,
                start,
                end - start,
                Pace::Here,
            )?;
            if (bytes.len() as u64) < end - start {
                return Err(OverlayError::Corrupt(format!(
                    "{}: the object holds fewer bytes than the file's size",
                    file.path
                )));
            }
            file.data.write_all_at(&bytes, start)?;
        }
        if filled.is_empty() {
            return Ok(());
        }
        file.data.sync_data()?;
        file.map.mark(&filled)?;
        Ok(())
    }

    /// Size and mtime of an overlay file, if it exists.
    pub fn stat(&self, ino: u64) -> Option<std::fs::Metadata> {
        std::fs::metadata(self.path(ino)).ok()
    }

    /// Serialises what replaces `ino`'s overlay bytes (a copy-up), so one
    /// file is never fetched twice at once; other files go on.
    pub fn file_lock(&self, ino: u64) -> FileGuard<'_> {
        let session = self.copy_ups.session.read();
        let mut busy = self.copy_ups.busy.lock();
        while busy.contains(&ino) {
            self.copy_ups.freed.wait(&mut busy);
        }
        busy.insert(ino);
        FileGuard {
            copy_ups: &self.copy_ups,
            ino,
            _session: session,
        }
    }

    /// Keeps every copy-up out (waits for those under way).
    pub fn exclusive(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.copy_ups.session.write()
    }

    /// Keeps steps over the whole session out, while copy-ups go on.
    pub fn shared(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.copy_ups.session.read()
    }

    /// [`Content::shared`] if no such step holds or waits for it.
    pub fn try_shared(&self) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
        self.copy_ups.session.try_read()
    }

    /// Fetches `len` bytes of `base` (the first `len`, for a truncating
    /// copy-up) into the overlay file of `ino`.
    pub fn copy_up(
        &self,
        ino: u64,
        base: &str,
        len: u64,
        mtime: std::time::SystemTime,
    ) -> Result<(), OverlayError> {
        let tmp = self.dir.join(format!("{ino}.copy"));
        let out = File::create(&tmp)?;
        let mut at = 0u64;
        while at < len {
            let n = COPY_CHUNK.min(len - at);
            let bytes = self.read_base(base, at, n)?;
            if bytes.is_empty() {
                break;
            }
            out.write_all_at(&bytes, at)?;
            at += bytes.len() as u64;
        }
        out.set_len(len)?;
        // Not a write: the file keeps its modification time, which a
        // remount compares with the journal's (see `Namespace::adopt_local`).
        out.set_modified(mtime)?;
        out.sync_all()?;
        self.close(ino);
        std::fs::rename(&tmp, self.path(ino))?;
        Ok(())
    }

    /// Up to `len` bytes of the overlay file of `ino` from `offset` (fewer
    /// at its end).
    pub fn read_local(&self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, OverlayError> {
        let f = self.local(ino)?;
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            let n = f.read_at(&mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Writes `bytes` to a new file beside the overlay files and syncs it;
    /// [`Content::install`] then puts it in place. Writers of the same file
    /// may run this at once: each has its own name.
    pub fn stage(&self, bytes: &[u8]) -> Result<PathBuf, OverlayError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!("put.{}.{n}", std::process::id()));
        let write = || {
            let out = File::create(&tmp)?;
            out.write_all_at(bytes, 0).and_then(|()| out.sync_all())
        };
        let written = match write() {
            // The space of files replaced a moment before may still be on
            // its way back (`removals`).
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                    && super::removals::drain() =>
            {
                write()
            }
            r => r,
        };
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        Ok(tmp)
    }

    /// Puts a staged file in place of the overlay file of `ino`: readers see
    /// the old bytes or the new ones, never a mix. The caller holds
    /// [`Content::exclusive`] and the directory is synced later.
    ///
    /// The two files are exchanged, and the old one, now under the staged
    /// name, goes to [`super::removals`]: a rename over it would free its blocks
    /// under the caller's locks (about 300 µs on ext4 for a synced file,
    /// which every other PUT of the session waited for). A crash before the
    /// removal leaves a staged name, which the next open removes.
    pub fn install(&self, ino: u64, staged: &Path) -> Result<(), OverlayError> {
        self.close(ino);
        let target = self.path(ino);
        match exchange(staged, &target) {
            Ok(()) => super::removals::queue(staged.to_owned()),
            // Nothing there yet, or a filesystem that cannot exchange
            // (`EINVAL`, or `EXDEV` on some overlayfs layers): a failed
            // exchange changed nothing, and the rename says what is wrong.
            Err(_) => std::fs::rename(staged, &target)?,
        }
        self.drop_map(ino);
        Ok(())
    }

    pub fn read_base(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, OverlayError> {
        self.read_base_from(self.reader().as_ref(), path, offset, len)
    }

    /// Bytes of `path` in `reader`'s object (taken with the node that
    /// named the path, so both are of one version).
    pub fn read_base_from(
        &self,
        reader: Option<&Arc<SessionReader>>,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, OverlayError> {
        read_object(&self.rt, reader, path, offset, len, Pace::Ahead)
    }

    /// Makes the overlay files and their directory durable.
    pub fn sync_dir(&self) -> Result<(), OverlayError> {
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Swaps the files at `a` and `b` (`renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes of `path` in `reader`'s object, waited for on `rt` from a thread
/// that is not one of its own ([`read_object_within`]).
pub fn read_object(
    rt: &tokio::runtime::Handle,
    reader: Option<&Arc<SessionReader>>,
    path: &str,
    offset: u64,
    len: u64,
    pace: Pace,
) -> Result<bytes::Bytes, OverlayError> {
    let reader = reader
        .ok_or_else(|| OverlayError::Corrupt(format!("{path}: no session object to read")))?;
    rt.block_on(read_object_within(reader, path, offset, len, pace))
}

/// Bytes of `path` in `reader`'s object within `--read-timeout-secs`;
/// `Pace::Ahead` lets a sequential reader's next segments load meanwhile. Safe
/// on the runtime's own threads: what is decoded in memory answers at once,
/// and the rest waits without holding the thread.
pub async fn read_object_within(
    reader: &SessionReader,
    path: &str,
    offset: u64,
    len: u64,
    pace: Pace,
) -> Result<bytes::Bytes, OverlayError> {
    let deadline = crate::store::deadline::read_deadline();
    let read = reader.read_with(path, offset, len, pace);
    match tokio::time::timeout(deadline, read).await {
        Ok(read) => Ok(read?),
        Err(_) => Err(crate::store::StoreError::Transient {
            op: "read",
            key: path.to_owned(),
            message: format!(
                "no answer within {deadline:?} (--read-timeout-secs); the store stalls"
            ),
        }
        .into()),
    }
}
