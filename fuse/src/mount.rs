//! Opening one session for mounting and putting it in front of the kernel.
//!
//! The session itself is opened by the core (`overlay::open`: the object,
//! the journal, crash repair, the version check); this adds the mount's own
//! choices (a subdirectory as the root, read-only) and the kernel options.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use sessionfs_core::overlay::namespace::{Namespace, ROOT};
use sessionfs_core::overlay::node::NodeKind;
use sessionfs_core::overlay::open::{self, Offline, OpenError, OpenSpec};
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;

use crate::fs::SessionFs;

pub struct MountSpec {
    pub store: Arc<dyn ObjectStore>,
    pub index: Option<TocIndex>,
    pub session: SessionPath,
    /// This session's overlay directory.
    pub overlay: PathBuf,
    /// Mount this directory of the session instead of its root.
    pub subdir: Option<String>,
    pub read_only: bool,
    /// Whether the mount may serve this host's cached version when the
    /// store cannot be reached (read-only then).
    pub offline: Offline,
    pub allow_other: bool,
    pub threads: usize,
    /// Owners and modes as the mount shows them.
    pub view: crate::attr::View,
}

/// Why a mount could not start, in words for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Fs(#[from] OverlayError),
    #[error(
        "this host cannot mount FUSE filesystems: {0} (load the fuse module; in a container, \
         pass --device /dev/fuse and --cap-add SYS_ADMIN)"
    )]
    NoFuse(String),
    #[error(transparent)]
    Open(#[from] OpenError),
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
    let live = open::open(
        &OpenSpec {
            store: spec.store.clone(),
            index: spec.index.clone(),
            session: spec.session.clone(),
            overlay: spec.overlay.clone(),
            read_only: spec.read_only,
            offline: spec.offline,
        },
        rt,
    )?;
    let root = match spec.subdir.as_deref().map(|s| s.trim_matches('/')) {
        None | Some("") => ROOT,
        Some(sub) => subdir_root(&mut live.ns.lock(), sub, spec.read_only)?,
    };
    Ok(SessionFs::new(Arc::new(live), root).with_view(spec.view))
}

fn subdir_root(ns: &mut Namespace, sub: &str, read_only: bool) -> Result<u64, MountError> {
    let mut at = ROOT;
    for part in sub.split('/').filter(|p| !p.is_empty()) {
        at = match ns.lookup(at, part) {
            Ok(n) if n.kind == NodeKind::Dir => n.ino,
            Ok(_) => return Err(MountError::BadSubdir(sub.to_owned())),
            Err(OverlayError::NotFound) if !read_only => {
                ns.create(at, part, NodeKind::Dir, 0o755, 0, 0, 0, None)?
                    .ino
            }
            Err(OverlayError::NotFound) => return Err(MountError::BadSubdir(sub.to_owned())),
            Err(e) => return Err(e.into()),
        };
    }
    Ok(at)
}

/// The kernel-side options of a session's mount.
/// `read_only` is the opened session's: an offline mount is read-only
/// even when the spec is not.
pub fn config(spec: &MountSpec, read_only: bool) -> Config {
    kernel_config(
        format!("sessionfs:{}", spec.session.as_str()),
        read_only,
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

/// The filesystem type the kernel lists (`/proc/mounts`, `df -T`, `findmnt -t`).
pub const FS_TYPE: &str = "fuse.sessionfs";

/// Mounts `fs` at `mountpoint`; returns once the kernel has answered INIT.
pub fn mount<FS: fuser::Filesystem>(
    fs: FS,
    mountpoint: &Path,
    config: &Config,
) -> Result<fuser::Session<FS>, MountError> {
    let failed = |source| MountError::Mount {
        path: mountpoint.display().to_string(),
        source,
    };
    match mount_typed(mountpoint, config).map_err(failed)? {
        Some(dev) => fuser::Session::from_fd(fs, dev, config.acl, config.clone()).map_err(failed),
        // Not allowed to call mount(2): fusermount3 mounts, and takes the
        // type from the `subtype` option itself.
        None => fuser::Session::new(fs, mountpoint, config).map_err(failed),
    }
}

/// mount(2) with the type [`FS_TYPE`]: fuser's own mount calls every
/// filesystem plain `fuse`, which hides what a mount is from `findmnt -t`,
/// fstab tooling and operators. `None` where this process may not mount
/// (not root); the caller then leaves it to fusermount3.
fn mount_typed(mountpoint: &Path, config: &Config) -> std::io::Result<Option<OwnedFd>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid}",
        dev.as_raw_fd()
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    let mut source = "sessionfs".to_owned();
    for option in &config.mount_options {
        match option {
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::RO => flags |= libc::MS_RDONLY,
            MountOption::FSName(name) => source = name.clone(),
            _ => {}
        }
    }
    if config.acl == SessionACL::All {
        data.push_str(",allow_other");
    }
    let c = |s: &str| CString::new(s).map_err(std::io::Error::other);
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let (source, fstype, data) = (c(&source)?, c(FS_TYPE)?, c(&data)?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(Some(dev.into()));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) => Ok(None),
        _ => Err(e),
    }
}
