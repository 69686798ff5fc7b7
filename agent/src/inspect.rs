//! `sessionfs ls` and `sessionfs cat`: looking into a session without
//! downloading it, through the lazy reader.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::{ObjectStore, StoreError};
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::toc::{Entry, Kind};
use sessionfs_core::tarball::TarballError;
use sessionfs_core::text::escape_controls;

/// Bytes read per request by `cat`: large enough to amortise a GET, small
/// enough to keep memory flat for any file size.
const CAT_CHUNK: u64 = 8 << 20;

pub async fn open(
    store: Arc<dyn ObjectStore>,
    session: &SessionPath,
    index: &TocIndex,
) -> Result<SessionReader> {
    match SessionReader::open(store.clone(), &session.object_key(), Some(index)).await {
        Ok(r) => Ok(r),
        Err(TarballError::Store(StoreError::NotFound { .. })) => Err(not_found(
            store.as_ref(),
            session,
            "list them with `sessionfs sessions`",
        )
        .await),
        // A GET (the first request of an open) tells a missing bucket apart.
        Err(TarballError::Store(e @ StoreError::BucketNotFound { .. })) => {
            Err(bucket_missing(&e, store.as_ref()))
        }
        Err(e) => Err(e.into()),
    }
}

fn bucket_missing(e: &StoreError, store: &dyn ObjectStore) -> anyhow::Error {
    anyhow::anyhow!(
        "{e} in {}: create it, or check MINIO_BUCKET/--bucket",
        store.describe()
    )
}

/// Why a session's object is not there, in words: a HEAD cannot tell a
/// missing bucket from a missing object, a listing can.
pub async fn not_found(
    store: &dyn ObjectStore,
    session: &SessionPath,
    hint: &str,
) -> anyhow::Error {
    if let Err(e @ StoreError::BucketNotFound { .. }) =
        store.list_all(&format!("{session}/"), None).await
    {
        return bucket_missing(&e, store);
    }
    anyhow::anyhow!(
        "session {session} not found in {} ({hint})",
        store.describe()
    )
}

/// A reader that went away (`| head`) ends the output, not the command.
pub fn quiet_pipe(r: std::io::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// How `ls` prints.
#[derive(Clone, Copy, Default)]
pub struct LsStyle {
    /// Type and mode (as `ls -l`), owner, size, modification time.
    pub long: bool,
    /// Sizes in KiB, MiB, … (with `long`).
    pub human: bool,
    /// One JSON array of every field, for scripts.
    pub json: bool,
    pub time_style: crate::local_time::TimeStyle,
}

pub async fn ls(reader: &SessionReader, path: Option<&str>, style: LsStyle) -> Result<()> {
    quiet_pipe(ls_to(reader, path, style, &mut std::io::stdout().lock()))
}

/// `-rwxr-xr-x`, as `ls -l` prints a mode.
fn mode_string(e: &Entry) -> String {
    let kind = match e.t {
        Kind::File | Kind::HardLink => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
    };
    let m = e.m;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let special = |x: bool, set: bool, on: char, off: char| match (set, x) {
        (true, true) => on,
        (true, false) => off,
        (false, true) => 'x',
        (false, false) => '-',
    };
    let mut out = String::with_capacity(10);
    out.push(kind);
    out.push(bit(0o400, 'r'));
    out.push(bit(0o200, 'w'));
    out.push(special(m & 0o100 != 0, m & 0o4000 != 0, 's', 'S'));
    out.push(bit(0o040, 'r'));
    out.push(bit(0o020, 'w'));
    out.push(special(m & 0o010 != 0, m & 0o2000 != 0, 's', 'S'));
    out.push(bit(0o004, 'r'));
    out.push(bit(0o002, 'w'));
    out.push(special(m & 0o001 != 0, m & 0o1000 != 0, 't', 'T'));
    out
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1}{}", UNITS[unit])
    } else {
        format!("{v:.0}{}", UNITS[unit])
    }
}

fn mtime(e: &Entry) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    match u64::try_from(e.mt) {
        Ok(s) => base + std::time::Duration::new(s, e.mn.min(999_999_999)),
        Err(_) => base - std::time::Duration::from_secs(e.mt.unsigned_abs()),
    }
}

fn ls_to(
    reader: &SessionReader,
    path: Option<&str>,
    style: LsStyle,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let entries: Vec<&Entry> = match path.map(|p| p.trim_matches('/')) {
        None => reader.entries().iter().collect(),
        Some("") => reader.list_dir(""),
        // As `ls`: a directory lists its entries, anything else itself.
        Some(p) => match reader.stat(p) {
            Some(e) if e.t == Kind::Dir => reader.list_dir(p),
            Some(e) => vec![e],
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no such file or directory in the session: {p}"),
                ))
            }
        },
    };
    if style.json {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "path": &*e.p,
                    "type": match e.t {
                        Kind::File => "file",
                        Kind::Dir => "dir",
                        Kind::Symlink => "symlink",
                        Kind::HardLink => "hardlink",
                        Kind::Fifo => "fifo",
                        Kind::CharDevice => "char",
                        Kind::BlockDevice => "block",
                    },
                    "mode": format!("{:04o}", e.m),
                    "size": e.s,
                    "uid": e.u,
                    "gid": e.g,
                    "mtime": humantime::format_rfc3339_nanos(mtime(e)).to_string(),
                    "target": e.lt(),
                })
            })
            .collect();
        return writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&list).map_err(std::io::Error::other)?
        );
    }
    let now = std::time::SystemTime::now();
    for e in entries {
        if !style.long {
            writeln!(out, "{}", escape_controls(&e.p))?;
            continue;
        }
        let target = match (e.t, e.lt()) {
            (Kind::HardLink, Some(t)) => format!(" (hard link to {})", escape_controls(t)),
            (_, Some(t)) => format!(" -> {}", escape_controls(t)),
            _ => String::new(),
        };
        let size = if style.human {
            human_size(e.s)
        } else {
            e.s.to_string()
        };
        let when = crate::local_time::format(mtime(e), style.time_style, now);
        writeln!(
            out,
            "{} {:>5} {:>5} {:>10} {when} {}{target}",
            mode_string(e),
            e.u,
            e.g,
            size,
            escape_controls(&e.p)
        )?;
    }
    Ok(())
}

pub async fn cat(reader: &SessionReader, path: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut offset = 0;
    loop {
        let chunk = reader.read(path, offset, CAT_CHUNK).await?;
        if chunk.is_empty() {
            break;
        }
        if let Err(e) = out.write_all(&chunk) {
            return quiet_pipe(Err(e));
        }
        offset += chunk.len() as u64;
    }
    quiet_pipe(out.flush())
}
