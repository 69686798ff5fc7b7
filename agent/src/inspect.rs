//! `sessionfs ls` and `sessionfs cat`: looking into a session without
//! downloading it, through the lazy reader.

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Result};
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::toc::{Entry, Kind};

/// Bytes read per request by `cat`: large enough to amortise a GET, small
/// enough to keep memory flat for any file size.
const CAT_CHUNK: u64 = 8 << 20;

pub async fn open(
    store: Arc<dyn ObjectStore>,
    session: &SessionPath,
    index: &TocIndex,
) -> Result<SessionReader> {
    Ok(SessionReader::open(store, &session.object_key(), Some(index)).await?)
}

pub async fn ls(reader: &SessionReader, dir: Option<&str>, long: bool) -> Result<()> {
    let entries: Vec<&Entry> = match dir {
        None => reader.entries().iter().collect(),
        Some(dir) => {
            let dir = dir.trim_matches('/');
            if !dir.is_empty() && reader.stat(dir).is_none_or(|e| e.t != Kind::Dir) {
                bail!("no such directory in the session: {dir}");
            }
            reader.list_dir(dir)
        }
    };
    let mut out = std::io::stdout().lock();
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
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default();
            writeln!(
                out,
                "{kind}{:04o} {:>12} {:>12} {}{target}",
                e.m, e.s, e.mt, e.p
            )?;
        } else {
            writeln!(out, "{}", e.p)?;
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
        out.write_all(&chunk)?;
        offset += chunk.len() as u64;
    }
    out.flush()?;
    Ok(())
}
