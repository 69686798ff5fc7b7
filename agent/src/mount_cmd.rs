//! `sessionfs mount` and `sessionfs umount`, and the running of a mount
//! that `serve --mount-root` shares.
//!
//! A mount runs in the foreground until SIGINT or SIGTERM (or an external
//! unmount); then the journals are synced and the mount point released.
//! `--daemon` re-executes the same command detached, with its log in the
//! overlay directory, and returns once the kernel lists the mount, or fails
//! with the child's own error if it never appears.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sessionfs_core::overlay::open::Offline;
use sessionfs_core::overlay::open::JOURNAL;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::StoreError;
use sessionfs_fuse::mount::{self, MountSpec};

use crate::local_stack::LocalStack;
use crate::sd_notify;
use crate::writeback_loop::{Policy, WriteBack};

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Session path, e.g. `owner__repo__branch`; it must exist in the
    /// store (or have changes in an overlay here) unless `--create`.
    pub session: String,
    /// An existing empty directory (see `--allow-non-empty`).
    pub mountpoint: PathBuf,
    /// Start a new, empty session when the store has none of this name
    /// (without it, a mistyped name is an error, not an empty mount).
    #[arg(long)]
    pub create: bool,
    /// Mount over a directory that holds files (they are hidden while
    /// mounted).
    #[arg(long)]
    pub allow_non_empty: bool,
    /// Mount this directory of the session (e.g. `workspace`) instead of its root.
    #[arg(long)]
    pub subdir: Option<String>,
    /// Refuse every change.
    #[arg(long)]
    pub read_only: bool,
    /// Do not contact the store: serve, read-only, the version this host
    /// last opened, from the cached index and blocks (files whose blocks are
    /// not cached fail with EIO). Without it, a mount whose store cannot be
    /// reached falls back to the same, saying so.
    #[arg(long)]
    pub offline: bool,
    /// Return once the mount is live, leaving it running in the background.
    #[arg(long)]
    pub daemon: bool,
    /// Let users other than the one mounting use the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Where overlays (changes not yet written back) live.
    /// [default: $XDG_STATE_HOME/sessionfs/overlays or ~/.local/state/sessionfs/overlays]
    #[arg(long, env = "SESSIONFS_OVERLAY_DIR", value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// FUSE worker threads. One is fastest: what waits on the disk or the
    /// store (reads of the object, copy-ups, truncates, fsync, flush) runs
    /// on a pool of its own, and more threads answering a single session
    /// only wake one another (10,000 creates took a quarter longer with 4,
    /// on 2 cores).
    #[arg(long, default_value_t = 1, value_parser = crate::arg_ranges::threads)]
    pub threads: u64,
    /// Seconds one read of the object may take, retries included, before
    /// it fails (EIO in a mount, 5xx in the API) and the log says why.
    #[arg(long, env = "SESSIONFS_READ_TIMEOUT_SECS", default_value_t = 30, value_name = "SECS",
          value_parser = crate::arg_ranges::seconds)]
    pub read_timeout_secs: u64,
    /// Show every file and directory as owned by this user (a container's
    /// user, say); the stored owners are kept and written back unchanged, and
    /// new files take their directory's stored owner.
    #[arg(long, value_name = "UID", help_heading = "Owners as shown")]
    pub uid: Option<u32>,
    /// Show every file and directory as of this group (see --uid).
    #[arg(long, value_name = "GID", help_heading = "Owners as shown")]
    pub gid: Option<u32>,
    /// Show every file with these permission bits (octal, e.g. 644).
    #[arg(long, value_name = "MODE", value_parser = crate::arg_ranges::octal_mode,
          help_heading = "Owners as shown")]
    pub file_mode: Option<u32>,
    /// Show every directory with these permission bits (octal, e.g. 755).
    #[arg(long, value_name = "MODE", value_parser = crate::arg_ranges::octal_mode,
          help_heading = "Owners as shown")]
    pub dir_mode: Option<u32>,
    /// Clear these permission bits from every mode shown (octal, e.g. 022).
    #[arg(long, value_name = "MASK", value_parser = crate::arg_ranges::octal_mode,
          help_heading = "Owners as shown")]
    pub umask: Option<u32>,
    /// Mount options as mount(8) and fstab give them, e.g.
    /// `-o ro,allow_other,subdir=workspace,cache_size=1024`: each stands for
    /// the flag of that meaning (README, "Mount options"); unknown ones are
    /// an error.
    #[arg(short = 'o', value_name = "OPT[,OPT…]")]
    pub options: Vec<String>,
    /// Serve Prometheus metrics (block cache, store traffic, write-backs)
    /// at http://ADDR/metrics, e.g. `127.0.0.1:9100`.
    #[arg(long, env = "SESSIONFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub writeback: Policy,
    #[command(flatten)]
    pub store: crate::store_args::StoreArgs,
}

/// The overlays' journal reserve, beside the sessions' overlay directories
/// (a file, so never taken for a session).
pub const RESERVE_FILE: &str = ".journal-reserve";

pub fn overlay_root(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(dir) => Ok(dir),
        None => crate::xdg_dir("XDG_STATE_HOME", ".local/state", "sessionfs/overlays")
            .context("cannot tell where overlays live: set SESSIONFS_OVERLAY_DIR"),
    }
}

pub fn check_mountpoint(mp: &Path, allow_non_empty: bool) -> Result<PathBuf> {
    let md = match std::fs::metadata(mp) {
        // A FUSE mount whose process died (kill -9): detach it and go on.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            if let Err(u) = umount(mp, true) {
                bail!(
                    "{} is a stale mount (its process died) and could not be detached ({u:#}); \
                     run `fusermount3 -uz {0}` or `umount -l {0}`",
                    mp.display()
                );
            }
            tracing::warn!(
                "{}: detached a stale mount left by a process that died",
                mp.display()
            );
            std::fs::metadata(mp).with_context(|| format!("mount point {}", mp.display()))?
        }
        other => other.with_context(|| format!("mount point {}", mp.display()))?,
    };
    if !md.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    let mp = mp.canonicalize()?;
    if is_mounted(&mp) {
        bail!("{} is already a mount point", mp.display());
    }
    if !allow_non_empty {
        let held = std::fs::read_dir(&mp)
            .with_context(|| format!("mount point {}", mp.display()))?
            .count();
        if held > 0 {
            bail!(
                "mount point {} is not empty ({held} entries, which the mount would hide): \
                 choose an empty directory, or pass --allow-non-empty",
                mp.display()
            );
        }
    }
    Ok(mp)
}

/// Whether the kernel lists `mp` as a mount point (of any filesystem).
pub fn is_mounted(mp: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mp.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mount_path(p) == want)
}

fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub async fn run(args: MountArgs, stack: LocalStack, quiet: bool) -> Result<()> {
    let bucket = args.store.bucket.clone();
    let (store, index) = (stack.store.clone(), stack.index.clone());
    let session = SessionPath::parse(&args.session)?;
    let mountpoint = check_mountpoint(&args.mountpoint, args.allow_non_empty)?;
    sessionfs_core::store::deadline::set_read_deadline(Duration::from_secs(args.read_timeout_secs));
    mount::check_fuse()?;
    let overlays = overlay_root(args.overlay_dir.clone())?.join(bucket);
    sessionfs_core::overlay::reserve::set_file(overlays.join(RESERVE_FILE));
    let overlay = overlays.join(session.as_str());
    if !args.create && !args.offline && !overlay.join(JOURNAL).exists() {
        let key = session.object_key();
        if let Err(StoreError::NotFound { .. }) = store.head(&key).await {
            return Err(crate::inspect::not_found(
                store.as_ref(),
                &session,
                &format!(
                    "no object {key}, no overlay here: check the name, or pass --create to \
                     start a new, empty session"
                ),
            )
            .await);
        }
    }
    if args.daemon {
        return daemonise(&overlay, &mountpoint, quiet).await;
    }
    // Taken before mounting, so a port in use fails the command cleanly.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}"))?,
        ),
        None => None,
    };
    let spec = MountSpec {
        store,
        index: Some(index),
        session: session.clone(),
        overlay,
        subdir: args.subdir,
        read_only: args.read_only,
        offline: if args.offline {
            Offline::Always
        } else {
            Offline::WhenUnreachable
        },
        allow_other: args.allow_other,
        threads: args.threads as usize,
        view: sessionfs_fuse::attr::View {
            uid: args.uid,
            gid: args.gid,
            file_mode: args.file_mode,
            dir_mode: args.dir_mode,
            umask: args.umask.unwrap_or(0),
        },
    };
    let rt = tokio::runtime::Handle::current();
    let mp = mountpoint.clone();
    let store = spec.store.clone();
    // Opening reads the TOC and the journal; mounting waits for the kernel.
    let (fuse_session, live) = tokio::task::spawn_blocking(move || {
        let fs = mount::open(&spec, &rt)?;
        let live = fs.live().clone();
        let root = fs.root();
        let config = mount::config(&spec, live.read_only());
        let session = mount::mount(fs, &mp, &config)?;
        // Changes that do not come through the mount (a move onto another
        // writer's object) reach the kernel's caches through the notifier.
        let notifier = Arc::new(std::sync::OnceLock::new());
        let _ = notifier.set(session.notifier());
        live.set_watcher(Some(sessionfs_fuse::fs::watcher(notifier, 0, root)));
        anyhow::Ok((session, live))
    })
    .await??;
    let read_only = live.read_only();
    // One line per mount, also when quiet: what is served, from which version.
    tracing::info!(
        session = %session,
        "mounted at {}: object version {}, {}{}",
        mountpoint.display(),
        live.reader().map_or("(none yet)".to_owned(), |r| r.meta().etag.clone()),
        if read_only { "read-only" } else { "read-write" },
        if read_only && !args.read_only { ", offline" } else { "" }
    );
    if !quiet {
        let offline = if read_only && !args.read_only {
            " (read-only, offline: the store cannot be reached; see the log)"
        } else {
            ""
        };
        eprintln!(
            "mounted {} at {}{offline}",
            session.as_str(),
            mountpoint.display()
        );
    }
    let one = live.clone();
    let writeback = WriteBack::new(
        Arc::new(move || vec![one.clone()]),
        store,
        args.writeback,
        Arc::new(|s| {
            tracing::error!(
                session = %s.name,
                "the session's object was deleted from the store; the mount keeps serving it and its changes stay in the overlay"
            )
        }),
    );
    // Before the first request: `sessionfs flush` right after `mount
    // --daemon` returns must find the loop (it registered at its first tick).
    if !args.offline {
        writeback.register_control(&live);
    }
    tokio::spawn(crate::reload::on_sighup(writeback.clone()));
    // --offline: nothing asks the store, not even whether a newer object exists.
    let looping = tokio::spawn({
        let writeback = writeback.clone();
        async move {
            if !args.offline {
                writeback.run().await
            }
        }
    });
    let metrics = metrics.map(|listener| {
        let (stack, live) = (Arc::new(stack), live.clone());
        let gauges = move || {
            let pending = live.has_pending_changes().unwrap_or(false);
            stack.gauges(1, u64::from(pending))
        };
        tokio::spawn(sessionfs_api::metrics::serve_alone(
            listener,
            Arc::new(gauges),
        ))
    });
    let served = serve_until_stopped(fuse_session, &mountpoint, quiet, &live).await;
    if let Some(m) = metrics {
        m.abort();
    }
    looping.abort();
    let _ = looping.await;
    // Unmounted: what is pending goes to the store before the process ends.
    if !read_only && !writeback.flush_all(STOP_FLUSH).await {
        tracing::error!("session {session}: changes left pending in the overlay");
    }
    if let Err(e) = live.sync() {
        tracing::error!("syncing the overlay: {e}");
    }
    served
}

/// How long a stop may spend writing back what is pending.
pub const STOP_FLUSH: Duration = Duration::from_secs(60);

/// A mount running on its own thread.
pub struct Running {
    /// Completes when the kernel lets go of the mount.
    pub ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    mountpoint: PathBuf,
}

/// Starts serving `fuse_session` on its own thread.
pub fn spawn<FS: fuser::Filesystem + Send + 'static>(
    fuse_session: fuser::Session<FS>,
    mountpoint: &Path,
) -> Result<Running> {
    let (done_tx, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = done_tx.send(fuse_session.run());
        })?;
    Ok(Running {
        ended,
        mountpoint: mountpoint.to_owned(),
    })
}

impl Running {
    /// Unmounts (lazily when busy) and waits for the session thread.
    pub async fn stop(self, quiet: bool) -> Result<()> {
        // The session thread ends once the kernel lets go of the mount.
        if let Err(e) = umount(&self.mountpoint, false) {
            tracing::warn!("unmount failed ({e}); detaching lazily");
            lazy_unmount(&self.mountpoint)?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.ended).await;
        if !quiet {
            eprintln!("unmounted {}", self.mountpoint.display());
        }
        Ok(())
    }
}

/// Completes at SIGINT or SIGTERM.
pub async fn stop_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Runs a mounted session until a signal or an external unmount.
async fn serve_until_stopped<FS: fuser::Filesystem + Send + 'static>(
    fuse_session: fuser::Session<FS>,
    mountpoint: &Path,
    quiet: bool,
    live: &Arc<sessionfs_core::overlay::live::LiveSession>,
) -> Result<()> {
    let mut running = spawn(fuse_session, mountpoint)?;
    // The kernel's requests are being answered from here on.
    let one = [live.clone()];
    sd_notify::ready(&format!(
        "mounted at {}; {}",
        mountpoint.display(),
        sd_notify::sessions_status(&one)
    ));
    // Both go on until the process exits: through the write-back at the
    // stop too, which the watchdog must not take for a hang.
    sd_notify::spawn_status(move || sd_notify::sessions_status(&one));
    sd_notify::spawn_watchdog();
    tokio::select! {
        r = stop_signal() => {
            sd_notify::stopping("unmounting, then writing back pending changes");
            r?
        }
        r = &mut running.ended => {
            r.context("the FUSE session thread died")??;
            if !quiet {
                eprintln!("unmounted {}", mountpoint.display());
            }
            return Ok(());
        }
    }
    running.stop(quiet).await
}

/// Starts this same command without `--daemon`, detached, and waits for the mount.
async fn daemonise(overlay: &Path, mountpoint: &Path, quiet: bool) -> Result<()> {
    std::fs::create_dir_all(overlay)?;
    let log_path = overlay.join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    // What earlier runs wrote stays in the log, but not in this run's answer.
    let start = log.metadata().map_or(0, |m| m.len());
    let args: Vec<std::ffi::OsString> = crate::command_line()
        .into_iter()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child.spawn().context("starting the background mount")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if is_mounted(mountpoint) {
            if !quiet {
                eprintln!(
                    "mounted at {} (pid {}, log {})",
                    mountpoint.display(),
                    child.id(),
                    log_path.display()
                );
            }
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read(&log_path).unwrap_or_default();
            let this_run = String::from_utf8_lossy(log.get(start as usize..).unwrap_or_default());
            let tail: Vec<&str> = this_run.lines().rev().take(5).collect();
            bail!(
                "the background mount exited ({status}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the mount did not appear within 120 s (log: {})",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lazy_unmount(mp: &Path) -> Result<()> {
    umount(mp, true)
}

/// `sessionfs umount`: the mount process sees the unmount, syncs and exits.
pub fn umount(mp: &Path, lazy: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())
        .context("mount point contains a NUL byte")?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Not root: fusermount3 may unmount a FUSE mount its user owns.
        Some(libc::EPERM) => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg(if lazy { "-uz" } else { "-u" }).arg(mp);
            let status = cmd.status().context("running fusermount3")?;
            if !status.success() {
                bail!("fusermount3 could not unmount {}", mp.display());
            }
            Ok(())
        }
        Some(libc::EBUSY) => bail!(
            "{} is busy (files are open there); close them, or use --lazy",
            mp.display()
        ),
        Some(libc::EINVAL) => bail!("{} is not a mount point", mp.display()),
        _ => Err(e).with_context(|| format!("unmounting {}", mp.display())),
    }
}
