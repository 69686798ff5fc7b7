//! The `fuser::Filesystem` of one mounted session: translates kernel
//! requests into [`Namespace`] and [`Content`] calls and errors into errno.
//!
//! Locking: the namespace is one mutex, held only for metadata work; file
//! bytes move outside it (overlay `pread`/`pwrite`, object reads through the
//! block cache), so a slow fetch never stalls `ls` or `stat` on the other
//! FUSE threads. Permission checks are the kernel's (`default_permissions`);
//! POSIX and BSD locks are the kernel's too (local to this mount).
//!
//! The mount root may be a subdirectory of the session (`--subdir`): the
//! kernel's inode 1 and that directory's inode swap numbers at this boundary.
//!
//! Opens: a session mounted on its own answers `open`, `opendir`, `flush`
//! and `create` with ENOSYS once, and the kernel then opens, lists and
//! closes without a request (and makes files by `MKNOD`): a warm `cat` or
//! `grep` of an unchanged file never reaches this process. So nothing here is kept by file handle: writes are tracked by
//! inode, a file is copied up at its first write, and an inode whose last
//! name goes lives until the kernel forgets its last lookup (each entry
//! answered is counted; `forget` counts down).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use sessionfs_core::overlay::live::{Covered, Invalidation, LiveSession, Watcher};
use sessionfs_core::overlay::namespace::{Namespace, RenameMode, SetAttr};
use sessionfs_core::overlay::node::{Data, Node, NodeKind, Time};
use sessionfs_core::overlay::{removals, OverlayError};

use crate::requests::{Kind, Requests};

/// Turns changes made elsewhere (the API, a move onto another writer's
/// object) into kernel invalidations for the mount whose session inodes
/// sit at `slot` with `root` as its root. Until the notifier is set (the
/// mount is up), there is nothing cached to invalidate.
pub fn watcher(notifier: Arc<OnceLock<Notifier>>, slot: u64, root: u64) -> Watcher {
    Arc::new(move |changes: &[Invalidation]| {
        let Some(n) = notifier.get() else { return };
        let kernel = |ino: u64| INodeNo((slot << SLOT_SHIFT) | swap(ino, root));
        let mut dirs = std::collections::HashSet::new();
        for change in changes {
            // ENOENT means the kernel had nothing cached: nothing to do.
            let _ = match change {
                Invalidation::Inode(ino) => n.inval_inode(kernel(*ino), 0, 0),
                Invalidation::Entry { parent, name } => {
                    dirs.insert(*parent);
                    n.inval_entry(kernel(*parent), OsStr::new(name))
                }
            };
        }
        // The kernel drops a cached listing with an entry only when it had
        // that name cached; a name it never looked up needs the directory's
        // pages (its listing) dropped.
        for dir in dirs {
            let _ = n.inval_inode(kernel(dir), 0, 0);
        }
    })
}

/// Prefix of the xattrs of a mount's root that reach the write-back loop
/// (`user.sessionfs.flush`, `user.sessionfs.status`) and of the one
/// answered here, `user.sessionfs.requests` (see [`crate::requests`]).
pub const CONTROL_XATTR: &str = "user.sessionfs.";

/// How long the kernel may trust names, attributes and directory listings.
/// Every change comes through this process: the kernel sees the effects of
/// its own requests, and what the API or a followed object changes is
/// invalidated through the notifier ([`watcher`]). So the kernel keeps all
/// of it for long, and a warm `find`, `stat` or `git status` never reaches
/// this process; the TTL only bounds how long an edit made behind
/// sessionfs's back (in the overlay directory by hand) stays unseen.
const TTL: Duration = Duration::from_secs(3600);
/// Longest symlink target accepted.
const PATH_MAX: usize = 4096;

/// What the journal has of the writes to one file. Kept by inode, not by
/// handle: a session mounted on its own lets the kernel open files without
/// asking (see `open`), so writes come with no handle of ours.
#[derive(Default)]
struct Written {
    /// Written since the journal last caught up.
    dirty: bool,
    /// The namespace's snapshot count when this file's writes were last
    /// journaled as a change. The first write after a snapshot (and the
    /// first of all) records one at once: `sessionfs flush` right after a
    /// close must find it, and closes do not wait for the journal.
    recorded: Option<u64>,
}

pub struct SessionFs {
    live: Arc<LiveSession>,
    written: Arc<Writes>,
    /// Directory listings in cookie order, by directory, as the last
    /// readdir from offset 0 found them (see [`Cookies`]).
    listings: Mutex<HashMap<u64, Cookies>>,
    root: u64,
    /// Under `serve --mount-root` each session has a slot: the high bits of
    /// its kernel inode numbers. 0 for a session mounted on its own.
    slot: u64,
    view: crate::attr::View,
    /// The kernel's requests so far, by kind (`user.sessionfs.requests`).
    requests: Requests,
}

/// A directory's entries as readdir hands them out: `.` and `..` at
/// offsets 1 and 2, then every name at its [`cookie`], in that order.
/// Directories are not opened (see `opendir`), so no per-open snapshot pins
/// the offsets; a name's offset never changes, so a listing resumed after
/// entries came or went (`rm -rf` unlinks as it reads) neither repeats nor
/// skips the entries that stayed.
type Cookies = Arc<Vec<(u64, String, u64, NodeKind)>>;

/// Listings kept for readdir calls that continue one (offset > 0).
const LISTINGS_KEPT: usize = 256;

/// A name's readdir offset: its first [`PREFIX_CHARS`] bytes, coded so the
/// order is kept ([`order_code`]), above [`HASH_BITS`] of a hash of the
/// whole name. Listings go in offset order, which is the names' order as
/// far as their first bytes tell: what walks the tree in listing order
/// (`find`, `grep -r`, `cp -r`, `tar`) then reads it in the session
/// object's order, one segment after the next, instead of jumping between
/// the segments of a directory's subdirectories as a hash order did. A cold
/// read of every file of the benchmark's tree (`xargs -P 4 cat`) inflated
/// its 935 segments 1,031 times in hash order, 957 in name order; with
/// less than 20 MiB of inflated segments kept, 1,781 times in hash order
/// (12 MiB) and 981 in name order (8 MiB). Always above the two dots' 1
/// and 2, and positive as an i64.
fn cookie(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let mut prefix = 0u64;
    for i in 0..PREFIX_CHARS {
        // A name that ends pads with 0, below every byte: "mod" < "mod0".
        let code = name.as_bytes().get(i).map_or(0, |&b| order_code(b));
        prefix = prefix << 6 | u64::from(code);
    }
    prefix << HASH_BITS | (h.finish() & ((1 << HASH_BITS) - 1))
}

/// Sorts a listing by offset, each offset unique: of two names with one
/// offset (same first bytes, same hash bits) the later takes the next free
/// one, so a listing resumed at either finds its place.
fn in_offset_order(v: &mut [(u64, String, u64, NodeKind)]) {
    v.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for i in 1..v.len() {
        if v[i].0 <= v[i - 1].0 {
            v[i].0 = v[i - 1].0 + 1;
        }
    }
}

/// Bytes of a name that order its offset: 6 bits each, 30 in all.
const PREFIX_CHARS: usize = 5;
/// Bits of the name's hash below them: names that share their first bytes
/// come in hash order, and two of them share an offset only if these bits
/// match too (which [`SessionFs::listing`] then separates).
const HASH_BITS: u32 = 33;

/// A byte's code in 1..=63, never lower for a higher byte: digits, `-`,
/// `.`, `_` and lower-case letters each have their own, upper-case letters
/// one per two, the rest share a few.
fn order_code(b: u8) -> u8 {
    match b {
        0x00..=0x2c => 1,
        b'-' => 2,
        b'.' | b'/' => 3,
        b'0'..=b'9' => 4 + (b - b'0'),
        0x3a..=0x40 => 14,
        b'A'..=b'Z' => 15 + (b - b'A') / 2,
        0x5b..=0x5e => 28,
        b'_' | b'`' => 29,
        b'a'..=b'z' => 30 + (b - b'a'),
        0x7b..=0xff => 56 + (b - 0x7b) / 17,
    }
}

/// Kernel inode numbers under a mount root: `slot << SLOT_SHIFT | inode`.
pub const SLOT_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << SLOT_SHIFT) - 1;

fn err(e: OverlayError) -> Errno {
    if e.is_unexpected() {
        tracing::error!("{e}");
    }
    Errno::from_i32(crate::errno(&e))
}

/// Answers a request that returns nothing but success or an errno.
fn answer(reply: ReplyEmpty, r: Result<(), OverlayError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

/// How every file handle is opened. Only this process changes the bytes,
/// so the page cache stays valid (`KEEP_CACHE`). A close asks nothing of the
/// daemon (`NOFLUSH`): writes reach the overlay file as they come, the first
/// one records its change at once, and the journal catches up with the
/// final size at the release, an fsync or the kernel forgetting the inode;
/// a process killed before that is caught up at remount from the overlay
/// file itself. POSIX locks are the kernel's.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Whether a write with these flags appends: the file was opened with
/// `O_APPEND`, and the write is not the page cache writing a mapping back.
fn appends(write_flags: WriteFlags, flags: OpenFlags) -> bool {
    flags.0 & libc::O_APPEND != 0 && !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE)
}

/// What is kept of the writes to each file since its journal entry.
type Writes = Mutex<HashMap<u64, Written>>;

/// The attributes the kernel is shown of `node`, as inode `ino` there.
fn shown(node: &Node, ino: INodeNo, view: crate::attr::View) -> FileAttr {
    let mut a = crate::attr::attr(node);
    a.ino = ino;
    view.apply(&mut a);
    a
}

/// Journals what writes did to `ino` since the journal last caught up.
fn catch_up(live: &LiveSession, written: &Writes, ino: u64) -> Result<(), OverlayError> {
    let dirty = written
        .lock()
        .get_mut(&ino)
        .is_some_and(|w| std::mem::take(&mut w.dirty));
    if dirty {
        live.ns.lock().flush(ino)?;
    }
    Ok(())
}

/// Makes `ino`'s bytes and what the journal says of them durable.
fn fsync_file(
    live: &LiveSession,
    written: &Writes,
    ino: u64,
    datasync: bool,
) -> Result<(), OverlayError> {
    let data = live.ns.lock().get(ino)?.data.clone();
    if data.in_overlay() {
        let f = live.content.local(ino)?;
        if datasync {
            f.sync_data()?;
        } else {
            f.sync_all()?;
        }
        // After the bytes its marks vouch for.
        if let Data::Partial(_) = data {
            live.content.chunk_map(ino)?.sync()?;
        }
    }
    catch_up(live, written, ino)?;
    // The directory and the journal's log, shared with concurrent
    // fsyncs (and API writes) of this session.
    live.durable()
}

/// A truncate (which may copy the file up first) and the other attributes.
fn setattr_file(live: &LiveSession, ino: u64, set: SetAttr) -> Result<Node, OverlayError> {
    live.writable()?;
    if let Some(size) = set.size {
        let node = live.ns.lock().get(ino)?.clone();
        if node.kind == NodeKind::File {
            live.resize(ino, size)?;
        }
    }
    live.ns.lock().setattr(ino, &set)
}

/// The permission bits a file keeps when a write or a change of owner takes
/// set-user-ID away, and set-group-ID where group execute is set (without
/// it the bit marks mandatory locking, not a privilege), as the kernel does
/// for its own filesystems; `None` when there is nothing to take.
fn killed_perm(perm: u16) -> Option<u32> {
    let perm = u32::from(perm);
    let mut kept = perm & !libc::S_ISUID;
    if kept & libc::S_IXGRP != 0 {
        kept &= !libc::S_ISGID;
    }
    (kept != perm).then_some(kept)
}

/// Takes set-user-ID and set-group-ID from file `ino` at a write by a
/// caller without `CAP_FSETID` (the kernel says so in the write's flags).
fn kill_suidgid(live: &LiveSession, ino: u64) -> Result<(), OverlayError> {
    let mut ns = live.ns.lock();
    let node = ns.get(ino)?;
    if node.kind != NodeKind::File {
        return Ok(());
    }
    if let Some(perm) = killed_perm(node.perm) {
        let set = SetAttr {
            perm: Some(perm),
            ..SetAttr::default()
        };
        ns.setattr(ino, &set)?;
    }
    Ok(())
}

/// Whether process `pid` has `CAP_FSETID` (bit 4 of its effective set, in
/// its own user namespace, where the kernel asks the initial one). A
/// process that is gone, or a status that cannot be read, counts as
/// without: the bits then go, which is the safe side.
fn has_fsetid(pid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps >> CAP_FSETID & 1 == 1)
}

fn fallocate_file(
    live: &LiveSession,
    ino: u64,
    offset: u64,
    length: u64,
    mode: i32,
) -> Result<(), OverlayError> {
    live.writable()?;
    if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
        // Space only: a file copied up chunk by chunk stays so (the
        // bytes it does not hold are still the object's).
        live.ensure_writable(ino, false)?;
    } else {
        // Punching, zeroing or moving ranges changes bytes it may not hold.
        live.ensure_local(ino, false)?;
    }
    let f = live.content.local(ino)?;
    let off = i64::try_from(offset).map_err(|_| OverlayError::Invalid("offset"))?;
    let len = i64::try_from(length).map_err(|_| OverlayError::Invalid("length"))?;
    // SAFETY: `f` is an open file descriptor owned by `f` for the whole
    // call; fallocate reads no memory of ours.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let size = f.metadata()?.len();
    let mut ns = live.ns.lock();
    let mut node = ns.get(ino)?.clone();
    if node.size != size {
        node.size = size;
        node.mtime = Time::now();
    }
    node.ctime = Time::now();
    ns.save(node, "write")?;
    Ok(())
}

/// A write to file `ino`, copying the file up (or filling the chunks of a
/// partial one) first as needed: files are copied up at their first write,
/// not at their open (which the kernel may not tell).
fn write_to(
    live: &LiveSession,
    written: &Mutex<HashMap<u64, Written>>,
    ino: u64,
    offset: u64,
    data: &[u8],
    append: bool,
) -> Result<u32, OverlayError> {
    live.writable()?;
    let recorded = written.lock().get(&ino).and_then(|w| w.recorded);
    let len = data.len() as u64;
    let mut ns = live.ns.lock();
    // A file held whole (the common case) needs nothing first. An append
    // lands at or past the end, where there is nothing to fill.
    let covered = if ns.get(ino)?.data == Data::Local {
        Covered::default()
    } else {
        drop(ns);
        let at = if append { u64::MAX - len } else { offset };
        let covered = live.prepare_write(ino, at, len)?;
        ns = live.ns.lock();
        covered
    };
    // After any copy-up: it replaces the overlay file.
    let f = live.content.local(ino)?;
    // Appends go to the end as we know it, whatever offset the kernel sent.
    let at = if append { ns.get(ino)?.size } else { offset };
    match f.write_all_at(data, at) {
        // Space freed by an unlink a moment ago may still be on its way
        // back (`removals`): waited for, then the write runs again.
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                && removals::drain() =>
        {
            f.write_all_at(data, at)?
        }
        r => r?,
    }
    ns.note_write(ino, at + len);
    let snapshots = ns.snapshots();
    let record = recorded != Some(snapshots);
    if record {
        ns.flush(ino)?;
    }
    drop(ns);
    covered.written()?;
    let mut written = written.lock();
    let w = written.entry(ino).or_default();
    if record {
        w.recorded = Some(snapshots);
    } else {
        w.dirty = true;
    }
    Ok(len as u32)
}

fn name_str(name: &OsStr) -> Result<&str, OverlayError> {
    std::str::from_utf8(name.as_bytes()).map_err(|_| OverlayError::BadName)
}

impl SessionFs {
    /// The session this filesystem serves.
    pub fn live(&self) -> &Arc<LiveSession> {
        &self.live
    }

    pub fn new(live: Arc<LiveSession>, root: u64) -> SessionFs {
        SessionFs {
            live,
            written: Arc::new(Mutex::new(HashMap::new())),
            listings: Mutex::new(HashMap::new()),
            root,
            slot: 0,
            view: crate::attr::View::default(),
            requests: Requests::default(),
        }
    }

    /// Owners and modes shown as `view` says.
    pub fn with_view(mut self, view: crate::attr::View) -> SessionFs {
        self.view = view;
        self
    }

    /// The session's inode that is the mount's root.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// This session as one of many under a mount root.
    pub fn with_slot(mut self, slot: u64) -> SessionFs {
        self.slot = slot;
        self
    }

    /// Kernel inode number → ours: the mount root and inode 1 swap.
    fn inner(&self, ino: INodeNo) -> u64 {
        swap(ino.0 & INO_MASK, self.root)
    }

    /// Ours → the kernel's.
    fn kernel(&self, ino: u64) -> INodeNo {
        INodeNo((self.slot << SLOT_SHIFT) | swap(ino, self.root))
    }

    fn attr(&self, node: &Node) -> FileAttr {
        shown(node, self.kernel(node.ino), self.view)
    }

    /// The attributes of the mounted directory itself.
    pub fn root_attr(&self) -> Result<FileAttr, OverlayError> {
        let ns = self.live.ns.lock();
        Ok(self.attr(ns.get(self.root)?))
    }

    /// Journals and syncs everything (before a session is dropped).
    pub fn sync(&self) -> Result<(), OverlayError> {
        self.live.sync()
    }

    fn writable(&self) -> Result<(), OverlayError> {
        self.live.writable()
    }

    /// Whether the kernel opens this session's files and directories
    /// without asking. A session mounted on its own does: a warm open of an
    /// unchanged file then costs no request at all (nor does its close),
    /// and an inode whose last name goes lives as long as the kernel's
    /// lookups of it, which `forget` ends. Under a mount root the root's
    /// own listing needs its opens, and sessions come and go, so there an
    /// inode lives as long as its open handles.
    fn unopened(&self) -> bool {
        self.slot == 0
    }

    /// The kernel learned of `node` by an entry we answer: with unopened
    /// files, that is the reference that keeps it alive.
    fn entry_held(&self, ns: &mut Namespace, node: &Node) {
        if self.unopened() {
            ns.hold(node.ino);
        }
    }

    /// Freed inodes: their overlay files go on another thread, so the
    /// kernel's next request is not kept waiting for the disk.
    fn free(&self, freed: Vec<u64>) {
        for ino in freed {
            self.live.content.remove_later(ino);
        }
    }

    fn entry(&self, node: &Node, reply: ReplyEntry) {
        self.entry_held(&mut self.live.ns.lock(), node);
        reply.entry(&TTL, &self.attr(node), Generation(0));
    }

    /// The permission bits a setattr without a mode leaves file `ino`
    /// with, when it takes set-user-ID or set-group-ID away: a change of
    /// owner (also `chown(-1, -1)`, which the kernel sends with nothing
    /// set) always does, a truncate by a caller without
    /// `CAP_FSETID`. The kernel sends `FATTR_KILL_SUIDGID` in exactly these
    /// cases, which fuser does not pass on.
    fn killed_by_setattr(
        &self,
        req: &Request,
        ino: u64,
        chown: bool,
        truncate: bool,
    ) -> Option<u32> {
        if !chown && !truncate {
            return None;
        }
        let perm = {
            let ns = self.live.ns.lock();
            let node = ns.get(ino).ok()?;
            if node.kind != NodeKind::File {
                return None;
            }
            killed_perm(node.perm)?
        };
        (chown || !has_fsetid(req.pid())).then_some(perm)
    }

    /// Owner and group of a new inode: BSD group semantics under a setgid
    /// directory, as Linux filesystems do.
    fn owner(&self, req: &Request, parent: u64) -> Result<(u32, u32, bool), OverlayError> {
        let ns = self.live.ns.lock();
        let p = ns.get(parent)?;
        let setgid = u32::from(p.perm) & libc::S_ISGID != 0;
        if self.view.maps_owners() {
            // The caller is shown as the owner; what is stored stays the
            // session's own: the directory's.
            return Ok((p.uid, p.gid, setgid));
        }
        Ok((req.uid(), if setgid { p.gid } else { req.gid() }, setgid))
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<String>,
    ) -> Result<Node, OverlayError> {
        self.writable()?;
        let name = name_str(name)?;
        let (uid, gid, setgid) = self.owner(req, parent)?;
        let mut perm = mode & 0o7777 & !umask;
        if kind == NodeKind::Dir && setgid {
            perm |= libc::S_ISGID;
        }
        self.live
            .ns
            .lock()
            .create(parent, name, kind, perm, uid, gid, rdev, target)
    }

    /// An open handle of `ino` (under a mount root, where opens are told).
    fn open_handle(&self, ino: u64, flags: i32) -> Result<(), OverlayError> {
        let acc = flags & libc::O_ACCMODE;
        if acc == libc::O_WRONLY || acc == libc::O_RDWR {
            self.writable()?;
        }
        self.live.ns.lock().hold(ino);
        Ok(())
    }

    fn do_read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, OverlayError> {
        self.live.read(ino, offset, u64::from(size))
    }

    /// Journals what writes did to `ino` since the journal last caught up.
    fn catch_up(&self, ino: u64) -> Result<(), OverlayError> {
        catch_up(&self.live, &self.written, ino)
    }

    /// Whether `ino`'s bytes are (partly) the object's, so that reading
    /// them, or changing the file's size or blocks, may fetch first.
    fn object_backed(&self, ino: u64) -> bool {
        self.live
            .ns
            .lock()
            .get(ino)
            .is_ok_and(|n| matches!(n.data, Data::Base(_) | Data::Partial(_)))
    }

    /// Runs `work` on the runtime's blocking pool: work that waits on the
    /// disk or the store leaves the FUSE threads to answer from the cache.
    fn offload(&self, work: impl FnOnce(&LiveSession, &Writes) + Send + 'static) {
        let (live, written) = (self.live.clone(), self.written.clone());
        self.live
            .content
            .runtime()
            .spawn_blocking(move || work(&live, &written));
    }

    /// The journal caught up with `ino`, and what was kept of its writes
    /// dropped: its handle closed, or the kernel forgot it.
    fn done_writing(&self, ino: u64) -> Result<(), OverlayError> {
        let r = self.catch_up(ino);
        self.written.lock().remove(&ino);
        r
    }

    fn do_release(&self, ino: u64) -> Result<(), OverlayError> {
        self.done_writing(ino)?;
        if self.unopened() {
            // A handle `create` made: the kernel's lookup holds the inode.
            return Ok(());
        }
        let mut ns = self.live.ns.lock();
        let freed = ns.let_go(&[(ino, 1)])?;
        if !ns.is_held(ino) {
            self.live.content.close(ino);
        }
        drop(ns);
        self.free(freed);
        Ok(())
    }

    /// The kernel dropped `n` lookups of `ino`: the journal catches up with
    /// its writes, and if that was its last reference and it has no name
    /// left, it is freed, its bytes at once: the kernel queues the forget
    /// within the unlink of a file nobody has open, ahead of the requests
    /// after it, so the space is back for the next write.
    fn forgotten(&self, ino: u64, n: u64) {
        if !self.unopened() {
            return;
        }
        if let Err(e) = self.done_writing(ino) {
            tracing::warn!(ino, "journaling the writes to a forgotten inode: {e}");
        }
        match self.live.ns.lock().let_go(&[(ino, n)]) {
            Ok(freed) => self.free(freed),
            Err(e) => tracing::error!(ino, "freeing a forgotten inode: {e}"),
        }
    }

    /// The listing of directory `dir` for a readdir from `offset`, with the
    /// index of its first entry after `offset`: read afresh for a listing
    /// that starts, the kept one for one that goes on.
    fn listing(&self, dir: u64, offset: u64) -> Result<(Cookies, usize), OverlayError> {
        let after = |l: Cookies| {
            let start = l.partition_point(|e| e.0 <= offset);
            (l, start)
        };
        if offset != 0 {
            if let Some(l) = self.listings.lock().get(&dir) {
                return Ok(after(l.clone()));
            }
        }
        let list = self.live.ns.lock().list(dir)?;
        let mut v: Vec<_> = list
            .into_iter()
            .enumerate()
            .map(|(i, (name, ino, kind))| {
                let c = if i < 2 { i as u64 + 1 } else { cookie(&name) };
                (c, name, ino, kind)
            })
            .collect();
        in_offset_order(&mut v);
        let v = Arc::new(v);
        let mut kept = self.listings.lock();
        if kept.len() >= LISTINGS_KEPT {
            kept.clear();
        }
        kept.insert(dir, v.clone());
        Ok(after(v))
    }

    /// A listing was handed out to its end: it need not be kept (a reader
    /// that goes on after all gets one read afresh, at the same offsets).
    fn listed(&self, dir: u64, list: &Cookies) {
        let mut kept = self.listings.lock();
        if kept.get(&dir).is_some_and(|k| Arc::ptr_eq(k, list)) {
            kept.remove(&dir);
        }
    }

    fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if data.len() > size as usize {
            reply.error(Errno::from_i32(libc::ERANGE));
        } else {
            reply.data(data);
        }
    }
}

/// The answer to a lookup of a missing name: inode 0 tells the kernel to
/// cache the name as missing for the entry TTL.
fn negative() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn swap(ino: u64, root: u64) -> u64 {
    if ino == 1 {
        root
    } else if ino == root {
        1
    } else {
        ino
    }
}

fn time_of(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => Time::now(),
        TimeOrNow::SpecificTime(t) => Time::from_system(t),
    }
}

impl Filesystem for SessionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Optional speed-ups; a kernel without them is fine.
        let _ = config.add_capabilities(
            InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_CACHE_SYMLINKS
                // The kernel then asks whether a file has capabilities
                // (a `GETXATTR`) at its first write only, not at every
                // one, and leaves taking set-user-ID and set-group-ID
                // away to us (`kill_suidgid`, `killed_by_setattr`).
                | InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        );
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        // Unmounted: everything answered is journaled; make it durable too.
        if let Err(e) = self.sync() {
            tracing::error!("syncing the overlay at unmount: {e}");
        }
        // The files of inodes freed last are not left for the next open.
        removals::drain();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forgotten(self.inner(ino), nlookup);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.requests.count(Kind::Lookup);
        let parent = self.inner(parent);
        let r = name_str(name).and_then(|n| {
            let mut ns = self.live.ns.lock();
            let node = ns.lookup(parent, n)?.clone();
            self.entry_held(&mut ns, &node);
            Ok(node)
        });
        match r {
            Ok(node) => reply.entry(&TTL, &self.attr(&node), Generation(0)),
            // A name that is not there is cached as such (builds and git
            // probe many); creating it through the kernel or invalidating it
            // ends that.
            Err(OverlayError::NotFound) => reply.entry(&TTL, &negative(), Generation(0)),
            Err(OverlayError::BadName) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.requests.count(Kind::Getattr);
        match self.live.ns.lock().get(self.inner(ino)) {
            Ok(node) => reply.attr(&TTL, &self.attr(node)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.requests.count(Kind::Setattr);
        let ino = self.inner(ino);
        let owner_change = uid.is_some() || gid.is_some();
        // `chown(-1, -1)` changes nothing but takes the bits too; the
        // kernel sends it with nothing set (the ctime is the kernel's). It
        // sends a write's removal of file capabilities the same way, so a
        // file with capabilities and set-user-ID loses the bit at root's
        // first write too, where ext4 keeps it.
        let nothing = size.is_none() && atime.is_none() && mtime.is_none() && ctime.is_none();
        let mode = match mode {
            Some(mode) => Some(mode),
            None => self.killed_by_setattr(req, ino, owner_change || nothing, size.is_some()),
        };
        // Shown owners are not stored ones: a chown to the shown owner
        // changes nothing; to anyone else it is refused.
        let (uid, gid) = if self.view.maps_owners() {
            let other_uid = uid.is_some_and(|u| Some(u) != self.view.uid);
            let other_gid = gid.is_some_and(|g| Some(g) != self.view.gid);
            if other_uid || other_gid {
                reply.error(Errno::EPERM);
                return;
            }
            (None, None)
        } else {
            (uid, gid)
        };
        let set = SetAttr {
            perm: mode,
            uid,
            gid,
            size,
            atime: atime.map(time_of),
            mtime: mtime.map(time_of),
        };
        let (kernel_ino, view) = (self.kernel(ino), self.view);
        let truncates = set.size.is_some();
        let answer = move |live: &LiveSession| match setattr_file(live, ino, set) {
            Ok(node) => reply.attr(&TTL, &shown(&node, kernel_ino, view)),
            Err(e) => reply.error(err(e)),
        };
        if truncates && self.object_backed(ino) {
            // A truncate may copy the file up from the store.
            self.offload(move |live, _| answer(live));
        } else {
            answer(&self.live);
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.requests.count(Kind::Readlink);
        match self.live.ns.lock().get(self.inner(ino)).map(Node::target) {
            Ok(Some(t)) => reply.data(t.as_bytes()),
            Ok(None) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.requests.count(Kind::Mknod);
        let Some(kind) = NodeKind::from_mode(mode).filter(|k| *k != NodeKind::Dir) else {
            return reply.error(Errno::EINVAL);
        };
        let parent = self.inner(parent);
        match self.make(req, parent, name, kind, mode, umask, rdev, None) {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.requests.count(Kind::Mkdir);
        let parent = self.inner(parent);
        match self.make(req, parent, name, NodeKind::Dir, mode, umask, 0, None) {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(err(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.requests.count(Kind::Unlink);
        let parent = self.inner(parent);
        let r = self.writable().and_then(|()| {
            let name = name_str(name)?;
            self.live.ns.lock().remove(parent, name, false)
        });
        match r {
            Ok(freed) => {
                self.free(freed);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.requests.count(Kind::Rmdir);
        let parent = self.inner(parent);
        let r = self.writable().and_then(|()| {
            let name = name_str(name)?;
            self.live.ns.lock().remove(parent, name, true)
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.requests.count(Kind::Symlink);
        let parent = self.inner(parent);
        let r = (|| {
            let t = std::str::from_utf8(target.as_os_str().as_bytes())
                .map_err(|_| OverlayError::BadName)?;
            if t.len() >= PATH_MAX {
                return Err(OverlayError::NameTooLong);
            }
            // Stored as given: sessionfs never follows it itself.
            self.make(
                req,
                parent,
                link_name,
                NodeKind::Symlink,
                0o777,
                0,
                0,
                Some(t.to_owned()),
            )
        })();
        match r {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Rename);
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL);
        };
        let (parent, newparent) = (self.inner(parent), self.inner(newparent));
        let r = self.writable().and_then(|()| {
            let (a, b) = (name_str(name)?, name_str(newname)?);
            self.live.ns.lock().rename(parent, a, newparent, b, mode)
        });
        match r {
            Ok(freed) => {
                self.free(freed);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.requests.count(Kind::Link);
        let (ino, newparent) = (self.inner(ino), self.inner(newparent));
        let r = self.writable().and_then(|()| {
            let name = name_str(newname)?;
            self.live.ns.lock().link(ino, newparent, name)
        });
        match r {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.requests.count(Kind::Open);
        if self.unopened() {
            // The kernel opens every file without asking from now on, with
            // the page cache kept (see `unopened`).
            return reply.error(Errno::ENOSYS);
        }
        // Only this process changes the bytes: the page cache stays valid.
        match self.open_handle(self.inner(ino), flags.0) {
            Ok(()) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.requests.count(Kind::Read);
        let ino = self.inner(ino);
        if !self.object_backed(ino) {
            match self.do_read(ino, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(err(e)),
            }
            return;
        }
        // Bytes that may wait on the store are read on the runtime's
        // blocking pool: the FUSE threads stay free to answer from the
        // cache and the journal while the store stalls.
        let live = self.live.clone();
        self.live.content.runtime().spawn_blocking(move || {
            match live.read(ino, offset, u64::from(size)) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(err(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.requests.count(Kind::Write);
        let ino = self.inner(ino);
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = kill_suidgid(&self.live, ino) {
                return reply.error(err(e));
            }
        }
        let append = appends(write_flags, flags);
        if self.live.write_fetches(ino, offset, data.len() as u64) {
            // A copy-up or chunks to fill first may wait on the store: on
            // the blocking pool, as reads from the object are.
            let (live, written, data) = (self.live.clone(), self.written.clone(), data.to_vec());
            self.live.content.runtime().spawn_blocking(move || {
                match write_to(&live, &written, ino, offset, &data, append) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(err(e)),
                }
            });
            return;
        }
        match write_to(&self.live, &self.written, ino, offset, data, append) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Flush);
        if self.unopened() {
            // Handles open with `NOFLUSH` ask for none; unopened ones would
            // at every close. ENOSYS once ends those.
            return reply.error(Errno::ENOSYS);
        }
        answer(reply, self.catch_up(self.inner(ino)))
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Release);
        answer(reply, self.do_release(self.inner(ino)))
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Fsync);
        // Waits on the disk.
        let ino = self.inner(ino);
        self.offload(move |live, written| answer(reply, fsync_file(live, written, ino, datasync)));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.requests.count(Kind::Opendir);
        // A session mounted on its own tells the kernel it has no opendir:
        // directories are then opened without a request (nor a release),
        // and their listings cached until a change drops them; readdir
        // needs no handle (see [`Cookies`]). Under a mount root the root's
        // own listing needs its opens, so directories answer as cached ones.
        if self.unopened() {
            return reply.error(Errno::ENOSYS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.requests.count(Kind::Readdir);
        let dir = self.inner(ino);
        let (list, start) = match self.listing(dir, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(err(e)),
        };
        let mut full = false;
        for (cookie, name, ino, kind) in &list[start..] {
            full = reply.add(
                self.kernel(*ino),
                *cookie,
                crate::attr::file_type(*kind),
                name,
            );
            if full {
                break;
            }
        }
        if !full {
            self.listed(dir, &list);
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.requests.count(Kind::Readdirplus);
        let dir = self.inner(ino);
        let (list, start) = match self.listing(dir, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(err(e)),
        };
        let mut full = false;
        let mut ns = self.live.ns.lock();
        for (cookie, name, ino, _) in &list[start..] {
            let Ok(node) = ns.get(*ino) else { continue };
            let attr = self.attr(node);
            full = reply.add(attr.ino, *cookie, name, &TTL, &attr, Generation(0));
            if full {
                break;
            }
            // The kernel takes a lookup of every entry but the dots.
            if name != "." && name != ".." && self.unopened() {
                ns.hold(*ino);
            }
        }
        drop(ns);
        if !full {
            self.listed(dir, &list);
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Releasedir);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Fsyncdir);
        answer(reply, self.live.ns.lock().sync())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.requests.count(Kind::Statfs);
        // The overlay's disk is where new bytes go: report its space.
        match nix_statvfs(self.content_dir()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Setxattr);
        let ino = self.inner(ino);
        let r = self.writable().and_then(|()| {
            let name = name_str(name)?;
            if name.starts_with("system.posix_acl_") {
                // No ACLs here: tools (cp -a, rsync -A) then fall back to chmod,
                // as on any filesystem without ACL support.
                return Err(OverlayError::NotSupported("POSIX ACLs"));
            }
            self.live.ns.lock().setxattr(ino, name, value, flags)
        });
        answer(reply, r)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.requests.count(Kind::Getxattr);
        let ino = self.inner(ino);
        // `sessionfs flush` and `sessionfs status` ask the mount's root.
        if ino == self.root {
            if let Some(what) = name.to_str().and_then(|n| n.strip_prefix(CONTROL_XATTR)) {
                if what == "requests" {
                    return Self::xattr_reply(self.requests.to_json().as_bytes(), size, reply);
                }
                // A flush waits for a write-back to the store.
                let what = what.to_owned();
                self.offload(move |live, _| match live.control(&what) {
                    Some(Ok(v)) => Self::xattr_reply(v.as_bytes(), size, reply),
                    Some(Err(e)) => {
                        tracing::warn!("{what}: {e}");
                        reply.error(Errno::from_i32(libc::EIO))
                    }
                    None => reply.error(Errno::from_i32(libc::ENOTSUP)),
                });
                return;
            }
        }
        let r = name_str(name).and_then(|n| self.live.ns.lock().getxattr(ino, n));
        match r {
            Ok(v) => Self::xattr_reply(&v, size, reply),
            Err(OverlayError::BadName) => reply.error(Errno::from_i32(libc::ENODATA)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.requests.count(Kind::Listxattr);
        match self.live.ns.lock().listxattr(self.inner(ino)) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                Self::xattr_reply(&buf, size, reply)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.requests.count(Kind::Removexattr);
        let ino = self.inner(ino);
        let r = self.writable().and_then(|()| {
            let name = name_str(name)?;
            self.live.ns.lock().removexattr(ino, name)
        });
        answer(reply, r)
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.requests.count(Kind::Access);
        let _ = mask;
        match self.live.ns.lock().get(self.inner(ino)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.requests.count(Kind::Create);
        if self.unopened() {
            // ENOSYS once, and the kernel makes files by `MKNOD` and opens
            // them as it opens the others, without a request. A file made
            // by `CREATE` comes with a handle, whose close sent a `RELEASE`
            // until the kernel had an `open` refused: a fresh mount that
            // only created files paid one a file.
            return reply.error(Errno::ENOSYS);
        }
        let parent = self.inner(parent);
        let r = (|| {
            let node = self.make(req, parent, name, NodeKind::File, mode, umask, 0, None)?;
            if let Err(e) = self.open_handle(node.ino, flags | libc::O_RDWR) {
                // A failed create creates nothing (EMFILE, ENOSPC): a retry
                // must not meet EEXIST.
                if let Ok(n) = name_str(name) {
                    let freed = self.live.ns.lock().remove(parent, n, false);
                    for ino in freed.unwrap_or_default() {
                        self.live.content.remove(ino);
                    }
                }
                return Err(e);
            }
            let node = self.live.ns.lock().get(node.ino)?.clone();
            Ok::<_, OverlayError>(node)
        })();
        match r {
            Ok(node) => reply.created(
                &TTL,
                &self.attr(&node),
                Generation(0),
                FileHandle(0),
                OPEN_FLAGS,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.requests.count(Kind::Ioctl);
        // Terminal probes (isatty) and the like: not a terminal, no ioctls.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        self.requests.count(Kind::Lseek);
        // ENOSYS once makes the kernel seek by itself from then on.
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.requests.count(Kind::CopyFileRange);
        // ENOSYS makes the kernel fall back to reads and writes.
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.requests.count(Kind::Fallocate);
        let ino = self.inner(ino);
        if self.object_backed(ino) {
            // Punching or zeroing may copy the file up from the store.
            self.offload(move |live, _| {
                answer(reply, fallocate_file(live, ino, offset, length, mode))
            });
        } else {
            answer(reply, fallocate_file(&self.live, ino, offset, length, mode));
        }
    }
}

impl SessionFs {
    fn content_dir(&self) -> &Path {
        self.live.content.dir()
    }
}

fn nix_statvfs(path: &Path) -> Result<libc::statvfs, OverlayError> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| OverlayError::Invalid("overlay path"))?;
    let mut out = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `out`
    // points to writable memory of the right type for statvfs to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), out.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    Ok(unsafe { out.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_codes_keep_the_order_of_bytes() {
        for b in 0..=254u8 {
            assert!(order_code(b) <= order_code(b + 1), "{b}");
        }
        assert!((0..=255u8).all(|b| (1..=63).contains(&order_code(b))));
        // The bytes of most names each have a code of their own.
        let common = b"-.0123456789_abcdefghijklmnopqrstuvwxyz";
        let mut codes: Vec<u8> = common.iter().map(|&b| order_code(b)).collect();
        codes.dedup();
        assert_eq!(codes.len(), common.len());
    }

    #[test]
    fn offsets_follow_the_names_order_as_far_as_their_first_bytes_go() {
        let mut names: Vec<&str> = vec![
            "mod",
            "mod0",
            "mod00",
            "mod07",
            "mod1",
            "mod16",
            "Makefile",
            "README.md",
            "src",
            "src-x",
            "src.rs",
            "src_a",
            "srcz",
            "a",
            "b",
            "zz",
            ".git",
            ".gitignore",
            "é",
            "~x",
            "Cargo.toml",
            "node_modules",
            "package.json",
            "9",
            "0",
        ];
        names.sort_unstable();
        for pair in names.windows(2) {
            assert!(cookie(pair[0]) < cookie(pair[1]), "{pair:?}");
        }
        // Within a shared prefix the hash orders them, always above the dots.
        for name in ["file00000.rs", "file00001.rs", "x", "\u{1}"] {
            let c = cookie(name);
            assert!(c > 2 && c <= i64::MAX as u64, "{name}: {c}");
        }
        assert_eq!(
            cookie("file00000.rs") >> HASH_BITS,
            cookie("file09999.rs") >> HASH_BITS
        );
    }

    #[test]
    fn a_listing_gives_each_name_its_own_offset_in_order() {
        let entry = |c: u64, name: &str| (c, name.to_owned(), 10, NodeKind::File);
        let mut v = vec![
            entry(9, "c"),
            entry(1, "."),
            entry(7, "b"),
            entry(2, ".."),
            entry(7, "a"),
            entry(8, "d"),
        ];
        in_offset_order(&mut v);
        let got: Vec<(u64, &str)> = v.iter().map(|e| (e.0, e.1.as_str())).collect();
        assert_eq!(
            got,
            [(1, "."), (2, ".."), (7, "a"), (8, "b"), (9, "d"), (10, "c")]
        );
    }
}
