//! Reading a session object lazily.
//!
//! A sessionfs object (see [`super::writer`]) opens with one suffix GET of
//! [`SUFFIX_LEN`] bytes, which holds the locator and, for all but the
//! largest sessions, the whole TOC (a second GET fetches a larger TOC). When
//! the local index has some version of the key, the open starts with a HEAD
//! instead, and with that version's TOC in the index it is that one HEAD.
//! A read fetches, in one ranged GET pinned to the ETag seen at open, only
//! the segments that hold the requested bytes, and checks each against its
//! digest, length and CRC before using a byte of it.
//!
//! Any other tarball is indexed once by [`super::foreign`] (one streaming
//! pass, kept in the local index too); a read then fetches the compressed
//! bytes from the access point before the range to the one after it (about
//! one span) and inflates from there.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use futures::TryStreamExt;

use super::by_path::ByPath;
use super::deflate::{inflate_exact, zlib_decompress_exact, GZIP_TRAILER_LEN, STORED_HEADER_LEN};
use super::foreign::{self, ForeignIndex, Format, Limits};
use super::index::{IndexedToc, TocIndex};
use super::segments::{changed_or, fetch_pinned, Segments};
use super::sparse::{self, Piece};
use super::toc::{
    object_digest, Entry, Kind, Locator, Toc, DIGEST_KEY, EOA_LEN, LOCATOR_FROM_END, LOCATOR_LEN,
};
use super::zran::{inflate_from_point, AccessPoint};
use super::TarballError;
use crate::store::{ByteRange, GetOptions, ObjectMeta, ObjectStore, StoreError};

/// Bytes fetched from the end of an object at open.
pub const SUFFIX_LEN: u64 = 256 * 1024;
/// How tar bytes are found in the object.
enum Layout {
    /// Written by sessionfs: the TOC's segments.
    Native,
    /// Written by another tool: access points into its gzip (or none, for a plain tar).
    Foreign {
        format: Format,
        points: Vec<AccessPoint>,
    },
}

pub struct SessionReader {
    store: Arc<dyn ObjectStore>,
    key: String,
    meta: ObjectMeta,
    layout: Layout,
    toc: Toc,
    /// Inflated segments, shared with the readahead tasks (native objects).
    segments: Arc<Segments>,
    by_path: ByPath,
    /// Each directory's entries, for the few that list the object itself
    /// (`sessionfs inspect`): built at the first listing, not by every
    /// mount and server (2.3 MB for 109,000 entries).
    children: std::sync::OnceLock<HashMap<String, Vec<usize>>>,
    /// Whether the TOC is a plain tree ([`super::plain`]), found once.
    plain: std::sync::OnceLock<bool>,
}

impl std::fmt::Debug for SessionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReader")
            .field("key", &self.key)
            .field("etag", &self.meta.etag)
            .field("entries", &self.toc.entries.len())
            .finish_non_exhaustive()
    }
}

/// How a read goes on past the bytes it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Readahead within the file once reads go forward (the default).
    Ahead,
    /// Only the bytes asked for: a reader that skips around the file (a
    /// write-back reading what it cannot reuse).
    Here,
    /// Readahead, in one pass over the files, each read once and in order
    /// (a pack): the inflated segments the pass has read through go as
    /// soon as it reads past them, instead of filling the budget every
    /// reader shares.
    Pass,
}

impl SessionReader {
    /// Opens the session object at `key`; `index` caches TOCs between opens.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        key: &str,
        index: Option<&TocIndex>,
    ) -> Result<SessionReader, TarballError> {
        let store_id = store.describe();
        let known = match index {
            Some(index) => index.knows(&store_id, key).await?,
            None => false,
        };
        // A key never opened here: the suffix GET is the first request, and
        // its answer says which version it read. An empty or tiny object
        // refuses a suffix range on some stores; the HEAD below copes.
        let tail = match known {
            true => None,
            false => match fetch_tail(store.as_ref(), key, None).await {
                Ok(tail) => Some(tail),
                Err(TarballError::Store(StoreError::InvalidRange { .. })) => None,
                Err(e) => return Err(e),
            },
        };
        let meta = match &tail {
            Some(tail) => tail.meta.clone(),
            None => store.head(key).await?,
        };
        if let (Some(index), true) = (index, known) {
            if let Some(cached) = index.get(&store_id, key, &meta.etag).await? {
                // A damaged cache entry is not fatal: fall through and read the object.
                match decode_cached(&cached, meta.size) {
                    Ok(toc) => {
                        return Ok(SessionReader::new(store, key, meta, Layout::Native, toc))
                    }
                    Err(e) => tracing::warn!(key, "ignoring a damaged cached index: {e}"),
                }
            }
            match index.get_foreign(&store_id, key, &meta.etag).await {
                Ok(Some(found)) => return Ok(SessionReader::foreign(store, key, meta, found)),
                Ok(None) => {}
                Err(e) => tracing::warn!(key, "ignoring a damaged cached index: {e}"),
            }
        }
        match read_tail(store.as_ref(), key, &meta, tail.map(|t| t.body)).await {
            Ok((locator, toc_bytes, toc)) => {
                if let Some(index) = index {
                    let entry = IndexedToc {
                        locator: locator.encode().to_vec(),
                        toc: toc_bytes,
                    };
                    index.put(&store_id, key, &meta.etag, entry).await?;
                }
                Ok(SessionReader::new(store, key, meta, Layout::Native, toc))
            }
            Err(TarballError::NotSeekable) => {
                let found = index_foreign(store.as_ref(), key, &meta).await?;
                if let Some(index) = index {
                    index
                        .put_foreign(&store_id, key, &meta.etag, &found)
                        .await?;
                }
                Ok(SessionReader::foreign(store, key, meta, found))
            }
            Err(e) => Err(e),
        }
    }

    /// A reader of an earlier version of the object at `key` (ETag `etag`),
    /// from the TOC the local index kept of it: what an overlay's pending
    /// changes were made against, after another writer replaced it. Its
    /// bytes are read from the block cache while they are there (the store
    /// has the new version only); `None` when the index does not have it.
    pub async fn from_index(
        store: Arc<dyn ObjectStore>,
        key: &str,
        etag: &str,
        index: &TocIndex,
    ) -> Result<Option<SessionReader>, TarballError> {
        let Some(cached) = index.get(&store.describe(), key, etag).await? else {
            return Ok(None);
        };
        // The object's size is the locator's own (bytes 56..64).
        let Some(size) = cached
            .locator
            .get(56..64)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            return Ok(None);
        };
        let toc = decode_cached(&cached, size)?;
        let meta = ObjectMeta::known(key, etag, size);
        Ok(Some(SessionReader::new(
            store,
            key,
            meta,
            Layout::Native,
            toc,
        )))
    }

    /// A reader of an object this process has just written, from the TOC it
    /// wrote: no request, and no chance of reading someone else's version.
    pub fn written(
        store: Arc<dyn ObjectStore>,
        key: &str,
        meta: ObjectMeta,
        toc: Toc,
    ) -> SessionReader {
        SessionReader::new(store, key, meta, Layout::Native, toc)
    }

    fn foreign(
        store: Arc<dyn ObjectStore>,
        key: &str,
        meta: ObjectMeta,
        found: ForeignIndex,
    ) -> SessionReader {
        let toc = Toc {
            v: super::toc::FORMAT_VERSION,
            segments: Vec::new(),
            entries: found.entries,
        };
        let layout = Layout::Foreign {
            format: found.format,
            points: found.points,
        };
        SessionReader::new(store, key, meta, layout, toc)
    }

    /// True for objects sessionfs did not write (indexed by a streaming pass).
    pub fn is_foreign(&self) -> bool {
        matches!(self.layout, Layout::Foreign { .. })
    }

    fn new(
        store: Arc<dyn ObjectStore>,
        key: &str,
        meta: ObjectMeta,
        layout: Layout,
        toc: Toc,
    ) -> SessionReader {
        let by_path = ByPath::new(&toc.entries);
        let segments = Arc::new(Segments::new(
            store.clone(),
            key,
            &meta.etag,
            meta.size,
            toc.segments.clone(),
            &toc.entries,
        ));
        SessionReader {
            segments,
            store,
            key: key.to_owned(),
            meta,
            layout,
            toc,
            by_path,
            children: std::sync::OnceLock::new(),
            plain: std::sync::OnceLock::new(),
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    pub fn toc(&self) -> &Toc {
        &self.toc
    }

    #[cfg(test)]
    pub(super) fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// Every entry, in archive order.
    pub fn entries(&self) -> &[Entry] {
        &self.toc.entries
    }

    pub fn stat(&self, path: &str) -> Option<&Entry> {
        self.by_path
            .get(&self.toc.entries, path.trim_matches('/'))
            .and_then(|i| self.toc.entries.get(i))
    }

    /// Whether a mount would show this object entry for entry, with the
    /// recorded inode numbers ([`super::plain`]): then it can be served as
    /// it is. Objects other tools wrote never are (they record no inodes).
    pub fn is_plain_tree(&self) -> bool {
        *self.plain.get_or_init(|| {
            matches!(self.layout, Layout::Native)
                && super::plain::is_plain(&self.toc.entries, &self.by_path)
        })
    }

    /// The regular files of a plain tree (hard links too), with their
    /// sizes, in the order a walk of the tree by name meets them.
    pub fn plain_files(&self) -> Vec<(&str, &Entry)> {
        let mut files: Vec<(&str, &Entry)> = self
            .toc
            .entries
            .iter()
            .filter_map(|e| match e.t {
                Kind::File => Some((&*e.p, e)),
                Kind::HardLink => {
                    let target = self.stat(e.lt()?)?;
                    (target.t == Kind::File).then_some((&*e.p, target))
                }
                _ => None,
            })
            .collect();
        files.sort_unstable_by(|a, b| walk_order(a.0, b.0));
        files
    }

    /// The entries directly inside directory `path` (`""` is the root).
    pub fn list_dir(&self, path: &str) -> Vec<&Entry> {
        self.children
            .get_or_init(|| {
                let mut children: HashMap<String, Vec<usize>> = HashMap::new();
                for (i, e) in self.toc.entries.iter().enumerate() {
                    let parent = e.p.rsplit_once('/').map_or("", |(parent, _)| parent);
                    match children.get_mut(parent) {
                        Some(ids) => ids.push(i),
                        None => {
                            children.insert(parent.to_owned(), vec![i]);
                        }
                    }
                }
                children
            })
            .get(path.trim_matches('/'))
            .map(|ids| ids.iter().map(|&i| &self.toc.entries[i]).collect())
            .unwrap_or_default()
    }

    /// The regular file `path` names, following hard links.
    fn file(&self, path: &str) -> Result<&Entry, TarballError> {
        let mut entry = self
            .stat(path)
            .ok_or_else(|| TarballError::NoSuchPath(path.to_owned()))?;
        // Validation guarantees hard links point at earlier entries: this ends.
        while entry.t == Kind::HardLink {
            let target = entry.lt().unwrap_or_default();
            entry = self
                .stat(target)
                .ok_or_else(|| TarballError::NoSuchPath(target.to_owned()))?;
        }
        match entry.t {
            Kind::File => Ok(entry),
            Kind::Dir => Err(TarballError::IsADirectory(path.to_owned())),
            _ => Err(TarballError::NotAFile(path.to_owned())),
        }
    }

    /// Reads up to `len` bytes of `path` from `offset` (fewer at the end of the file).
    pub async fn read(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, TarballError> {
        self.read_with(path, offset, len, Pace::Ahead).await
    }

    /// Reads up to `len` bytes of `path` from `offset`, as `pace` says.
    pub async fn read_with(
        &self,
        path: &str,
        offset: u64,
        len: u64,
        pace: Pace,
    ) -> Result<Bytes, TarballError> {
        let ahead = pace != Pace::Here;
        let entry = self.file(path)?;
        let end = offset.saturating_add(len).min(entry.s);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let Some(map) = entry.sp() else {
            let limit = if ahead { entry.s } else { end };
            return self
                .read_tar(
                    entry.data_offset + offset,
                    entry.data_offset + end,
                    entry.data_offset + limit,
                    pace == Pace::Pass,
                )
                .await;
        };
        let pieces = sparse::pieces(map, entry.data_offset, offset, end);
        // One fetch for all the stored bytes the read touches.
        let stored: Vec<(u64, u64)> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Stored(a, b) => Some((*a, *b)),
                Piece::Zeros(_) => None,
            })
            .collect();
        let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
            return Ok(Bytes::from(vec![0u8; (end - offset) as usize]));
        };
        let base = first.0;
        // No readahead past the pieces asked for: sparse files are rare.
        let data = self.read_tar(base, last.1, last.1, false).await?;
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for piece in pieces {
            match piece {
                Piece::Stored(a, b) => {
                    out.extend_from_slice(&data[(a - base) as usize..(b - base) as usize])
                }
                Piece::Zeros(n) => out.resize(out.len() + n as usize, 0),
            }
        }
        Ok(out.freeze())
    }

    pub async fn read_all(&self, path: &str) -> Result<Bytes, TarballError> {
        self.read(path, 0, u64::MAX).await
    }

    /// Tar-stream bytes `start..end` of a file whose bytes end at `limit`.
    async fn read_tar(
        &self,
        start: u64,
        end: u64,
        limit: u64,
        pass: bool,
    ) -> Result<Bytes, TarballError> {
        match &self.layout {
            Layout::Native => self.segments.read(start, end, limit, pass).await,
            Layout::Foreign {
                format: Format::Plain,
                ..
            } => self.fetch(start, end).await,
            Layout::Foreign {
                format: Format::Gzip,
                points,
            } => {
                // A read never inflates across a gzip member boundary: split it there.
                let mut out = BytesMut::with_capacity((end - start) as usize);
                let mut at = start;
                while at < end {
                    let i = points.partition_point(|p| p.uo <= at).saturating_sub(1);
                    let point = points.get(i).ok_or_else(|| {
                        TarballError::Corrupt("no access point before the data".into())
                    })?;
                    let member_end = points[i + 1..]
                        .iter()
                        .find(|p| p.window_len == 0)
                        .map_or(u64::MAX, |p| p.uo);
                    let piece_end = end.min(member_end);
                    let fetch_end = points[i + 1..]
                        .iter()
                        .find(|p| p.uo >= piece_end)
                        .map_or(self.meta.size, |p| p.co.min(self.meta.size));
                    let fetch_start = point.co - u64::from(point.bits > 0);
                    let compressed = self.fetch(fetch_start, fetch_end).await?;
                    // About one span of CPU work: off the async runtime.
                    let point = point.clone();
                    let piece = tokio::task::spawn_blocking(move || {
                        inflate_from_point(&point, &compressed, at, piece_end)
                    })
                    .await
                    .map_err(|e| TarballError::Corrupt(format!("inflate worker failed: {e}")))??;
                    out.extend_from_slice(&piece);
                    at = piece_end;
                }
                Ok(out.freeze())
            }
        }
    }

    /// Object bytes `start..end`, pinned to the version opened.
    async fn fetch(&self, start: u64, end: u64) -> Result<Bytes, TarballError> {
        fetch_pinned(
            self.store.as_ref(),
            &self.key,
            &self.meta.etag,
            self.meta.size,
            start,
            end,
        )
        .await
    }
}

fn decode_cached(cached: &IndexedToc, object_size: u64) -> Result<Toc, TarballError> {
    let locator = Locator::decode(&cached.locator, object_size)?;
    decode_toc(&locator, &cached.toc)
}

/// Checks and parses the compressed TOC.
/// Paths compared component by component, as a walk of the tree by name
/// meets them: `a/b` before `a-c` (no name holds a NUL).
fn walk_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn byte(c: u8) -> u8 {
        if c == b'/' {
            0
        } else {
            c
        }
    }
    a.bytes().map(byte).cmp(b.bytes().map(byte))
}

pub fn decode_toc(locator: &Locator, toc_bytes: &[u8]) -> Result<Toc, TarballError> {
    if crc32fast::hash(toc_bytes) != locator.toc_crc {
        return Err(TarballError::Corrupt(
            "table of contents: CRC mismatch".into(),
        ));
    }
    let raw = zlib_decompress_exact(toc_bytes, locator.toc_raw_len as usize)
        .map_err(|e| TarballError::Corrupt(format!("table of contents: {e:?}")))?;
    let toc = super::toc_codec::read(&raw, locator.version)
        .map_err(|e| TarballError::Corrupt(format!("table of contents: {e}")))?;
    toc.validate(locator)?;
    Ok(toc)
}

/// Streams the whole object through the foreign index pass, off the async runtime.
async fn index_foreign(
    store: &dyn ObjectStore,
    key: &str,
    meta: &ObjectMeta,
) -> Result<ForeignIndex, TarballError> {
    let stream = store
        .get_stream(key, GetOptions::default().if_match(meta.etag.clone()))
        .await
        .map_err(changed_or)?;
    let reader = tokio_util::io::StreamReader::new(stream.body.map_err(std::io::Error::other));
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    tokio::task::spawn_blocking(move || foreign::index(bridge, Limits::default()))
        .await
        .map_err(|e| TarballError::Corrupt(format!("index worker failed: {e}")))?
}

/// The last [`SUFFIX_LEN`] bytes of the object (all of a smaller one), of
/// the version `etag` or, without one, of whichever version is current.
/// Read once: the TOC in them goes to the local index, not the block cache.
async fn fetch_tail(
    store: &dyn ObjectStore,
    key: &str,
    etag: Option<&str>,
) -> Result<crate::store::GetResult, TarballError> {
    let mut opts = GetOptions::range(ByteRange::Suffix(SUFFIX_LEN)).once();
    opts.if_match = etag.map(str::to_owned);
    store.get(key, opts).await.map_err(changed_or)
}

/// Reads and checks the tail of the object: locator, end of archive, TOC.
/// `tail` is the object's last bytes when the caller already fetched them.
async fn read_tail(
    store: &dyn ObjectStore,
    key: &str,
    meta: &ObjectMeta,
    tail: Option<Bytes>,
) -> Result<(Locator, Vec<u8>, Toc), TarballError> {
    let size = meta.size;
    let final_block = (STORED_HEADER_LEN + LOCATOR_LEN + EOA_LEN) as u64;
    if size < final_block + GZIP_TRAILER_LEN as u64 + 10 {
        return Err(TarballError::NotSeekable);
    }
    let pinned = |range| GetOptions::range(range).if_match(meta.etag.clone()).once();
    let suffix_len = SUFFIX_LEN.min(size);
    let tail = match tail {
        Some(tail) => tail,
        None => fetch_tail(store, key, Some(&meta.etag)).await?.body,
    };
    if tail.len() as u64 != suffix_len {
        return Err(TarballError::Corrupt(
            "short read of the object's tail".into(),
        ));
    }
    let t = tail.len();
    let block = &tail[t - GZIP_TRAILER_LEN - final_block as usize..t - GZIP_TRAILER_LEN];
    let stored_len = (LOCATOR_LEN + EOA_LEN) as u16;
    let expected_header = [
        1,
        stored_len as u8,
        (stored_len >> 8) as u8,
        !stored_len as u8,
        (!stored_len >> 8) as u8,
    ];
    if block[..STORED_HEADER_LEN] != expected_header {
        return Err(TarballError::NotSeekable);
    }
    let locator_bytes = &tail[t - LOCATOR_FROM_END..t - LOCATOR_FROM_END + LOCATOR_LEN];
    let locator = Locator::decode(locator_bytes, size)?;
    if block[STORED_HEADER_LEN + LOCATOR_LEN..]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(TarballError::Corrupt("end of archive is not zero".into()));
    }
    let isize = u32::from_le_bytes([tail[t - 4], tail[t - 3], tail[t - 2], tail[t - 1]]);
    if isize != locator.tar_size as u32 {
        return Err(TarballError::Corrupt(
            "gzip trailer disagrees with the locator".into(),
        ));
    }

    // The TOC region: stored blocks from toc_offset up to the final block.
    let region_end = size - GZIP_TRAILER_LEN as u64 - final_block;
    let region_start = locator.toc_offset;
    let tail_start = size - suffix_len;
    let region: Bytes = if region_start >= tail_start {
        tail.slice((region_start - tail_start) as usize..(region_end - tail_start) as usize)
    } else {
        store
            .get(
                key,
                pinned(ByteRange::Bounded {
                    start: region_start,
                    end: region_end,
                }),
            )
            .await
            .map_err(changed_or)?
            .body
    };
    let content_len = Locator::toc_entry_len(locator.toc_len) as usize + 512 - LOCATOR_LEN;
    let content = inflate_exact(&region, content_len)
        .map_err(|e| TarballError::Corrupt(format!("table of contents region: {e:?}")))?;
    let toc_bytes = content[512..512 + locator.toc_len as usize].to_vec();
    let toc = decode_toc(&locator, &toc_bytes)?;
    // The object's digest, when its writer left one, binds the TOC (and so
    // every segment) to what was stored.
    if let Some(want) = meta.metadata.get(DIGEST_KEY) {
        let mut end = region.to_vec();
        end.extend_from_slice(&tail[t - GZIP_TRAILER_LEN - final_block as usize..]);
        let got = object_digest(&toc.segments, &end);
        if &got != want {
            return Err(TarballError::Corrupt(format!(
                "the object's digest is {got}, its metadata says {want}"
            )));
        }
    }
    Ok((locator, toc_bytes, toc))
}
