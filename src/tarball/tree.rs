//! Walking a directory into the entries of a session, in the order the
//! writer emits them: depth first, names in byte order, a directory before
//! its contents, so the same tree always gives the same object.
//!
//! Hard links become a regular file at their first path and links to it at
//! the later ones (tar needs the target first). Only `user.*` xattrs are kept:
//! others (`security.*`, `trusted.*`) are host policy, and restoring them
//! elsewhere fails or needs privileges. Sockets cannot be archived and are
//! skipped with a warning, as `tar` does. A top-level `.sessionfs` is
//! sessionfs's own (an extracted index) and is never packed again.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::tar_header::hex_encode;
use super::toc::{Entry, Kind, Rare, StatData, RESERVED_DIR};
use super::TarballError;

/// An entry and, for regular files, where its bytes come from.
#[derive(Debug)]
pub struct TreeEntry {
    pub entry: Entry,
    pub source: Option<Source>,
}

/// Where a regular file's bytes come from when it is packed.
pub enum Source {
    /// A file on local disk, opened when its turn comes.
    File(PathBuf),
    /// Any reader (a file of another session object, say); it must give
    /// exactly the entry's size.
    Stream(Box<dyn std::io::Read + Send>),
    /// A reader opened from the entry when its turn comes, by an opener
    /// many entries share: a tree of 200,000 unchanged files then holds no
    /// reader (and no second copy of each path) per entry.
    Open(Opener),
    /// A file some stretches of which the object being replaced holds as
    /// whole segments (see [`Reusing`]).
    Reusing(Reusing),
}

/// A file whose unchanged stretches are whole segments of the object a
/// write-back replaces (a large file changed in place). A write-back's pack
/// lays those segments in as they are, for the upload to copy server-side;
/// any other pack reads every byte through `reader`.
pub struct Reusing {
    pub reader: Box<dyn SkipRead>,
    /// Where in the file each segment's bytes begin, and the segment (the
    /// old object's), ascending and not overlapping.
    pub segments: Vec<(u64, super::toc::Segment)>,
}

/// A reader that can move on without reading.
pub trait SkipRead: std::io::Read + Send {
    fn skip(&mut self, n: u64) -> std::io::Result<()>;
}

/// Opens the bytes of an entry (see [`Source::Open`]).
pub type Opener =
    std::sync::Arc<dyn Fn(&Entry) -> std::io::Result<Box<dyn std::io::Read + Send>> + Send + Sync>;

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "File({})", p.display()),
            Source::Stream(_) => f.write_str("Stream"),
            Source::Open(_) => f.write_str("Open"),
            Source::Reusing(r) => write!(f, "Reusing({} segments)", r.segments.len()),
        }
    }
}

impl AsRef<Entry> for TreeEntry {
    fn as_ref(&self) -> &Entry {
        &self.entry
    }
}

pub fn walk(root: &Path) -> Result<Vec<TreeEntry>, TarballError> {
    let md = fs::metadata(root).map_err(|e| TarballError::io(root, e))?;
    if !md.is_dir() {
        return Err(TarballError::io(
            root,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }
    let mut out = Vec::new();
    let mut links = HashMap::new();
    walk_dir(root, "", &mut out, &mut links)?;
    Ok(out)
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    out: &mut Vec<TreeEntry>,
    links: &mut HashMap<(u64, u64), String>,
) -> Result<(), TarballError> {
    let mut children: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| TarballError::io(dir, e))?
        .map(|entry| {
            let entry = entry.map_err(|e| TarballError::io(dir, e))?;
            Ok((entry.file_name().into_encoded_bytes(), entry.path()))
        })
        .collect::<Result<_, TarballError>>()?;
    children.sort();
    for (name, path) in children {
        let name = String::from_utf8(name).map_err(|_| {
            TarballError::Unsupported(format!("{}: file name is not UTF-8", path.display()))
        })?;
        if rel.is_empty() && name == RESERVED_DIR {
            continue;
        }
        let p = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let md = fs::symlink_metadata(&path).map_err(|e| TarballError::io(&path, e))?;
        let ft = md.file_type();
        let mut entry = Entry {
            p: p.as_str().into(),
            t: Kind::File,
            s: 0,
            m: md.mode() & 0o7777,
            u: u64::from(md.uid()),
            g: u64::from(md.gid()),
            mt: md.mtime(),
            mn: u32::try_from(md.mtime_nsec()).unwrap_or(0),
            ho: 0,
            data_offset: 0,
            rare: Rare {
                x: user_xattrs(&path),
                ..Rare::default()
            }
            .boxed(),
            sd: StatData {
                i: md.ino(),
                cs: md.ctime(),
                cn: u32::try_from(md.ctime_nsec()).unwrap_or(0),
            }
            .into(),
        };
        let mut source = None;
        if ft.is_dir() {
            entry.t = Kind::Dir;
        } else if ft.is_symlink() {
            entry.t = Kind::Symlink;
            let target = fs::read_link(&path).map_err(|e| TarballError::io(&path, e))?;
            let target = target.into_os_string().into_string().map_err(|_| {
                TarballError::Unsupported(format!("{}: link target is not UTF-8", path.display()))
            })?;
            entry.set_lt(Some(target));
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    entry.t = Kind::HardLink;
                    entry.set_lt(Some(first.clone()));
                    out.push(TreeEntry {
                        entry,
                        source: None,
                    });
                    continue;
                }
                links.insert((md.dev(), md.ino()), p.clone());
            }
            entry.s = md.len();
            source = Some(Source::File(path.clone()));
        } else if ft.is_fifo() {
            entry.t = Kind::Fifo;
        } else if ft.is_char_device() || ft.is_block_device() {
            entry.t = if ft.is_char_device() {
                Kind::CharDevice
            } else {
                Kind::BlockDevice
            };
            let rdev = md.rdev();
            entry.set_dv(Some((major(rdev), minor(rdev))));
        } else {
            tracing::warn!("{}: socket skipped", path.display());
            continue;
        }
        let is_dir = entry.t == Kind::Dir;
        out.push(TreeEntry { entry, source });
        if is_dir {
            walk_dir(&path, &p, out, links)?;
        }
    }
    Ok(())
}

fn user_xattrs(path: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    for name in names {
        let Some(name) = name.to_str().filter(|n| n.starts_with("user.")) else {
            continue;
        };
        if let Ok(Some(value)) = xattr::get(path, name) {
            out.insert(name.to_owned(), hex_encode(&value));
        }
    }
    out
}

/// glibc's encoding of device numbers.
fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}
