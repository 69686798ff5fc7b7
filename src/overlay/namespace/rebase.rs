//! Moving the tree onto another version of the session object (another
//! writer's), keeping every local change: a three-way merge by path of the
//! base the overlay was made against (B), the stored object (R) and the
//! local tree (L).
//!
//! For each path R changed (B and R differ):
//! - unchanged here (including a file this host wrote back into B and kept
//!   in the overlay, not changed since, before a remount too) → R's version
//!   is taken (created, updated or removed);
//! - changed here too → the local version stays, and R's is kept beside it
//!   as `NAME.conflict-<tag>` (a file or symlink; directories merge by
//!   their children);
//! - deleted here, changed there → R's version comes back (a deletion never
//!   wins over a change); changed here, deleted there → the local one stays;
//! - a file whose mode, owner or xattrs alone changed here (its bytes still
//!   the base's) takes R's bytes with those on top, or goes if R deleted
//!   it: B's bytes, which it would need to stay, may be gone from the store.
//!
//! What R brings is not a local change: it is applied without change-feed
//! rows, so following another writer never triggers a write-back of its
//! own (two writers would otherwise chase each other). Conflict copies are
//! local additions and are recorded as changes.
//!
//! Files whose bytes are still the base object's at a path R changes must
//! be copied up first ([`Namespace::rebase_copy_ups`]): B's bytes are not
//! in R.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Namespace, ROOT};
use crate::overlay::journal::Op;
use crate::overlay::node::{perm_bits, Data, Node, NodeKind, Time};
use crate::overlay::OverlayError;
use crate::tarball::tar_header::{hex_decode, hex_encode};
use crate::tarball::toc::{Entry, Kind};

/// What a rebase did.
#[derive(Debug, Default)]
pub struct Rebased {
    /// Paths that took the stored object's version.
    pub taken: Vec<String>,
    /// Paths changed on both sides, with the name the other side's version
    /// was kept under (none when it had nothing to keep).
    pub conflicts: Vec<(String, Option<String>)>,
    /// Inodes whose attributes or bytes changed.
    pub inodes: Vec<u64>,
    /// Names added or removed: (directory, name).
    pub entries: Vec<(u64, String)>,
    /// Inodes gone whose overlay files can go.
    pub freed: Vec<u64>,
}

/// Whether two entries describe the same thing (offsets aside; a
/// directory's mtime moves with its children and does not count).
fn same_entry(a: &Entry, b: &Entry) -> bool {
    a.t == b.t
        && a.s == b.s
        && a.m == b.m
        && a.u == b.u
        && a.g == b.g
        && (a.t == Kind::Dir || (a.mt == b.mt && a.mn == b.mn))
        && a.lt() == b.lt()
        && a.dv() == b.dv()
        && a.x() == b.x()
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

struct Sides<'a> {
    base: HashMap<&'a str, &'a Entry>,
    remote: HashMap<&'a str, &'a Entry>,
    local: HashMap<String, u64>,
    /// Overlay files the base object holds exactly, at these paths: what
    /// the last write-back here packed while the kernel held the file.
    written: HashMap<u64, Arc<str>>,
}

impl<'a> Sides<'a> {
    fn remote_changed(&self, p: &str) -> bool {
        match (self.base.get(p), self.remote.get(p)) {
            (None, None) => false,
            (Some(b), Some(r)) => !same_entry(b, r),
            _ => true,
        }
    }
}

impl Namespace {
    fn sides<'a>(&self, base: &'a [Entry], remote: &'a [Entry]) -> Result<Sides<'a>, OverlayError> {
        let base_etag = self.journal.meta("base_etag")?.unwrap_or_default();
        // A write-back forgets the changes it covers: those left came after.
        let pending = self.journal.changed_since(0)?;
        let written = match self.written_back(&base_etag) {
            Some(w) => w
                .paths
                .iter()
                .filter(|(ino, _)| !pending.contains(ino))
                .map(|(ino, p)| (*ino, p.clone()))
                .collect(),
            None => HashMap::new(),
        };
        Ok(Sides {
            base: base.iter().map(|e| (&*e.p, e)).collect(),
            remote: remote.iter().map(|e| (&*e.p, e)).collect(),
            local: self.walk(ROOT).into_iter().collect(),
            written,
        })
    }

    /// Whether the local node at `p` is still what the base had there.
    fn local_unchanged(&self, s: &Sides<'_>, p: &str) -> bool {
        let (b, l) = (s.base.get(p), s.local.get(p));
        let (b, ino) = match (b, l) {
            (None, None) => return true,
            (Some(b), Some(ino)) => (*b, *ino),
            _ => return false,
        };
        let Ok(n) = self.get(ino) else { return false };
        if b.t == Kind::HardLink {
            return b.lt().and_then(|t| s.local.get(t)) == Some(&ino);
        }
        if NodeKind::of_entry(b.t) != Some(n.kind)
            || n.perm != perm_bits(b.m)
            || u64::from(n.uid) != b.u
            || u64::from(n.gid) != b.g
        {
            return false;
        }
        match n.kind {
            NodeKind::Dir => true,
            NodeKind::Symlink => n.target() == b.lt() && (n.mtime.s, n.mtime.ns) == (b.mt, b.mn),
            NodeKind::File => {
                (n.mtime.s, n.mtime.ns) == (b.mt, b.mn)
                    && n.size == b.s
                    && match &n.data {
                        Data::Base(q) => **q == *p,
                        Data::None | Data::Target(_) => b.s == 0,
                        // Written back from here, unchanged since: the base
                        // is this file. The base's stat data say so across
                        // remounts (the inode packed, and its ctime, which
                        // every change moves); the last write-back's list
                        // says so in objects without stat data.
                        Data::Local | Data::Partial(_) => {
                            b.sd.get().is_some_and(|sd| {
                                sd.i == ino && (sd.cs, sd.cn) == (n.ctime.s, n.ctime.ns)
                            }) || s.written.get(&ino).is_some_and(|q| **q == *p)
                        }
                    }
            }
            _ => (n.mtime.s, n.mtime.ns) == (b.mt, b.mn),
        }
    }

    /// Whether the file at `p` still reads the base's bytes there, changed
    /// here (if at all) in its mode, owner or xattrs only: its content is
    /// the base's, so theirs wins it, and what changed here stays on top.
    fn content_from_base(&self, s: &Sides<'_>, p: &str) -> bool {
        let (Some(b), Some(ino)) = (s.base.get(p), s.local.get(p)) else {
            return false;
        };
        self.get(*ino).is_ok_and(|n| {
            b.t == Kind::File
                && n.kind == NodeKind::File
                && n.size == b.s
                && matches!(&n.data, Data::Base(q) if **q == *p)
        })
    }

    /// Files whose bytes (or, copied up chunk by chunk, some of them) are
    /// the base object's at a path the stored object changed, and that keep
    /// those bytes through the rebase: they must be copied up in full (from
    /// the base object, or its cached blocks) first.
    pub fn rebase_copy_ups(
        &self,
        base: &[Entry],
        remote: &[Entry],
    ) -> Result<Vec<u64>, OverlayError> {
        let s = self.sides(base, remote)?;
        let mut out = Vec::new();
        for n in self.nodes.values() {
            // A file copied up chunk by chunk reads the chunks it does not
            // hold from the stored object afterwards, as an unchanged file
            // does, unless the stored object changed that file too.
            let (Data::Base(q) | Data::Partial(q)) = &n.data else {
                continue;
            };
            if !s.remote_changed(q) {
                continue;
            }
            let takes_remote = s.local.get(&**q) == Some(&n.ino)
                && (self.local_unchanged(&s, q) || self.content_from_base(&s, q));
            if !takes_remote {
                out.push(n.ino);
            }
        }
        Ok(out)
    }

    /// Rebases the tree onto the stored object `remote` (ETag `etag`),
    /// from `base`; `tag` names conflict copies. Fails with
    /// [`OverlayError::Invalid`] when a file still needs a copy-up (the
    /// caller copies it and tries again).
    pub fn rebase(
        &mut self,
        base: &[Entry],
        remote: &[Entry],
        etag: &str,
        tag: &str,
    ) -> Result<Rebased, OverlayError> {
        if !self.rebase_copy_ups(base, remote)?.is_empty() {
            return Err(OverlayError::Invalid(
                "files still need a copy-up before the rebase",
            ));
        }
        let s = self.sides(base, remote)?;
        let mut paths: Vec<&str> = s
            .base
            .keys()
            .chain(s.remote.keys())
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|p| s.remote_changed(p))
            .collect();
        // Parents before children for what comes; children before parents
        // for what goes (removals skip directories still holding entries).
        paths.sort_by_key(|p| (p.matches('/').count(), *p));
        let mut out = Rebased::default();
        // The tree changes in memory first, the journal in one transaction
        // at the end; if that fails, memory goes back to what it was.
        let backup = (self.nodes.clone(), self.children.clone(), self.next_ino);
        let mut ops = Vec::new();
        let mut removals = Vec::new();
        for p in paths {
            let unchanged_here = self.local_unchanged(&s, p);
            // Its mode, owner or xattrs changed here, not its bytes: those
            // are the replaced object's, which may be gone. Deleted there,
            // it goes; changed there, theirs comes with ours on top.
            let only_attributes_here = !unchanged_here && self.content_from_base(&s, p);
            let here = self.lookup_path(p);
            match (s.remote.get(p), here) {
                (None, Some(_)) if unchanged_here || only_attributes_here => removals.push(p),
                // Changed here, deleted there: ours stays, and goes to the
                // store (pending already, unless changed before a remount).
                (None, Some(ino)) => {
                    ops.push(Op::Change("kept".into(), ino, p.to_owned()));
                    out.conflicts.push((p.to_owned(), None));
                }
                (None, None) => {}
                (Some(r), None) => {
                    // New there, or deleted here and changed there: theirs.
                    if !unchanged_here {
                        out.conflicts.push((p.to_owned(), None));
                    }
                    if self.put_remote(&mut ops, p, r, p, &mut out)? {
                        out.taken.push(p.to_owned());
                    }
                }
                (Some(r), Some(ino)) if unchanged_here => {
                    self.update_remote(&mut ops, p, ino, r, &mut out)?;
                    out.taken.push(p.to_owned());
                }
                (Some(r), Some(ino)) if only_attributes_here => {
                    let b = s.base[p];
                    let ours = self.get(ino)?.clone();
                    let mut our_xattrs = std::collections::BTreeMap::new();
                    for name in self.journal.xattr_names(ino)? {
                        if let Some(v) = self.journal.xattr(ino, &name)? {
                            our_xattrs.insert(name, v);
                        }
                    }
                    let xattrs_changed = our_xattrs.len() != b.x().len()
                        || our_xattrs
                            .iter()
                            .any(|(k, v)| b.x().get(k) != Some(&hex_encode(v)));
                    self.update_remote(&mut ops, p, ino, r, &mut out)?;
                    if r.t == Kind::File {
                        let mut m = self.get(ino)?.clone();
                        if ours.perm != perm_bits(b.m) {
                            m.perm = ours.perm;
                        }
                        if u64::from(ours.uid) != b.u {
                            m.uid = ours.uid;
                        }
                        if u64::from(ours.gid) != b.g {
                            m.gid = ours.gid;
                        }
                        ops.push(Op::PutNode(m.clone()));
                        self.nodes.insert(ino, m);
                        if xattrs_changed {
                            for name in r.x().keys() {
                                ops.push(Op::RemoveXattr(ino, name.clone()));
                            }
                            for (k, v) in our_xattrs {
                                ops.push(Op::SetXattr(ino, k, v));
                            }
                        }
                        // Ours on top of theirs: a change here, for the store.
                        ops.push(Op::Change("merged".into(), ino, p.to_owned()));
                    }
                    out.taken.push(p.to_owned());
                }
                (Some(r), Some(ino)) => {
                    let local_dir = self.get(ino).is_ok_and(|n| n.kind == NodeKind::Dir);
                    if r.t == Kind::Dir && local_dir {
                        continue;
                    }
                    let mut copy = None;
                    if r.t != Kind::Dir && r.t != Kind::HardLink {
                        let (dir, name) = split(p);
                        let name = format!("{name}.conflict-{tag}");
                        let at = if dir.is_empty() {
                            name
                        } else {
                            format!("{dir}/{name}")
                        };
                        // The copy reads the stored object's bytes at `p`.
                        if self.put_remote(&mut ops, &at, r, p, &mut out)? {
                            if let Some(ino) = self.lookup_path(&at) {
                                ops.push(Op::Change("conflict".into(), ino, at.clone()));
                            }
                            copy = Some(at);
                        }
                    }
                    // Ours stays, and goes to the store beside theirs.
                    ops.push(Op::Change("kept".into(), ino, p.to_owned()));
                    out.conflicts.push((p.to_owned(), copy));
                }
            }
        }
        removals.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        for p in removals {
            if self.remove_remote(&mut ops, p, &mut out)? {
                out.taken.push(p.to_owned());
            }
        }
        let journaled = (|| {
            let tx = self.journal.begin()?;
            for op in ops {
                tx.push(op);
            }
            tx.set_meta("base_etag", etag)?;
            tx.commit()
        })();
        if let Err(e) = journaled {
            (self.nodes, self.children, self.next_ino) = backup;
            return Err(e);
        }
        Ok(out)
    }

    /// The inode at a session-relative path, if any.
    fn lookup_path(&self, p: &str) -> Option<u64> {
        let mut at = ROOT;
        for part in p.split('/') {
            at = self.child(at, part)?;
        }
        Some(at)
    }

    /// Creates `p` as the stored object's entry `r` describes it (under its
    /// parent, which must be a directory here), its bytes read from the
    /// object at `bytes_at`. Returns whether it was created.
    fn put_remote(
        &mut self,
        ops: &mut Vec<Op>,
        p: &str,
        r: &Entry,
        bytes_at: &str,
        out: &mut Rebased,
    ) -> Result<bool, OverlayError> {
        let (dir, name) = split(p);
        let parent = if dir.is_empty() {
            Some(ROOT)
        } else {
            self.lookup_path(dir)
        };
        let Some(parent) = parent.filter(|d| self.is_dir(*d)) else {
            tracing::warn!("rebase: {p:?} has no directory here to go in; left out");
            return Ok(false);
        };
        if self.child(parent, name).is_some() {
            return Ok(false);
        }
        if r.t == Kind::HardLink {
            let Some(target) = r.lt().and_then(|t| self.lookup_path(t)) else {
                return Ok(false);
            };
            if self.is_dir(target) {
                return Ok(false);
            }
            let mut n = self.get(target)?.clone();
            n.nlink += 1;
            ops.push(Op::PutNode(n.clone()));
            self.nodes.insert(target, n);
            ops.push(Op::PutDirent(parent, name.to_owned(), target));
            self.children
                .entry(parent)
                .or_default()
                .insert(name.into(), target);
            out.entries.push((parent, name.to_owned()));
            out.inodes.push(target);
            return Ok(true);
        }
        let Some(kind) = NodeKind::of_entry(r.t) else {
            return Ok(false);
        };
        let ino = self.alloc();
        let bytes_at = if bytes_at == &*r.p {
            r.p.clone()
        } else {
            bytes_at.into()
        };
        let node = Node::from_entry(ino, kind, parent, r, Some(bytes_at));
        if kind == NodeKind::Dir {
            self.children.insert(ino, Default::default());
            let mut pn = self.get(parent)?.clone();
            pn.nlink += 1;
            ops.push(Op::PutNode(pn.clone()));
            self.nodes.insert(parent, pn);
        }
        ops.push(Op::PutNode(node.clone()));
        ops.push(Op::PutDirent(parent, name.to_owned(), ino));
        for (k, hex) in r.x() {
            if let Some(v) = hex_decode(hex) {
                ops.push(Op::SetXattr(ino, k.clone(), v));
            }
        }
        self.nodes.insert(ino, node);
        self.children
            .entry(parent)
            .or_default()
            .insert(name.into(), ino);
        out.entries.push((parent, name.to_owned()));
        out.inodes.push(parent);
        Ok(true)
    }

    /// Gives the node at `p` the stored object's version.
    fn update_remote(
        &mut self,
        ops: &mut Vec<Op>,
        p: &str,
        ino: u64,
        r: &Entry,
        out: &mut Rebased,
    ) -> Result<(), OverlayError> {
        let n = self.get(ino)?.clone();
        let same_kind = NodeKind::of_entry(r.t) == Some(n.kind) && r.t != Kind::HardLink;
        if !same_kind {
            // Another kind of thing: the old one goes, the new one comes.
            if self.remove_remote(ops, p, out)? {
                self.put_remote(ops, p, r, p, out)?;
            }
            return Ok(());
        }
        let bytes_at = if p == &*r.p { r.p.clone() } else { p.into() };
        let mut m = Node::from_entry(ino, n.kind, n.parent, r, Some(bytes_at));
        m.nlink = n.nlink;
        m.atime = n.atime;
        m.ctime = Time::now();
        if n.kind == NodeKind::Dir {
            m.mtime = n.mtime;
        }
        if n.data.in_overlay() {
            // Its bytes were the base's (see `local_unchanged`): they are
            // read from the object now, and the overlay file can go.
            out.freed.push(ino);
        }
        ops.push(Op::PutNode(m.clone()));
        for name in self.journal.xattr_names(ino)? {
            ops.push(Op::RemoveXattr(ino, name));
        }
        for (k, hex) in r.x() {
            if let Some(v) = hex_decode(hex) {
                ops.push(Op::SetXattr(ino, k.clone(), v));
            }
        }
        self.nodes.insert(ino, m);
        out.inodes.push(ino);
        Ok(())
    }

    /// Removes the name `p` (a directory only when empty). Returns whether
    /// it went.
    fn remove_remote(
        &mut self,
        ops: &mut Vec<Op>,
        p: &str,
        out: &mut Rebased,
    ) -> Result<bool, OverlayError> {
        let (dir, name) = split(p);
        let parent = if dir.is_empty() {
            Some(ROOT)
        } else {
            self.lookup_path(dir)
        };
        let Some(parent) = parent else {
            return Ok(false);
        };
        let Some(ino) = self.child(parent, name) else {
            return Ok(false);
        };
        let mut n = self.get(ino)?.clone();
        let is_dir = n.kind == NodeKind::Dir;
        if is_dir && self.children.get(&ino).is_some_and(|c| !c.is_empty()) {
            return Ok(false);
        }
        ops.push(Op::DeleteDirent(parent, name.to_owned()));
        if let Some(c) = self.children.get_mut(&parent) {
            c.remove(name);
        }
        if is_dir {
            let mut pn = self.get(parent)?.clone();
            pn.nlink = pn.nlink.saturating_sub(1);
            ops.push(Op::PutNode(pn.clone()));
            self.nodes.insert(parent, pn);
            self.children.remove(&ino);
            n.nlink = 0;
        } else {
            n.nlink = n.nlink.saturating_sub(1);
        }
        if n.nlink == 0 && !self.is_held(ino) {
            ops.push(Op::DeleteNode(ino));
            self.nodes.remove(&ino);
            out.freed.push(ino);
        } else {
            ops.push(Op::PutNode(n.clone()));
            self.nodes.insert(ino, n);
        }
        out.entries.push((parent, name.to_owned()));
        out.inodes.push(parent);
        out.inodes.push(ino);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::namespace::SetAttr;

    fn file(p: &str, mt: i64) -> Entry {
        Entry {
            p: p.into(),
            t: Kind::File,
            s: 5,
            m: 0o644,
            u: 0,
            g: 0,
            mt,
            mn: 0,
            ho: 0,
            data_offset: 0,
            rare: None,
            sd: crate::tarball::toc::Sd::NONE,
        }
    }

    fn dir(p: &str) -> Entry {
        Entry {
            t: Kind::Dir,
            s: 0,
            m: 0o755,
            ..file(p, 1)
        }
    }

    fn base() -> Vec<Entry> {
        vec![
            dir("w"),
            file("w/a", 1),
            file("w/b", 1),
            file("w/c", 1),
            file("w/d", 1),
        ]
    }

    /// The base, with the files at `changed` in a newer version (mtime 2).
    fn newer(changed: &[&str]) -> Vec<Entry> {
        base()
            .into_iter()
            .map(|e| match changed.contains(&&*e.p) {
                true => file(&e.p, 2),
                false => e,
            })
            .collect()
    }

    fn open(dir: &std::path::Path) -> Namespace {
        Namespace::open(&dir.join("j.db"), Some("base"), &base())
            .unwrap()
            .0
    }

    fn ino(ns: &Namespace, p: &str) -> u64 {
        ns.lookup_path(p)
            .unwrap_or_else(|| panic!("{p} is missing"))
    }

    #[test]
    fn what_changed_only_there_is_taken_without_a_local_change() {
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let a = ino(&ns, "w/a");
        // There: a changed, b deleted, e new (in a new directory).
        let remote = vec![
            dir("w"),
            file("w/a", 2),
            file("w/c", 1),
            file("w/d", 1),
            dir("w/new"),
            file("w/new/e", 3),
        ];
        let r = ns.rebase(&base(), &remote, "remote", "tag").unwrap();
        assert!(r.conflicts.is_empty());
        assert_eq!(ino(&ns, "w/a"), a, "a keeps its inode");
        assert_eq!({ ns.get(a).unwrap().mtime.s }, 2);
        assert_eq!(ns.get(a).unwrap().data, Data::Base("w/a".into()));
        assert!(ns.lookup_path("w/b").is_none());
        assert_eq!(
            ns.get(ino(&ns, "w/new/e")).unwrap().data,
            Data::Base("w/new/e".into())
        );
        assert!(
            !ns.journal().has_changes().unwrap(),
            "following is not a change here"
        );
        assert_eq!(
            ns.journal().meta("base_etag").unwrap().as_deref(),
            Some("remote")
        );
        // The journal holds the same tree: a reopen sees it.
        drop(ns);
        let ns = Namespace::open(&d.path().join("j.db"), Some("remote"), &[])
            .unwrap()
            .0;
        assert!(ns.lookup_path("w/new/e").is_some() && ns.lookup_path("w/b").is_none());
    }

    #[test]
    fn both_sides_changed_keeps_ours_and_theirs_beside_it() {
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let a = ino(&ns, "w/a");
        // Their bytes changed here (a mode alone would go on top of theirs).
        let set = SetAttr {
            size: Some(3),
            ..SetAttr::default()
        };
        ns.setattr(a, &set).unwrap();
        // Deleted here, changed there.
        let w = ino(&ns, "w");
        ns.remove(w, "c", false).unwrap();
        // Changed here, deleted there.
        let dd = ino(&ns, "w/d");
        ns.setattr(dd, &set).unwrap();
        let remote = vec![dir("w"), file("w/a", 2), file("w/b", 1), file("w/c", 2)];
        // Ours keep the base's bytes, which the new object lacks.
        let mut copy_ups = ns.rebase_copy_ups(&base(), &remote).unwrap();
        copy_ups.sort();
        assert_eq!(copy_ups, vec![a, dd]);
        for i in copy_ups {
            ns.set_data(i, Data::Local, None).unwrap();
        }
        let r = ns.rebase(&base(), &remote, "remote", "tag").unwrap();
        assert_eq!(ns.get(a).unwrap().size, 3, "ours stays");
        let copy = ino(&ns, "w/a.conflict-tag");
        assert_eq!(ns.get(copy).unwrap().data, Data::Base("w/a".into()));
        assert_eq!(r.conflicts.len(), 3, "{:?}", r.conflicts);
        assert_eq!(
            { ns.get(ino(&ns, "w/c")).unwrap().mtime.s },
            2,
            "a deletion does not win over a change"
        );
        assert_eq!(
            ns.get(dd).unwrap().size,
            3,
            "a change does not lose to a deletion"
        );
    }

    /// A mount keeps the files it wrote back in the overlay while the
    /// kernel knows them. Its base object holds them as they are, so a later
    /// object from another writer changing one takes that writer's version:
    /// not a conflict (two hosts once made a conflict copy of each other's
    /// version every time they followed, without end).
    #[test]
    fn files_written_back_from_here_take_the_next_version_without_conflict() {
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let (a, b) = (ino(&ns, "w/a"), ino(&ns, "w/b"));
        for i in [a, b] {
            ns.set_data(i, Data::Local, None).unwrap();
        }
        let seq = ns.journal().last_seq().unwrap();
        ns.adopt_object(&[], "base", seq).unwrap();
        ns.set_written_back(Some(crate::overlay::namespace::WrittenBack {
            etag: "base".into(),
            seq,
            paths: [(a, "w/a".into()), (b, "w/b".into())].into(),
        }));
        // b is written again after the write-back (same attributes).
        let same = SetAttr {
            perm: Some(0o644),
            ..SetAttr::default()
        };
        ns.setattr(b, &same).unwrap();
        let remote = newer(&["w/a", "w/b"]);
        assert!(ns.rebase_copy_ups(&base(), &remote).unwrap().is_empty());
        let r = ns.rebase(&base(), &remote, "remote", "tag").unwrap();
        assert_eq!(ns.get(a).unwrap().data, Data::Base("w/a".into()));
        assert_eq!({ ns.get(a).unwrap().mtime.s }, 2);
        assert_eq!(r.freed, vec![a], "a's overlay file can go");
        assert_eq!(r.conflicts.len(), 1, "{:?}", r.conflicts);
        assert_eq!(r.conflicts[0].0, "w/b", "b changed here since");
        assert_eq!(ns.get(b).unwrap().data, Data::Local);
    }

    /// A chmod or an xattr here, a new version there: their bytes, with
    /// ours on top, and no copy-up (the replaced object's bytes may be
    /// gone). A file only chmodded here and deleted there goes.
    #[test]
    fn attributes_changed_here_go_on_top_of_their_bytes() {
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let (a, b) = (ino(&ns, "w/a"), ino(&ns, "w/b"));
        let exec = SetAttr {
            perm: Some(0o755),
            ..SetAttr::default()
        };
        ns.setattr(a, &exec).unwrap();
        ns.setxattr(a, "user.k", b"ours", 0).unwrap();
        ns.setattr(b, &exec).unwrap();
        let remote = vec![dir("w"), file("w/a", 2), file("w/c", 1), file("w/d", 1)];
        assert!(ns.rebase_copy_ups(&base(), &remote).unwrap().is_empty());
        let r = ns.rebase(&base(), &remote, "remote", "tag").unwrap();
        assert!(r.conflicts.is_empty(), "{:?}", r.conflicts);
        let n = ns.get(a).unwrap();
        assert_eq!(n.data, Data::Base("w/a".into()));
        assert_eq!(({ n.mtime.s }, n.perm), (2, 0o755));
        assert_eq!(ns.getxattr(a, "user.k").unwrap(), b"ours");
        assert!(ns.journal().changed_since(0).unwrap().contains(&a));
        assert!(ns.lookup_path("w/b").is_none());
    }

    /// After a remount the last write-back's list is gone; the base's stat
    /// data still name the inode packed and its ctime then.
    #[test]
    fn the_bases_stat_data_vouch_for_overlay_files_across_remounts() {
        use crate::tarball::toc::StatData;
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let (a, b) = (ino(&ns, "w/a"), ino(&ns, "w/b"));
        let mut packed = base();
        for (i, inode) in [(1, a), (2, b)] {
            ns.set_data(inode, Data::Local, None).unwrap();
            let ctime = ns.get(inode).unwrap().ctime;
            // b changed after it was packed: its ctime moved on.
            let cn = if inode == b { ctime.ns ^ 1 } else { ctime.ns };
            packed[i].sd = StatData {
                i: inode,
                cs: ctime.s,
                cn,
            }
            .into();
        }
        // Nothing pending: as after the write-back, before the remount.
        let seq = ns.journal().last_seq().unwrap();
        ns.adopt_object(&[], "base", seq).unwrap();
        let remote = newer(&["w/a", "w/b"]);
        let r = ns.rebase(&packed, &remote, "remote", "tag").unwrap();
        assert_eq!(ns.get(a).unwrap().data, Data::Base("w/a".into()));
        assert_eq!(r.freed, vec![a]);
        let conflicts: Vec<&str> = r.conflicts.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(conflicts, ["w/b"]);
        // Ours stays, so it goes to the store: a change here again.
        let pending = ns.journal().changed_since(0).unwrap();
        assert!(pending.contains(&b) && !pending.contains(&a), "{pending:?}");
    }

    #[test]
    fn files_reading_bytes_the_new_object_lacks_are_copied_up_first() {
        let d = tempfile::tempdir().unwrap();
        let mut ns = open(d.path());
        let a = ino(&ns, "w/a");
        let w = ino(&ns, "w");
        ns.rename(w, "a", w, "moved", super::super::RenameMode::Replace)
            .unwrap();
        let remote = newer(&["w/a"]);
        assert_eq!(ns.rebase_copy_ups(&base(), &remote).unwrap(), vec![a]);
        assert!(ns.rebase(&base(), &remote, "remote", "tag").is_err());
        ns.set_data(a, Data::Local, None).unwrap();
        assert!(ns.rebase_copy_ups(&base(), &remote).unwrap().is_empty());
        ns.rebase(&base(), &remote, "remote", "tag").unwrap();
        // Both survive: ours moved, theirs at the old name.
        assert_eq!(ino(&ns, "w/moved"), a);
        assert_eq!(
            ns.get(ino(&ns, "w/a")).unwrap().data,
            Data::Base("w/a".into())
        );
    }
}
