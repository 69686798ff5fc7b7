//! The block cache in front of the real S3 server, traffic counted beneath
//! it: warm reads cost nothing, a restart keeps the cache, a damaged block is
//! fetched again and never served, the byte budget holds under a read larger
//! than the cache, concurrent readers of a block cause one fetch, a cold
//! small read fetches only its bytes (a second in its block the block), a
//! readahead fetches what is missing without reading what is cached, and
//! eviction under heavy concurrent use never breaks a reader.

use std::sync::Arc;

use bytes::Bytes;
use sessionfs_core::cache::blocks::{block_id, BlockCache};
use sessionfs_core::store::cached::CachedStore;
use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::{ByteRange, GetOptions, ObjectStore, PutOptions};
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::writer::{pack_dir, PackOptions};
use sessionfs_tests::{pattern, s3_store, unique_prefix};

const MIB: u64 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    key: String,
    data: Bytes,
    etag: String,
    s3: Arc<dyn ObjectStore>,
}

async fn setup(name: &str, size: usize) -> Setup {
    let s3 = s3_store().await;
    let key = format!("{}object", unique_prefix(name));
    let data = pattern(size, 5);
    let etag = s3
        .put(&key, data.clone(), PutOptions::default())
        .await
        .unwrap()
        .etag;
    Setup {
        dir: tempfile::tempdir().unwrap(),
        key,
        data,
        etag,
        s3,
    }
}

fn cached(s: &Setup, budget: u64) -> (Arc<MeteredStore>, CachedStore) {
    let metered = Arc::new(MeteredStore::new(s.s3.clone()));
    let cache = Arc::new(BlockCache::open(&s.dir.path().join("cache"), budget, MIB).unwrap());
    (metered.clone(), CachedStore::new(metered, cache))
}

async fn read(store: &CachedStore, s: &Setup, start: u64, end: u64) -> Bytes {
    store
        .get(
            &s.key,
            GetOptions::range(ByteRange::Bounded { start, end }).if_match(s.etag.clone()),
        )
        .await
        .unwrap()
        .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_reads_and_restarts_cost_no_requests() {
    let s = setup("cache-warm", (5 * MIB + 77) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    assert_eq!(
        read(&store, &s, 100, 3 * MIB + 5).await,
        s.data.slice(100..(3 * MIB + 5) as usize)
    );
    let cold = metered.snapshot().gets;
    assert_eq!(cold, 1, "adjacent missing blocks come in one GET");
    assert_eq!(
        read(&store, &s, 2 * MIB, 2 * MIB + 10).await,
        s.data.slice((2 * MIB) as usize..(2 * MIB + 10) as usize)
    );
    assert_eq!(
        metered.snapshot().gets,
        cold,
        "a cached block costs nothing"
    );
    // The last, short block.
    let tail = read(&store, &s, 5 * MIB, 5 * MIB + 77).await;
    assert_eq!(tail, s.data.slice((5 * MIB) as usize..));
    drop(store);

    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    assert_eq!(
        read(&store, &s, 0, 3 * MIB).await,
        s.data.slice(..(3 * MIB) as usize)
    );
    assert_eq!(
        metered.snapshot().gets,
        0,
        "after a restart the blocks are still there"
    );
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_block_is_fetched_again_not_served() {
    let s = setup("cache-damage", (2 * MIB) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    read(&store, &s, 0, MIB).await;
    let id = block_id(&s.s3.describe(), &s.key, &s.etag, 0);
    let path = store.cache().block_path(&id);
    let mut raw = std::fs::read(&path).unwrap();
    raw[5000] ^= 0x01;
    std::fs::write(&path, raw).unwrap();
    let before = metered.snapshot().gets;
    assert_eq!(read(&store, &s, 4000, 6000).await, s.data.slice(4000..6000));
    assert_eq!(metered.snapshot().gets, before + 1, "refetched");
    assert_eq!(store.cache().stats().corrupt, 1);
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_small_read_fetches_its_bytes_and_a_second_one_the_block() {
    let s = setup("cache-fragment", (4 * MIB) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    let gets = || metered.snapshot();
    assert_eq!(read(&store, &s, 5000, 9000).await, s.data.slice(5000..9000));
    assert_eq!((gets().gets, gets().bytes_in), (1, 4000), "only its bytes");
    // Inside the fragment: nothing fetched, also by a reader after a restart.
    assert_eq!(read(&store, &s, 6000, 7000).await, s.data.slice(6000..7000));
    let (metered2, restarted) = cached(&s, 64 * MIB);
    assert_eq!(
        read(&restarted, &s, 5000, 9000).await,
        s.data.slice(5000..9000)
    );
    assert_eq!((gets().gets, metered2.snapshot().gets), (1, 0));
    // Elsewhere in the block, not continuing the last read: the whole block.
    assert_eq!(
        read(&store, &s, 200_000, 201_000).await,
        s.data.slice(200_000..201_000)
    );
    assert_eq!(gets().gets, 2);
    assert_eq!(gets().bytes_in, 4000 + MIB);
    // Which then answers every read in it.
    assert_eq!(read(&store, &s, 10, 20).await, s.data.slice(10..20));
    assert_eq!(
        read(&store, &s, 900_000, 1_000_000).await,
        s.data.slice(900_000..1_000_000)
    );
    assert_eq!(gets().gets, 2);
    // A burst of cold reads (within a second of the last fragment) gets
    // whole blocks: here a small read straddling two blocks.
    let straddle = (2 * MIB - 300)..(2 * MIB + 300);
    assert_eq!(
        read(&store, &s, straddle.start, straddle.end).await,
        s.data.slice(straddle.start as usize..straddle.end as usize)
    );
    assert_eq!((gets().gets, gets().bytes_in), (3, 4000 + 3 * MIB));
    // Once the object's reads are quiet, such a read fetches its bytes once.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let straddle = (3 * MIB - 300)..(3 * MIB + 300);
    assert_eq!(
        read(&store, &s, straddle.start, straddle.end).await,
        s.data.slice(straddle.start as usize..straddle.end as usize)
    );
    assert_eq!((gets().gets, gets().bytes_in), (4, 4600 + 3 * MIB));
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_byte_budget_holds_under_a_read_larger_than_the_cache() {
    let s = setup("cache-budget", (16 * MIB) as usize).await;
    let (_, store) = cached(&s, 4 * MIB);
    store.head(&s.key).await.unwrap();
    for i in 0..16 {
        let got = read(&store, &s, i * MIB, (i + 1) * MIB).await;
        assert_eq!(
            got,
            s.data.slice((i * MIB) as usize..((i + 1) * MIB) as usize)
        );
    }
    // The budget holds at every moment, also while readahead finishes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let used = store.cache().disk_usage();
        assert!(used <= 4 * MIB, "{used} bytes cached with a 4 MiB budget");
        if store.cache().stats().evicted >= 12 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "evicted only {}",
            store.cache().stats().evicted
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_of_a_block_cause_one_fetch() {
    let s = setup("cache-flight", (3 * MIB) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let (key, etag) = (s.key.clone(), s.etag.clone());
            tokio::spawn(async move {
                // Longer than a block: whole blocks, not fragments.
                let range = ByteRange::Bounded {
                    start: 1000 + i,
                    end: MIB + 5000 + i,
                };
                store
                    .get(&key, GetOptions::range(range).if_match(etag))
                    .await
                    .unwrap()
                    .body
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(
            r.await.unwrap(),
            s.data.slice(1000 + i..MIB as usize + 5000 + i)
        );
    }
    assert_eq!(metered.snapshot().gets, 1);
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_under_load_never_breaks_a_reader() {
    let s = setup("cache-evict", (8 * MIB) as usize).await;
    let (_, store) = cached(&s, 2 * MIB);
    store.head(&s.key).await.unwrap();
    let readers: Vec<_> = (0..32u64)
        .map(|i| {
            let store = store.clone();
            let (key, etag) = (s.key.clone(), s.etag.clone());
            tokio::spawn(async move {
                let start = (i * 7_919_113) % (7 * MIB);
                let range = ByteRange::Bounded {
                    start,
                    end: start + MIB + 3,
                };
                (
                    start,
                    store
                        .get(&key, GetOptions::range(range).if_match(etag))
                        .await
                        .unwrap()
                        .body,
                )
            })
        })
        .collect();
    for r in readers {
        let (start, body) = r.await.unwrap();
        assert_eq!(
            body,
            s.data.slice(start as usize..(start + MIB + 3) as usize)
        );
    }
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_reads_through_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree/workspace");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a.bin"), pattern(3 << 20, 8)).unwrap();
    std::fs::write(tree.join("b.txt"), b"bee").unwrap();
    let mut object = Vec::new();
    pack_dir(
        &dir.path().join("tree"),
        &mut object,
        &PackOptions::default(),
        &|_| {},
    )
    .unwrap();
    let s3 = s3_store().await;
    let key = format!("{}session.tar.gz", unique_prefix("cache-session"));
    s3.put(&key, Bytes::from(object), PutOptions::default())
        .await
        .unwrap();
    let metered = Arc::new(MeteredStore::new(s3.clone()));
    let cache = Arc::new(BlockCache::open(&dir.path().join("cache"), 64 * MIB, MIB).unwrap());
    let store: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(metered.clone(), cache));
    let reader = SessionReader::open(store.clone(), &key, None)
        .await
        .unwrap();
    assert_eq!(
        &reader.read_all("workspace/b.txt").await.unwrap()[..],
        b"bee"
    );
    assert_eq!(
        reader.read_all("workspace/a.bin").await.unwrap(),
        pattern(3 << 20, 8)
    );
    let before = metered.snapshot().gets;
    assert_eq!(
        reader.read_all("workspace/a.bin").await.unwrap(),
        pattern(3 << 20, 8)
    );
    assert_eq!(
        metered.snapshot().gets,
        before,
        "the second read is served from the cache"
    );
    s3.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_reads_are_read_ahead() {
    let s = setup("cache-readahead", (8 * MIB) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    read(&store, &s, 0, MIB).await;
    read(&store, &s, MIB, 2 * MIB).await;
    // The second read continued the first: blocks 2..=5 are being fetched.
    for _ in 0..100 {
        if (2..=5).all(|b| {
            store
                .cache()
                .read(&block_id(&s.s3.describe(), &s.key, &s.etag, b))
                .is_some()
        }) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let before = metered.snapshot().gets;
    // Not a continuation (it starts a byte later), so it starts no readahead of its own.
    let got = read(&store, &s, 2 * MIB + 1, 6 * MIB).await;
    assert_eq!(
        got,
        s.data.slice((2 * MIB + 1) as usize..(6 * MIB) as usize)
    );
    assert_eq!(metered.snapshot().gets, before, "already read ahead");
    s.s3.delete(&s.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_readahead_fetches_the_blocks_missing_and_reads_none_cached() {
    let s = setup("cache-readahead-held", (8 * MIB) as usize).await;
    let (metered, store) = cached(&s, 64 * MIB);
    store.head(&s.key).await.unwrap();
    let id = |b| block_id(&s.s3.describe(), &s.key, &s.etag, b);
    // Blocks 3 and 4 cached by a read that continues nothing.
    read(&store, &s, 3 * MIB, 5 * MIB).await;
    let hits = store.cache().stats().hits;
    read(&store, &s, 0, MIB).await;
    read(&store, &s, MIB, 2 * MIB).await;
    // The second read continued the first: the readahead of 2..=5 fetches
    // 2 and 5, in a GET each.
    for _ in 0..100 {
        if store.cache().holds(&id(2)) && store.cache().holds(&id(5)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(store.cache().holds(&id(2)) && store.cache().holds(&id(5)));
    assert_eq!(metered.snapshot().gets, 1 + 2 + 2);
    assert_eq!(
        store.cache().stats().hits,
        hits,
        "the readahead read the blocks it found cached"
    );
    // What it fetched is served right.
    let before = metered.snapshot().gets;
    assert_eq!(
        read(&store, &s, 2 * MIB + 1, 6 * MIB).await,
        s.data.slice((2 * MIB + 1) as usize..(6 * MIB) as usize)
    );
    assert_eq!(metered.snapshot().gets, before);
    s.s3.delete(&s.key).await.unwrap();
}

#[test]
fn two_processes_sharing_one_cache_directory_read_correctly() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree/workspace");
    std::fs::create_dir_all(&tree).unwrap();
    // 40 MiB of incompressible bytes against a 16 MiB cache.
    let data = pattern(40 << 20, 77);
    std::fs::write(tree.join("big.bin"), &data).unwrap();
    // Read last, by a process that did not fill the cache: it must count the
    // blocks it finds there, or the directory grows to both files' worth.
    let other = pattern(12 << 20, 78);
    std::fs::write(tree.join("other.bin"), &other).unwrap();
    let vars = [
        ("SESSIONFS_STORE", "local".to_owned()),
        (
            "SESSIONFS_STORE_DIR",
            dir.path().join("store").display().to_string(),
        ),
        (
            "SESSIONFS_CACHE_DIR",
            dir.path().join("cache").display().to_string(),
        ),
        ("SESSIONFS_CACHE_SIZE", "16".to_owned()),
    ];
    let sfs = || {
        let mut c = Command::new(sessionfs_tests::sessionfs_bin());
        c.arg("--quiet")
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        c
    };
    assert!(sfs()
        .arg("push")
        .arg(dir.path().join("tree"))
        .arg("shared")
        .status()
        .unwrap()
        .success());
    // Four processes at once, one cache directory, a budget smaller than the file.
    for round in 0..3 {
        let children: Vec<_> = (0..4)
            .map(|_| {
                sfs()
                    .args(["cat", "shared", "workspace/big.bin"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stdout == data[..],
                "round {round}: a process read wrong bytes"
            );
        }
        // The processes evicted each other's blocks: the shared directory
        // stays within the one budget (plus a block in flight).
        let used = dir_bytes(&dir.path().join("cache"));
        assert!(
            used <= 17 << 20,
            "round {round}: {used} bytes in a cache of 16 MiB"
        );
        assert!(used >= 8 << 20, "round {round}: only {used} bytes cached");
    }
    let out = sfs()
        .args(["cat", "shared", "workspace/other.bin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == other[..],
        "the later process read wrong bytes"
    );
    let used = dir_bytes(&dir.path().join("cache"));
    assert!(
        used <= 17 << 20,
        "{used} bytes in a cache of 16 MiB after a later process read another file"
    );
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                dir_bytes(&e.path())
            } else if e.file_name() == "index.db"
                || e.file_name().to_string_lossy().starts_with("index.db-")
            {
                0
            } else {
                md.len()
            }
        })
        .sum()
}
