//! Sequential and concurrent reads of a large file, counted at the store
//! layer against the real S3 server: a reader moving forward gets the next
//! segments fetched in few GETs ahead of it and no byte of the next file;
//! readers racing over the same segments (as many as are kept inflated
//! once read) fetch each one once.

use std::process::Command;
use std::sync::Arc;

use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::segments::READ_KEPT;
use sessionfs_core::tarball::toc::Segment;
use sessionfs_tests::{pattern, run_ok, s3_env, s3_store, sessionfs_bin};

const MIB: usize = 1 << 20;

/// Pushes a session holding `big.bin` (40 MiB, incompressible) followed by
/// `next.bin` (8 MiB); returns its key and the two files' bytes.
async fn pushed() -> (tempfile::TempDir, String, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("tree/workspace");
    std::fs::create_dir_all(&w).unwrap();
    let big = pattern(40 * MIB, 7).to_vec();
    let next = pattern(8 * MIB, 8).to_vec();
    std::fs::write(w.join("big.bin"), &big).unwrap();
    std::fs::write(w.join("next.bin"), &next).unwrap();
    let session = format!("ahead-{:016x}", rand::random::<u64>());
    run_ok(
        Command::new(sessionfs_bin())
            .args(["--quiet", "push"])
            .arg(dir.path().join("tree"))
            .arg(&session)
            .envs(s3_env()),
        "push",
    );
    (dir, format!("{session}/session.tar.gz"), big, next)
}

/// The segments holding the bytes of `path`, and their compressed size.
fn segments_of(reader: &SessionReader, path: &str) -> (Vec<Segment>, u64) {
    segments_holding(reader, path, 0, u64::MAX)
}

/// The segments holding bytes `from..to` of `path`, and their compressed size.
fn segments_holding(reader: &SessionReader, path: &str, from: u64, to: u64) -> (Vec<Segment>, u64) {
    let e = reader.stat(path).unwrap();
    let (start, end) = (e.data_offset + from, e.data_offset + to.min(e.s));
    let segs: Vec<Segment> = reader
        .toc()
        .segments
        .iter()
        .filter(|s| s.uo + s.ul > start && s.uo < end)
        .cloned()
        .collect();
    let cl = segs.iter().map(|s| s.cl).sum();
    (segs, cl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_gets_segments_ahead_in_few_requests_and_none_past_its_file() {
    let (_dir, key, big, _) = pushed().await;
    let metered = Arc::new(MeteredStore::new(s3_store().await));
    let reader = SessionReader::open(metered.clone() as Arc<dyn ObjectStore>, &key, None)
        .await
        .unwrap();
    let (segs, compressed) = segments_of(&reader, "workspace/big.bin");
    assert!(segs.len() >= 16, "{} segments", segs.len());
    let opened = metered.snapshot();

    // The kernel's way: 128 KiB at a time, front to back.
    let mut got = Vec::with_capacity(big.len());
    while got.len() < big.len() {
        let piece = reader
            .read("workspace/big.bin", got.len() as u64, 128 * 1024)
            .await
            .unwrap();
        assert!(!piece.is_empty());
        got.extend_from_slice(&piece);
    }
    assert!(got == big, "the bytes read differ from the file's");
    // Let a readahead still under way finish before counting.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let read = metered.snapshot();
    let gets = read.gets - opened.gets;
    let bytes = read.bytes_in - opened.bytes_in;
    println!(
        "{} segments, {compressed} bytes compressed: {gets} GETs, {bytes} bytes",
        segs.len()
    );
    assert!(
        gets * 3 <= segs.len() as u64,
        "{gets} GETs for {} segments: no readahead in runs",
        segs.len()
    );
    assert_eq!(
        bytes, compressed,
        "every segment of the file fetched once, nothing of the next file"
    );
    s3_store().await.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_racing_over_the_same_segments_fetch_each_once() {
    let (_dir, key, big, next) = pushed().await;
    let metered = Arc::new(MeteredStore::new(s3_store().await));
    let reader = Arc::new(
        SessionReader::open(metered.clone() as Arc<dyn ObjectStore>, &key, None)
            .await
            .unwrap(),
    );
    // The last 2 MiB of big.bin and the first 2 of next.bin: segments
    // within what is kept of those read, so that none is evicted and
    // fetched again (a mount's block cache would answer that second
    // fetch). Readahead may load the rest of next.bin, once.
    let (tail, head) = (38 * MIB as u64, 2 * MIB as u64);
    let (segs_big, compressed_big) = segments_holding(&reader, "workspace/big.bin", tail, u64::MAX);
    let (segs_next, _) = segments_holding(&reader, "workspace/next.bin", 0, head);
    let inflated: u64 = segs_big.iter().chain(&segs_next).map(|s| s.ul).sum();
    assert!(inflated <= READ_KEPT, "{inflated} bytes of segments read");
    let (_, compressed_next) = segments_of(&reader, "workspace/next.bin");
    let opened = metered.snapshot();
    // Eight readers, each over both parts in 1 MiB reads, from different
    // starting points so that they meet in the middle.
    let mut tasks = Vec::new();
    for r in 0..8u64 {
        let reader = reader.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for path in ["workspace/big.bin", "workspace/next.bin"] {
                let (from, to) = if path.ends_with("big.bin") {
                    (tail, 40 * MIB as u64)
                } else {
                    (0, head)
                };
                let mut part = vec![0u8; (to - from) as usize];
                let chunks = (to - from) / MIB as u64;
                for k in 0..chunks {
                    let at = ((k + r * 5) % chunks) * MIB as u64;
                    let piece = reader.read(path, from + at, MIB as u64).await.unwrap();
                    part[at as usize..at as usize + piece.len()].copy_from_slice(&piece);
                }
                out.push(part);
            }
            out
        }));
    }
    for t in tasks {
        let parts = t.await.unwrap();
        assert!(
            parts[0] == big[tail as usize..] && parts[1] == next[..head as usize],
            "a reader got other bytes"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let bytes = metered.snapshot().bytes_in - opened.bytes_in;
    // A segment is shared by the two files at their boundary at most.
    assert!(
        bytes <= compressed_big + compressed_next,
        "{bytes} bytes fetched for {} bytes of segments: some fetched twice",
        compressed_big + compressed_next
    );
    s3_store().await.delete(&key).await.unwrap();
}
