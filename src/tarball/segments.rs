//! The inflated segments of one object version, shared by all its readers.
//!
//! A run of missing segments is fetched in one ranged GET pinned to the
//! version's ETag; each segment is checked ([`verify_segment`]: digest,
//! length, CRC) and inflated on the blocking pool, the segments of a run in
//! parallel. Inflated segments stay in one LRU for the whole process, under
//! [`DECODED_BUDGET`], so reads that walk through a segment in small pieces
//! (the kernel's 128 KiB) inflate it once. Segments inflated ahead of a
//! sequential reader and not read yet have the budget to themselves; those
//! read stay under [`READ_KEPT`] of it. A pass over every file (a pack)
//! lets go of the segments it has read through as soon as it starts past
//! them, so that it holds a segment or two, not the whole budget; other
//! readers' segments read through to their last file's end go first, and
//! beyond [`THROUGH_KEPT`] (a walk over a mount's files).
//!
//! Each segment is loaded by one reader at a time: a reader that finds it in
//! flight waits for that load instead of fetching it again (and loads it
//! itself only if that load failed).
//!
//! Readahead: once reads move forward segment by segment, the next segments
//! of the same file (up to [`AHEAD_BYTES`]) are fetched and inflated in the
//! background, on the other cores, while the reader consumes the current
//! one. One core inflates about 250 MiB/s of source-like text; a sequential
//! reader then gets the cores' combined speed instead of one core's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::deflate::inflate_exact_into;
use super::toc::{Entry, Kind, Segment};
use super::TarballError;
use crate::store::{ByteRange, GetOptions, ObjectStore, StoreError};

/// Inflated bytes kept by the whole process, over every object version it
/// reads: the windows ahead of sequential readers and the segments being
/// read. It was per version, so a server reading many sessions at once
/// could hold this much for each. 64 MiB (with 32 MiB ahead) read a 100 MiB
/// file no faster; a mount that had read every file of a 45,000-file
/// session held 40 MB more.
pub const DECODED_BUDGET: u64 = 20 << 20;
/// Inflated bytes kept, within [`DECODED_BUDGET`], of segments a reader
/// has read (rather than loaded ahead of it and not read yet). Readers
/// that come back to a segment come back soon: the kernel's pieces of one
/// file, a few readers racing over the same files, a walk whose readers are
/// each in a segment or two. Once read, the bytes behind a sequential
/// reader are not read again, and a walk over the files of a session
/// filled the whole budget with segments it had left, where it re-inflates
/// hardly any more with this much (957 inflates of 935 segments with the
/// whole budget, 981 with 8 MiB, listings in name order).
pub const READ_KEPT: u64 = 8 << 20;
/// Inflated bytes kept of segments whose last bytes a reader (not a pass)
/// has read, the file that ends them read to its end: what a walk over the
/// files (`find | xargs cat`, `grep -r`, a build) leaves behind it. They go
/// first, and beyond this much at once, so that such a walk holds the
/// segments its readers are in rather than the whole budget: a mount that
/// read every file of the benchmark's tree (109,000 entries, through S3)
/// held 101–107 MB after it, where it held 117–119 MB with the budget full
/// of segments read through (peaks 116–120 MB against 123–125).
const THROUGH_KEPT: u64 = 4 << 20;
/// Most segments fetched by one GET (a 32 MiB window of 2 MiB segments;
/// [`AHEAD_BYTES`] keeps runs shorter). GETs of four segments, all at once,
/// were not faster here (one run each: 0.64× single-threaded inflate
/// against 0.78×).
const RUN_SEGMENTS: usize = 16;
/// Inflated bytes loaded ahead of a sequential reader.
pub const AHEAD_BYTES: u64 = 16 << 20;
/// A read of at least this much inside one segment shares the segment's
/// buffer instead of copying it (a sequential reader's 128 KiB–1 MiB
/// pieces: 100 MiB fewer copied per 100 MiB read). Smaller reads copy, so
/// a few bytes kept somewhere never hold a whole segment in memory.
const SHARED_READ: u64 = 64 << 10;
/// A segment ends with its last file's padding, under a tar block.
const TAR_BLOCK: u64 = 512;

pub struct Segments {
    store: Arc<dyn ObjectStore>,
    key: String,
    etag: String,
    size: u64,
    segs: Vec<Segment>,
    /// Where the file bytes in each segment end in the tar stream (0: it
    /// holds none): a read that gets there has read through the segment.
    data_ends: Vec<u64>,
    /// This version's segments in [`decoded`].
    id: u64,
    state: Mutex<State>,
}

struct State {
    /// Segments being loaded; the receiver sees its sender dropped when the
    /// load ends, whichever way.
    inflight: HashMap<usize, watch::Receiver<()>>,
    /// The last segment the previous read touched, to spot sequential reads.
    last: Option<usize>,
    /// Segments a pass went through to the end (padding aside), first and
    /// last: they go once the pass reads past them.
    behind: Option<(usize, usize)>,
    /// By segment: whether a reader (not a pass) has read its last file to
    /// the end.
    read_through: Vec<bool>,
}

impl Drop for Segments {
    fn drop(&mut self) {
        decoded::forget(self.id);
    }
}

/// The inflated segments of every version the process reads, in one LRU
/// under [`DECODED_BUDGET`], keyed by (version, segment). Taken inside a
/// version's own state lock, never the other way round.
mod decoded {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex, MutexGuard};

    use bytes::Bytes;

    use super::{spare, DECODED_BUDGET, READ_KEPT, THROUGH_KEPT};

    type Key = (u64, usize);

    struct Kept {
        lru: lru::LruCache<Key, Bytes>,
        bytes: u64,
        /// Segments loaded ahead of a reader and not read yet, with their
        /// lengths: not under [`READ_KEPT`].
        ahead: HashMap<Key, u64>,
        ahead_bytes: u64,
        /// Segments read through ([`read_through`]), oldest first, with
        /// their lengths: the first to go.
        through: lru::LruCache<Key, u64>,
        through_bytes: u64,
    }

    impl Kept {
        fn new() -> Kept {
            Kept {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                ahead: HashMap::new(),
                ahead_bytes: 0,
                through: lru::LruCache::unbounded(),
                through_bytes: 0,
            }
        }

        /// A kept segment, now read: no longer ahead of its reader.
        fn get(&mut self, key: &Key) -> Option<Bytes> {
            let raw = self.lru.get(key).cloned()?;
            self.through.promote(key);
            if let Some(len) = self.ahead.remove(key) {
                self.ahead_bytes -= len;
            }
            Some(raw)
        }

        /// Keeps `raw`, loaded `ahead` of its reader or for it; returns
        /// what goes to make room.
        fn put(&mut self, key: Key, raw: Bytes, ahead: bool) -> Vec<Bytes> {
            let old = self.pop(&key);
            let len = raw.len() as u64;
            self.bytes += len;
            self.lru.put(key, raw);
            if ahead {
                self.ahead.insert(key, len);
                self.ahead_bytes += len;
            }
            let mut evicted = self.evict();
            evicted.extend(old);
            evicted
        }

        /// Marks a kept segment read through; returns what goes.
        fn read_through(&mut self, key: Key) -> Vec<Bytes> {
            let Some(len) = self.lru.peek(&key).map(|raw| raw.len() as u64) else {
                return Vec::new();
            };
            if self.through.put(key, len).is_none() {
                self.through_bytes += len;
            }
            self.evict()
        }

        fn pop(&mut self, key: &Key) -> Option<Bytes> {
            let old = self.lru.pop(key)?;
            self.bytes -= old.len() as u64;
            self.unmark(key);
            if let Some(len) = self.ahead.remove(key) {
                self.ahead_bytes -= len;
            }
            Some(old)
        }

        fn unmark(&mut self, key: &Key) {
            if let Some(len) = self.through.pop(key) {
                self.through_bytes -= len;
            }
        }

        /// Bytes of the segments read (not ahead of their readers).
        fn read_bytes(&self) -> u64 {
            self.bytes - self.ahead_bytes
        }

        /// Evicts the oldest segments read through while they pass
        /// [`THROUGH_KEPT`], or the segments read pass [`READ_KEPT`], or all
        /// pass [`DECODED_BUDGET`]; then the least recently read of the
        /// segments read while those pass [`READ_KEPT`]; then the least
        /// recently used of all while all pass [`DECODED_BUDGET`].
        fn evict(&mut self) -> Vec<Bytes> {
            let mut evicted = Vec::new();
            while self.through_bytes > THROUGH_KEPT
                || ((self.read_bytes() > READ_KEPT || self.bytes > DECODED_BUDGET)
                    && !self.through.is_empty())
            {
                let Some(key) = self.through.peek_lru().map(|(k, _)| *k) else {
                    break;
                };
                match self.pop(&key) {
                    Some(old) => evicted.push(old),
                    None => self.unmark(&key),
                }
            }
            while self.read_bytes() > READ_KEPT {
                let oldest_read = self
                    .lru
                    .iter()
                    .rev()
                    .map(|(k, _)| *k)
                    .find(|k| !self.ahead.contains_key(k));
                match oldest_read.and_then(|k| self.pop(&k)) {
                    Some(old) => evicted.push(old),
                    None => break,
                }
            }
            while self.bytes > DECODED_BUDGET {
                match self.lru.peek_lru().map(|(k, _)| *k) {
                    Some(key) => evicted.extend(self.pop(&key)),
                    None => break,
                }
            }
            evicted
        }
    }

    static KEPT: LazyLock<Mutex<Kept>> = LazyLock::new(|| Mutex::new(Kept::new()));

    fn kept() -> MutexGuard<'static, Kept> {
        KEPT.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept segment. One read through stays so (readers walking a
    /// directory in an order of its own may read the file that ends it
    /// before the others), but goes after the others read through.
    pub fn get(id: u64, index: usize) -> Option<Bytes> {
        let (raw, evicted) = {
            let mut k = kept();
            let raw = k.get(&(id, index));
            (raw, k.evict())
        };
        for old in evicted {
            spare::give(old);
        }
        raw
    }

    pub fn contains(id: u64, index: usize) -> bool {
        kept().lru.contains(&(id, index))
    }

    /// Keeps a segment loaded, `ahead` of its reader or for it.
    pub fn put(id: u64, index: usize, raw: Bytes, ahead: bool) {
        let evicted = kept().put((id, index), raw, ahead);
        for old in evicted {
            spare::give(old);
        }
    }

    /// A reader read a segment to its end: it goes before any other, and
    /// once more than [`THROUGH_KEPT`] of such segments are kept.
    pub fn read_through(id: u64, index: usize) {
        let evicted = kept().read_through((id, index));
        for old in evicted {
            spare::give(old);
        }
    }

    /// Drops one segment: its reader is done with it. Its buffer goes to
    /// the spare ones once that reader lets it go too.
    pub fn release(id: u64, index: usize) {
        let old = kept().pop(&(id, index));
        if let Some(old) = old {
            spare::give(old);
        }
    }

    /// Drops a version's segments (its reader is gone); their buffers go
    /// to the spare ones as evicted ones do.
    pub fn forget(id: u64) {
        let mut freed = Vec::new();
        {
            let mut k = kept();
            let mine: Vec<_> = k
                .lru
                .iter()
                .map(|(key, _)| *key)
                .filter(|key| key.0 == id)
                .collect();
            for key in mine {
                if let Some(old) = k.pop(&key) {
                    freed.push(old);
                }
            }
        }
        for old in freed {
            spare::give(old);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn versions_share_one_budget_and_leave_with_their_reader() {
            let seg = (DECODED_BUDGET / 4) as usize;
            let (a, b) = (u64::MAX - 1, u64::MAX - 2);
            for i in 0..4 {
                put(a, i, Bytes::from(vec![1u8; seg]), true);
            }
            for i in 0..4 {
                put(b, i, Bytes::from(vec![2u8; seg]), true);
            }
            assert!(kept().bytes <= DECODED_BUDGET);
            // The newer version's segments pushed out the older one's.
            assert!((0..4).all(|i| contains(b, i)));
            assert!((0..4).all(|i| !contains(a, i)));
            assert_eq!(get(b, 3).as_deref(), Some(&vec![2u8; seg][..]));
            let held = kept().bytes;
            forget(b);
            assert!((0..4).all(|i| !contains(b, i)));
            assert_eq!(kept().bytes, held - 4 * seg as u64);
        }

        #[test]
        fn segments_read_through_go_first_and_beyond_their_own_budget() {
            // A table of its own: other tests share the process's.
            let mut k = Kept::new();
            let seg = (THROUGH_KEPT / 2) as usize;
            let has = |k: &Kept, i: usize| k.lru.contains(&(1, i));
            for i in 0..4 {
                assert!(k.put((1, i), Bytes::from(vec![3u8; seg]), false).is_empty());
            }
            // Two read through fit their budget; a third pushes out the
            // oldest of them, not the segments still being read.
            k.read_through((1, 0));
            k.read_through((1, 1));
            assert!((0..4).all(|i| has(&k, i)));
            assert_eq!(k.read_through((1, 2)).len(), 1);
            assert!(!has(&k, 0) && has(&k, 1) && has(&k, 2) && has(&k, 3));
            // Read again, it goes after the others read through.
            assert!(k.get(&(1, 1)).is_some());
            k.put((1, 4), Bytes::from(vec![3u8; seg]), false);
            k.read_through((1, 4));
            assert!(has(&k, 1) && !has(&k, 2) && has(&k, 3) && has(&k, 4));
            k.read_through((1, 3));
            assert!(!has(&k, 1) && has(&k, 3) && has(&k, 4));
            assert_eq!((k.bytes, k.through_bytes), (2 * seg as u64, 2 * seg as u64));
            // Over the whole budget, those read through go before the rest.
            let big = (DECODED_BUDGET / 2) as usize;
            k.put((1, 5), Bytes::from(vec![3u8; big]), true);
            k.put((1, 6), Bytes::from(vec![3u8; big]), true);
            assert!(!has(&k, 3) && !has(&k, 4) && has(&k, 5) && has(&k, 6));
            assert!(k.bytes <= DECODED_BUDGET && k.through_bytes == 0);
        }

        #[test]
        fn segments_read_keep_to_their_share_and_those_ahead_wait_for_their_reader() {
            let mut k = Kept::new();
            let seg = (READ_KEPT / 4) as usize;
            let has = |k: &Kept, i: usize| k.lru.contains(&(2, i));
            // Loaded ahead of a reader: the budget beyond READ_KEPT is theirs.
            let ahead = ((DECODED_BUDGET - READ_KEPT) / seg as u64) as usize;
            for i in 0..ahead {
                assert!(k.put((2, i), Bytes::from(vec![4u8; seg]), true).is_empty());
            }
            // The reader reads them in turn; those it read beyond READ_KEPT
            // go, oldest first, and none of those still ahead of it.
            for i in 0..ahead {
                assert!(k.get(&(2, i)).is_some());
                k.evict();
                assert!(k.read_bytes() <= READ_KEPT);
                assert!((i + 1..ahead).all(|j| has(&k, j)), "one ahead went");
            }
            assert!((0..ahead - 4).all(|i| !has(&k, i)));
            assert!((ahead - 4..ahead).all(|i| has(&k, i)));
            // Loaded for a reader: within READ_KEPT at once.
            for i in 100..106 {
                k.put((2, i), Bytes::from(vec![4u8; seg]), false);
            }
            assert!((102..106).all(|i| has(&k, i)) && k.read_bytes() == READ_KEPT);
            assert_eq!(k.ahead_bytes, 0);
        }
    }
}

/// Inflated segments' buffers, reused. A segment inflates into about 2 MiB;
/// freed and allocated again for every segment a reader walks through,
/// they left glibc's arenas holding some 50 MB more than was in use after
/// reading a 45,000-file session, while having the allocator hand such
/// buffers back to the kernel each time (a lower mmap threshold) made
/// that read 20 % slower. A few buffers evicted from the LRU, no longer
/// shared with a reader, wait here for the next inflate instead.
mod spare {
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Most buffers kept (about 2 MiB each).
    const KEPT: usize = 4;

    static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn spare() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
        SPARE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer to inflate into: a kept one, or a new empty one.
    pub fn take() -> Vec<u8> {
        spare().pop().unwrap_or_default()
    }

    /// Keeps the buffer of an evicted segment, if no reader holds it still.
    pub fn give(evicted: Bytes) {
        if let Ok(buf) = evicted.try_into_mut() {
            let mut kept = spare();
            if kept.len() < KEPT {
                kept.push(buf.into());
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn an_evicted_buffer_is_reused_unless_a_reader_holds_it() {
            let buf = vec![5u8; 1 << 20];
            let at = buf.as_ptr();
            let held = Bytes::from(buf);
            let reader = held.clone();
            give(held);
            // Other tests may take and give buffers meanwhile: look for ours.
            let mut taken: Vec<Vec<u8>> = (0..KEPT).map(|_| take()).collect();
            assert!(taken.iter().all(|b| b.as_ptr() != at), "held by a reader");
            taken.clear();
            give(reader);
            let taken: Vec<Vec<u8>> = (0..KEPT).map(|_| take()).collect();
            assert!(taken.iter().any(|b| b.as_ptr() == at && b.len() == 1 << 20));
        }
    }
}

/// Readahead inflates under way at once: one per core, taken in the order
/// asked for (the semaphore is fair), so the segment a reader needs next is
/// done first instead of every segment of a window sharing the cores and
/// finishing together. Loads a reader waits for do not queue here.
fn inflaters() -> &'static tokio::sync::Semaphore {
    static INFLATERS: std::sync::LazyLock<tokio::sync::Semaphore> =
        std::sync::LazyLock::new(|| {
            tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
        });
    &INFLATERS
}

/// Segments this reader has claimed to load. Each is published on its own
/// as soon as it is inflated (see [`Claim::publish`]); dropping the claim
/// takes what is left (failed loads) out of the in-flight map. Either way
/// the segment's sender is dropped, which wakes whoever waits for it.
struct Claim {
    segments: Arc<Segments>,
    indices: Vec<usize>,
    done: Mutex<HashMap<usize, watch::Sender<()>>>,
}

impl Claim {
    /// Puts a loaded segment in the LRU, then wakes its waiters.
    fn publish(&self, i: usize, raw: Bytes, ahead: bool) {
        {
            let mut st = self.segments.lock();
            decoded::put(self.segments.id, i, raw, ahead);
            st.inflight.remove(&i);
        }
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&i);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let left = std::mem::take(self.done.get_mut().unwrap_or_else(|p| p.into_inner()));
        // Out of the map first, then the senders dropped: a woken waiter
        // that claims the segment again must not see its claim removed.
        let mut st = self.segments.lock();
        for i in left.keys() {
            st.inflight.remove(i);
        }
        drop(st);
        drop(left);
    }
}

/// Ids of object versions' segments in [`decoded`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Segments {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: &str,
        etag: &str,
        size: u64,
        segs: Vec<Segment>,
        entries: &[Entry],
    ) -> Segments {
        Segments {
            store,
            key: key.to_owned(),
            etag: etag.to_owned(),
            size,
            data_ends: data_ends(&segs, entries),
            state: Mutex::new(State {
                inflight: HashMap::new(),
                last: None,
                behind: None,
                read_through: vec![false; segs.len()],
            }),
            segs,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tar-stream bytes `start..end`. `limit` is where the file being read
    /// ends in the tar stream: readahead never goes past it. `pass`: the
    /// read is part of one pass over the files, in order (see
    /// [`super::reader::Pace::Pass`]).
    pub async fn read(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        limit: u64,
        pass: bool,
    ) -> Result<Bytes, TarballError> {
        let first = self.segs.partition_point(|s| s.uo + s.ul <= start);
        let last = self.segs.partition_point(|s| s.uo < end);
        if first >= last {
            return Err(TarballError::Corrupt(format!(
                "no segment holds tar bytes {start}..{end}"
            )));
        }
        let mut raws: Vec<Option<Bytes>> = vec![None; last - first];
        let mut waits = Vec::new();
        let claim = {
            let mut st = self.lock();
            let mut mine = Vec::new();
            for i in first..last {
                if let Some(raw) = decoded::get(self.id, i) {
                    raws[i - first] = Some(raw);
                } else if let Some(rx) = st.inflight.get(&i) {
                    waits.push((i, rx.clone()));
                } else {
                    mine.push(i);
                }
            }
            let sequential = st.last.is_some_and(|l| first == l || first == l + 1);
            st.last = Some(last - 1);
            // A pass does not come back to the segments it read through:
            // they go now, not when the budget pushes them out. Only a
            // pass says so: readers of a mount or of the API, many at once
            // and over the same files, would let go of what others read.
            if let Some((lo, hi)) = st.behind.filter(|&(lo, _)| pass && first > lo) {
                for i in lo..=hi.min(first - 1) {
                    decoded::release(self.id, i);
                }
                st.behind = None;
            }
            let claim = self.claim(&mut st, mine);
            let ahead = if sequential {
                self.claim_ahead(&mut st, last, limit)
            } else {
                None
            };
            drop(st);
            if let Some(ahead) = ahead {
                let segments = self.clone();
                tokio::spawn(async move {
                    let deadline = crate::store::deadline::read_deadline();
                    match tokio::time::timeout(deadline, segments.load(&ahead, true)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::debug!(key = %segments.key, "readahead: {e}"),
                        // Dropping the load frees its claim: readers waiting
                        // on those segments fetch them themselves.
                        Err(_) => {
                            tracing::debug!(key = %segments.key, "readahead: no answer within {deadline:?}")
                        }
                    }
                });
            }
            claim
        };
        for (i, raw) in self.load(&claim, false).await? {
            raws[i - first] = Some(raw);
        }
        drop(claim);
        for (i, mut rx) in waits {
            // Err: the loader is gone (done or failed); either way look again.
            let _ = rx.changed().await;
            let found = decoded::get(self.id, i);
            let raw = match found {
                Some(raw) => raw,
                None => {
                    let claim = {
                        let mut st = self.lock();
                        self.claim(&mut st, vec![i])
                    };
                    let mut got = self.load(&claim, false).await?;
                    got.pop().map(|(_, raw)| raw).ok_or_else(|| {
                        TarballError::Corrupt(format!("segment {i} was not loaded"))
                    })?
                }
            };
            raws[i - first] = Some(raw);
        }
        // A file read to its end, the last of its segment (headers of
        // entries without bytes may follow), or in a segment whose last
        // file was read before: it was inflated again for a file its
        // reader read out of order, and is done with once that is.
        if !pass && end == limit {
            let seg = last - 1;
            let through = {
                let mut st = self.lock();
                st.read_through[seg] |= self.data_ends[seg] == end;
                st.read_through[seg]
            };
            if through {
                decoded::read_through(self.id, seg);
            }
        }
        if pass {
            let through_last = self.segs[last - 1].uo + self.segs[last - 1].ul <= end + TAR_BLOCK;
            let hi = if through_last {
                Some(last - 1)
            } else {
                (last - 1).checked_sub(1)
            };
            if let Some(hi) = hi.filter(|&hi| hi >= first) {
                self.lock().behind = Some((first, hi));
            }
        }
        if let ([seg], [Some(raw)]) = (&self.segs[first..last], &raws[..]) {
            if end - start >= SHARED_READ {
                let from = (start - seg.uo) as usize;
                return Ok(raw.slice(from..from + (end - start) as usize));
            }
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for (seg, raw) in self.segs[first..last].iter().zip(raws.iter()) {
            let raw = raw
                .as_ref()
                .ok_or_else(|| TarballError::Corrupt("a segment was not loaded".into()))?;
            let from = start.saturating_sub(seg.uo).min(seg.ul) as usize;
            let to = (end - seg.uo).min(seg.ul) as usize;
            out.extend_from_slice(&raw[from..to]);
        }
        Ok(out.freeze())
    }

    fn claim(self: &Arc<Self>, st: &mut State, indices: Vec<usize>) -> Claim {
        let mut done = HashMap::with_capacity(indices.len());
        for &i in &indices {
            let (tx, rx) = watch::channel(());
            st.inflight.insert(i, rx);
            done.insert(i, tx);
        }
        Claim {
            segments: self.clone(),
            indices,
            done: Mutex::new(done),
        }
    }

    /// Claims the segments after `from` that hold bytes before `limit`, up
    /// to [`AHEAD_BYTES`], skipping those already loaded or in flight. The
    /// window is topped up once half of it is missing (or the file ends in
    /// it): a GET per half window (8 MiB) rather than one per segment, and
    /// the next GET under way while the last one's segments inflate.
    fn claim_ahead(self: &Arc<Self>, st: &mut State, from: usize, limit: u64) -> Option<Claim> {
        let mut wanted = Vec::new();
        let (mut window, mut missing) = (0, 0);
        let mut file_ends = true;
        for (i, seg) in self.segs.iter().enumerate().skip(from) {
            if seg.uo >= limit {
                break;
            }
            if window >= AHEAD_BYTES {
                file_ends = false;
                break;
            }
            window += seg.ul;
            if !decoded::contains(self.id, i) && !st.inflight.contains_key(&i) {
                wanted.push(i);
                missing += seg.ul;
            }
        }
        let worth = missing > 0 && (file_ends || 2 * missing >= AHEAD_BYTES);
        worth.then(|| self.claim(st, wanted))
    }

    /// Loads the claimed segments: one GET per run of up to [`RUN_SEGMENTS`]
    /// adjacent ones, all under way at once, every segment inflated on the
    /// blocking pool as soon as its GET is done and published as soon as it
    /// is inflated.
    async fn load(&self, claim: &Claim, ahead: bool) -> Result<Vec<(usize, Bytes)>, TarballError> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &i in &claim.indices {
            match runs.last_mut() {
                Some((lo, hi)) if *hi + 1 == i && i - *lo < RUN_SEGMENTS => *hi = i,
                _ => runs.push((i, i)),
            }
        }
        let fetches = runs.iter().map(|&(lo, hi)| async move {
            let co_start = self.segs[lo].co;
            let body = self
                .fetch(co_start, self.segs[hi].co + self.segs[hi].cl)
                .await?;
            let inflates = (lo..=hi).map(|i| {
                let seg = self.segs[i].clone();
                let at = (seg.co - co_start) as usize;
                let compressed = body.slice(at..at + seg.cl as usize);
                async move {
                    let _turn = match ahead {
                        true => Some(inflaters().acquire().await),
                        false => None,
                    };
                    let raw =
                        tokio::task::spawn_blocking(move || verify_segment(i, &seg, &compressed))
                            .await
                            .map_err(|e| {
                                TarballError::Corrupt(format!("inflate worker failed: {e}"))
                            })??;
                    let raw = Bytes::from(raw);
                    claim.publish(i, raw.clone(), ahead);
                    Ok::<_, TarballError>((i, raw))
                }
            });
            futures::future::try_join_all(inflates).await
        });
        Ok(futures::future::try_join_all(fetches)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Object bytes `start..end`, pinned to the version opened.
    async fn fetch(&self, start: u64, end: u64) -> Result<Bytes, TarballError> {
        fetch_pinned(
            self.store.as_ref(),
            &self.key,
            &self.etag,
            self.size,
            start,
            end,
        )
        .await
    }
}

/// For each segment, where the last file bytes in it end in the tar stream
/// (0 when it holds none). Sparse files are left out: their stored bytes
/// are not their size.
fn data_ends(segs: &[Segment], entries: &[Entry]) -> Vec<u64> {
    let mut ends = vec![0u64; segs.len()];
    for e in entries {
        if e.t != Kind::File || e.s == 0 || e.sp().is_some() {
            continue;
        }
        let end = e.data_offset + e.s;
        let i = segs.partition_point(|g| g.uo + g.ul < end);
        if let Some(slot) = ends.get_mut(i) {
            *slot = (*slot).max(end);
        }
    }
    ends
}

/// Bytes `start..end` of the version `etag` (of `size` bytes) of `key`.
pub async fn fetch_pinned(
    store: &dyn ObjectStore,
    key: &str,
    etag: &str,
    size: u64,
    start: u64,
    end: u64,
) -> Result<Bytes, TarballError> {
    let got = store
        .get(
            key,
            GetOptions::range(ByteRange::Bounded { start, end })
                .if_match(etag.to_owned())
                .of_size(size),
        )
        .await
        .map_err(changed_or)?;
    if got.body.len() as u64 != end - start {
        return Err(TarballError::Corrupt(
            "object shorter than its index says".into(),
        ));
    }
    Ok(got.body)
}

/// A read pinned to an ETag fails with a precondition error when the object
/// was replaced since the open.
pub fn changed_or(e: StoreError) -> TarballError {
    match e {
        StoreError::PreconditionFailed { .. } => TarballError::ObjectChanged,
        e => TarballError::Store(e),
    }
}

/// Inflates one segment, refusing it unless digest, length and CRC all match.
pub fn verify_segment(
    index: usize,
    seg: &Segment,
    compressed: &[u8],
) -> Result<Vec<u8>, TarballError> {
    let bad = |what: String| TarballError::BadSegment {
        index,
        start: seg.co,
        end: seg.co + seg.cl,
        what,
    };
    let digest = blake3::hash(compressed);
    if super::tar_header::hex_encode(&digest.as_bytes()[..16]) != seg.d {
        return Err(bad("digest mismatch".into()));
    }
    let raw = inflate_exact_into(compressed, seg.ul as usize, spare::take())
        .map_err(|e| bad(format!("{e:?}")))?;
    if crc32fast::hash(&raw) != seg.crc {
        return Err(bad("CRC mismatch".into()));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::reader::{Pace, SessionReader};
    use super::super::tree::walk;
    use super::super::writer::{pack_entries, PackOptions};
    use super::decoded;
    use crate::store::local::LocalStore;
    use crate::store::{ObjectStore, PutOptions};

    /// Six files of 1.5 MiB, each in a segment of its own.
    async fn session(dir: &std::path::Path) -> SessionReader {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("workspace")).unwrap();
        for i in 0..6u8 {
            let bytes: Vec<u8> = (0..3 << 19).map(|n: u32| (n % 251) as u8 ^ i).collect();
            std::fs::write(tree.join(format!("workspace/f{i}")), bytes).unwrap();
        }
        let mut object = Vec::new();
        pack_entries(
            walk(&tree).unwrap(),
            &mut object,
            &PackOptions::default(),
            &|_| {},
        )
        .unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::open(dir.join("store"), "bucket").unwrap());
        store
            .put("s/session.tar.gz", object.into(), PutOptions::default())
            .await
            .unwrap();
        SessionReader::open(store, "s/session.tar.gz", None)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pass_lets_go_of_what_it_read_through_and_other_readers_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let reader = session(dir.path()).await;
        let seg_of = |i: u8| {
            let e = reader.stat(&format!("workspace/f{i}")).unwrap();
            reader
                .toc()
                .segments
                .partition_point(|s| s.uo + s.ul <= e.data_offset)
        };
        let held = |i: u8| decoded::contains(reader.segments().id, seg_of(i));
        let whole = 3 << 19;
        // Readers that are not a pass (a mount's, the API's) going forward
        // file after file: the segments they read through go first, the
        // last of them kept (4 MiB: two of 1.5 MiB).
        for i in 0..6u8 {
            let got = reader
                .read(&format!("workspace/f{i}"), 0, whole)
                .await
                .unwrap();
            assert_eq!(got.len(), whole as usize);
        }
        assert!((0..4).all(|i| !held(i)) && held(4) && held(5));
        // Read only in part, a file's segment stays, however many others
        // are read through after it.
        reader.read("workspace/f0", 0, 1 << 20).await.unwrap();
        for i in 1..6u8 {
            reader
                .read(&format!("workspace/f{i}"), 0, whole)
                .await
                .unwrap();
        }
        assert!(held(0) && !held(1) && held(5));
        // A pass: each file's segment goes once the pass reads the next.
        for i in 0..6u8 {
            let path = format!("workspace/f{i}");
            reader.read_with(&path, 0, whole, Pace::Pass).await.unwrap();
            assert!(held(i), "f{i} just read");
            if i >= 1 {
                assert!(!held(i - 1), "f{} read through and passed", i - 1);
            }
        }
        // Reading back within a pass is not reading past: nothing goes.
        reader
            .read_with("workspace/f2", 0, whole, Pace::Pass)
            .await
            .unwrap();
        reader
            .read_with("workspace/f1", 0, whole, Pace::Pass)
            .await
            .unwrap();
        assert!(held(1) && held(2) && held(5));
    }
}
