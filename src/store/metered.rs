//! A store that counts what goes through it: requests and bytes, per
//! operation. It wraps any other store; the laziness tests assert on its
//! counts, and the metrics endpoint reports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    CompletedPart, CopySource, DeleteOutcome, GetOptions, GetResult, GetStream, ListPage,
    ListRequest, ObjectMeta, ObjectStore, Precondition, PutOptions, PutResult, Result,
};

/// Counters since creation (or the last `reset`).
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub gets: AtomicU64,
    pub heads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A plain copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: u64,
    pub gets: u64,
    pub heads: u64,
    pub writes: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug)]
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> MeteredStore {
        MeteredStore {
            inner,
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        Snapshot {
            requests: c.requests.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            heads: c.heads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
        }
    }

    fn count(&self, counter: &AtomicU64) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn request(&self) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ObjectStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        self.count(&self.counters.heads);
        self.inner.head(key).await
    }

    async fn get(&self, key: &str, opts: GetOptions) -> Result<GetResult> {
        self.count(&self.counters.gets);
        let got = self.inner.get(key, opts).await?;
        self.counters
            .bytes_in
            .fetch_add(got.body.len() as u64, Ordering::Relaxed);
        Ok(got)
    }

    async fn get_stream(&self, key: &str, opts: GetOptions) -> Result<GetStream> {
        self.count(&self.counters.gets);
        let mut got = self.inner.get_stream(key, opts).await?;
        let counters = Arc::clone(&self.counters);
        got.body = got
            .body
            .inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    counters
                        .bytes_in
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            })
            .boxed();
        Ok(got)
    }

    async fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> Result<PutResult> {
        self.count(&self.counters.writes);
        self.counters
            .bytes_out
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.inner.put(key, body, opts).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.count(&self.counters.writes);
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<DeleteOutcome>> {
        self.count(&self.counters.writes);
        self.inner.delete_many(keys).await
    }

    async fn list(&self, req: ListRequest) -> Result<ListPage> {
        self.request();
        self.inner.list(req).await
    }

    async fn create_multipart(&self, key: &str, opts: PutOptions) -> Result<String> {
        self.count(&self.counters.writes);
        self.inner.create_multipart(key, opts).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        self.count(&self.counters.writes);
        self.counters
            .bytes_out
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.inner
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
        self.count(&self.counters.writes);
        self.inner
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
        self.count(&self.counters.writes);
        self.inner
            .complete_multipart(key, upload_id, parts, precondition)
            .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.count(&self.counters.writes);
        self.inner.abort_multipart(key, upload_id).await
    }

    async fn list_multipart(&self, key: &str) -> Result<Vec<super::PendingUpload>> {
        self.request();
        self.inner.list_multipart(key).await
    }
}
