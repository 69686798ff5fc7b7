//! A store that serves ranged reads of a pinned object version from the block
//! cache ([`crate::cache::blocks`]) and fetches only the blocks it lacks:
//! adjacent missing blocks in one GET, each block once however many readers
//! want it. A read that continues where the previous one of the same object
//! ended starts a background readahead of the next blocks (fetching those
//! the cache lacks, without reading those it has). A small read
//! that does not, of blocks not cached, fetches only its own bytes (kept as
//! a fragment; see [`Inner::fragment`]) unless it comes in a burst of them.
//!
//! Only reads that name both a byte range and an ETag (`If-Match`) are cached:
//! the ETag is what makes cached bytes valid forever. Everything else passes
//! through, and so do reads marked [`GetOptions::once`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{
    ByteRange, CompletedPart, CopySource, DeleteOutcome, GetOptions, GetResult, GetStream,
    ListPage, ListRequest, ObjectMeta, ObjectStore, Precondition, PutOptions, PutResult, Result,
    StoreError,
};
use crate::cache::blocks::{block_id, fragment_id, BlockCache, BlockId};

/// Blocks read ahead once reads are sequential.
pub const READAHEAD_BLOCKS: u64 = 4;

/// A cold small read fetches only its bytes (a fragment) when the object
/// was not read for this long: reads closer together are a burst (a scan,
/// a build, `grep -r`, a large file read in pieces), which whole blocks
/// serve in fewer requests and bytes. (Reading every file of a
/// 45,000-file session cold fetched 10 % more with a fragment per read.)
const FRAGMENT_QUIET: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct CachedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    store_id: String,
    cache: Arc<BlockCache>,
    /// What a HEAD or GET said of each version, to answer cached reads.
    metas: Mutex<HashMap<(String, String), ObjectMeta>>,
    /// Per key: where the last read ended and when, to spot sequential
    /// reads and bursts ([`FRAGMENT_QUIET`]).
    last_read: Mutex<HashMap<String, (u64, Instant)>>,
}

/// How a read looks for blocks in the cache.
#[derive(Clone, Copy)]
enum Look {
    /// Reads each cached block: its bytes are wanted.
    Read,
    /// Only asks whether the block is cached (an empty stand-in if so).
    Present,
}

/// A run of blocks and those of them the cache held when looked at.
struct Cached {
    first: u64,
    ids: Vec<BlockId>,
    got: Vec<Option<Bytes>>,
}

impl CachedStore {
    pub fn new(store: Arc<dyn ObjectStore>, cache: Arc<BlockCache>) -> CachedStore {
        CachedStore {
            inner: Arc::new(Inner {
                store_id: store.describe(),
                store,
                cache,
                metas: Mutex::new(HashMap::new()),
                last_read: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn cache(&self) -> &BlockCache {
        &self.inner.cache
    }
}

impl Inner {
    fn remember(&self, meta: &ObjectMeta) {
        let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        metas.insert((meta.key.clone(), meta.etag.clone()), meta.clone());
    }

    /// The version's meta: remembered, else from `size` (the caller's TOC
    /// knows it; blocks are keyed by the ETag, so a wrong version is never
    /// served), else a HEAD.
    async fn meta(&self, key: &str, etag: &str, size: Option<u64>) -> Result<ObjectMeta> {
        let known = {
            let metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
            metas.get(&(key.to_owned(), etag.to_owned())).cloned()
        };
        if let Some(meta) = known {
            return Ok(meta);
        }
        if let Some(size) = size {
            let meta = ObjectMeta::known(key, etag, size);
            self.remember(&meta);
            return Ok(meta);
        }
        let meta = self.store.head(key).await?;
        if meta.etag != etag {
            return Err(StoreError::precondition("get", key));
        }
        self.remember(&meta);
        Ok(meta)
    }

    /// Blocks `first..=last` of a version as `look` finds them in the
    /// cache: [`Look::Read`] reads each once, [`Look::Present`] only asks.
    fn cached(&self, key: &str, etag: &str, first: u64, last: u64, look: Look) -> Cached {
        let ids: Vec<BlockId> = (first..=last)
            .map(|b| block_id(&self.store_id, key, etag, b))
            .collect();
        let got = ids.iter().map(|id| self.look(id, look)).collect();
        Cached { first, ids, got }
    }

    fn look(&self, id: &BlockId, look: Look) -> Option<Bytes> {
        match look {
            Look::Read => self.cache.read(id),
            Look::Present => self.cache.holds(id).then(Bytes::new),
        }
    }

    /// Fetches what the cache lacks of blocks `first..=last` of a version,
    /// without reading what it has: readahead wants the blocks on disk for
    /// the reads to come, not in memory now. (Reading them cost each
    /// sequential read 4 MiB copied from the page cache, and as much
    /// memory for a moment.)
    async fn prefetch(&self, key: &str, etag: &str, first: u64, last: u64) -> Result<()> {
        let cached = self.cached(key, etag, first, last, Look::Present);
        self.complete(key, etag, cached, Look::Present)
            .await
            .map(drop)
    }

    /// The blocks a [`Cached`] lacks, fetched (or waited for); those another
    /// reader fetched meanwhile are looked at as `look` says.
    async fn complete(
        &self,
        key: &str,
        etag: &str,
        cached: Cached,
        look: Look,
    ) -> Result<Vec<Bytes>> {
        let Cached {
            first,
            ids,
            mut got,
        } = cached;
        if got.iter().all(Option::is_some) {
            return Ok(got.into_iter().flatten().collect());
        }
        // Take the missing blocks' fetch locks in ascending order (no deadlock),
        // then look again: another reader may have fetched them meanwhile.
        let locks: Vec<_> = ids
            .iter()
            .zip(&got)
            .filter(|(_, b)| b.is_none())
            .map(|(id, _)| (*id, self.cache.flight(id)))
            .collect();
        let mut guards = Vec::with_capacity(locks.len());
        for (_, lock) in &locks {
            guards.push(lock.clone().lock_owned().await);
        }
        for (slot, id) in got.iter_mut().zip(&ids) {
            if slot.is_none() {
                *slot = self.look(id, look);
            }
        }
        let result = self.fetch_missing(key, etag, first, &ids, &mut got).await;
        drop(guards);
        for (id, _) in &locks {
            self.cache.land(id);
        }
        result?;
        Ok(got.into_iter().flatten().collect())
    }

    /// A read of less than one block's bytes that does not continue the
    /// previous one, while its blocks are not all cached, fetches only its own
    /// bytes and keeps them as a fragment of the block it starts in: a cold
    /// read of one small file then moves the segment that holds it, not the
    /// one or two whole blocks around it. The fragment answers later reads
    /// inside it. A read in the same block that it does not cover returns
    /// `None`, and the caller fetches the whole blocks: at most two requests
    /// per block, however many files in it are read. So does a cold read
    /// less than [`FRAGMENT_QUIET`] after the object's previous read
    /// (`quiet` false).
    async fn fragment(
        &self,
        key: &str,
        etag: &str,
        wanted: &std::ops::Range<u64>,
        first: u64,
        quiet: bool,
    ) -> Result<Option<Bytes>> {
        if wanted.end - wanted.start >= self.cache.block_size() {
            return Ok(None);
        }
        let id = fragment_id(&self.store_id, key, etag, first);
        let covered = |kept: Option<Bytes>| -> Option<Option<Bytes>> {
            let kept = kept?;
            let start = u64::from_le_bytes(kept.get(..8)?.try_into().ok()?);
            let bytes = kept.slice(8..);
            let end = start + bytes.len() as u64;
            Some((start <= wanted.start && wanted.end <= end).then(|| {
                bytes.slice((wanted.start - start) as usize..(wanted.end - start) as usize)
            }))
        };
        if let Some(answer) = covered(self.cache.read(&id)) {
            return Ok(answer);
        }
        if !quiet {
            return Ok(None);
        }
        let lock = self.cache.flight(&id);
        let guard = lock.lock_owned().await;
        let result = match covered(self.cache.read(&id)) {
            Some(answer) => Ok(answer),
            None => {
                self.cache.miss();
                let fetched = self
                    .store
                    .get(
                        key,
                        GetOptions::range(ByteRange::Bounded {
                            start: wanted.start,
                            end: wanted.end,
                        })
                        .if_match(etag.to_owned()),
                    )
                    .await;
                fetched.and_then(|fetched| {
                    if fetched.body.len() as u64 != wanted.end - wanted.start {
                        return Err(StoreError::Other {
                            op: "get",
                            key: key.to_owned(),
                            message: "the store answered a range of another length".to_owned(),
                        });
                    }
                    self.remember(&fetched.meta);
                    let mut kept = BytesMut::with_capacity(8 + fetched.body.len());
                    kept.extend_from_slice(&wanted.start.to_le_bytes());
                    kept.extend_from_slice(&fetched.body);
                    self.keep(&id, &kept);
                    Ok(Some(fetched.body))
                })
            }
        };
        drop(guard);
        self.cache.land(&id);
        result
    }

    /// Writes a fetched block or fragment to the cache; a failed write
    /// only means the bytes are served uncached.
    fn keep(&self, id: &BlockId, bytes: &[u8]) {
        match self.cache.write(id, bytes) {
            Ok(()) => self.cache.adopt_others_soon(),
            Err(e) => tracing::warn!("block cache write failed (serving uncached): {e}"),
        }
    }

    async fn fetch_missing(
        &self,
        key: &str,
        etag: &str,
        first: u64,
        ids: &[BlockId],
        got: &mut [Option<Bytes>],
    ) -> Result<()> {
        let bs = self.cache.block_size();
        let mut i = 0;
        while i < got.len() {
            if got[i].is_some() {
                i += 1;
                continue;
            }
            let run_start = i;
            while i < got.len() && got[i].is_none() {
                i += 1;
            }
            self.cache.miss();
            let start = (first + run_start as u64) * bs;
            let end = (first + i as u64) * bs;
            let fetched = self
                .store
                .get(
                    key,
                    GetOptions::range(ByteRange::Bounded { start, end }).if_match(etag.to_owned()),
                )
                .await?;
            self.remember(&fetched.meta);
            for (j, slot) in got.iter_mut().enumerate().take(i).skip(run_start) {
                let from = (j - run_start) as u64 * bs;
                if from >= fetched.body.len() as u64 {
                    break;
                }
                let to = (from + bs).min(fetched.body.len() as u64);
                let block = fetched.body.slice(from as usize..to as usize);
                self.keep(&ids[j], &block);
                *slot = Some(block);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for CachedStore {
    fn describe(&self) -> String {
        self.inner.store_id.clone()
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let meta = self.inner.store.head(key).await?;
        self.inner.remember(&meta);
        Ok(meta)
    }

    async fn get(&self, key: &str, opts: GetOptions) -> Result<GetResult> {
        let (Some(range), Some(etag), false) = (opts.range, opts.if_match.clone(), opts.once)
        else {
            return self.inner.store.get(key, opts).await;
        };
        let meta = self.inner.meta(key, &etag, opts.size).await?;
        let Some(wanted) = range.resolve(meta.size) else {
            return Err(StoreError::invalid_range(
                "get",
                key,
                &range,
                Some(meta.size),
            ));
        };
        let bs = self.inner.cache.block_size();
        let (first, last) = (wanted.start / bs, (wanted.end - 1) / bs);
        // Sequential: this read starts exactly where the previous one
        // ended. Quiet: the previous one was a while ago.
        let (sequential, quiet) = {
            let mut reads = self
                .inner
                .last_read
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match reads.insert(key.to_owned(), (wanted.end, Instant::now())) {
                Some((end, at)) => (end == wanted.start, at.elapsed() >= FRAGMENT_QUIET),
                None => (false, true),
            }
        };
        let cached = self.inner.cached(key, &etag, first, last, Look::Read);
        if !sequential && cached.got.iter().any(Option::is_none) {
            if let Some(body) = self
                .inner
                .fragment(key, &etag, &wanted, first, quiet)
                .await?
            {
                return Ok(GetResult {
                    meta,
                    range: wanted,
                    body,
                });
            }
        }
        let blocks = self.inner.complete(key, &etag, cached, Look::Read).await?;
        let mut body = BytesMut::with_capacity((wanted.end - wanted.start) as usize);
        for (i, block) in blocks.iter().enumerate() {
            let block_start = (first + i as u64) * bs;
            let from = wanted.start.saturating_sub(block_start) as usize;
            let to = ((wanted.end - block_start) as usize).min(block.len());
            if from < to {
                body.extend_from_slice(&block[from..to]);
            }
        }
        if body.len() as u64 != wanted.end - wanted.start {
            return Err(StoreError::Other {
                op: "get",
                key: key.to_owned(),
                message: "cached blocks are shorter than the object".to_owned(),
            });
        }
        let last_block = (meta.size - 1) / bs;
        if sequential && last < last_block {
            let inner = Arc::clone(&self.inner);
            let (key, ahead_to) = (key.to_owned(), (last + READAHEAD_BLOCKS).min(last_block));
            tokio::spawn(async move {
                // Bounded like any read (see `deadline`): its fetch locks
                // would otherwise hold later readers of these blocks
                // behind a dead connection.
                let deadline = super::deadline::read_deadline();
                let ahead = inner.prefetch(&key, &etag, last + 1, ahead_to);
                match tokio::time::timeout(deadline, ahead).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(key, "readahead failed: {e}"),
                    Err(_) => tracing::debug!(key, "readahead: no answer within {deadline:?}"),
                }
            });
        }
        Ok(GetResult {
            meta,
            range: wanted,
            body: body.freeze(),
        })
    }

    async fn get_stream(&self, key: &str, opts: GetOptions) -> Result<GetStream> {
        self.inner.store.get_stream(key, opts).await
    }

    async fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> Result<PutResult> {
        self.inner.store.put(key, body, opts).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.store.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<DeleteOutcome>> {
        self.inner.store.delete_many(keys).await
    }

    async fn list(&self, req: ListRequest) -> Result<ListPage> {
        self.inner.store.list(req).await
    }

    async fn list_all(&self, prefix: &str, delimiter: Option<&str>) -> Result<ListPage> {
        self.inner.store.list_all(prefix, delimiter).await
    }

    async fn create_multipart(&self, key: &str, opts: PutOptions) -> Result<String> {
        self.inner.store.create_multipart(key, opts).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        self.inner
            .store
            .upload_part(key, upload_id, part_number, body)
            .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource,
    ) -> Result<CompletedPart> {
        self.inner
            .store
            .upload_part_copy(key, upload_id, part_number, source)
            .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        precondition: Precondition,
    ) -> Result<PutResult> {
        self.inner
            .store
            .complete_multipart(key, upload_id, parts, precondition)
            .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.inner.store.abort_multipart(key, upload_id).await
    }

    async fn list_multipart(&self, key: &str) -> Result<Vec<super::PendingUpload>> {
        self.inner.store.list_multipart(key).await
    }
}
