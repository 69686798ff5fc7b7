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
    let described = store.describe();
    match SessionReader::open(store, &session.object_key(), Some(index)).await {
        Ok(r) => Ok(r),
        Err(TarballError::Store(StoreError::NotFound { .. })) => anyhow::bail!(
            "session {session} not found in {described} (list them with `sessionfs sessions`)"
        ),
        Err(e) => Err(e.into()),
    }
}

/// A reader that went away (`| head`) ends the output, not the command.
fn quiet_pipe(r: std::io::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

pub async fn ls(reader: &SessionReader, dir: Option<&str>, long: bool) -> Result<()> {
    quiet_pipe(ls_to(reader, dir, long, &mut std::io::stdout().lock()))
}

fn ls_to(
    reader: &SessionReader,
    dir: Option<&str>,
    long: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let entries: Vec<&Entry> = match dir {
        None => reader.entries().iter().collect(),
        Some(dir) => {
            let dir = dir.trim_matches('/');
            if !dir.is_empty() && reader.stat(dir).is_none_or(|e| e.t != Kind::Dir) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no such directory in the session: {dir}"),
                ));
            }
            reader.list_dir(dir)
        }
    };
    for e in entries {
        if long {
            let kind = match e.t {
                Kind::File => '-',
                Kind::Dir => 'd',
                Kind::Symlink => 'l',
                Kind::HardLink => 'h',
                Kind::Fifo => 'p',
                Kind::CharDevice => 'c',
                Kind::BlockDevice => 'b',
            };
            let target =
                e.lt.as_deref()
                    .map(|t| format!(" -> {}", escape_controls(t)))
                    .unwrap_or_default();
            writeln!(
                out,
                "{kind}{:04o} {:>12} {:>12} {}{target}",
                e.m,
                e.s,
                e.mt,
                escape_controls(&e.p)
            )?;
        } else {
            writeln!(out, "{}", escape_controls(&e.p))?;
        }
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
