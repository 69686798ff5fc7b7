//! The tarball benchmark of issue "Seekable session tarball".
//!
//! On a generated session of source-like files (tens of thousands of small
//! ones plus a few large ones, about 1 GiB at scale 1.0) and on a foreign
//! `tar czf` of the same tree, it measures, each beside a reference taken in
//! the same run, with the bytes moved:
//! - pack time and object size beside `tar czf`;
//! - first open of the foreign object (the index pass) beside `gzip -dc` of it;
//! - cold and warm read of one small file (latency, bytes, requests) beside
//!   downloading the whole object;
//! - sequential read of a large file beside single-threaded inflate of the
//!   same compressed bytes (zlib, and libdeflate, the reader's decoder),
//!   and beside libdeflate on every core in memory (the ceiling).
//!
//! The store is the S3 server from the environment (`scripts/bench.sh` starts
//! one) or, without it, a local store.
//!
//! usage: sessionfs-bench [SCALE] [tarball|writeback|roots|sequential]
//! (default 1.0 tarball; 0.1 for a quick run). `writeback` runs the
//! write-back benchmark ([`writeback`]) instead, `roots` the root listing
//! ([`roots`]), `sequential` only the sequential read on a session of one
//! large file.

mod roots;
mod writeback;

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use sessionfs_core::cache::blocks::{BlockCache, BLOCK_SIZE};
use sessionfs_core::store::cached::CachedStore;
use sessionfs_core::store::config::{minio_endpoint, S3Config};
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::s3::S3Store;
use sessionfs_core::store::{GetOptions, ObjectStore, PutOptions};
use sessionfs_core::tarball::deflate::inflate_exact;
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::toc::Segment;
use sessionfs_core::tarball::writer::{pack_dir, PackOptions};

const MIB: f64 = 1024.0 * 1024.0;

/// A small deterministic generator, so every run measures the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "impl", "struct", "pub", "use", "return", "match", "if", "else", "for",
    "in", "while", "self", "Self", "Result", "Option", "Some", "None", "Ok", "Err", "String",
    "Vec", "u64", "usize", "config", "buffer", "offset", "length", "reader", "writer", "session",
    "store", "cache", "block", "entry", "index", "segment", "error", "value", "count", "total",
    "async", "await", "const", "static", "trait", "where", "=>", "{", "}", "(", ")", ";", "&",
    "::", "->", "==", "!=", "+=", "0", "1", "42", "\"text\"",
];

/// Source-like text: indented lines of tokens and names, about 4:1 under gzip.
fn source_text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    while out.len() < len {
        let indent = rng.below(4) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..3 + rng.below(9) {
            let word = WORDS[rng.below(WORDS.len() as u64) as usize];
            out.extend_from_slice(word.as_bytes());
            if rng.below(5) == 0 {
                out.extend_from_slice(format!("_{}", rng.below(1000)).as_bytes());
            }
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// Generates the tree (with `only_large`, one large file and one small);
/// returns (files, bytes, the small file to read, the large file to read).
fn generate(root: &Path, scale: f64, only_large: bool) -> Result<(usize, u64, String, String)> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let small_files = if only_large {
        1
    } else {
        (40_000.0 * scale) as usize
    };
    let mut total = 0u64;
    let w = root.join("workspace");
    for i in 0..small_files {
        let dir = w.join(format!("pkg{:03}/src/mod{:02}", i % 400, (i / 400) % 25));
        if i < 10_000 || i % 400 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = 200 + (rng.below(1000) * rng.below(40)) as usize;
        let text = source_text(&mut rng, len);
        std::fs::write(dir.join(format!("file{i:05}.rs")), &text)?;
        total += text.len() as u64;
    }
    let large = if only_large {
        1
    } else {
        (6.0 * scale).ceil() as usize
    };
    let large_len = (100.0 * scale.min(1.0) * MIB) as usize;
    for i in 0..large {
        let path = w.join(format!("assets/large{i}.dat"));
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        let mut f = BufWriter::new(std::fs::File::create(&path)?);
        let mut written = 0;
        while written < large_len {
            let chunk = source_text(&mut rng, (1 << 20).min(large_len - written));
            f.write_all(&chunk)?;
            written += chunk.len();
        }
        f.flush()?;
        total += large_len as u64;
    }
    std::fs::write(
        root.join(".session-metadata.json"),
        br#"{"sessionPath":"bench__tree__main"}"#,
    )?;
    let small = format!(
        "workspace/pkg123/src/mod{:02}/file{:05}.rs",
        (small_files / 2 / 400) % 25,
        small_files / 2 / 400 * 400 + 123
    );
    Ok((
        small_files + large + 1,
        total,
        small,
        "workspace/assets/large0.dat".to_owned(),
    ))
}

async fn store_from_env() -> Result<(Arc<dyn ObjectStore>, String)> {
    if let Ok(host) = std::env::var("MINIO_ENDPOINT") {
        let port = std::env::var("MINIO_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        let cfg = S3Config {
            endpoint: Some(minio_endpoint(&host, port, false)?),
            access_key: std::env::var("MINIO_ROOT_USER").ok(),
            secret_key: std::env::var("MINIO_ROOT_PASSWORD").ok(),
            ..S3Config::default()
        };
        let bucket = std::env::var("MINIO_BUCKET").unwrap_or_else(|_| "sessions".to_owned());
        let store = S3Store::connect(&cfg, &bucket).await?;
        let what = store.describe();
        return Ok((Arc::new(store), what));
    }
    let dir = std::env::temp_dir().join("sessionfs-bench-store");
    let store = LocalStore::open(&dir, "sessions")?;
    let what = store.describe();
    Ok((Arc::new(store), what))
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

fn run(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(t.elapsed())
}

fn row(what: &str, ours: String, reference: String, ratio: f64, bytes: String) {
    println!("| {what} | {ours} | {reference} | {ratio:.2} | {bytes} |");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn s(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let scale: f64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1.0);
    match std::env::args().nth(2).as_deref() {
        None | Some("tarball") => {}
        Some("writeback") => return writeback::bench(scale).await,
        Some("roots") => return roots::bench(scale).await,
        Some("sequential") => return sequential_only(scale).await,
        Some(other) => {
            bail!("unknown benchmark {other:?}: tarball, writeback, roots or sequential")
        }
    }
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    let ((files, bytes, small, large), gen) = time(|| generate(&tree, scale, false))?;
    eprintln!(
        "generated {files} files, {:.0} MiB in {}",
        bytes as f64 / MIB,
        s(gen)
    );
    let (store, what) = store_from_env().await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# sessionfs tarball benchmark: {files} files, {:.0} MiB of content, store {what}, {cores} cores\n", bytes as f64 / MIB);
    println!("| measure | sessionfs | reference | ratio (sessionfs / reference) | bytes |");
    println!("| --- | --- | --- | --- | --- |");

    // Pack beside tar czf.
    let native_path = work.path().join("native.tar.gz");
    let foreign_path = work.path().join("foreign.tar.gz");
    let (stats, pack_t) = time(|| {
        let out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&native_path)?);
        Ok(pack_dir(&tree, out, &PackOptions::default(), &|_| {})?)
    })?;
    let tar_t = run(Command::new("tar")
        .arg("czf")
        .arg(&foreign_path)
        .arg("-C")
        .arg(&tree)
        .arg("."))?;
    let foreign_len = std::fs::metadata(&foreign_path)?.len();
    row(
        "pack time (tar czf)",
        s(pack_t),
        s(tar_t),
        pack_t.as_secs_f64() / tar_t.as_secs_f64(),
        format!("{:.0} MiB of tar", stats.tar_size as f64 / MIB),
    );
    row(
        "object size (tar czf)",
        format!("{:.1} MiB", stats.object_size as f64 / MIB),
        format!("{:.1} MiB", foreign_len as f64 / MIB),
        stats.object_size as f64 / foreign_len as f64,
        format!(
            "{} segments, TOC {:.2} MiB ({:.1} B/entry)",
            stats.segments,
            stats.toc_size as f64 / MIB,
            stats.toc_size as f64 / stats.entries as f64
        ),
    );

    // Upload both.
    let native_key = "bench__native__main/session.tar.gz";
    let foreign_key = "bench__foreign__main/session.tar.gz";
    for (key, path) in [(native_key, &native_path), (foreign_key, &foreign_path)] {
        upload(store.as_ref(), key, path).await?;
    }

    // First open of the foreign object beside gzip -dc.
    let index = TocIndex::open(&work.path().join("index.db"))?;
    let metered = Arc::new(MeteredStore::new(store.clone()));
    let t = Instant::now();
    let foreign = SessionReader::open(
        metered.clone() as Arc<dyn ObjectStore>,
        foreign_key,
        Some(&index),
    )
    .await?;
    let open_t = t.elapsed();
    let gunzip_t = run(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} > /dev/null", foreign_path.display())))?;
    row(
        "first open of the foreign object (gzip -dc of it)",
        s(open_t),
        s(gunzip_t),
        open_t.as_secs_f64() / gunzip_t.as_secs_f64(),
        format!(
            "{:.1} MiB read, {} entries",
            metered.snapshot().bytes_in as f64 / MIB,
            foreign.entries().len()
        ),
    );

    // Cold and warm read of one small file beside downloading the whole object.
    for (label, key) in [("native", native_key), ("foreign", foreign_key)] {
        let metered = Arc::new(MeteredStore::new(store.clone()));
        let cache = Arc::new(BlockCache::open(
            &work.path().join(format!("cache-{label}")),
            4 << 30,
            BLOCK_SIZE,
        )?);
        let cached: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(metered.clone(), cache));
        let reader = SessionReader::open(cached.clone(), key, Some(&index)).await?;
        let opened = metered.snapshot();
        let t = Instant::now();
        let data = reader.read_all(&small).await?;
        let cold_t = t.elapsed();
        let cold = metered.snapshot();
        let t = Instant::now();
        reader.read_all(&small).await?;
        let warm_t = t.elapsed();
        let warm = metered.snapshot();
        let t = Instant::now();
        let whole = store.get(key, GetOptions::default()).await?;
        let whole_t = t.elapsed();
        row(
            &format!(
                "cold read of one {} B file, {label} (download whole object)",
                data.len()
            ),
            ms(cold_t),
            ms(whole_t),
            cold_t.as_secs_f64() / whole_t.as_secs_f64(),
            format!(
                "{} requests, {:.2} MiB with the open ({} requests, {:.2} MiB; whole: {:.1} MiB)",
                cold.requests,
                cold.bytes_in as f64 / MIB,
                opened.requests,
                opened.bytes_in as f64 / MIB,
                whole.body.len() as f64 / MIB,
            ),
        );
        row(
            &format!("warm read of the same file, {label} (download whole object)"),
            ms(warm_t),
            ms(whole_t),
            warm_t.as_secs_f64() / whole_t.as_secs_f64(),
            format!(
                "{} requests, {} bytes",
                warm.requests - cold.requests,
                warm.bytes_in - cold.bytes_in
            ),
        );
    }

    sequential(
        &store,
        &index,
        native_key,
        &native_path,
        &large,
        work.path(),
    )
    .await?;
    println!("\n(ratio for throughput rows: sessionfs speed / reference speed)");

    for key in [native_key, foreign_key] {
        store.delete(key).await?;
    }
    Ok(())
}

/// Sequential read of a large file in 1 MiB reads, cold, through the block
/// cache, beside single-threaded inflate of the same segments in memory.
async fn sequential(
    store: &Arc<dyn ObjectStore>,
    index: &TocIndex,
    native_key: &str,
    native_path: &Path,
    large: &str,
    work: &Path,
) -> Result<()> {
    let metered = Arc::new(MeteredStore::new(store.clone()));
    let cache = Arc::new(BlockCache::open(
        &work.join("cache-seq"),
        4 << 30,
        BLOCK_SIZE,
    )?);
    let cached: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(metered.clone(), cache));
    let reader = SessionReader::open(cached, native_key, Some(index)).await?;
    let entry = reader.stat(large).context("large file")?.clone();
    let t = Instant::now();
    let mut offset = 0;
    while offset < entry.s {
        offset += reader.read(large, offset, 1 << 20).await?.len() as u64;
    }
    let seq_t = t.elapsed();
    let segs: Vec<_> = reader
        .toc()
        .segments
        .iter()
        .filter(|sg| sg.uo + sg.ul > entry.data_offset && sg.uo < entry.data_offset + entry.s)
        .cloned()
        .collect();
    let object = Bytes::from(std::fs::read(native_path)?);
    let compressed = |sg: &Segment| &object[sg.co as usize..(sg.co + sg.cl) as usize];
    // The reference is zlib (what gzip and every tar reader inflate with),
    // on one core; the second row is the decoder the reader uses, on one core.
    let t = Instant::now();
    let mut inflated = 0u64;
    for sg in &segs {
        inflated += zlib_inflate(compressed(sg), sg.ul as usize)? as u64;
    }
    let zlib_t = t.elapsed();
    let t = Instant::now();
    for sg in &segs {
        inflate_exact(compressed(sg), sg.ul as usize)
            .map_err(|e| anyhow::anyhow!("inflate: {e:?}"))?;
    }
    let libdeflate_t = t.elapsed();
    // What the cores here could do at best: the same decoder on every
    // core, in memory, with no fetch, check or cache beside it. The reader
    // cannot beat this; the gap to it is what the pipeline costs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|k| {
                let (segs, compressed) = (&segs, &compressed);
                scope.spawn(move || {
                    segs.iter().skip(k).step_by(cores).try_for_each(|sg| {
                        inflate_exact(compressed(sg), sg.ul as usize)
                            .map(drop)
                            .map_err(|e| anyhow::anyhow!("inflate: {e:?}"))
                    })
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("an inflate thread panicked"))?
        })
    })?;
    let parallel_t = t.elapsed();
    let mbs = |d: Duration| entry.s as f64 / MIB / d.as_secs_f64();
    let bytes = format!(
        "{} requests, {:.1} MiB fetched, {:.1} MiB inflated",
        metered.snapshot().requests,
        metered.snapshot().bytes_in as f64 / MIB,
        inflated as f64 / MIB
    );
    for (reference, took) in [
        ("single-threaded zlib inflate", zlib_t),
        (
            "single-threaded libdeflate, the reader's decoder",
            libdeflate_t,
        ),
        (
            &format!("libdeflate on all {cores} cores, in memory: the ceiling"),
            parallel_t,
        ),
    ] {
        row(
            &format!(
                "sequential read of a {:.0} MiB file ({reference})",
                entry.s as f64 / MIB
            ),
            format!("{:.0} MiB/s", mbs(seq_t)),
            format!("{:.0} MiB/s", mbs(took)),
            took.as_secs_f64() / seq_t.as_secs_f64(),
            bytes.clone(),
        );
    }
    Ok(())
}

/// Only the sequential read row, on a session of one large file: a quick
/// loop for work on the readahead.
async fn sequential_only(scale: f64) -> Result<()> {
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    let (_, _, _, large) = generate(&tree, scale, true)?;
    let (store, what) = store_from_env().await?;
    println!("# sessionfs sequential read benchmark, store {what}\n");
    println!("| measure | sessionfs | reference | ratio (sessionfs / reference) | bytes |");
    println!("| --- | --- | --- | --- | --- |");
    let native_path = work.path().join("native.tar.gz");
    let out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&native_path)?);
    pack_dir(&tree, out, &PackOptions::default(), &|_| {})?;
    let key = "bench__sequential__main/session.tar.gz";
    upload(store.as_ref(), key, &native_path).await?;
    let index = TocIndex::open(&work.path().join("index.db"))?;
    sequential(&store, &index, key, &native_path, &large, work.path()).await?;
    println!("\n(ratio: sessionfs speed / reference speed)");
    store.delete(key).await?;
    Ok(())
}

/// zlib's raw inflate of one segment (flate2, as gzip readers do it); the
/// bytes inflated.
fn zlib_inflate(compressed: &[u8], expected: usize) -> Result<usize> {
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(expected + 1);
    d.decompress_vec(compressed, &mut out, flate2::FlushDecompress::Sync)?;
    if out.len() != expected {
        bail!("segment inflated to {} bytes, not {expected}", out.len());
    }
    Ok(out.len())
}

async fn upload(store: &dyn ObjectStore, key: &str, path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    let mut file = std::fs::File::open(path)?;
    if len <= 64 << 20 {
        let mut body = Vec::new();
        file.read_to_end(&mut body)?;
        store
            .put(key, Bytes::from(body), PutOptions::default())
            .await?;
        return Ok(());
    }
    let id = store.create_multipart(key, PutOptions::default()).await?;
    let mut parts = Vec::new();
    let mut number = 1;
    loop {
        let mut buf = vec![0u8; 32 << 20];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        parts.push(
            store
                .upload_part(key, &id, number, Bytes::from(buf))
                .await?,
        );
        number += 1;
    }
    store
        .complete_multipart(key, &id, &parts, Default::default())
        .await?;
    Ok(())
}
