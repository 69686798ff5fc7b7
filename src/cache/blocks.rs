//! The on-disk block cache: object bytes in fixed-size blocks, keyed by
//! store, key, ETag and block number, kept under a byte budget.
//!
//! - One file per block (`blocks/ab/abcdef….blk`): a header (magic, length,
//!   CRC32 of the data, the block's id) then the data. The header is checked
//!   on every read; a block that fails is deleted and fetched again, never
//!   served.
//! - Blocks are written to a temporary file and renamed into place, so a crash
//!   or a second process never sees half a block. Several processes may share
//!   one directory: each keeps its own LRU over what it has seen, and a block
//!   another process evicted is simply a miss.
//! - The LRU (`lru`) holds every block's size; inserting past the budget
//!   deletes the least recently used files. A reader that already opened a
//!   block keeps reading it after eviction (Unix unlink semantics).
//! - At start the directory is scanned, so the cache survives a restart;
//!   every few blocks written, and when the process lets go of the cache,
//!   it is scanned again for blocks other processes wrote, so that the
//!   shared directory keeps to the budget too.
//! - One fetch per block at a time: concurrent readers of a missing block wait
//!   for the first reader's fetch. Adjacent missing blocks go in one GET.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;

/// Default block size.
pub const BLOCK_SIZE: u64 = 1 << 20;
const MAGIC: &[u8; 4] = b"SFB1";
const HEADER_LEN: usize = 4 + 4 + 4 + 16;

/// Which block: a digest of (store, key, ETag, block number).
pub type BlockId = [u8; 16];

pub fn block_id(store: &str, key: &str, etag: &str, block: u64) -> BlockId {
    id_of(store, key, etag, block, "")
}

/// Which fragment: the bytes of one small read that starts in block
/// `block`, kept while the whole block is not (see
/// [`crate::store::cached`]). The file holds the fragment's object offset
/// (8 bytes, little-endian) and then its bytes.
pub fn fragment_id(store: &str, key: &str, etag: &str, block: u64) -> BlockId {
    id_of(store, key, etag, block, "fragment")
}

fn id_of(store: &str, key: &str, etag: &str, block: u64, kind: &str) -> BlockId {
    let mut h = blake3::Hasher::new();
    for part in [store, key, etag] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&block.to_le_bytes());
    // Nothing for whole blocks, so their ids (and caches on disk) stay as they were.
    h.update(kind.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

/// What happened to cached blocks, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub evicted: u64,
    pub bytes: u64,
}

pub struct BlockCache {
    dir: PathBuf,
    tmp: PathBuf,
    budget: u64,
    block_size: u64,
    state: Mutex<State>,
    inflight: Mutex<HashMap<BlockId, Arc<tokio::sync::Mutex<()>>>>,
    /// Blocks written, to look for other processes' every [`RESCAN_WRITES`].
    writes: AtomicU64,
    /// `writes` when the last look at the others' blocks began.
    adopted_at: AtomicU64,
    /// A look at the others' blocks is under way (one at a time).
    adopting: AtomicBool,
}

/// Blocks this process writes between two looks at the blocks other
/// processes sharing the directory wrote ([`BlockCache::adopt_others`]).
const RESCAN_WRITES: u64 = 16;

impl Drop for BlockCache {
    /// A process that wrote blocks leaves the cache within the budget,
    /// also counting what others wrote meanwhile. One that only read
    /// (a CLI `cat` of cached files) exits without scanning the directory.
    fn drop(&mut self) {
        if *self.writes.get_mut() > 0 {
            self.adopt_others();
        }
    }
}

/// The block files under `dir` whose ids `wanted` takes, oldest first:
/// (mtime, id, data length).
fn scan(
    dir: &Path,
    mut wanted: impl FnMut(&BlockId) -> bool,
) -> io::Result<Vec<(i64, BlockId, u64)>> {
    let mut found = Vec::new();
    for shard in fs::read_dir(dir)?.flatten() {
        let Ok(files) = fs::read_dir(shard.path()) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name();
            let Some(id) = name.to_str().and_then(parse_hex).filter(|id| wanted(id)) else {
                continue;
            };
            let Ok(md) = file.metadata() else { continue };
            found.push((md.mtime(), id, md.len().saturating_sub(HEADER_LEN as u64)));
        }
    }
    found.sort();
    Ok(found)
}

struct State {
    lru: LruCache<BlockId, u64>,
    stats: CacheStats,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

fn hex(id: &BlockId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(name: &str) -> Option<BlockId> {
    let name = name.strip_suffix(".blk")?;
    if name.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

impl BlockCache {
    /// Opens (creating) the cache in `dir` with a budget of `budget` bytes,
    /// taking in the blocks a previous run left, oldest first.
    pub fn open(dir: &Path, budget: u64, block_size: u64) -> io::Result<BlockCache> {
        let blocks = dir.join("blocks");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&blocks)?;
        fs::create_dir_all(&tmp)?;
        // Leftovers of crashed writers; recent files may belong to another
        // process sharing the directory, mid-write.
        for entry in fs::read_dir(&tmp)?.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(600));
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
        let found = scan(&blocks, |_| true)?;
        let cache = BlockCache {
            dir: blocks,
            tmp,
            budget,
            block_size,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                stats: CacheStats::default(),
            }),
            inflight: Mutex::new(HashMap::new()),
            writes: AtomicU64::new(0),
            adopted_at: AtomicU64::new(0),
            adopting: AtomicBool::new(false),
        };
        for (_, id, len) in found {
            cache.account(id, len);
        }
        Ok(cache)
    }

    /// Takes in the blocks other processes sharing the directory wrote
    /// since this one last looked, as the least recently used, and evicts
    /// past the budget: each process keeps to the budget what it knows of,
    /// so without this the directory grew by what the others wrote and
    /// this one never read. It reads the whole directory, so it runs
    /// every [`RESCAN_WRITES`] blocks written, off the async runtime
    /// ([`BlockCache::adopt_others_soon`]), and when the process lets go.
    fn adopt_others(&self) {
        if self.adopting.swap(true, Ordering::Acquire) {
            return;
        }
        self.adopted_at
            .store(self.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.adopt_unknown();
        self.adopting.store(false, Ordering::Release);
    }

    /// After a write: a look at the others' blocks when one is due, on the
    /// blocking pool when a tokio runtime runs this thread.
    pub(crate) fn adopt_others_soon(self: &Arc<Self>) {
        let writes = self.writes.load(Ordering::Relaxed);
        if writes < self.adopted_at.load(Ordering::Relaxed) + RESCAN_WRITES {
            return;
        }
        let cache = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || cache.adopt_others())),
            Err(_) => cache.adopt_others(),
        }
    }

    fn adopt_unknown(&self) {
        let known = |id: &BlockId| self.lock_state().lru.contains(id);
        let Ok(found) = scan(&self.dir, |id| !known(id)) else {
            return;
        };
        let evict = {
            let mut st = self.lock_state();
            // Newest first, each to the cold end: the oldest goes first.
            for (_, id, len) in found.iter().rev() {
                if let Some(old) = st.lru.put(*id, *len) {
                    st.stats.bytes -= old;
                }
                st.lru.demote(id);
                st.stats.bytes += len;
            }
            self.over_budget(&mut st)
        };
        for victim in evict {
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn stats(&self) -> CacheStats {
        self.lock_state().stats
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &BlockId) -> PathBuf {
        let name = hex(id);
        self.dir.join(&name[..2]).join(format!("{name}.blk"))
    }

    /// Records a block and evicts least recently used ones past the budget.
    fn account(&self, id: BlockId, len: u64) {
        let evict = {
            let mut st = self.lock_state();
            if let Some(old) = st.lru.put(id, len) {
                st.stats.bytes -= old;
            }
            st.stats.bytes += len;
            self.over_budget(&mut st)
        };
        for victim in evict {
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    /// Takes least recently used blocks out until the budget holds; the
    /// caller deletes their files (outside the lock).
    fn over_budget(&self, st: &mut State) -> Vec<BlockId> {
        let mut evict = Vec::new();
        while st.stats.bytes > self.budget && st.lru.len() > 1 {
            let Some((victim, size)) = st.lru.pop_lru() else {
                break;
            };
            st.stats.bytes -= size;
            st.stats.evicted += 1;
            evict.push(victim);
        }
        evict
    }

    fn forget(&self, id: &BlockId) {
        let mut st = self.lock_state();
        if let Some(len) = st.lru.pop(id) {
            st.stats.bytes -= len;
        }
    }

    /// Whether the block is cached, without reading it: one `stat`. (A
    /// damaged block is found, and fetched again, when it is read.)
    pub fn holds(&self, id: &BlockId) -> bool {
        self.path(id).exists()
    }

    /// The block, if cached and sound. A damaged one is deleted.
    pub fn read(&self, id: &BlockId) -> Option<Bytes> {
        let path = self.path(id);
        let mut file = File::open(&path).ok()?;
        let mut raw = Vec::new();
        if file.read_to_end(&mut raw).is_err() || !sound(&raw, id) {
            tracing::warn!(path = %path.display(), "cached block failed its check; fetching it again");
            let _ = fs::remove_file(&path);
            self.forget(id);
            self.lock_state().stats.corrupt += 1;
            return None;
        }
        let mut st = self.lock_state();
        st.stats.hits += 1;
        if st.lru.get(id).is_none() {
            // Written by another process sharing the directory: count it now.
            drop(st);
            self.account(*id, (raw.len() - HEADER_LEN) as u64);
        }
        Some(Bytes::from(raw).slice(HEADER_LEN..))
    }

    /// Stores a block (atomically: temporary file, then rename).
    pub fn write(&self, id: &BlockId, data: &[u8]) -> io::Result<()> {
        let path = self.path(id);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self
            .tmp
            .join(format!("{}.{:x}", hex(id), rand::random::<u64>()));
        let mut file = match File::create(&tmp) {
            // The cache directory was deleted under a running process:
            // made again, so caching goes on (the block directory above
            // was recreated the same way).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.tmp)?;
                tracing::warn!(dir = %self.dir.display(), "the block cache directory went away; made it again");
                File::create(&tmp)?
            }
            other => other?,
        };
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(data.len() as u32).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        header.extend_from_slice(id);
        let written = file.write_all(&header).and_then(|()| file.write_all(data));
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.account(*id, data.len() as u64);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn miss(&self) {
        self.lock_state().stats.misses += 1;
    }

    /// The lock that makes one fetch per block at a time.
    pub(crate) fn flight(&self, id: &BlockId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(*id).or_default().clone()
    }

    pub(crate) fn land(&self, id: &BlockId) {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and the lander hold it: nobody else is waiting.
        if map.get(id).is_some_and(|m| Arc::strong_count(m) <= 2) {
            map.remove(id);
        }
    }

    /// Bytes on disk under the blocks directory (for tests of the budget).
    pub fn disk_usage(&self) -> u64 {
        let mut total = 0;
        if let Ok(shards) = fs::read_dir(&self.dir) {
            for shard in shards.flatten() {
                if let Ok(files) = fs::read_dir(shard.path()) {
                    total += files
                        .flatten()
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| m.len().saturating_sub(HEADER_LEN as u64))
                        .sum::<u64>();
                }
            }
        }
        total
    }

    /// Where block `id` lives (tests damage it on purpose).
    pub fn block_path(&self, id: &BlockId) -> PathBuf {
        self.path(id)
    }
}

fn sound(raw: &[u8], id: &BlockId) -> bool {
    if raw.len() < HEADER_LEN || &raw[..4] != MAGIC || &raw[12..28] != id {
        return false;
    }
    let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
    let crc = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    raw.len() - HEADER_LEN == len && crc32fast::hash(&raw[HEADER_LEN..]) == crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 10 << 20, BLOCK_SIZE).unwrap();
        let id = block_id("s", "k", "\"e\"", 3);
        cache.write(&id, b"block data").unwrap();
        assert_eq!(&cache.read(&id).unwrap()[..], b"block data");
        let path = cache.block_path(&id);
        let mut raw = fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(&path, raw).unwrap();
        assert!(cache.read(&id).is_none());
        assert!(!path.exists());
        assert_eq!(cache.stats().corrupt, 1);
    }

    #[test]
    fn a_cache_directory_deleted_under_it_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let cache = BlockCache::open(&root, 10 << 20, BLOCK_SIZE).unwrap();
        let (a, b) = (block_id("s", "k", "e", 1), block_id("s", "k", "e", 2));
        cache.write(&a, b"first").unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert!(cache.read(&a).is_none(), "gone with the directory: a miss");
        cache.write(&b, b"second").unwrap();
        assert_eq!(&cache.read(&b).unwrap()[..], b"second");
        assert!(cache.block_path(&b).exists());
    }

    #[test]
    fn the_budget_evicts_least_recently_used_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 3000, 1000).unwrap();
        let ids: Vec<BlockId> = (0..5).map(|i| block_id("s", "k", "e", i)).collect();
        for id in &ids[..3] {
            cache.write(id, &[1u8; 1000]).unwrap();
        }
        assert!(cache.read(&ids[0]).is_some()); // 0 is now the most recent
        cache.write(&ids[3], &[1u8; 1000]).unwrap();
        assert!(
            cache.read(&ids[1]).is_none(),
            "1 was the least recently used"
        );
        assert!(cache.read(&ids[0]).is_some());
        assert!(cache.disk_usage() <= 3000);
        // A restart keeps what is there.
        drop(cache);
        let again = BlockCache::open(dir.path(), 3000, 1000).unwrap();
        assert!(again.read(&ids[0]).is_some());
        assert_eq!(again.stats().bytes, 3000);
    }
}
