//! Block-level copy-up: a large unchanged file opened for writing is not
//! fetched. Its overlay file starts sparse, at the file's size, and a map
//! beside it (`data/{ino}-map`) says which 1 MiB chunks of the file the
//! overlay file holds; the other chunks are still the object's bytes, read
//! from it through the block cache as an unchanged file's are.
//!
//! - **Writes.** A write into a chunk the overlay file does not hold first
//!   fills that chunk's missing part from the object, syncs the overlay
//!   file, and only then marks the chunk: the mark never reaches the disk
//!   before the bytes it vouches for, so a power loss can lose a write not
//!   yet synced (as on any file system) but never turn the object's bytes
//!   into zeros. A kill -9 loses nothing: both files are the kernel's.
//! - **`base_len`.** Bytes at or past it are always the overlay file's, so
//!   appends and a file grown by truncate fetch nothing. A truncation below
//!   it lowers it (synced before the file shrinks), so bytes cut off and
//!   grown back read as zeros, not as the object's.
//! - **What reads the rest.** The mount and the API read each piece from
//!   where it is. A write-back packs the file from both, laying the old
//!   object's segments that hold only chunks not held into the new object
//!   as they are (copied server-side: `export.rs`, `tarball/writer.rs`),
//!   then drops the overlay copy, as for a file copied up whole.
//! - **Another writer's object.** After a rebase onto it, the chunks not
//!   held are read from it at the same path, as an unchanged file's bytes
//!   are; only a file that writer changed too is filled completely first,
//!   from the old object (or its cached blocks). If those are gone, the
//!   rebase fails and the changes stay pending, as for a whole file then.
//!
//! The map file: a magic (8 bytes), `base_len` (u64, little-endian), then
//! one bit per chunk (chunk `c` is bit `c % 8` of byte `c / 8`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::OverlayError;
use crate::tarball::reader::{Pace, SessionReader};

/// The unit the overlay file holds or not.
pub const CHUNK: u64 = 1 << 20;

/// Files at least this large are copied up chunk by chunk; smaller ones are
/// fetched whole (one request, no map).
pub const MIN_SIZE: u64 = 8 << 20;

const MAGIC: &[u8; 8] = b"sfsmap1\n";
const HEADER: u64 = 16;

/// Which chunks of one file the overlay file holds.
pub struct ChunkMap {
    file: File,
    state: Mutex<State>,
}

struct State {
    base_len: u64,
    bits: Vec<u8>,
}

impl State {
    fn present(&self, chunk: u64) -> bool {
        self.bits
            .get((chunk / 8) as usize)
            .is_some_and(|b| b & (1 << (chunk % 8)) != 0)
    }

    /// Whether the byte at `at` is the object's (not held, below `base_len`).
    fn objects(&self, at: u64) -> bool {
        at < self.base_len && !self.present(at / CHUNK)
    }
}

/// A piece of a byte range and where its bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub from_object: bool,
}

impl ChunkMap {
    /// A new map of a file of `base_len` bytes, none of them held yet;
    /// synced before it returns.
    pub fn create(path: &Path, base_len: u64) -> std::io::Result<ChunkMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let bits = vec![0u8; base_len.div_ceil(CHUNK).div_ceil(8) as usize];
        let mut head = Vec::with_capacity(HEADER as usize + bits.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&base_len.to_le_bytes());
        head.extend_from_slice(&bits);
        file.write_all_at(&head, 0)?;
        file.sync_all()?;
        Ok(ChunkMap {
            file,
            state: Mutex::new(State { base_len, bits }),
        })
    }

    /// The map at `path`, as a crash left it.
    pub fn open(path: &Path) -> Result<ChunkMap, OverlayError> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut all)?;
        if all.len() < HEADER as usize || &all[..8] != MAGIC {
            return Err(OverlayError::Corrupt(format!(
                "{}: not a chunk map",
                path.display()
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&all[8..16]);
        let base_len = u64::from_le_bytes(len);
        let mut bits = all.split_off(HEADER as usize);
        // Bits a crash cut off were never synced: those chunks read from
        // the object, which is what they held before the lost write.
        bits.resize(base_len.div_ceil(CHUNK).div_ceil(8) as usize, 0);
        Ok(ChunkMap {
            file,
            state: Mutex::new(State { base_len, bits }),
        })
    }

    /// Below this, bytes of chunks not held are the object's.
    pub fn base_len(&self) -> u64 {
        self.state.lock().base_len
    }

    /// `[offset, offset + len)` cut where its bytes change place.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let s = self.state.lock();
        let end = offset.saturating_add(len);
        let mut out: Vec<Piece> = Vec::new();
        let mut at = offset;
        while at < end {
            let from_object = s.objects(at);
            let next = if at >= s.base_len {
                end
            } else {
                ((at / CHUNK + 1) * CHUNK).min(s.base_len).min(end)
            };
            match out.last_mut() {
                Some(p) if p.from_object == from_object => p.end = next,
                _ => out.push(Piece {
                    start: at,
                    end: next,
                    from_object,
                }),
            }
            at = next;
        }
        out
    }

    /// The chunks a write of `[offset, offset + len)` must fill first: those
    /// it touches below `base_len` that the overlay file does not hold.
    pub fn to_fill(&self, offset: u64, len: u64) -> Vec<u64> {
        let s = self.state.lock();
        let end = offset.saturating_add(len).min(s.base_len);
        if offset >= end {
            return Vec::new();
        }
        (offset / CHUNK..end.div_ceil(CHUNK))
            .filter(|c| !s.present(*c))
            .collect()
    }

    /// Every chunk still the object's.
    pub fn missing(&self) -> Vec<u64> {
        let base_len = self.base_len();
        self.to_fill(0, base_len)
    }

    /// The bytes of `chunk` that are the object's while it is not held.
    pub fn object_range(&self, chunk: u64) -> (u64, u64) {
        let base_len = self.base_len();
        let start = chunk.saturating_mul(CHUNK).min(base_len);
        (start, start.saturating_add(CHUNK).min(base_len))
    }

    /// Marks `chunks` held. Their bytes must be durable in the overlay file
    /// already (see the module header).
    pub fn mark(&self, chunks: &[u64]) -> std::io::Result<()> {
        let mut s = self.state.lock();
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for &c in chunks {
            let i = (c / 8) as usize;
            if let Some(b) = s.bits.get_mut(i) {
                *b |= 1 << (c % 8);
                lo = lo.min(i);
                hi = hi.max(i);
            }
        }
        if lo <= hi {
            // Under the lock: concurrent marks of one byte write it in turn,
            // each with every bit set so far.
            self.file
                .write_all_at(&s.bits[lo..=hi], HEADER + lo as u64)?;
        }
        Ok(())
    }

    /// The file is being cut to `len`: bytes past it are no longer the
    /// object's. Synced before it returns (the caller shrinks after).
    pub fn limit(&self, len: u64) -> std::io::Result<()> {
        let mut s = self.state.lock();
        if len >= s.base_len {
            return Ok(());
        }
        s.base_len = len;
        self.file.write_all_at(&len.to_le_bytes(), 8)?;
        self.file.sync_data()
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// One version of a file copied up chunk by chunk: its overlay file, its
/// map, and the object its other chunks are read from.
#[derive(Clone)]
pub struct PartialFile {
    pub data: Arc<File>,
    pub map: Arc<ChunkMap>,
    pub reader: Option<Arc<SessionReader>>,
    /// The file's path in that object.
    pub path: String,
    /// How reads of the object go ([`Pace::Here`] for a reader that skips
    /// what it reuses).
    pub pace: Pace,
}

impl PartialFile {
    /// Up to `len` bytes from `offset` (fewer at the overlay file's end),
    /// each piece from where it is.
    pub fn read_at(
        &self,
        rt: &tokio::runtime::Handle,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, OverlayError> {
        let mut out = Vec::with_capacity(len as usize);
        for p in self.map.pieces(offset, len) {
            let want = (p.end - p.start) as usize;
            let before = out.len();
            if p.from_object {
                let bytes = super::content::read_object(
                    rt,
                    self.reader.as_ref(),
                    &self.path,
                    p.start,
                    p.end - p.start,
                    self.pace,
                )?;
                out.extend_from_slice(&bytes);
            } else {
                out.resize(before + want, 0);
                let mut got = 0;
                while got < want {
                    let n = self
                        .data
                        .read_at(&mut out[before + got..], p.start + got as u64)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                out.truncate(before + got);
            }
            if out.len() - before < want {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(dir: &Path, base_len: u64) -> ChunkMap {
        ChunkMap::create(&dir.join("m"), base_len).unwrap()
    }

    #[test]
    fn pieces_follow_the_held_chunks_and_base_len() {
        let d = tempfile::tempdir().unwrap();
        let m = map(d.path(), 3 * CHUNK + 100);
        assert_eq!(
            m.pieces(10, 20),
            vec![Piece {
                start: 10,
                end: 30,
                from_object: true
            }]
        );
        m.mark(&[1]).unwrap();
        let p = m.pieces(CHUNK - 5, 5 * CHUNK);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: CHUNK - 5,
                    end: CHUNK,
                    from_object: true
                },
                Piece {
                    start: CHUNK,
                    end: 2 * CHUNK,
                    from_object: false
                },
                Piece {
                    start: 2 * CHUNK,
                    end: 3 * CHUNK + 100,
                    from_object: true
                },
                Piece {
                    start: 3 * CHUNK + 100,
                    end: 6 * CHUNK - 5,
                    from_object: false
                },
            ]
        );
    }

    #[test]
    fn writes_fill_only_chunks_below_base_len_not_held() {
        let d = tempfile::tempdir().unwrap();
        let m = map(d.path(), 2 * CHUNK + 10);
        assert_eq!(m.to_fill(CHUNK - 1, 2), vec![0, 1]);
        m.mark(&[0]).unwrap();
        assert_eq!(m.to_fill(CHUNK - 1, 2), vec![1]);
        // An append past base_len fetches nothing.
        assert!(m.to_fill(2 * CHUNK + 10, 4096).is_empty());
        assert_eq!(m.to_fill(2 * CHUNK + 5, 4096), vec![2]);
        assert_eq!(m.object_range(2), (2 * CHUNK, 2 * CHUNK + 10));
        assert_eq!(m.missing(), vec![1, 2]);
    }

    #[test]
    fn a_reopened_map_keeps_marks_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let m = map(d.path(), 20 * CHUNK);
        m.mark(&[3, 17]).unwrap();
        m.limit(5 * CHUNK + 1).unwrap();
        drop(m);
        let m = ChunkMap::open(&d.path().join("m")).unwrap();
        assert_eq!(m.base_len(), 5 * CHUNK + 1);
        assert_eq!(m.missing(), vec![0, 1, 2, 4, 5]);
        // Cut back past a limit: the bytes there are the overlay file's.
        assert!(!m.pieces(6 * CHUNK, 10)[0].from_object);
    }

    #[test]
    fn a_map_that_is_not_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("m"), b"garbage").unwrap();
        assert!(matches!(
            ChunkMap::open(&d.path().join("m")),
            Err(OverlayError::Corrupt(_))
        ));
    }
}
