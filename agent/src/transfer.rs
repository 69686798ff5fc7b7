//! `sessionfs pack`, `push` and `pull`: moving whole sessions between a
//! directory and the store.
//!
//! `push` packs into a temporary file first (so a tree that changes during the
//! pack never reaches the store half-written), then uploads it: one PUT up to
//! `MULTIPART_THRESHOLD`, multipart above. `pull` downloads to a temporary
//! file and extracts it with the `tar` crate, whose unpacking refuses `..`
//! paths and writes through no symlink out of the destination; it reads
//! multi-member gzip too, so any tarball of the bucket can be pulled.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sessionfs_core::session::SessionPath;

use crate::units::human_bytes;
use sessionfs_core::store::upload::put_file;
use sessionfs_core::store::{GetOptions, ObjectStore, PutOptions, StoreError};
use sessionfs_core::tarball::reader::decode_toc;
use sessionfs_core::tarball::toc::{
    Kind, Locator, DIGEST_KEY, LOCATOR_LEN, MAX_TOC_RAW, RESERVED_DIR, TOC_PATH,
};
use sessionfs_core::tarball::writer::{pack_dir, PackOptions, PackStats};

fn bytes_bar(total: Option<u64>, what: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_owned());
    bar
}

/// Packs `dir` into the file `out`.
pub async fn pack(dir: &Path, out: &Path, quiet: bool) -> Result<PackStats> {
    let (dir, out) = (dir.to_path_buf(), out.to_path_buf());
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        bytes_bar(None, "packing")
    };
    let b = bar.clone();
    let stats = tokio::task::spawn_blocking(move || -> Result<PackStats> {
        let file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let stats = pack_dir(&dir, &mut writer, &PackOptions::default(), &|n| {
            b.set_position(n)
        })
        .with_context(|| format!("packing {}", dir.display()))?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(stats)
    })
    .await??;
    bar.finish_and_clear();
    Ok(stats)
}

/// Packs `dir` and uploads it as session `session`, replacing what was there.
pub async fn push(
    store: Arc<dyn ObjectStore>,
    dir: &Path,
    session: &SessionPath,
    quiet: bool,
    json: bool,
) -> Result<()> {
    let scratch = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let stats = pack(dir, scratch.path(), quiet || json).await?;
    let key = session.object_key();
    let bar = if quiet || json {
        ProgressBar::hidden()
    } else {
        bytes_bar(Some(stats.object_size), "uploading")
    };
    let opts = PutOptions {
        content_type: Some("application/gzip".to_owned()),
        metadata: [(DIGEST_KEY.to_owned(), stats.digest.clone())].into(),
        ..PutOptions::default()
    };
    let etag = put_file(store.as_ref(), &key, scratch.path(), opts, &|n| {
        bar.set_position(n)
    })
    .await?;
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "sessionPath": session.as_str(),
                "entries": stats.entries,
                "tarBytes": stats.tar_size,
                "objectBytes": stats.object_size,
                "segments": stats.segments,
                "etag": etag,
            })
        );
    } else if !quiet {
        eprintln!(
            "pushed {session}: {} entries, {} of tar in a {} object ({} segments), etag {etag}",
            stats.entries,
            human_bytes(stats.tar_size),
            human_bytes(stats.object_size),
            stats.segments
        );
    }
    Ok(())
}

/// Refuses a pull into an existing directory that holds files: the
/// session's files would replace any of the same name there, unasked.
pub fn refuse_non_empty(dir: &Path) -> Result<()> {
    let held = match std::fs::read_dir(dir) {
        Ok(entries) => entries.count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
    };
    if held > 0 {
        bail!(
            "{} is not empty ({held} entries, which files of the session could replace): \
             choose a new or empty directory, or pass --allow-non-empty",
            dir.display()
        );
    }
    Ok(())
}

/// Downloads session `session` and extracts it into `dir`.
pub async fn pull(
    store: Arc<dyn ObjectStore>,
    session: &SessionPath,
    dir: &Path,
    quiet: bool,
    json: bool,
) -> Result<()> {
    let key = session.object_key();
    let mut stream = match store.get_stream(&key, GetOptions::default()).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => {
            return Err(crate::inspect::not_found(
                store.as_ref(),
                session,
                "list them with `sessionfs sessions`",
            )
            .await)
        }
        Err(e) => return Err(e.into()),
    };
    let (size, etag) = (stream.meta.size, stream.meta.etag.clone());
    let bar = if quiet || json {
        ProgressBar::hidden()
    } else {
        bytes_bar(Some(stream.meta.size), "downloading")
    };
    let scratch = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    {
        let mut out = BufWriter::with_capacity(1 << 20, scratch.as_file());
        let mut done = 0u64;
        while let Some(chunk) = stream.body.next().await {
            let chunk = chunk?;
            out.write_all(&chunk)?;
            done += chunk.len() as u64;
            bar.set_position(done);
        }
        out.flush()?;
    }
    bar.finish_and_clear();
    let (archive, dir) = (scratch.reopen()?, dir.to_path_buf());
    let count = tokio::task::spawn_blocking(move || extract(archive, &dir)).await??;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "sessionPath": session.as_str(),
                "entries": count,
                "objectBytes": size,
                "etag": etag,
            })
        );
    } else if !quiet {
        eprintln!(
            "pulled {session}: {count} entries from a {} object",
            human_bytes(size)
        );
    }
    Ok(())
}

/// Extracts a (possibly multi-member) tar.gz into `dir`, leaving out
/// sessionfs's own index.
fn extract(archive: File, dir: &Path) -> Result<usize> {
    let object_size = archive.metadata()?.len();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, archive));
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_unpack_xattrs(true);
    // Owners as stored, when this process may set them (root).
    // SAFETY: geteuid has no preconditions.
    tar.set_preserve_ownerships(unsafe { libc::geteuid() } == 0);
    tar.set_overwrite(true);
    let mut count = 0;
    let mut toc_entry = None;
    for entry in tar.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let path = entry.path().context("reading an entry name")?.into_owned();
        if path
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() == RESERVED_DIR)
        {
            if path.to_str() == Some(TOC_PATH) && entry.size() <= 2 * MAX_TOC_RAW {
                let mut data = Vec::with_capacity(entry.size() as usize);
                std::io::Read::read_to_end(&mut entry, &mut data)
                    .context("reading the table of contents")?;
                toc_entry = Some(data);
            }
            continue;
        }
        if !entry
            .unpack_in(dir)
            .with_context(|| format!("extracting {}", path.display()))?
        {
            bail!(
                "refusing to extract {}: it points outside {}",
                path.display(),
                dir.display()
            );
        }
        count += 1;
    }
    if let Some(data) = toc_entry {
        restore_mtimes(&data, object_size, dir)?;
    }
    Ok(count)
}

/// Tar headers hold whole seconds; a sessionfs object's TOC has the
/// nanoseconds: set them once everything is extracted (a directory's own
/// time last, as its entries' creation moved it).
fn restore_mtimes(toc_entry: &[u8], object_size: u64, dir: &Path) -> Result<()> {
    let Some(at) = toc_entry.len().checked_sub(LOCATOR_LEN) else {
        bail!("the table of contents is cut short");
    };
    let locator = Locator::decode(&toc_entry[at..], object_size)?;
    let toc_bytes = toc_entry
        .get(..locator.toc_len as usize)
        .context("the table of contents is cut short")?;
    let toc = decode_toc(&locator, toc_bytes)?;
    let (dirs, others): (Vec<_>, Vec<_>) = toc.entries.iter().partition(|e| e.t == Kind::Dir);
    for e in others.into_iter().chain(dirs.into_iter().rev()) {
        let path = std::ffi::CString::new(dir.join(&*e.p).as_os_str().as_encoded_bytes())?;
        let t = libc::timespec {
            tv_sec: e.mt,
            tv_nsec: i64::from(e.mn.min(999_999_999)),
        };
        // SAFETY: `path` is NUL-terminated; `times` holds two timespecs.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                path.as_ptr(),
                [t, t].as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            bail!("setting the time of {}: {err}", e.p);
        }
    }
    Ok(())
}

/// Refuses a push over a session whose overlay on this host holds changes
/// not yet written back (`--force` pushes anyway; a mount then merges them
/// onto the pushed tree). An overlay a running mount holds is left to it.
pub fn refuse_pending(bucket: &str, session: &SessionPath) -> anyhow::Result<()> {
    let from_env = std::env::var_os("SESSIONFS_OVERLAY_DIR").map(std::path::PathBuf::from);
    let Ok(root) = crate::mount_cmd::overlay_root(from_env) else {
        return Ok(());
    };
    let overlay = root.join(bucket).join(session.as_str());
    let journal = overlay.join(sessionfs_core::overlay::open::JOURNAL);
    if !journal.exists() {
        return Ok(());
    }
    match sessionfs_core::overlay::journal::Journal::open(&journal) {
        Ok(j) if j.has_changes().unwrap_or(false) => anyhow::bail!(
            "the overlay {} holds changes of {session} not yet written back; mount the session \
             (they are written back) or push with --force (they are merged onto the push)",
            overlay.display()
        ),
        _ => Ok(()),
    }
}
