//! The object store as every command sees it: counted (what reached the
//! store, for `/metrics`), behind the on-disk block cache, with the index of
//! session TOCs beside it, all in the local state directory.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use sessionfs_core::cache::blocks::{BlockCache, BLOCK_SIZE};
use sessionfs_core::store::cached::CachedStore;
use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;

use crate::store_args::StoreArgs;

pub struct LocalStack {
    /// The store behind the cache: what sessions read and write through.
    pub store: Arc<dyn ObjectStore>,
    pub index: TocIndex,
    pub cache: Arc<BlockCache>,
    pub metered: Arc<MeteredStore>,
}

impl LocalStack {
    pub async fn open(store: &StoreArgs, dir: PathBuf, cache_mib: u64) -> anyhow::Result<Self> {
        let index = TocIndex::open(&dir.join("index.db"))?;
        let cache = Arc::new(
            BlockCache::open(&dir.join("blocks"), cache_mib << 20, BLOCK_SIZE)
                .with_context(|| format!("opening the block cache in {}", dir.display()))?,
        );
        let metered = Arc::new(MeteredStore::new(store.config()?.open().await?));
        Ok(LocalStack {
            store: Arc::new(CachedStore::new(metered.clone(), cache.clone())),
            index,
            cache,
            metered,
        })
    }

    /// What `/metrics` reports of the cache and the store.
    pub fn gauges(&self, open_sessions: u64, pending: u64) -> sessionfs_api::metrics::Gauges {
        sessionfs_api::metrics::Gauges::of(
            self.cache.stats(),
            self.metered.snapshot(),
            open_sessions,
            pending,
        )
    }
}
