//! Opening one session for mounting and putting it in front of the kernel.
//!
//! A session's overlay is a directory: `journal.db` (the tree and the change
//! feed) and `data/` (changed files). Opening it reads the object's TOC
//! (lazily, through the block cache), starts the journal from it the first
//! time, and on later opens reconciles what a crash may have left: overlay
//! files longer than the journal knew, inodes unlinked while open. An
//! overlay whose pending changes were made against another version of the
//! object than the one now stored is refused rather than silently mixed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::{ObjectStore, StoreError};
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::TarballError;

use crate::content::Content;
use crate::fs::SessionFs;
use crate::namespace::{Namespace, ROOT};
use crate::node::{NodeKind, Time};
use crate::FsError;

pub struct MountSpec {
    pub store: Arc<dyn ObjectStore>,
    pub index: Option<TocIndex>,
    pub session: SessionPath,
    /// This session's overlay directory.
    pub overlay: PathBuf,
    /// Mount this directory of the session instead of its root.
    pub subdir: Option<String>,
    pub read_only: bool,
    pub allow_other: bool,
    pub threads: usize,
}

/// Why a mount could not start, in words for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Fs(#[from] FsError),
    #[error(
        "this host cannot mount FUSE filesystems: {0} (load the fuse module; in a container, \
         pass --device /dev/fuse and --cap-add SYS_ADMIN)"
    )]
    NoFuse(String),
    #[error(
        "the overlay at {overlay} holds changes not yet written back, made against object \
         version {journal}, but the stored object is now {stored}; write them back or move \
         the overlay away"
    )]
    Diverged {
        overlay: String,
        journal: String,
        stored: String,
    },
    #[error("--subdir {0:?} is not a directory of the session")]
    BadSubdir(String),
    #[error("mounting on {path}: {source}")]
    Mount {
        path: String,
        source: std::io::Error,
    },
}

/// Checks that FUSE is usable here, before anything else is set up.
pub fn check_fuse() -> Result<(), MountError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(MountError::NoFuse("/dev/fuse does not exist".into()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(MountError::NoFuse(
            "no permission to open /dev/fuse (run as root or add the user to the fuse group)"
                .into(),
        )),
        Err(e) => Err(MountError::NoFuse(format!("/dev/fuse: {e}"))),
    }
}

/// Opens the session's object and overlay: the filesystem, ready to mount.
pub fn open(spec: &MountSpec, rt: &tokio::runtime::Handle) -> Result<SessionFs, MountError> {
    std::fs::create_dir_all(&spec.overlay).map_err(FsError::from)?;
    let key = spec.session.object_key();
    let reader = match rt.block_on(SessionReader::open(
        spec.store.clone(),
        &key,
        spec.index.as_ref(),
    )) {
        Ok(r) => Some(Arc::new(r)),
        Err(TarballError::Store(StoreError::NotFound { .. })) => None,
        Err(e) => return Err(FsError::from(e).into()),
    };
    let etag = reader.as_ref().map(|r| r.meta().etag.clone());
    let journal_path = spec.overlay.join("journal.db");
    if journal_path.exists() {
        check_version(&journal_path, &spec.overlay, etag.as_deref())?;
    }
    let entries = reader.as_ref().map_or(&[][..], |r| r.entries());
    let (mut ns, orphans) = Namespace::open(&journal_path, etag.as_deref(), entries)?;
    let content = Content::new(&spec.overlay, reader.clone(), rt.clone())?;
    for ino in orphans {
        content.remove(ino);
    }
    // Files created and written whose journal entry had not caught up.
    for ino in ns.unjournaled_local() {
        if content.stat(ino).is_some() {
            ns.mark_local(ino);
            ns.flush(ino)?;
        }
    }
    // Writes that reached overlay files after the journal last caught up.
    for ino in ns.local_files() {
        if let Some(md) = content.stat(ino) {
            let mtime = md.modified().map(Time::from_system).unwrap_or_default();
            ns.adopt_local(ino, md.len(), mtime);
        }
    }
    let root = match spec.subdir.as_deref().map(|s| s.trim_matches('/')) {
        None | Some("") => ROOT,
        Some(sub) => subdir_root(&mut ns, sub, spec.read_only)?,
    };
    Ok(SessionFs::new(ns, content, root, spec.read_only))
}

/// Refuses an overlay with pending changes against another object version;
/// one without pending changes is simply started again from the object.
fn check_version(journal: &Path, overlay: &Path, etag: Option<&str>) -> Result<(), MountError> {
    let j = crate::journal::Journal::open(journal)?;
    let Some(recorded) = j.meta("base_etag")? else {
        return Ok(());
    };
    let stored = etag.unwrap_or("");
    if recorded == stored {
        return Ok(());
    }
    if !j.changes_since(0)?.is_empty() {
        return Err(MountError::Diverged {
            overlay: overlay.display().to_string(),
            journal: recorded,
            stored: stored.to_owned(),
        });
    }
    drop(j);
    tracing::info!("the object changed and the overlay has no pending changes: starting afresh");
    for name in ["journal.db", "journal.db-wal", "journal.db-shm"] {
        let _ = std::fs::remove_file(overlay.join(name));
    }
    let _ = std::fs::remove_dir_all(overlay.join("data"));
    Ok(())
}

fn subdir_root(ns: &mut Namespace, sub: &str, read_only: bool) -> Result<u64, MountError> {
    let mut at = ROOT;
    for part in sub.split('/').filter(|p| !p.is_empty()) {
        at = match ns.lookup(at, part) {
            Ok(n) if n.kind == NodeKind::Dir => n.ino,
            Ok(_) => return Err(MountError::BadSubdir(sub.to_owned())),
            Err(FsError::NotFound) if !read_only => {
                ns.create(at, part, NodeKind::Dir, 0o755, 0, 0, 0, None)?
                    .ino
            }
            Err(FsError::NotFound) => return Err(MountError::BadSubdir(sub.to_owned())),
            Err(e) => return Err(e.into()),
        };
    }
    Ok(at)
}

/// The kernel-side options of a session's mount.
pub fn config(spec: &MountSpec) -> Config {
    kernel_config(
        format!("sessionfs:{}", spec.session.as_str()),
        spec.read_only,
        spec.allow_other,
        spec.threads,
    )
}

/// The kernel-side options of any sessionfs mount.
pub fn kernel_config(fsname: String, read_only: bool, allow_other: bool, threads: usize) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("sessionfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(threads.max(1));
    config
}

/// Mounts `fs` at `mountpoint`; returns once the kernel has answered INIT.
pub fn mount<FS: fuser::Filesystem>(
    fs: FS,
    mountpoint: &Path,
    config: &Config,
) -> Result<fuser::Session<FS>, MountError> {
    fuser::Session::new(fs, mountpoint, config).map_err(|source| MountError::Mount {
        path: mountpoint.display().to_string(),
        source,
    })
}
