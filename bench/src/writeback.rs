//! The write-back benchmark of issue "Sync agent": on the generated session
//! (about 1 GiB of tar at scale 1.0) it changes 1, 3 and 100 scattered small
//! files, then one 100 MiB file, and writes the session back each time,
//! beside the two references measured on the same session in the same run:
//! a full repack of the merged view sent with one PutObject (the seed's
//! approach), and `tar czf` of the tree plus its upload.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use sessionfs_core::cache::blocks::{BlockCache, BLOCK_SIZE};
use sessionfs_core::overlay::export;
use sessionfs_core::overlay::open::{open, OpenSpec};
use sessionfs_core::overlay::writeback::{write_back, WriteBackOptions};
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::cached::CachedStore;
use sessionfs_core::store::{ObjectStore, PutOptions};
use sessionfs_core::tarball::writer::{pack_dir, pack_entries, PackOptions};

use crate::{generate, run, s, store_from_env, upload, MIB};

/// Files and their new bytes.
type Changes = Vec<(String, Vec<u8>)>;

pub async fn bench(scale: f64) -> Result<()> {
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    let (files, bytes, _, large) = generate(&tree, scale, false)?;
    let (store, what) = store_from_env().await?;
    let session = SessionPath::parse("bench__writeback__main")?;
    let key = session.object_key();
    let packed = work.path().join("base.tar.gz");
    let stats = pack_dir(
        &tree,
        std::io::BufWriter::new(std::fs::File::create(&packed)?),
        &PackOptions::default(),
        &|_| {},
    )?;
    upload(store.as_ref(), &key, &packed).await?;
    println!(
        "# sessionfs write-back benchmark: {files} files, {:.0} MiB of content, {:.0} MiB of tar in a {:.0} MiB object, store {what}\n",
        bytes as f64 / MIB,
        stats.tar_size as f64 / MIB,
        stats.object_size as f64 / MIB
    );
    println!("| change | write-back: uploaded / copied server-side / requests / time | full repack + PutObject: uploaded / time | ratio (time) | tar czf + upload: uploaded / time |");
    println!("| --- | --- | --- | --- | --- |");

    let cache = Arc::new(BlockCache::open(
        &work.path().join("blocks"),
        8 << 30,
        BLOCK_SIZE,
    )?);
    let cached: Arc<dyn ObjectStore> = Arc::new(CachedStore::new(store.clone(), cache));
    let spec = OpenSpec {
        store: cached.clone(),
        index: None,
        session: session.clone(),
        overlay: work.path().join("overlay"),
        read_only: false,
        offline: sessionfs_core::overlay::open::Offline::Never,
    };
    let rt = tokio::runtime::Handle::current();
    let live = tokio::task::spawn_blocking(move || open(&spec, &rt)).await??;
    let live = Arc::new(live);
    let smalls: Vec<String> = live
        .list_files()
        .into_iter()
        .filter(|f| f.size < 64 << 10)
        .map(|f| f.path)
        .collect();
    let scattered = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| smalls[(i * smalls.len() / n + smalls.len() / (2 * n)) % smalls.len()].clone())
            .collect()
    };
    let big = crate::source_text(&mut crate::Rng(0xfeed), (100.0 * MIB) as usize);
    let scenarios: Vec<(String, Changes)> = vec![
        (
            "1 small file".into(),
            scattered(1)
                .into_iter()
                .map(|p| (p, b"// changed\n".to_vec()))
                .collect(),
        ),
        (
            "3 small files".into(),
            scattered(3)
                .into_iter()
                .map(|p| (p, b"// changed\n".to_vec()))
                .collect(),
        ),
        (
            "100 small files".into(),
            scattered(100)
                .into_iter()
                .map(|p| (p, b"// changed\n".to_vec()))
                .collect(),
        ),
        ("one 100 MiB file".into(), vec![(large, big)]),
    ];
    let reference_key = "bench__writeback_reference__main/session.tar.gz";
    for (what, changes) in scenarios {
        let live2 = live.clone();
        let store2 = cached.clone();
        let report = tokio::task::spawn_blocking(move || -> Result<_> {
            for (path, bytes) in &changes {
                live2.put_file(path, bytes)?;
            }
            write_back(&live2, &store2, &WriteBackOptions::default())?
                .context("nothing was written back")
        })
        .await??;
        // The seed's way: the whole merged view packed and sent in one PUT.
        let live2 = live.clone();
        let t = Instant::now();
        let full = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut out = Vec::new();
            pack_entries(
                export::entries(&live2)?,
                &mut out,
                &PackOptions::default(),
                &|_| {},
            )?;
            Ok(out)
        })
        .await??;
        let full_len = full.len() as u64;
        store
            .put(reference_key, Bytes::from(full), PutOptions::default())
            .await?;
        let full_t = t.elapsed();
        // tar czf of the tree and its upload.
        let tgz = work.path().join("reference.tar.gz");
        let t = Instant::now();
        run(Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(&tree)
            .arg("."))?;
        upload(store.as_ref(), reference_key, &tgz).await?;
        let tar_t = t.elapsed();
        let tgz_len = std::fs::metadata(&tgz)?.len();
        println!(
            "| {what} | {:.2} MiB / {:.0} MiB / {} / {} | {:.0} MiB / {} | {:.3} | {:.0} MiB / {} |",
            report.uploaded as f64 / MIB,
            report.copied as f64 / MIB,
            report.requests,
            s(std::time::Duration::from_secs_f64(report.seconds)),
            full_len as f64 / MIB,
            s(full_t),
            report.seconds / full_t.as_secs_f64(),
            tgz_len as f64 / MIB,
            s(tar_t),
        );
    }
    println!("\n(ratio: write-back time / full repack + PutObject time)");
    store.delete(&key).await?;
    store.delete(reference_key).await?;
    drop(live);
    let _ = std::fs::remove_dir_all(Path::new(work.path()));
    Ok(())
}
