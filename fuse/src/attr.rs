//! Inodes as the kernel sees them: the overlay's [`Node`] turned into
//! `fuser`'s `FileAttr` and `FileType`, in one place so every reply agrees.

use fuser::{FileAttr, FileType, INodeNo};
use sessionfs_core::overlay::node::{Node, NodeKind, BLOCK_SIZE};

/// The kernel's name for an inode type.
pub fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

/// What the kernel is told about `node` (its inode number as stored).
pub fn attr(node: &Node) -> FileAttr {
    let size = match node.kind {
        NodeKind::Symlink => node.target().map_or(0, |t| t.len() as u64),
        NodeKind::Dir => u64::from(BLOCK_SIZE),
        _ => node.size,
    };
    FileAttr {
        ino: INodeNo(node.ino),
        size,
        // st_blocks counts 512-byte units of what the file occupies.
        blocks: size.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE / 512),
        atime: node.atime.system(),
        mtime: node.mtime.system(),
        ctime: node.ctime.system(),
        crtime: node.ctime.system(),
        kind: file_type(node.kind),
        perm: node.perm,
        nlink: node.nlink,
        uid: node.uid,
        gid: node.gid,
        rdev: node.rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// How a mount shows owners and modes (`--uid`, `--gid`, `--file-mode`,
/// `--dir-mode`, `--umask`): for a container whose user is not the one the
/// session was packed by. Only the view changes: the stored owners and modes
/// stay as they are and are written back unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Permission bits every non-directory shows.
    pub file_mode: Option<u32>,
    /// Permission bits every directory shows.
    pub dir_mode: Option<u32>,
    /// Bits cleared from every shown mode.
    pub umask: u32,
}

impl View {
    /// Whether owners are shown as someone else: new inodes then take the
    /// stored owner of their directory, and chown cannot give them another.
    pub fn maps_owners(&self) -> bool {
        self.uid.is_some() || self.gid.is_some()
    }

    pub fn apply(&self, a: &mut FileAttr) {
        if let Some(uid) = self.uid {
            a.uid = uid;
        }
        if let Some(gid) = self.gid {
            a.gid = gid;
        }
        let mode = if a.kind == FileType::Directory {
            self.dir_mode
        } else if a.kind == FileType::Symlink {
            None
        } else {
            self.file_mode
        };
        if let Some(mode) = mode {
            a.perm = (mode & 0o7777) as u16;
        }
        a.perm &= !(self.umask & 0o7777) as u16;
    }
}
