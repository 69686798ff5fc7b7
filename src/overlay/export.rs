//! The merged view of a session — its object with the overlay's changes
//! applied — packed as a session object: what `download` serves before the
//! changes are written back, and what the write-back stores.
//!
//! The tree is read from the namespace in one step (under its lock), in the
//! writer's order. Bytes are read while packing: changed files from their
//! overlay files, unchanged ones from the object through the block cache.
//! A file changed while it is being packed makes the pack fail with
//! [`TarballError::Changed`]; the caller packs again.

use std::io::{Read, Write};
use std::sync::Arc;

use super::live::LiveSession;
use super::namespace::ROOT;
use super::node::{Data, NodeKind, Time};
use super::OverlayError;
use crate::store::MIN_PART_SIZE;
use crate::tarball::reader::{Pace, SessionReader};
use crate::tarball::tar_header::hex_encode;
use crate::tarball::toc::{Entry, Kind, Rare, Segment, StatData};
use crate::tarball::tree::{Opener, Reusing, SkipRead, Source, TreeEntry};
use crate::tarball::writer::{pack_entries, PackOptions, PackStats};

/// Bytes read from the object per request while packing.
const READ_CHUNK: u64 = 4 << 20;

/// The merged view at one instant, as the writer takes it, with what a
/// write-back needs to adopt the object it becomes.
pub struct Snapshot {
    pub tree: Vec<TreeEntry>,
    /// Where each entry's bytes come from (same order as `tree`).
    pub origin: Vec<Origin>,
    /// The change feed up to here is in the snapshot.
    pub seq: i64,
    /// The object version the overlay is based on ("" for none).
    pub base_etag: String,
    /// That object.
    pub reader: Option<Arc<SessionReader>>,
}

/// Where the bytes of one entry of a [`Snapshot`] come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// No data of its own: directories, links, devices, empty files.
    Meta,
    /// Unchanged bytes of the base object's file at `moved_from`, or at
    /// the entry's own path when `None` (most files: not renamed since).
    Base {
        ino: u64,
        moved_from: Option<Arc<str>>,
    },
    /// The overlay file of `ino`, as it was at the snapshot; `in_object`:
    /// the base object holds these very bytes at the entry's path (see
    /// [`WrittenBack`](super::namespace::WrittenBack)).
    Local {
        ino: u64,
        size: u64,
        mtime: Time,
        in_object: bool,
    },
    /// Zeros (a file grown by truncate, never written).
    Zeros { ino: u64 },
}

impl Snapshot {
    /// Whether entry `i` has exactly the bytes of the base object's entry
    /// at the same path (or no bytes at all).
    pub fn same_bytes(&self, i: usize) -> bool {
        match &self.origin[i] {
            Origin::Meta => true,
            Origin::Base { moved_from, .. } => moved_from.is_none(),
            Origin::Local { in_object, .. } => *in_object,
            _ => false,
        }
    }
}

/// The session's tree as the writer takes it.
pub fn entries(live: &LiveSession) -> Result<Vec<TreeEntry>, OverlayError> {
    Ok(capture(live, false)?.tree)
}

/// Captures the merged view in one step, under the namespace lock.
/// For a write-back: files changed in place name the segments of the base
/// object they can keep ([`Source::Reusing`]).
pub fn snapshot(live: &LiveSession) -> Result<Snapshot, OverlayError> {
    capture(live, true)
}

fn capture(live: &LiveSession, reuse: bool) -> Result<Snapshot, OverlayError> {
    let mut ns = live.ns.lock();
    ns.snapshot_taken();
    let reader = live.reader();
    let seq = ns.journal().last_seq()?;
    let base_etag = ns.journal().meta("base_etag")?.unwrap_or_default();
    let written_back = ns.written_back(&base_etag).filter(|_| reuse);
    let changed_after = match written_back {
        Some(w) => ns.journal().changed_since(w.seq)?,
        None => Default::default(),
    };
    let in_object = |ino: u64, path: &str| {
        written_back.is_some_and(|w| w.paths.get(&ino).is_some_and(|p| **p == *path))
            && !changed_after.contains(&ino)
    };
    let walk = ns.walk(ROOT);
    // Sized once: doubling a vector of 200,000 entries leaves up to half of
    // it unused, and the snapshot is the largest thing a write-back holds.
    let mut out = Vec::with_capacity(walk.len());
    let mut origin = Vec::with_capacity(walk.len());
    let mut first_path = std::collections::HashMap::new();
    let xattrs = ns.journal().all_xattrs()?;
    // Unchanged files are read from the object when the packer reaches
    // them; their base path is the entry's own unless moved since.
    let moved: Arc<parking_lot::Mutex<std::collections::HashMap<u64, Arc<str>>>> = Arc::default();
    let opener: Option<Opener> = reader.clone().map(|reader| {
        let (moved, rt) = (moved.clone(), live.content.runtime().clone());
        let open: Opener = Arc::new(move |entry: &Entry| {
            let ino = entry.sd.get().map(|sd| sd.i);
            let path = ino
                .and_then(|i| moved.lock().get(&i).map(|p| p.to_string()))
                .unwrap_or_else(|| entry.p.to_string());
            Ok(Box::new(BaseReader {
                reader: reader.clone(),
                path,
                at: 0,
                size: entry.s,
                rt: rt.clone(),
            }) as Box<dyn Read + Send>)
        });
        open
    });
    for (path, ino) in walk {
        let n = ns.get(ino)?;
        let x = xattrs
            .get(&ino)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), hex_encode(v)))
            .collect();
        let mut entry = Entry {
            p: path.as_str().into(),
            t: Kind::File,
            s: 0,
            m: u32::from(n.perm),
            u: u64::from(n.uid),
            g: u64::from(n.gid),
            mt: n.mtime.s,
            mn: n.mtime.ns,
            ho: 0,
            data_offset: 0,
            rare: Rare {
                x,
                ..Rare::default()
            }
            .boxed(),
            sd: StatData {
                i: ino,
                cs: n.ctime.s,
                cn: n.ctime.ns,
            }
            .into(),
        };
        let mut source = None;
        let mut from = Origin::Meta;
        match n.kind {
            NodeKind::Dir => entry.t = Kind::Dir,
            NodeKind::Symlink => {
                entry.t = Kind::Symlink;
                entry.set_lt(n.target().map(str::to_owned));
            }
            NodeKind::Fifo => entry.t = Kind::Fifo,
            NodeKind::CharDevice | NodeKind::BlockDevice => {
                entry.t = if n.kind == NodeKind::CharDevice {
                    Kind::CharDevice
                } else {
                    Kind::BlockDevice
                };
                let dev = libc::dev_t::from(n.rdev);
                entry.set_dv(Some((libc::major(dev), libc::minor(dev))));
            }
            NodeKind::Socket => continue,
            NodeKind::File => {
                if let Some(first) = first_path.get(&ino) {
                    entry.t = Kind::HardLink;
                    entry.set_lt(Some(String::clone(first)));
                } else {
                    if n.nlink > 1 {
                        first_path.insert(ino, path.clone());
                    }
                    entry.s = n.size;
                    from = match &n.data {
                        _ if n.size == 0 => Origin::Meta,
                        Data::Local | Data::Partial(_) => Origin::Local {
                            ino,
                            size: n.size,
                            mtime: n.mtime,
                            in_object: n.data == Data::Local
                                && n.nlink == 1
                                && in_object(ino, &path),
                        },
                        Data::Base(base) => Origin::Base {
                            ino,
                            moved_from: (**base != *path).then(|| base.clone()),
                        },
                        Data::None | Data::Target(_) => Origin::Zeros { ino },
                    };
                    source = match &n.data {
                        _ if n.size == 0 => None,
                        Data::Local => Some(Source::File(live.content.path_of(ino))),
                        Data::Base(base) => {
                            let open = opener.clone().ok_or_else(|| {
                                OverlayError::Corrupt(format!("{path}: no session object"))
                            })?;
                            if **base != *path {
                                moved.lock().insert(ino, base.clone());
                            }
                            Some(Source::Open(open))
                        }
                        Data::None | Data::Target(_) => {
                            Some(Source::Stream(Box::new(std::io::repeat(0).take(n.size))))
                        }
                        Data::Partial(base) => {
                            let mut file = live.content.partial_file(ino, reader.clone(), base)?;
                            let segments = reader
                                .as_deref()
                                .filter(|_| reuse)
                                .map(|r| reusable(r, base, &file.map, n.size))
                                .unwrap_or_default();
                            // Reading ahead would fetch what is reused.
                            file.pace = if segments.is_empty() {
                                Pace::Ahead
                            } else {
                                Pace::Here
                            };
                            Some(Source::Reusing(Reusing {
                                reader: Box::new(PartialReader {
                                    file,
                                    at: 0,
                                    size: n.size,
                                    rt: live.content.runtime().clone(),
                                }),
                                segments,
                            }))
                        }
                    };
                }
            }
        }
        out.push(TreeEntry { entry, source });
        origin.push(from);
    }
    Ok(Snapshot {
        tree: out,
        origin,
        seq,
        base_etag,
        reader,
    })
}

/// Packs the merged view into `out`.
pub fn export<W: Write + Send>(live: &LiveSession, out: W) -> Result<PackStats, OverlayError> {
    let tree = entries(live)?;
    Ok(pack_entries(tree, out, &PackOptions::default(), &|_| {})?)
}

/// The segments of the base object that hold stretches of a file copied up
/// chunk by chunk that are still wholly the object's (`base` there; `size`
/// bytes now): only the file's own segments (data, no header or padding),
/// in runs long enough to be copied server-side as parts of their own.
fn reusable(
    reader: &SessionReader,
    base: &str,
    map: &super::partial::ChunkMap,
    size: u64,
) -> Vec<(u64, Segment)> {
    let Some(e) = reader.stat(base) else {
        return Vec::new();
    };
    if reader.is_foreign() || e.t != Kind::File || e.sp().is_some() {
        return Vec::new();
    }
    let (start, end) = (e.data_offset, e.data_offset + e.s);
    let segments = &reader.toc().segments;
    let first = segments.partition_point(|s| s.uo < start);
    let mut runs: Vec<Vec<(u64, Segment)>> = Vec::new();
    for s in segments[first..].iter().take_while(|s| s.uo + s.ul <= end) {
        let at = s.uo - start;
        let whole = match map.pieces(at, s.ul).as_slice() {
            [p] => p.from_object && p.end == at + s.ul,
            _ => false,
        };
        if !whole || at + s.ul > size {
            runs.push(Vec::new());
            continue;
        }
        match runs.last_mut() {
            Some(run)
                if run
                    .last()
                    .is_some_and(|(a, p)| a + p.ul == at && p.co + p.cl == s.co) =>
            {
                run.push((at, s.clone()))
            }
            _ => runs.push(vec![(at, s.clone())]),
        }
    }
    runs.into_iter()
        .filter(|run| run.iter().map(|(_, s)| s.cl).sum::<u64>() >= MIN_PART_SIZE)
        .flatten()
        .collect()
}

/// A file copied up chunk by chunk, read from its overlay file and the
/// object a piece at a time. Runs on the packing thread.
struct PartialReader {
    file: super::partial::PartialFile,
    at: u64,
    size: u64,
    rt: tokio::runtime::Handle,
}

impl SkipRead for PartialReader {
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.at = self.at.saturating_add(n).min(self.size);
        Ok(())
    }
}

impl Read for PartialReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(READ_CHUNK).min(self.size - self.at);
        let bytes = self
            .file
            .read_at(&self.rt, self.at, want)
            .map_err(std::io::Error::other)?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.at += bytes.len() as u64;
        Ok(bytes.len())
    }
}

/// An unchanged file, read from the object a chunk at a time. Runs on the
/// packing thread, never on the runtime's.
struct BaseReader {
    reader: Arc<SessionReader>,
    path: String,
    at: u64,
    size: u64,
    rt: tokio::runtime::Handle,
}

impl Read for BaseReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(READ_CHUNK).min(self.size - self.at);
        let bytes = self
            .rt
            .block_on(self.reader.read_with(&self.path, self.at, want, Pace::Pass))
            .map_err(std::io::Error::other)?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.at += bytes.len() as u64;
        Ok(bytes.len())
    }
}
