//! Durable file operations for the local store: a write is a temporary file,
//! fsynced, renamed over the target, and the directory fsynced, so a crash
//! leaves either the old object or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file being written in the store's scratch directory; removed on drop
/// unless it was renamed into place.
pub(crate) struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    pub(crate) fn create(dir: &Path) -> io::Result<TempFile> {
        loop {
            let path = dir.join(format!("tmp-{:032x}", rand::random::<u128>()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        persisted: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)
    }

    /// Flushes the contents to disk (before the caller takes locks around the rename).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Renames the (already synced) file to `target`, then flushes `target`'s
    /// directory so the rename itself survives a crash. On failure the file
    /// stays temporary, and the caller may try again.
    pub(crate) fn rename_into(&mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        self.persisted = true;
        sync_parent(target)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Creates `dir` and its missing ancestors below `root`, fsyncing each new
/// directory's parent so the new entries survive a crash.
pub(crate) fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "directory outside the store"))?;
    let mut current = root.to_path_buf();
    for part in rel.components() {
        current.push(part);
        match fs::create_dir(&current) {
            Ok(()) => sync_parent(&current)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !current.is_dir() {
                    return Err(io::ErrorKind::NotADirectory.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the empty directories from `dir` up to (not including) `root`.
/// Stops quietly at the first directory that is not empty: another writer may
/// be filling it at this moment, and it retries if its directory vanishes.
pub(crate) fn prune_empty_dirs(root: &Path, dir: &Path) {
    let mut current = dir.to_path_buf();
    while current.starts_with(root) && current != root {
        if fs::remove_dir(&current).is_err() {
            return;
        }
        let _ = sync_parent(&current);
        if !current.pop() {
            return;
        }
    }
}
