//! One inode of a mounted session: what it is, its attributes, and where its
//! bytes live (still in the session object, or in the local overlay).
//!
//! The namespace keeps these in memory and the journal keeps them on disk;
//! the FUSE layer turns them into what the kernel wants (`fuse/src/attr.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The type of an inode, as stored in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl NodeKind {
    pub fn code(self) -> i64 {
        match self {
            NodeKind::File => 0,
            NodeKind::Dir => 1,
            NodeKind::Symlink => 2,
            NodeKind::Fifo => 3,
            NodeKind::Socket => 4,
            NodeKind::CharDevice => 5,
            NodeKind::BlockDevice => 6,
        }
    }

    pub fn from_code(code: i64) -> Option<NodeKind> {
        Some(match code {
            0 => NodeKind::File,
            1 => NodeKind::Dir,
            2 => NodeKind::Symlink,
            3 => NodeKind::Fifo,
            4 => NodeKind::Socket,
            5 => NodeKind::CharDevice,
            6 => NodeKind::BlockDevice,
            _ => return None,
        })
    }

    /// The kind of an entry of a session object (a hard link has none: it
    /// names another entry's inode).
    pub fn of_entry(k: crate::tarball::toc::Kind) -> Option<NodeKind> {
        use crate::tarball::toc::Kind;
        Some(match k {
            Kind::File => NodeKind::File,
            Kind::Dir => NodeKind::Dir,
            Kind::Symlink => NodeKind::Symlink,
            Kind::Fifo => NodeKind::Fifo,
            Kind::CharDevice => NodeKind::CharDevice,
            Kind::BlockDevice => NodeKind::BlockDevice,
            Kind::HardLink => return None,
        })
    }

    /// From the `S_IFMT` bits of a mode given to mknod.
    pub fn from_mode(mode: u32) -> Option<NodeKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NodeKind::File,
            libc::S_IFDIR => NodeKind::Dir,
            libc::S_IFLNK => NodeKind::Symlink,
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDevice,
            libc::S_IFBLK => NodeKind::BlockDevice,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the epoch (may be before it).
///
/// Packed to 12 bytes: a node holds three, and nodes are the bulk of an
/// open session's memory (padded to 16 bytes, the three cost 3 MB more in
/// the node table of a 200,000-file session).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct Time {
    pub s: i64,
    pub ns: u32,
}

impl Time {
    pub fn now() -> Time {
        Time::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Time {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                s: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                ns: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, d.subsec_nanos());
                if ns == 0 {
                    Time { s: -s, ns: 0 }
                } else {
                    Time {
                        s: -s - 1,
                        ns: 1_000_000_000 - ns,
                    }
                }
            }
        }
    }

    pub fn system(self) -> SystemTime {
        if self.s >= 0 {
            UNIX_EPOCH + Duration::new(self.s as u64, self.ns)
        } else {
            UNIX_EPOCH - Duration::new(self.s.unsigned_abs(), 0) + Duration::new(0, self.ns)
        }
    }
}

/// Where a regular file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// Not a regular file, or a file with no bytes yet written.
    None,
    /// Unchanged since the session object: this entry of it (the path
    /// shared with the object's TOC where it can be).
    Base(Arc<str>),
    /// In the overlay, in the file named after the inode.
    Local,
    /// In the overlay file where its chunk map says so, elsewhere still the
    /// object's file at this path (see [`super::partial`]).
    Partial(Arc<str>),
    /// A symlink's target: its content, kept here rather than in a field
    /// of every node (16 bytes each of the namespace's table).
    Target(Box<str>),
}

impl Data {
    /// Whether the file has an overlay file (whole or partial).
    pub fn in_overlay(&self) -> bool {
        matches!(self, Data::Local | Data::Partial(_))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub ino: u64,
    pub kind: NodeKind,
    /// Permission bits, `0o7777`.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub data: Data,
    /// The parent of a directory (directories have exactly one).
    pub parent: u64,
}

impl Node {
    /// A symlink's target.
    pub fn target(&self) -> Option<&str> {
        match &self.data {
            Data::Target(t) => Some(t),
            _ => None,
        }
    }

    /// A node as an entry of a session object describes it, under `parent`;
    /// a file's bytes are the object's at `bytes_at` (none when empty).
    pub fn from_entry(
        ino: u64,
        kind: NodeKind,
        parent: u64,
        e: &crate::tarball::toc::Entry,
        bytes_at: Option<Arc<str>>,
    ) -> Node {
        let mtime = Time { s: e.mt, ns: e.mn };
        let ctime = e.sd.get().map_or(mtime, |sd| Time {
            s: sd.cs,
            ns: sd.cn,
        });
        Node {
            ino,
            kind,
            perm: perm_bits(e.m),
            uid: u32::try_from(e.u).unwrap_or(0),
            gid: u32::try_from(e.g).unwrap_or(0),
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            rdev: e.dv().map_or(0, |(ma, mi)| libc::makedev(ma, mi) as u32),
            size: if kind == NodeKind::File { e.s } else { 0 },
            atime: mtime,
            mtime,
            ctime,
            data: match (bytes_at, e.lt()) {
                (Some(p), _) if kind == NodeKind::File && e.s > 0 => Data::Base(p),
                (_, Some(t)) if kind == NodeKind::Symlink => Data::Target(t.into()),
                _ => Data::None,
            },
            parent,
        }
    }
}

/// The permission bits (`0o7777`) of a mode.
pub fn perm_bits(mode: u32) -> u16 {
    (mode & 0o7777) as u16
}

/// Reported block size; also the unit of `st_blocks` rounding.
pub const BLOCK_SIZE: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_before_and_after_the_epoch() {
        for t in [
            Time { s: 0, ns: 0 },
            Time {
                s: 1_700_000_000,
                ns: 123_456_789,
            },
            Time { s: -1, ns: 500 },
            Time { s: -86_400, ns: 0 },
        ] {
            assert_eq!(Time::from_system(t.system()), t);
        }
    }

    #[test]
    fn a_node_stays_small() {
        // The namespace holds one per inode, 200,000 in a large session:
        // each 8 bytes are 2 MB of its table.
        assert!(
            std::mem::size_of::<Node>() <= 104,
            "{}",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn kinds_round_trip_through_codes_and_modes() {
        for k in [
            NodeKind::File,
            NodeKind::Dir,
            NodeKind::Symlink,
            NodeKind::Fifo,
            NodeKind::Socket,
            NodeKind::CharDevice,
            NodeKind::BlockDevice,
        ] {
            assert_eq!(NodeKind::from_code(k.code()), Some(k));
        }
        assert_eq!(
            NodeKind::from_mode(libc::S_IFIFO | 0o644),
            Some(NodeKind::Fifo)
        );
        assert_eq!(NodeKind::from_mode(0o644), Some(NodeKind::File));
    }
}
