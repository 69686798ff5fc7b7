//! The mounted tree: inodes and directory entries in memory, every change
//! journaled before it is answered.
//!
//! It starts as the session object's TOC (files still [`Data::Base`]) and
//! then follows what the mount does: creates, unlinks, renames (with
//! `RENAME_NOREPLACE` and `RENAME_EXCHANGE`), hard links, attribute changes,
//! xattrs. The POSIX rules for each (what may replace what, which link counts
//! and times move) are checked here, so the FUSE layer only translates.
//!
//! Inode numbers are allocated once and kept in the journal, so they are
//! stable for the life of the overlay, across remounts. An inode whose last
//! name goes while it is open lives on (nlink 0) until its last close.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::tarball::by_path::ByPath;
use crate::tarball::plain::usable_recorded_ino;
use crate::tarball::tar_header::hex_decode;
use crate::tarball::toc::{Entry, Kind};

use super::journal::{Journal, Op, Tx};
use super::node::{perm_bits, Data, Node, NodeKind, Time};
use super::OverlayError;

mod rebase;
pub use rebase::Rebased;

pub const ROOT: u64 = 1;
/// Longest name of one directory entry, as on Linux filesystems.
pub const NAME_MAX: usize = 255;

/// What a setattr changes.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
}

/// How a rename treats an existing target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// Freed inodes whose journal rows are deleted together (see `let_go`).
const UNJOURNALED_FREED: usize = 64;

pub struct Namespace {
    journal: Journal,
    nodes: HashMap<u64, Node>,
    children: HashMap<u64, BTreeMap<Box<str>, u64>>,
    next_ino: u64,
    /// References that keep an inode alive after its last name goes: open
    /// handles, or (for a mount that has the kernel open files without
    /// asking) the kernel's own lookup count of the inode.
    held: HashMap<u64, u64>,
    /// Inodes freed whose journal rows still say `nlink` 0: deleted from
    /// the journal [`UNJOURNALED_FREED`] at a time (a crash first leaves
    /// orphans, which the next open removes).
    freed_rows: Vec<u64>,
    /// Counts the snapshots taken of the tree (write-backs): a file written
    /// through a handle records a change again once one was taken since.
    snapshots: u64,
    /// Overlay files the last object written back holds exactly.
    written_back: Option<WrittenBack>,
}

/// Overlay files whose bytes the object `etag` holds, each at its path
/// there, as of change `seq`. A write-back packed them while the mount's
/// kernel held them (it may write to a file it knows without asking), so
/// they stayed in the overlay (whole, or chunk by chunk). Until one
/// changes (a change recorded after `seq`: every write after a snapshot
/// records one) or its path does:
/// - the next write-back copies the bytes of a whole, singly linked one
///   from that object instead of packing them again: files created in a
///   mount do not make every later write-back a full one;
/// - following another writer's object counts each as unchanged here.
///
/// Kept in memory only: after a restart the kernel holds nothing, and the
/// next write-back takes them back to the object.
#[derive(Debug)]
pub struct WrittenBack {
    pub etag: String,
    pub seq: i64,
    pub paths: HashMap<u64, Arc<str>>,
}

/// Inodes whose overlay data can go: the caller removes their files.
pub type Freed = Vec<u64>;

/// One entry of a directory listing: name, inode, type.
pub type Listing = Vec<(String, u64, NodeKind)>;

pub fn check_name(name: &str) -> Result<(), OverlayError> {
    if name.len() > NAME_MAX {
        return Err(OverlayError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(OverlayError::Invalid("not a valid name"));
    }
    Ok(())
}

/// `.sessionfs` at the session root is sessionfs's own (the TOC lives in
/// the object under it): no user entry may take the name, or the object
/// written back would hold two entries of one path.
fn check_not_reserved(parent: u64, name: &str) -> Result<(), OverlayError> {
    if parent == ROOT && name == crate::tarball::toc::RESERVED_DIR {
        return Err(OverlayError::NotPermitted(
            "the name .sessionfs at a session's root is reserved for sessionfs",
        ));
    }
    Ok(())
}

impl Namespace {
    /// Loads the journal at `path`, or starts it from `entries` (the TOC of
    /// the session object, or nothing for a new session) when it is new.
    pub fn open(
        path: &Path,
        base_etag: Option<&str>,
        entries: &[Entry],
    ) -> Result<(Namespace, Freed), OverlayError> {
        let journal = Journal::open(path)?;
        let mut ns = Namespace {
            journal,
            nodes: HashMap::new(),
            children: HashMap::new(),
            next_ino: ROOT + 1,
            held: HashMap::new(),
            freed_rows: Vec::new(),
            snapshots: 0,
            written_back: None,
        };
        // Sized once: a table grown by doubling holds the old and the new
        // at once while it grows (for a 45,000-file session, the new one is
        // 10 MB), and leaves the allocator a hole of the old one's size.
        ns.nodes.reserve(entries.len() + 1);
        if ns.journal.meta("initialised")?.is_none() {
            ns.init_from_toc(base_etag, entries)?;
            return Ok((ns, Vec::new()));
        }
        let by_path = ByPath::new(entries);
        let shared = |p: &str| by_path.get(entries, p).map(|i| entries[i].p.clone());
        for node in ns.journal.load_nodes(shared)? {
            if node.kind == NodeKind::Dir {
                ns.children.entry(node.ino).or_default();
            }
            ns.next_ino = ns.next_ino.max(node.ino + 1);
            ns.nodes.insert(node.ino, node);
        }
        for (parent, name, ino) in ns.journal.load_dirents()? {
            ns.children
                .entry(parent)
                .or_default()
                .insert(name.into(), ino);
        }
        if !ns.nodes.contains_key(&ROOT) {
            return Err(OverlayError::Corrupt("the journal has no root".into()));
        }
        // Inodes unlinked while open when the last mount ended.
        let orphans: Vec<u64> = ns
            .nodes
            .values()
            .filter(|n| n.nlink == 0 && n.ino != ROOT)
            .map(|n| n.ino)
            .collect();
        let tx = ns.journal.begin()?;
        for ino in &orphans {
            tx.delete_node(*ino)?;
        }
        tx.commit()?;
        for ino in &orphans {
            ns.nodes.remove(ino);
        }
        Ok((ns, orphans))
    }

    fn init_from_toc(
        &mut self,
        base_etag: Option<&str>,
        entries: &[Entry],
    ) -> Result<(), OverlayError> {
        let now = Time::now();
        let root = Node {
            ino: ROOT,
            kind: NodeKind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            data: Data::None,
            parent: ROOT,
        };
        self.nodes.insert(ROOT, root);
        self.children.insert(ROOT, BTreeMap::new());
        let mut by_path: HashMap<&str, u64> = HashMap::new();
        let mut xattrs: Vec<(u64, String, Vec<u8>)> = Vec::new();
        let recorded = recorded_inodes(entries);
        self.next_ino = recorded.values().max().map_or(ROOT + 1, |max| max + 1);
        // Parents before children, whatever the tar order was; hard links last.
        let mut order: Vec<&Entry> = entries.iter().collect();
        order.sort_by_cached_key(|e| (e.t == Kind::HardLink, e.p.matches('/').count()));
        for e in order {
            let (parent_path, name) = match e.p.rsplit_once('/') {
                Some((p, n)) => (Some(p), n),
                None => (None, &*e.p),
            };
            let parent = match parent_path {
                None => ROOT,
                Some(p) => match by_path.get(p) {
                    Some(&ino) if self.is_dir(ino) => ino,
                    _ => continue, // the reader supplies parents; an oddity is skipped
                },
            };
            if self.child(parent, name).is_some() {
                continue;
            }
            if e.t == Kind::HardLink {
                let Some(&target) = e.lt().and_then(|t| by_path.get(t)) else {
                    continue;
                };
                if self.is_dir(target) {
                    continue;
                }
                self.children
                    .entry(parent)
                    .or_default()
                    .insert(name.into(), target);
                if let Some(n) = self.nodes.get_mut(&target) {
                    n.nlink += 1;
                }
                by_path.insert(&e.p, target);
                continue;
            }
            let Some(kind) = NodeKind::of_entry(e.t) else {
                continue;
            };
            let ino = match recorded.get(&*e.p) {
                Some(&ino) => ino,
                None => self.alloc(),
            };
            let node = Node::from_entry(ino, kind, parent, e, Some(e.p.clone()));
            for (k, hex) in e.x() {
                if let Some(v) = hex_decode(hex) {
                    xattrs.push((ino, k.clone(), v));
                }
            }
            if kind == NodeKind::Dir {
                self.children.insert(ino, BTreeMap::new());
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.nlink += 1;
                }
            }
            self.children
                .entry(parent)
                .or_default()
                .insert(name.into(), ino);
            self.nodes.insert(ino, node);
            by_path.insert(&e.p, ino);
        }
        // In key order, so that SQLite appends to its B-trees rather than
        // splitting pages all over them.
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        let mut parents: Vec<u64> = self.children.keys().copied().collect();
        parents.sort_unstable();
        let nodes = inos
            .iter()
            .filter_map(|ino| self.nodes.get(ino))
            .map(|n| Op::PutNode(n.clone()));
        let dirents = parents
            .iter()
            .filter_map(|parent| Some((*parent, self.children.get(parent)?)))
            .flat_map(|(parent, names)| {
                names
                    .iter()
                    .map(move |(name, &ino)| Op::PutDirent(parent, name.to_string(), ino))
            });
        let xattrs = xattrs
            .into_iter()
            .map(|(ino, k, v)| Op::SetXattr(ino, k, v));
        let meta = [
            Op::SetMeta("initialised".into(), "1".into()),
            Op::SetMeta("base_etag".into(), base_etag.unwrap_or("").into()),
        ];
        self.journal
            .bulk(nodes.chain(dirents).chain(xattrs).chain(meta))
    }

    fn alloc(&mut self) -> u64 {
        // Recorded inode numbers (see `recorded_inodes`) all sit below
        // `next_ino`, so a new inode never meets one.
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.nodes
            .get(&ino)
            .is_some_and(|n| n.kind == NodeKind::Dir)
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children
            .get(&parent)
            .and_then(|c| c.get(name))
            .copied()
    }

    pub fn get(&self, ino: u64) -> Result<&Node, OverlayError> {
        self.nodes.get(&ino).ok_or(OverlayError::NotFound)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Node, OverlayError> {
        self.nodes.get_mut(&ino).ok_or(OverlayError::NotFound)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<Box<str>, u64>, OverlayError> {
        match self.nodes.get(&ino) {
            None => Err(OverlayError::NotFound),
            Some(n) if n.kind != NodeKind::Dir => Err(OverlayError::NotDir),
            Some(_) => self.children.get(&ino).ok_or(OverlayError::NotFound),
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<&Node, OverlayError> {
        if name.len() > NAME_MAX {
            return Err(OverlayError::NameTooLong);
        }
        let ino = match name {
            "." => parent,
            ".." => self.get(parent)?.parent,
            _ => *self.dir(parent)?.get(name).ok_or(OverlayError::NotFound)?,
        };
        self.get(ino)
    }

    /// The path of a directory inode, for the change feed and logs.
    pub fn dir_path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        for _ in 0..4096 {
            if ino == ROOT {
                break;
            }
            let Some(n) = self.nodes.get(&ino) else { break };
            if let Some((name, _)) = self
                .children
                .get(&n.parent)
                .and_then(|c| c.iter().find(|(_, &i)| i == ino))
            {
                parts.push(name.clone());
            }
            ino = n.parent;
        }
        parts.reverse();
        parts.join("/")
    }

    fn path_in(&self, parent: u64, name: &str) -> String {
        let dir = self.dir_path(parent);
        if dir.is_empty() {
            name.to_owned()
        } else {
            format!("{dir}/{name}")
        }
    }

    /// Every name of the tree below `ino`, depth first in byte order of the
    /// names (a directory before its contents), as the writer packs them:
    /// `(path, inode)`.
    pub fn walk(&self, ino: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        self.walk_into(ino, "", &mut out);
        out
    }

    fn walk_into(&self, dir: u64, prefix: &str, out: &mut Vec<(String, u64)>) {
        let Some(names) = self.children.get(&dir) else {
            return;
        };
        for (name, &child) in names {
            let path = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            out.push((path.clone(), child));
            if self.children.contains_key(&child) {
                self.walk_into(child, &path, out);
            }
        }
    }

    /// The entries of a directory, `.` and `..` first.
    pub fn list(&self, ino: u64) -> Result<Listing, OverlayError> {
        let names = self.dir(ino)?;
        let parent = self.get(ino)?.parent;
        let mut out = Vec::with_capacity(names.len() + 2);
        out.push((".".to_owned(), ino, NodeKind::Dir));
        out.push(("..".to_owned(), parent, NodeKind::Dir));
        for (name, &child) in names {
            if let Some(n) = self.nodes.get(&child) {
                out.push((name.to_string(), child, n.kind));
            }
        }
        Ok(out)
    }

    /// mknod, mkdir, symlink and create.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        kind: NodeKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<String>,
    ) -> Result<Node, OverlayError> {
        check_name(name)?;
        check_not_reserved(parent, name)?;
        if self.dir(parent)?.contains_key(name) {
            return Err(OverlayError::Exists);
        }
        let now = Time::now();
        let ino = self.alloc();
        let node = Node {
            ino,
            kind,
            perm: perm_bits(perm),
            uid,
            gid,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            rdev,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            data: target.map_or(Data::None, |t| Data::Target(t.into())),
            parent,
        };
        let detail = self.path_in(parent, name);
        let tx = self.journal.begin()?;
        tx.put_node(&node)?;
        tx.put_dirent(parent, name, ino)?;
        let p = touched_dir(&self.nodes, parent, kind == NodeKind::Dir, 1, now)?;
        tx.put_node(&p)?;
        tx.change("create", ino, &detail)?;
        tx.commit()?;
        self.nodes.insert(parent, p);
        if kind == NodeKind::Dir {
            self.children.insert(ino, BTreeMap::new());
        }
        self.children
            .entry(parent)
            .or_default()
            .insert(name.into(), ino);
        self.nodes.insert(ino, node.clone());
        Ok(node)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &str) -> Result<Node, OverlayError> {
        check_name(name)?;
        check_not_reserved(parent, name)?;
        let node = self.get(ino)?;
        if node.kind == NodeKind::Dir {
            return Err(OverlayError::NotPermitted("hard links to directories"));
        }
        if self.dir(parent)?.contains_key(name) {
            return Err(OverlayError::Exists);
        }
        let now = Time::now();
        let mut node = node.clone();
        node.nlink += 1;
        node.ctime = now;
        let detail = self.path_in(parent, name);
        let tx = self.journal.begin()?;
        tx.put_node(&node)?;
        tx.put_dirent(parent, name, ino)?;
        let p = touched_dir(&self.nodes, parent, false, 0, now)?;
        tx.put_node(&p)?;
        tx.change("link", ino, &detail)?;
        tx.commit()?;
        self.nodes.insert(parent, p);
        self.children
            .entry(parent)
            .or_default()
            .insert(name.into(), ino);
        self.nodes.insert(ino, node.clone());
        Ok(node)
    }

    /// Runs `op`, which frees space, so that it works on a full disk: if
    /// its journal write finds no room, the overlays' reserve is given up
    /// and `op` runs again (its transaction rolled back, nothing applied).
    fn freeing<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, OverlayError>,
    ) -> Result<T, OverlayError> {
        // Space the previous delete freed goes to the reserve first.
        super::reserve::take_back();
        match op(self) {
            Err(e) if e.no_space() && super::reserve::release() => op(self),
            r => r,
        }
    }

    /// unlink (`dir == false`) and rmdir (`dir == true`).
    pub fn remove(&mut self, parent: u64, name: &str, dir: bool) -> Result<Freed, OverlayError> {
        self.freeing(|ns| ns.remove_once(parent, name, dir))
    }

    fn remove_once(&mut self, parent: u64, name: &str, dir: bool) -> Result<Freed, OverlayError> {
        if name == "." {
            return Err(OverlayError::Invalid("rmdir of ."));
        }
        if name == ".." {
            return Err(OverlayError::NotEmpty);
        }
        let ino = *self.dir(parent)?.get(name).ok_or(OverlayError::NotFound)?;
        let node = self.get(ino)?;
        match (dir, node.kind == NodeKind::Dir) {
            (true, false) => return Err(OverlayError::NotDir),
            (false, true) => return Err(OverlayError::IsDir),
            (true, true) if !self.children.get(&ino).is_none_or(|c| c.is_empty()) => {
                return Err(OverlayError::NotEmpty)
            }
            _ => {}
        }
        let now = Time::now();
        let detail = self.path_in(parent, name);
        let tx = self.journal.begin()?;
        tx.delete_dirent(parent, name)?;
        let p = touched_dir(&self.nodes, parent, dir, -1, now)?;
        tx.put_node(&p)?;
        let freed = self.drop_link(&tx, ino, now)?;
        tx.change(if dir { "rmdir" } else { "unlink" }, ino, &detail)?;
        tx.commit()?;
        self.nodes.insert(parent, p);
        if let Some(c) = self.children.get_mut(&parent) {
            c.remove(name);
        }
        Ok(self.apply_drop(ino, freed, now))
    }

    /// Journals one name of `ino` going away; returns the new link count.
    fn drop_link(&self, tx: &Tx<'_>, ino: u64, now: Time) -> Result<u32, OverlayError> {
        let mut n = self.get(ino)?.clone();
        n.nlink = if n.kind == NodeKind::Dir {
            0
        } else {
            n.nlink.saturating_sub(1)
        };
        n.ctime = now;
        if n.nlink == 0 && !self.held.contains_key(&ino) {
            tx.delete_node(ino)?;
        } else {
            tx.put_node(&n)?;
        }
        Ok(n.nlink)
    }

    fn apply_drop(&mut self, ino: u64, nlink: u32, now: Time) -> Freed {
        if nlink == 0 && !self.held.contains_key(&ino) {
            self.nodes.remove(&ino);
            self.children.remove(&ino);
            return vec![ino];
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.nlink = nlink;
            n.ctime = now;
        }
        if nlink == 0 {
            self.children.remove(&ino);
        }
        Vec::new()
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        mode: RenameMode,
    ) -> Result<Freed, OverlayError> {
        check_name(new_name)?;
        check_not_reserved(new_parent, new_name)?;
        let src = *self.dir(parent)?.get(name).ok_or(OverlayError::NotFound)?;
        let dst = self.dir(new_parent)?.get(new_name).copied();
        let src_is_dir = self.is_dir(src);
        if src_is_dir && (new_parent == src || self.is_ancestor(src, new_parent)) {
            return Err(OverlayError::Invalid("a directory cannot move into itself"));
        }
        if let Some(dst) = dst {
            let dst_is_dir = self.is_dir(dst);
            if mode == RenameMode::Exchange {
                if dst_is_dir && (parent == dst || self.is_ancestor(dst, parent)) {
                    return Err(OverlayError::Invalid("a directory cannot move into itself"));
                }
            } else if mode == RenameMode::NoReplace {
                return Err(OverlayError::Exists);
            } else if dst == src {
                return Ok(Vec::new());
            } else if src_is_dir && !dst_is_dir {
                return Err(OverlayError::NotDir);
            } else if !src_is_dir && dst_is_dir {
                return Err(OverlayError::IsDir);
            } else if dst_is_dir && !self.children.get(&dst).is_none_or(|c| c.is_empty()) {
                return Err(OverlayError::NotEmpty);
            }
        } else if mode == RenameMode::Exchange {
            return Err(OverlayError::NotFound);
        }
        let now = Time::now();
        let detail = format!(
            "{} -> {}",
            self.path_in(parent, name),
            self.path_in(new_parent, new_name)
        );
        let tx = self.journal.begin()?;
        let mut freed = Vec::new();
        let mut updates: Vec<Node> = Vec::new();
        let mut dir_delta: HashMap<u64, i32> = HashMap::new();
        match (mode, dst) {
            (RenameMode::Exchange, Some(dst)) => {
                tx.put_dirent(parent, name, dst)?;
                tx.put_dirent(new_parent, new_name, src)?;
                for (ino, to) in [(src, new_parent), (dst, parent)] {
                    let mut n = self.get(ino)?.clone();
                    n.ctime = now;
                    if n.kind == NodeKind::Dir && n.parent != to {
                        *dir_delta.entry(n.parent).or_default() -= 1;
                        *dir_delta.entry(to).or_default() += 1;
                        n.parent = to;
                    }
                    updates.push(n);
                }
            }
            _ => {
                let mut dropped = None;
                if let Some(dst) = dst {
                    let nlink = self.drop_link(&tx, dst, now)?;
                    if self.is_dir(dst) {
                        *dir_delta.entry(new_parent).or_default() -= 1;
                    }
                    dropped = Some((dst, nlink));
                }
                tx.delete_dirent(parent, name)?;
                tx.put_dirent(new_parent, new_name, src)?;
                let mut n = self.get(src)?.clone();
                n.ctime = now;
                if src_is_dir {
                    *dir_delta.entry(parent).or_default() -= 1;
                    *dir_delta.entry(new_parent).or_default() += 1;
                    n.parent = new_parent;
                }
                updates.push(n);
                if let Some((dst, nlink)) = dropped {
                    freed.push((dst, nlink));
                }
            }
        }
        for dir in [parent, new_parent] {
            if updates.iter().any(|n| n.ino == dir) {
                continue;
            }
            let delta = dir_delta.get(&dir).copied().unwrap_or(0);
            let mut p = self.get(dir)?.clone();
            p.nlink = p.nlink.saturating_add_signed(delta);
            dir_delta.insert(dir, 0);
            p.mtime = now;
            p.ctime = now;
            updates.push(p);
        }
        for n in &updates {
            tx.put_node(n)?;
        }
        tx.change("rename", src, &detail)?;
        tx.commit()?;
        // The journal has it: now the same in memory.
        match (mode, dst) {
            (RenameMode::Exchange, Some(dst)) => {
                self.children
                    .entry(parent)
                    .or_default()
                    .insert(name.into(), dst);
                self.children
                    .entry(new_parent)
                    .or_default()
                    .insert(new_name.into(), src);
            }
            _ => {
                if let Some(c) = self.children.get_mut(&parent) {
                    c.remove(name);
                }
                self.children
                    .entry(new_parent)
                    .or_default()
                    .insert(new_name.into(), src);
            }
        }
        for n in updates {
            self.nodes.insert(n.ino, n);
        }
        let mut out = Vec::new();
        for (ino, nlink) in freed {
            out.extend(self.apply_drop(ino, nlink, now));
        }
        Ok(out)
    }

    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        for _ in 0..4096 {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT {
                return false;
            }
            match self.nodes.get(&ino) {
                Some(n) => ino = n.parent,
                None => return false,
            }
        }
        false
    }

    pub fn setattr(&mut self, ino: u64, set: &SetAttr) -> Result<Node, OverlayError> {
        let now = Time::now();
        let mut n = self.get(ino)?.clone();
        if let Some(perm) = set.perm {
            n.perm = perm_bits(perm);
        }
        if let Some(uid) = set.uid {
            n.uid = uid;
        }
        if let Some(gid) = set.gid {
            n.gid = gid;
        }
        if let Some(size) = set.size {
            if n.kind == NodeKind::Dir {
                return Err(OverlayError::IsDir);
            }
            if n.kind != NodeKind::File {
                return Err(OverlayError::Invalid("truncate of a special file"));
            }
            n.size = size;
            n.mtime = now;
        }
        if let Some(t) = set.atime {
            n.atime = t;
        }
        if let Some(t) = set.mtime {
            n.mtime = t;
        }
        n.ctime = now;
        self.save(n, "setattr")
    }

    /// Journals a changed node (after a copy-up, a write, a truncate).
    pub fn save(&mut self, n: Node, op: &str) -> Result<Node, OverlayError> {
        let tx = self.journal.begin()?;
        tx.put_node(&n)?;
        tx.change(op, n.ino, "")?;
        tx.commit()?;
        self.nodes.insert(n.ino, n.clone());
        Ok(n)
    }

    /// Records what writes did to a file, without a journal transaction:
    /// the overlay file holds the bytes and its size; the journal catches up
    /// at the next [`Namespace::flush`].
    pub fn note_write(&mut self, ino: u64, end: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.size = n.size.max(end);
            let now = Time::now();
            n.mtime = now;
            n.ctime = now;
        }
    }

    /// Journals the current state of a file written through a handle.
    pub fn flush(&mut self, ino: u64) -> Result<(), OverlayError> {
        if let Some(n) = self.nodes.get(&ino).cloned() {
            self.save(n, "write")?;
        }
        Ok(())
    }

    pub fn set_data(
        &mut self,
        ino: u64,
        data: Data,
        size: Option<u64>,
    ) -> Result<Node, OverlayError> {
        let mut n = self.get_mut(ino)?.clone();
        n.data = data;
        if let Some(s) = size {
            n.size = s;
        }
        self.save(n, "write")
    }

    /// An empty file got its overlay file: recorded in memory only (see
    /// [`Namespace::unjournaled_local`]).
    pub fn mark_local(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.data = Data::Local;
        }
    }

    /// Regular files the journal has without data: after a crash, those
    /// with an overlay file are local (created and written, not yet flushed).
    pub fn unjournaled_local(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.kind == NodeKind::File && n.data == Data::None)
            .map(|n| n.ino)
            .collect()
    }

    /// One more reference to `ino` (an open handle, or a kernel lookup).
    pub fn hold(&mut self, ino: u64) {
        *self.held.entry(ino).or_default() += 1;
    }

    /// References that went (`(ino, how many)`): an inode left with none
    /// and no name is freed at once (its bytes can go), its journal row
    /// later, with others (`rm -rf` has the kernel forget one inode per
    /// file). Returns the freed inodes.
    pub fn let_go(&mut self, refs: &[(u64, u64)]) -> Result<Freed, OverlayError> {
        let mut gone = Vec::new();
        for &(ino, n) in refs {
            let Some(c) = self.held.get_mut(&ino) else {
                continue;
            };
            *c = c.saturating_sub(n);
            if *c > 0 {
                continue;
            }
            self.held.remove(&ino);
            if self.nodes.get(&ino).is_some_and(|n| n.nlink == 0) {
                gone.push(ino);
            }
        }
        for ino in &gone {
            self.nodes.remove(ino);
            self.children.remove(ino);
        }
        self.freed_rows.extend_from_slice(&gone);
        if self.freed_rows.len() >= UNJOURNALED_FREED {
            self.journal_freed()?;
        }
        Ok(gone)
    }

    /// Deletes the journal rows of the inodes freed since the last time.
    fn journal_freed(&mut self) -> Result<(), OverlayError> {
        if self.freed_rows.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.freed_rows);
        self.freeing(|ns| {
            let tx = ns.journal.begin()?;
            for ino in &rows {
                tx.delete_node(*ino)?;
            }
            tx.commit()
        })
    }

    pub fn is_held(&self, ino: u64) -> bool {
        self.held.contains_key(&ino)
    }

    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Vec<u8>, OverlayError> {
        self.get(ino)?;
        self.journal.xattr(ino, name)?.ok_or(OverlayError::NoAttr)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<String>, OverlayError> {
        self.get(ino)?;
        self.journal.xattr_names(ino)
    }

    pub fn setxattr(
        &mut self,
        ino: u64,
        name: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<(), OverlayError> {
        self.get(ino)?;
        let exists = self.journal.xattr(ino, name)?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(OverlayError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(OverlayError::NoAttr);
        }
        let mut n = self.get(ino)?.clone();
        n.ctime = Time::now();
        let tx = self.journal.begin()?;
        tx.set_xattr(ino, name, value)?;
        tx.put_node(&n)?;
        tx.change("xattr", ino, name)?;
        tx.commit()?;
        self.nodes.insert(ino, n);
        Ok(())
    }

    pub fn removexattr(&mut self, ino: u64, name: &str) -> Result<(), OverlayError> {
        let mut n = self.get(ino)?.clone();
        if self.journal.xattr(ino, name)?.is_none() {
            return Err(OverlayError::NoAttr);
        }
        n.ctime = Time::now();
        let tx = self.journal.begin()?;
        tx.remove_xattr(ino, name)?;
        tx.put_node(&n)?;
        tx.change("xattr", ino, name)?;
        tx.commit()?;
        self.nodes.insert(ino, n);
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), OverlayError> {
        self.journal_freed()?;
        self.journal.sync()
    }

    /// A write-back completed: the object with ETag `etag` holds every
    /// change up to `seq`. Points the given files at their bytes in it and
    /// forgets the changes, in one transaction. Not a change itself.
    pub fn adopt_object(
        &mut self,
        data: &[(u64, Data)],
        etag: &str,
        seq: i64,
    ) -> Result<(), OverlayError> {
        let mut updated = Vec::with_capacity(data.len());
        for (ino, d) in data {
            if let Some(n) = self.nodes.get(ino) {
                let mut n = n.clone();
                n.data = d.clone();
                updated.push(n);
            }
        }
        let tx = self.journal.begin()?;
        for n in &updated {
            tx.put_node(n)?;
        }
        tx.set_meta("base_etag", etag)?;
        tx.confirm(seq)?;
        tx.set_attempt(None)?;
        tx.commit()?;
        for n in updated {
            self.nodes.insert(n.ino, n);
        }
        Ok(())
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Inodes whose bytes live in the overlay (to reconcile after a crash).
    pub fn local_files(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.data.in_overlay())
            .map(|n| n.ino)
            .collect()
    }

    /// Takes the size and modification time of an overlay file written
    /// after the journal last recorded its inode (a process killed with the
    /// file open), and records them as a change. Every record of a write
    /// sets the ctime after the write's own mtime, and copy-ups keep the
    /// node's mtime, so an overlay file modified later than both recorded
    /// times was written since; an mtime set into the past (`touch -d`,
    /// `tar x`) is not one.
    pub fn adopt_local(&mut self, ino: u64, size: u64, mtime: Time) -> Result<(), OverlayError> {
        let Some(n) = self.nodes.get(&ino) else {
            return Ok(());
        };
        let recorded = (n.ctime.s, n.ctime.ns).max((n.mtime.s, n.mtime.ns));
        let written = (mtime.s, mtime.ns) > recorded;
        if !written && n.size == size {
            return Ok(());
        }
        let mut n = n.clone();
        n.size = size;
        if written {
            n.mtime = mtime;
            n.ctime = mtime;
        }
        self.save(n, "write")?;
        Ok(())
    }

    /// Which overlay files the object `etag` holds as they are, if that
    /// object is the one the last write-back stored.
    pub fn written_back(&self, etag: &str) -> Option<&WrittenBack> {
        self.written_back.as_ref().filter(|w| w.etag == etag)
    }

    pub fn set_written_back(&mut self, written_back: Option<WrittenBack>) {
        self.written_back = written_back;
    }

    /// A snapshot of the tree is being taken (see [`Namespace::snapshots`]).
    pub fn snapshot_taken(&mut self) {
        self.snapshots += 1;
    }

    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }
}

/// The parent directory after a child came or went: times, and the link
/// count when the child is a directory (its `..`).
fn touched_dir(
    nodes: &HashMap<u64, Node>,
    parent: u64,
    child_is_dir: bool,
    delta: i32,
    now: Time,
) -> Result<Node, OverlayError> {
    let mut p = nodes.get(&parent).ok_or(OverlayError::NotFound)?.clone();
    if child_is_dir {
        p.nlink = p.nlink.saturating_add_signed(delta);
    }
    p.mtime = now;
    p.ctime = now;
    Ok(p)
}

/// The inode numbers entries recorded where they were packed, by path:
/// kept as this namespace's own, so that a mount shows what `lstat` showed
/// there (git's index then matches without reading a file). A number that
/// two entries recorded (trees packed from several filesystems), the root's
/// 1, or one too large for a mount's slot bits is not kept: that entry gets
/// a new number, as every entry of an object without them does.
fn recorded_inodes(entries: &[Entry]) -> HashMap<&str, u64> {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for e in entries {
        if let Some(sd) = e.sd.get().filter(|_| e.t != Kind::HardLink) {
            *seen.entry(sd.i).or_default() += 1;
        }
    }
    entries
        .iter()
        .filter(|e| e.t != Kind::HardLink)
        .filter_map(|e| {
            let i = e.sd.get()?.i;
            let usable = usable_recorded_ino(i) && seen.get(&i) == Some(&1);
            usable.then_some((&*e.p, i))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarball::toc::Rare;
    use std::sync::Arc;

    fn entry(p: &str, t: Kind, lt: Option<&str>) -> Entry {
        Entry {
            p: p.into(),
            t,
            s: if t == Kind::File { 5 } else { 0 },
            m: if t == Kind::Dir { 0o755 } else { 0o644 },
            u: 0,
            g: 0,
            mt: 1_700_000_000,
            mn: 7,
            ho: 0,
            data_offset: 0,
            rare: Rare {
                lt: lt.map(str::to_owned),
                ..Rare::default()
            }
            .boxed(),
            sd: crate::tarball::toc::Sd::NONE,
        }
    }

    fn open_ns(dir: &Path) -> Namespace {
        reopen_ns(dir).0
    }

    fn reopen_ns(dir: &Path) -> (Namespace, Vec<u64>) {
        // Children listed before their parent, a hard link, a symlink.
        let entries = vec![
            entry("a/b/file", Kind::File, None),
            entry("a", Kind::Dir, None),
            entry("a/b", Kind::Dir, None),
            entry("a/link", Kind::HardLink, Some("a/b/file")),
            entry("sym", Kind::Symlink, Some("a/b/file")),
        ];
        Namespace::open(&dir.join("j.db"), Some("etag"), &entries).unwrap()
    }

    #[test]
    fn the_toc_becomes_a_tree_with_links_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ns = open_ns(dir.path());
        let a = ns.lookup(ROOT, "a").unwrap().clone();
        assert_eq!(a.nlink, 3, "a holds b");
        let b = ns.lookup(a.ino, "b").unwrap().ino;
        let file = ns.lookup(b, "file").unwrap();
        assert_eq!(file.nlink, 2);
        assert_eq!(file.data, Data::Base("a/b/file".into()));
        assert_eq!(
            file.mtime,
            Time {
                s: 1_700_000_000,
                ns: 7
            }
        );
        assert_eq!(ns.lookup(a.ino, "link").unwrap().ino, file.ino);
        assert_eq!(ns.lookup(b, "..").unwrap().ino, a.ino);
        assert_eq!(ns.get(ROOT).unwrap().nlink, 3);
    }

    #[test]
    fn unchanged_files_share_their_path_with_the_toc_also_when_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            entry("a", Kind::Dir, None),
            entry("a/file", Kind::File, None),
            entry("sym", Kind::Symlink, Some("a/file")),
        ];
        let path = dir.path().join("j.db");
        let shares = |ns: &Namespace| {
            let a = ns.lookup(ROOT, "a").unwrap().ino;
            match &ns.lookup(a, "file").unwrap().data {
                Data::Base(p) => Arc::ptr_eq(p, &entries[1].p),
                other => panic!("{other:?}"),
            }
        };
        let (ns, _) = Namespace::open(&path, Some("etag"), &entries).unwrap();
        assert!(shares(&ns), "made from the TOC");
        drop(ns);
        // Loaded from the journal: the TOC's copy again, not the journal's.
        let (ns, _) = Namespace::open(&path, Some("etag"), &entries).unwrap();
        assert!(shares(&ns), "loaded from the journal");
        let sym = ns.lookup(ROOT, "sym").unwrap();
        assert_eq!(
            (sym.target(), &sym.data),
            (Some("a/file"), &Data::Target("a/file".into()))
        );
        // Without the TOC (an object gone), the journal's own copy.
        drop(ns);
        let (ns, _) = Namespace::open(&path, Some("etag"), &[]).unwrap();
        let a = ns.lookup(ROOT, "a").unwrap().ino;
        assert_eq!(
            ns.lookup(a, "file").unwrap().data,
            Data::Base("a/file".into())
        );
    }

    #[test]
    fn exchange_of_directories_moves_their_link_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut ns = open_ns(dir.path());
        let a = ns.lookup(ROOT, "a").unwrap().ino;
        let x = ns
            .create(ROOT, "x", NodeKind::File, 0o644, 0, 0, 0, None)
            .unwrap()
            .ino;
        // A directory swapped with a file in another directory.
        ns.rename(a, "b", ROOT, "x", RenameMode::Exchange).unwrap();
        assert_eq!(ns.lookup(ROOT, "x").unwrap().kind, NodeKind::Dir);
        assert_eq!(ns.lookup(a, "b").unwrap().ino, x);
        assert_eq!(ns.get(a).unwrap().nlink, 2);
        assert_eq!(ns.get(ROOT).unwrap().nlink, 4);
        let moved = ns.lookup(ROOT, "x").unwrap().ino;
        assert_eq!(ns.lookup(moved, "..").unwrap().ino, ROOT);
        // Into its own subtree: refused.
        assert!(matches!(
            ns.rename(ROOT, "a", a, "inside", RenameMode::Replace),
            Err(OverlayError::Invalid(_))
        ));
    }

    #[test]
    fn the_change_feed_lists_changes_until_confirmed_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut ns = open_ns(dir.path());
        assert!(ns.journal().changes_since(0).unwrap().is_empty());
        let a = ns.lookup(ROOT, "a").unwrap().ino;
        ns.create(a, "new", NodeKind::File, 0o600, 1, 1, 0, None)
            .unwrap();
        ns.rename(a, "new", ROOT, "renamed", RenameMode::NoReplace)
            .unwrap();
        ns.remove(ROOT, "sym", false).unwrap();
        let feed = ns.journal().changes_since(0).unwrap();
        let ops: Vec<&str> = feed.iter().map(|c| c.op.as_str()).collect();
        assert_eq!(ops, ["create", "rename", "unlink"]);
        assert_eq!(feed[0].detail, "a/new");
        assert_eq!(feed[1].detail, "a/new -> renamed");
        drop(ns);
        let (ns, _) = Namespace::open(&dir.path().join("j.db"), Some("etag"), &[]).unwrap();
        assert_eq!(ns.journal().changes_since(0).unwrap().len(), 3);
        assert!(ns.lookup(ROOT, "renamed").is_ok());
        assert!(matches!(
            ns.lookup(ROOT, "sym"),
            Err(OverlayError::NotFound)
        ));
        let tx = ns.journal().begin().unwrap();
        tx.confirm(feed[1].seq).unwrap();
        tx.commit().unwrap();
        let left = ns.journal().changes_since(0).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].op, "unlink");
    }

    #[test]
    fn an_inode_unlinked_while_held_lives_until_its_last_reference_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ns = open_ns(dir.path());
        let n = ns
            .create(ROOT, "f", NodeKind::File, 0o644, 0, 0, 0, None)
            .unwrap();
        let kept = ns
            .create(ROOT, "g", NodeKind::File, 0o644, 0, 0, 0, None)
            .unwrap();
        ns.hold(n.ino);
        ns.hold(n.ino);
        ns.hold(kept.ino);
        assert!(ns.remove(ROOT, "f", false).unwrap().is_empty());
        assert_eq!(ns.get(n.ino).unwrap().nlink, 0);
        assert!(ns.let_go(&[(n.ino, 1)]).unwrap().is_empty());
        assert!(ns.get(n.ino).is_ok(), "one reference is left");
        // A named inode is not freed with its last reference.
        assert_eq!(
            ns.let_go(&[(n.ino, 1), (kept.ino, 1)]).unwrap(),
            vec![n.ino]
        );
        assert!(ns.get(n.ino).is_err());
        assert!(ns.get(kept.ino).is_ok());
        assert!(!ns.is_held(kept.ino));
        // Its journal row goes with the next batch, or at the latest at a
        // sync; until then a reopen finds it an orphan and frees it.
        drop(ns);
        let (mut ns, orphans) = reopen_ns(dir.path());
        assert_eq!(orphans, vec![n.ino]);
        assert!(ns.get(n.ino).is_err());
        let m = ns
            .create(ROOT, "h", NodeKind::File, 0o644, 0, 0, 0, None)
            .unwrap();
        ns.hold(m.ino);
        ns.remove(ROOT, "h", false).unwrap();
        assert_eq!(ns.let_go(&[(m.ino, 1)]).unwrap(), vec![m.ino]);
        ns.sync().unwrap();
        drop(ns);
        let (_, orphans) = reopen_ns(dir.path());
        assert!(orphans.is_empty());
    }
}
