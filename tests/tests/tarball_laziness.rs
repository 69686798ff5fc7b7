//! Reading one small file of a large session moves almost nothing: counted at
//! the store layer against the real S3 server. A session of more than 1 GiB of
//! tar is pushed with the real binary; then, on a host that never saw it, the
//! open and the read of one small file cost 2 requests and at most 1.5 MiB;
//! with the TOC in the local index an open is a single HEAD and the read a
//! single GET.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use sessionfs_core::cache::blocks::{BlockCache, BLOCK_SIZE};
use sessionfs_core::store::cached::CachedStore;
use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_tests::{pattern, s3_env, s3_store, sessionfs_bin};

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_small_file_of_a_gib_session_moves_at_most_one_and_a_half_mib_in_two_requests() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let w = tree.join("workspace");
    std::fs::create_dir_all(w.join("small")).unwrap();
    // 4 x 260 MiB of data deflate compresses well (a 16 KiB pattern repeats
    // inside its 32 KiB window), so the test stays quick while the tar is > 1 GiB.
    let block = pattern(16 * 1024, 99);
    for i in 0..4 {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(w.join(format!("big{i}.bin"))).unwrap());
        for _ in 0..(260 * 1024 / 16) {
            f.write_all(&block).unwrap();
        }
    }
    for i in 0..2000 {
        std::fs::write(
            w.join(format!("small/f{i:04}.txt")),
            format!("small file {i}\n").repeat(8),
        )
        .unwrap();
    }
    let target = "workspace/small/f1234.txt";
    let expected = std::fs::read(tree.join(target)).unwrap();

    let session = format!("lazy-{:016x}", rand::random::<u64>());
    let out = Command::new(sessionfs_bin())
        .args(["--quiet", "push"])
        .arg(&tree)
        .arg(&session)
        .envs(s3_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = format!("{session}/session.tar.gz");

    // Cold, as a mount on a new host reads: through an empty block cache,
    // with an empty index.
    let index = TocIndex::open(&dir.path().join("index.db")).unwrap();
    let cold = Arc::new(MeteredStore::new(s3_store().await));
    let cache =
        Arc::new(BlockCache::open(&dir.path().join("blocks"), 1 << 30, BLOCK_SIZE).unwrap());
    let cached: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(cold.clone(), cache));
    let reader = SessionReader::open(cached.clone(), &key, Some(&index))
        .await
        .unwrap();
    let tar_size: u64 = reader.toc().segments.iter().map(|s| s.ul).sum();
    assert!(tar_size >= GIB, "the session holds {tar_size} bytes of tar");
    let opened = cold.snapshot();
    assert_eq!(
        (opened.heads, opened.gets),
        (0, 1),
        "open is one suffix GET"
    );

    let data = reader.read_all(target).await.unwrap();
    assert_eq!(data, expected);
    let read = cold.snapshot();
    println!(
        "cold open and read of {target}: {} requests, {} bytes (object {} bytes)",
        read.requests,
        read.bytes_in,
        reader.meta().size
    );
    assert!(read.requests <= 2, "{} requests", read.requests);
    // The suffix (256 KiB) and the segment that holds the file, not the
    // 1 MiB cache blocks around it.
    assert!(read.bytes_in <= 1536 << 10, "{} bytes", read.bytes_in);
    // Read again, from the fragment the cache kept.
    let again = SessionReader::open(cached, &key, Some(&index))
        .await
        .unwrap();
    assert_eq!(again.read_all(target).await.unwrap(), expected);
    assert_eq!(
        cold.snapshot().gets,
        read.gets,
        "a second reader reads the cached fragment"
    );

    // Warm: the TOC comes from the index.
    let warm = Arc::new(MeteredStore::new(s3_store().await));
    let reader = SessionReader::open(warm.clone() as Arc<dyn ObjectStore>, &key, Some(&index))
        .await
        .unwrap();
    assert_eq!(warm.snapshot().requests, 1, "a warm open is one HEAD");
    assert_eq!(reader.read_all(target).await.unwrap(), expected);
    let after = warm.snapshot();
    assert_eq!(after.requests, 2, "and the read one GET");
    assert!(after.bytes_in <= 2 << 20);

    s3_store().await.delete(&key).await.unwrap();
}
