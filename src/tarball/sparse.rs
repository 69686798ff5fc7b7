//! Sparse members of foreign tarballs: GNU tar writes them as old-GNU `S`
//! entries (`--format=gnu`, Debian's default) or with PAX records in one of
//! three versions (`--format=posix`: 0.0, 0.1, and the default 1.0).
//!
//! Every form stores the data chunks back to back and describes where each
//! belongs in the file; the holes between them read as zeros. This module
//! recovers that map as [`SparseMap`] (pairs of file offset and length) plus
//! where the stored chunks begin in the tar stream, so a read can fetch just
//! the chunks it overlaps.
//!
//! The old-GNU form may continue its map in extension blocks between the
//! header and the data. The `tar` crate consumes those blocks without showing
//! them, so the index pass keeps the recent tar stream in a [`Tail`] and the
//! blocks are read back from it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::rc::Rc;

/// Pairs of (offset in the file, length); sorted, non-overlapping.
pub type SparseMap = Vec<(u64, u64)>;

/// Most chunks accepted in one sparse map: bounds the memory of a hostile map.
pub const MAX_CHUNKS: usize = 1 << 20;
/// How much of the recent tar stream the [`Tail`] keeps: the parser's
/// read-ahead plus the largest old-GNU extension run we accept.
const TAIL_LEN: usize = 4 << 20;

/// The last [`TAIL_LEN`] bytes that went through a [`TapReader`].
#[derive(Default)]
pub struct Tail {
    bytes: VecDeque<u8>,
    /// Tar-stream offset just past the last byte kept.
    end: u64,
}

impl Tail {
    /// Bytes `start..start + len` if they are still kept.
    fn slice(&self, start: u64, len: usize) -> Option<Vec<u8>> {
        let first = self.end - self.bytes.len() as u64;
        if start < first || start + len as u64 > self.end {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        Some(self.bytes.range(skip..skip + len).copied().collect())
    }
}

/// Passes reads through, remembering the tail of what went by.
pub struct TapReader<R> {
    pub inner: R,
    tail: Rc<RefCell<Tail>>,
}

impl<R> TapReader<R> {
    pub fn new(inner: R) -> (Self, Rc<RefCell<Tail>>) {
        let tail = Rc::new(RefCell::new(Tail::default()));
        (
            TapReader {
                inner,
                tail: tail.clone(),
            },
            tail,
        )
    }
}

impl<R: Read> Read for TapReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut tail = self.tail.borrow_mut();
        tail.bytes.extend(&buf[..n]);
        let excess = tail.bytes.len().saturating_sub(TAIL_LEN);
        tail.bytes.drain(..excess);
        tail.end += n as u64;
        Ok(n)
    }
}

/// A sparse member as the index keeps it.
#[derive(Debug, PartialEq, Eq)]
pub struct Sparse {
    /// The name to use instead of the header's (PAX forms).
    pub name: Option<String>,
    /// The size of the file, holes included.
    pub real_size: u64,
    pub map: SparseMap,
    /// Where the stored chunks begin in the tar stream.
    pub data_offset: u64,
}

/// The sparse description of an entry, `Ok(None)` when it is not sparse.
pub fn describe<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    tail: &RefCell<Tail>,
) -> Result<Option<Sparse>, String> {
    if entry.header().entry_type() == tar::EntryType::GNUSparse {
        return old_gnu(entry, tail).map(Some);
    }
    let mut pax: Vec<(String, String)> = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let (Ok(k), Ok(v)) = (ext.key(), ext.value()) {
                if k.starts_with("GNU.sparse.") {
                    pax.push((k.to_owned(), v.to_owned()));
                }
            }
        }
    }
    if pax.is_empty() {
        return Ok(None);
    }
    let get = |k: &str| pax.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    let num = |k: &str| -> Result<Option<u64>, String> {
        get(k)
            .map(|v| v.parse::<u64>().map_err(|_| format!("bad {k} {v:?}")))
            .transpose()
    };
    let name = get("GNU.sparse.name").cloned();
    let data_start = entry.raw_file_position();
    if num("GNU.sparse.major")? == Some(1) {
        let real_size = num("GNU.sparse.realsize")?.ok_or("GNU.sparse.realsize missing")?;
        let (map, map_len) = read_v1_map(entry)?;
        let stored = entry
            .size()
            .checked_sub(map_len)
            .ok_or("sparse map longer than the member")?;
        return finish(name, real_size, map, data_start + map_len, stored).map(Some);
    }
    let real_size = num("GNU.sparse.size")?
        .or(num("GNU.sparse.realsize")?)
        .ok_or("GNU.sparse.size missing")?;
    let map = if let Some(m) = get("GNU.sparse.map") {
        // 0.1: "offset,length,offset,length,…"
        let nums: Vec<u64> = m
            .split(',')
            .map(|n| n.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("bad GNU.sparse.map {m:?}"))?;
        if !nums.len().is_multiple_of(2) || nums.len() / 2 > MAX_CHUNKS {
            return Err("GNU.sparse.map is malformed".into());
        }
        nums.chunks(2).map(|c| (c[0], c[1])).collect()
    } else {
        // 0.0: repeated offset/numbytes records, in order.
        let offsets = pax.iter().filter(|(k, _)| k == "GNU.sparse.offset");
        let lengths = pax.iter().filter(|(k, _)| k == "GNU.sparse.numbytes");
        offsets
            .zip(lengths)
            .take(MAX_CHUNKS + 1)
            .map(|((_, o), (_, l))| Ok((o.parse()?, l.parse()?)))
            .collect::<Result<SparseMap, std::num::ParseIntError>>()
            .map_err(|_| "bad GNU.sparse.offset/numbytes".to_owned())?
    };
    finish(name, real_size, map, data_start, entry.size()).map(Some)
}

/// Old GNU `S` entries: four chunks in the header, more in extension blocks.
fn old_gnu<R: Read>(entry: &tar::Entry<'_, R>, tail: &RefCell<Tail>) -> Result<Sparse, String> {
    let gnu = entry
        .header()
        .as_gnu()
        .ok_or("sparse entry without a GNU header")?;
    let mut map = SparseMap::new();
    let push = |map: &mut SparseMap, h: &tar::GnuSparseHeader| -> Result<(), String> {
        if !h.is_empty() {
            let o = h.offset().map_err(|e| e.to_string())?;
            let l = h.length().map_err(|e| e.to_string())?;
            map.push((o, l));
        }
        Ok(())
    };
    for h in &gnu.sparse {
        push(&mut map, h)?;
    }
    // The crate reports the position right after the main header; the
    // extension blocks come first, then the data.
    let mut at = entry.raw_file_position();
    let mut extended = gnu.is_extended();
    while extended {
        let block = tail
            .borrow()
            .slice(at, 512)
            .ok_or("sparse map extension blocks too long")?;
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.as_mut_bytes().copy_from_slice(&block);
        for h in ext.sparse() {
            push(&mut map, h)?;
        }
        if map.len() > MAX_CHUNKS {
            return Err("sparse map has too many chunks".into());
        }
        extended = ext.is_extended();
        at += 512;
    }
    let real_size = gnu.real_size().map_err(|e| e.to_string())?;
    let stored = entry.header().entry_size().map_err(|e| e.to_string())?;
    finish(None, real_size, map, at, stored)
}

/// The 1.0 map at the start of the data: decimal numbers one per line (the
/// count, then offset and length pairs), padded to a 512-byte block.
fn read_v1_map<R: Read>(data: &mut R) -> Result<(SparseMap, u64), String> {
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut next = |consumed: &mut u64| -> Result<u64, String> {
        line.clear();
        let mut byte = [0u8; 1];
        loop {
            data.read_exact(&mut byte)
                .map_err(|_| "sparse map truncated".to_owned())?;
            *consumed += 1;
            if byte[0] == b'\n' {
                break;
            }
            if line.len() > 20 {
                return Err("sparse map line too long".into());
            }
            line.push(byte[0]);
        }
        std::str::from_utf8(&line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad sparse map number {:?}", String::from_utf8_lossy(&line)))
    };
    let count = next(&mut consumed)?;
    if count > MAX_CHUNKS as u64 {
        return Err("sparse map has too many chunks".into());
    }
    let mut map = SparseMap::with_capacity(count as usize);
    for _ in 0..count {
        let o = next(&mut consumed)?;
        let l = next(&mut consumed)?;
        map.push((o, l));
    }
    Ok((map, consumed.div_ceil(512) * 512))
}

/// Checks the map against the sizes and drops empty chunks.
fn finish(
    name: Option<String>,
    real_size: u64,
    mut map: SparseMap,
    data_offset: u64,
    stored: u64,
) -> Result<Sparse, String> {
    if map.len() > MAX_CHUNKS {
        return Err("sparse map has too many chunks".into());
    }
    map.retain(|&(_, l)| l > 0);
    let mut end = 0u64;
    let mut total = 0u64;
    for &(o, l) in &map {
        let chunk_end = o.checked_add(l).ok_or("sparse map overflows")?;
        if o < end || chunk_end > real_size {
            return Err("sparse map chunks overlap or pass the end of the file".into());
        }
        end = chunk_end;
        total += l;
    }
    if total > stored {
        return Err(format!(
            "sparse map lists {total} bytes but the member stores {stored}"
        ));
    }
    Ok(Sparse {
        name,
        real_size,
        map,
        data_offset,
    })
}

/// The stored ranges (tar-stream offsets) and holes that make up
/// `offset..end` of a sparse file, in order.
pub fn pieces(map: &[(u64, u64)], data_offset: u64, offset: u64, end: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = offset;
    let mut stored = data_offset;
    for &(o, l) in map {
        if at >= end {
            break;
        }
        let chunk_end = o + l;
        if chunk_end <= at {
            stored += l;
            continue;
        }
        if o > at {
            let hole_end = o.min(end);
            out.push(Piece::Zeros(hole_end - at));
            at = hole_end;
            if at >= end {
                break;
            }
        }
        let take_end = chunk_end.min(end);
        out.push(Piece::Stored(stored + (at - o), stored + (take_end - o)));
        at = take_end;
        stored += l;
    }
    if at < end {
        out.push(Piece::Zeros(end - at));
    }
    out
}

/// Part of a read of a sparse file.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Tar-stream bytes `start..end`.
    Stored(u64, u64),
    Zeros(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_holes_and_chunks() {
        // file: [0,10) hole, [10,20) chunk A, [20,30) hole, [30,35) chunk B, [35,40) hole
        let map = vec![(10, 10), (30, 5)];
        assert_eq!(
            pieces(&map, 1000, 0, 40),
            vec![
                Piece::Zeros(10),
                Piece::Stored(1000, 1010),
                Piece::Zeros(10),
                Piece::Stored(1010, 1015),
                Piece::Zeros(5)
            ]
        );
        assert_eq!(
            pieces(&map, 1000, 15, 32),
            vec![
                Piece::Stored(1005, 1010),
                Piece::Zeros(10),
                Piece::Stored(1010, 1012)
            ]
        );
        assert_eq!(pieces(&map, 1000, 36, 38), vec![Piece::Zeros(2)]);
    }

    #[test]
    fn v1_map_is_parsed_and_padded() {
        let text = b"2\n0\n5\n100\n3\n";
        let mut data = text.to_vec();
        data.resize(512, 0);
        let (map, len) = read_v1_map(&mut &data[..]).unwrap();
        assert_eq!(map, vec![(0, 5), (100, 3)]);
        assert_eq!(len, 512);
        assert!(read_v1_map(&mut &b"2\n0\n"[..]).is_err());
        assert!(read_v1_map(&mut &b"99999999999\n"[..]).is_err());
    }

    #[test]
    fn overlapping_or_oversized_maps_are_refused() {
        assert!(finish(None, 10, vec![(0, 5), (4, 2)], 0, 100).is_err());
        assert!(finish(None, 10, vec![(8, 5)], 0, 100).is_err());
        assert!(finish(None, 10, vec![(0, 5)], 0, 4).is_err());
        assert!(finish(None, 10, vec![(0, 5), (6, 0)], 0, 5).is_ok());
    }

    #[test]
    fn tail_keeps_recent_bytes() {
        let (mut tap, tail) = TapReader::new(&b"abcdefgh"[..]);
        let mut buf = [0u8; 8];
        tap.read_exact(&mut buf).unwrap();
        assert_eq!(tail.borrow().slice(2, 3).unwrap(), b"cde");
        assert!(tail.borrow().slice(6, 3).is_none());
    }
}
