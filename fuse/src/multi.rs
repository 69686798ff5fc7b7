//! Every session of a bucket under one mount root (`serve --mount-root`).
//!
//! The root lists the sessions: those with an object in the store and those
//! with an overlay here (created, not yet written back). A session is opened
//! (its TOC read, its overlay journal loaded) the first time it is looked up,
//! then kept. `mkdir` in the root starts a new session; `rmdir` of a session
//! deletes its object and overlay, and only when the mount was started with
//! that allowed. Nothing else may be created in the root.
//!
//! Sessions come from the process's [`Registry`], which the HTTP API shares:
//! each is opened once, whichever side asks first. Here each open session is
//! a [`SessionFs`] with its own slot: the high bits of the kernel inode
//! numbers say which session a request is for, and the request goes to that
//! session unchanged. The mount watches every session it serves, so a change
//! the API makes is followed by the kernel invalidations it needs (through
//! the FUSE notifier), and the API will not replace a watched session.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use sessionfs_core::overlay::namespace::ROOT as SESSION_ROOT;
use sessionfs_core::overlay::open::OpenError;
use sessionfs_core::overlay::registry::{Registry, RegistryError};
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::SessionPath;

use crate::fs::{SessionFs, SLOT_SHIFT};

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

pub struct RootSpec {
    pub registry: Arc<Registry>,
    pub allow_delete: bool,
    /// Filled in once the kernel has the mount: the way to tell it of
    /// changes made through the API.
    pub notifier: Arc<OnceLock<Notifier>>,
}

struct State {
    slots: BTreeMap<String, u64>,
    sessions: Vec<Arc<SessionFs>>,
    /// Open root directory handles: a snapshot of the names.
    dirs: BTreeMap<u64, Arc<[String]>>,
    next_fh: u64,
}

pub struct MultiFs {
    spec: RootSpec,
    rt: tokio::runtime::Handle,
    state: Mutex<State>,
    created: SystemTime,
}

fn err(e: OverlayError) -> Errno {
    if e.is_unexpected() {
        tracing::error!("{e}");
    }
    Errno::from_i32(crate::errno(&e))
}

impl MultiFs {
    pub fn new(spec: RootSpec, rt: tokio::runtime::Handle) -> MultiFs {
        MultiFs {
            spec,
            rt,
            state: Mutex::new(State {
                slots: BTreeMap::new(),
                sessions: Vec::new(),
                dirs: BTreeMap::new(),
                next_fh: 1,
            }),
            created: SystemTime::now(),
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 4096,
            blocks: 8,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The session a kernel inode number belongs to.
    fn route(&self, ino: INodeNo) -> Option<Arc<SessionFs>> {
        let slot = ino.0 >> SLOT_SHIFT;
        let state = self.state.lock();
        slot.checked_sub(1)
            .and_then(|i| state.sessions.get(i as usize))
            .cloned()
    }

    fn names(&self) -> Result<Vec<String>, OverlayError> {
        Ok(self
            .rt
            .block_on(self.spec.registry.names())?
            .into_iter()
            .collect())
    }

    fn exists(&self, name: &str) -> bool {
        SessionPath::parse(name).is_ok_and(|p| {
            self.rt
                .block_on(self.spec.registry.exists(&p))
                .unwrap_or(false)
        })
    }

    /// Opens (once) the session `name`; `create` allows a session that does not exist yet.
    fn session(&self, name: &str, create: bool) -> Result<Arc<SessionFs>, OverlayError> {
        let session = SessionPath::parse(name).map_err(|_| OverlayError::NotFound)?;
        let open = {
            let state = self.state.lock();
            state
                .slots
                .get(name)
                .map(|&slot| state.sessions[(slot - 1) as usize].clone())
        };
        if let Some(fs) = open {
            return Ok(fs);
        }
        let live = match self.spec.registry.open(&session, create) {
            Ok(live) => live,
            Err(RegistryError::NotFound(_)) => return Err(OverlayError::NotFound),
            Err(RegistryError::Open(OpenError::Overlay(e)) | RegistryError::Overlay(e)) => {
                return Err(e)
            }
            Err(e) => {
                tracing::error!("opening session {name}: {e}");
                return Err(OverlayError::Corrupt(e.to_string()));
            }
        };
        let mut state = self.state.lock();
        // Another thread may have got here meanwhile: keep the first.
        if let Some(&slot) = state.slots.get(name) {
            return Ok(state.sessions[(slot - 1) as usize].clone());
        }
        let slot = state.sessions.len() as u64 + 1;
        live.set_watcher(Some(crate::fs::watcher(
            self.spec.notifier.clone(),
            slot,
            SESSION_ROOT,
        )));
        let fs = Arc::new(SessionFs::new(live, SESSION_ROOT).with_slot(slot));
        state.sessions.push(fs.clone());
        state.slots.insert(name.to_owned(), slot);
        Ok(fs)
    }

    fn lookup_session(&self, name: &OsStr, create: bool) -> Result<FileAttr, OverlayError> {
        let name = name.to_str().ok_or(OverlayError::NotFound)?;
        self.session(name, create)?.root_attr()
    }

    fn delete_session(&self, name: &OsStr) -> Result<(), OverlayError> {
        if !self.spec.allow_delete {
            return Err(OverlayError::NotPermitted(
                "removing a session needs serve --allow-delete-sessions",
            ));
        }
        if self.spec.registry.read_only() {
            return Err(OverlayError::ReadOnly);
        }
        let name = name.to_str().ok_or(OverlayError::NotFound)?;
        let session = SessionPath::parse(name).map_err(|_| OverlayError::NotFound)?;
        if !self.exists(name) {
            return Err(OverlayError::NotFound);
        }
        match self
            .rt
            .block_on(self.spec.registry.delete_mounted(&session))
        {
            Ok(()) => {}
            Err(RegistryError::Store(e)) => return Err(e.into()),
            Err(RegistryError::Overlay(e)) => return Err(e),
            Err(e) => return Err(OverlayError::Corrupt(e.to_string())),
        }
        // The slot stays (inode numbers are never reused); the name goes.
        self.state.lock().slots.remove(name);
        Ok(())
    }
}

/// Routes a request on inode `$ino`: the root answers `$root_errno`, a session handles it.
macro_rules! route {
    ($self:ident, $ino:expr, $reply:ident, $root_errno:expr, |$fs:ident| $call:expr) => {
        if $ino.0 == ROOT {
            $reply.error($root_errno)
        } else {
            match $self.route($ino) {
                Some($fs) => $call,
                None => $reply.error(Errno::ENOENT),
            }
        }
    };
}

impl Filesystem for MultiFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        for fs in &self.state.lock().sessions {
            if let Err(e) = fs.sync() {
                tracing::error!("syncing an overlay at unmount: {e}");
            }
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT {
            return match self.lookup_session(name, false) {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(err(e)),
            };
        }
        route!(self, parent, reply, Errno::ENOENT, |fs| fs
            .lookup(req, parent, name, reply))
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.root_attr());
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .getattr(req, ino, fh, reply))
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
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        route!(self, ino, reply, Errno::EPERM, |fs| fs.setattr(
            req, ino, mode, uid, gid, size, atime, mtime, ctime, fh, crtime, chgtime, bkuptime,
            flags, reply
        ))
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        route!(self, ino, reply, Errno::EINVAL, |fs| fs
            .readlink(req, ino, reply))
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
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .mknod(req, parent, name, mode, umask, rdev, reply))
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
        if parent.0 == ROOT {
            if self.spec.registry.read_only() {
                return reply.error(Errno::EROFS);
            }
            if name.to_str().is_some_and(|n| self.exists(n)) {
                return reply.error(Errno::EEXIST);
            }
            let valid = name.to_str().is_some_and(|n| SessionPath::parse(n).is_ok());
            if !valid {
                return reply.error(Errno::EINVAL);
            }
            // A new session: its overlay now, its object at the first write-back.
            return match self.lookup_session(name, true) {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(err(e)),
            };
        }
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .mkdir(req, parent, name, mode, umask, reply))
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        route!(self, parent, reply, Errno::EISDIR, |fs| fs
            .unlink(req, parent, name, reply))
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 == ROOT {
            return match self.delete_session(name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(err(e)),
            };
        }
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .rmdir(req, parent, name, reply))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .symlink(req, parent, link_name, target, reply))
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 == ROOT || newparent.0 == ROOT {
            return reply.error(Errno::EPERM);
        }
        if parent.0 >> SLOT_SHIFT != newparent.0 >> SLOT_SHIFT {
            return reply.error(Errno::EXDEV);
        }
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .rename(req, parent, name, newparent, newname, flags, reply))
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if newparent.0 == ROOT {
            return reply.error(Errno::EPERM);
        }
        if ino.0 >> SLOT_SHIFT != newparent.0 >> SLOT_SHIFT {
            return reply.error(Errno::EXDEV);
        }
        route!(self, ino, reply, Errno::EPERM, |fs| fs
            .link(req, ino, newparent, newname, reply))
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .open(req, ino, flags, reply))
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .read(req, ino, fh, offset, size, flags, lock_owner, reply))
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs.write(
            req,
            ino,
            fh,
            offset,
            data,
            write_flags,
            flags,
            lock_owner,
            reply
        ))
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .flush(req, ino, fh, lock_owner, reply))
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .release(req, ino, fh, flags, lock_owner, flush, reply))
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .fsync(req, ino, fh, datasync, reply))
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return match self.names() {
                Ok(names) => {
                    let mut state = self.state.lock();
                    let fh = state.next_fh;
                    state.next_fh += 1;
                    state.dirs.insert(fh, names.into());
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(err(e)),
            };
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .opendir(req, ino, flags, reply))
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 == ROOT {
            let Some(names) = self.state.lock().dirs.get(&fh.0).cloned() else {
                return reply.ok();
            };
            // Each call resumes at `offset` directly: the kernel reads a
            // root of 100,000 sessions in hundreds of calls.
            for i in offset as usize..names.len() + 2 {
                let (name, ino) = match i {
                    0 => (".", ROOT),
                    1 => ("..", ROOT),
                    _ => {
                        let name = names[i - 2].as_str();
                        // Not opened yet: any number outside every slot will do for readdir.
                        let ino = self
                            .state
                            .lock()
                            .slots
                            .get(name)
                            .map_or(INO_UNOPENED, |s| (s << SLOT_SHIFT) | 1);
                        (name, ino)
                    }
                };
                if reply.add(INodeNo(ino), i as u64 + 1, FileType::Directory, name) {
                    break;
                }
            }
            return reply.ok();
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .readdir(req, ino, fh, offset, reply))
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        // The root never offers readdirplus (the kernel falls back to readdir).
        route!(self, ino, reply, Errno::ENOSYS, |fs| fs
            .readdirplus(req, ino, fh, offset, reply))
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if ino.0 == ROOT {
            self.state.lock().dirs.remove(&fh.0);
            return reply.ok();
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .releasedir(req, ino, fh, flags, reply))
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == ROOT {
            return reply.ok();
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .fsyncdir(req, ino, fh, datasync, reply))
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self
            .route(ino)
            .or_else(|| self.state.lock().sessions.first().cloned())
        {
            Some(fs) => fs.statfs(req, ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        route!(self, ino, reply, Errno::EPERM, |fs| fs
            .setxattr(req, ino, name, value, flags, position, reply))
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        route!(self, ino, reply, Errno::from_i32(libc::ENODATA), |fs| fs
            .getxattr(req, ino, name, size, reply))
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if ino.0 == ROOT {
            return if size == 0 {
                reply.size(0)
            } else {
                reply.data(&[])
            };
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .listxattr(req, ino, size, reply))
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        route!(self, ino, reply, Errno::from_i32(libc::ENODATA), |fs| fs
            .removexattr(req, ino, name, reply))
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if ino.0 == ROOT {
            return reply.ok();
        }
        route!(self, ino, reply, Errno::ENOENT, |fs| fs
            .access(req, ino, mask, reply))
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
        route!(self, parent, reply, Errno::EPERM, |fs| fs
            .create(req, parent, name, mode, umask, flags, reply))
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        route!(self, ino, reply, Errno::from_i32(libc::ENOTTY), |fs| fs
            .ioctl(req, ino, fh, flags, cmd, in_data, out_size, reply))
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        route!(self, ino, reply, Errno::ENOSYS, |fs| fs
            .lseek(req, ino, fh, offset, whence, reply))
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        route!(self, ino_in, reply, Errno::ENOSYS, |fs| fs.copy_file_range(
            req, ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len, flags, reply
        ))
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        route!(self, ino, reply, Errno::EISDIR, |fs| fs
            .fallocate(req, ino, fh, offset, length, mode, reply))
    }
}

/// A directory entry's inode number for a session not opened yet: readdir
/// needs one, the kernel looks the name up before using it.
const INO_UNOPENED: u64 = u64::MAX >> 1;
