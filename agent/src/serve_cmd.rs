//! `sessionfs serve`: the storage-worker HTTP API and, with `--mount-root`,
//! every session mounted under one directory — one process, one registry
//! of open sessions, one block cache, so a file written through either is
//! what the other reads.
//!
//! SIGINT or SIGTERM stops accepting connections, lets the requests in
//! flight finish (up to a grace period), unmounts, then syncs every open
//! session's journal.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use sessionfs_api::{ApiConfig, AppState, BuildInfo};
use sessionfs_core::overlay::registry::{Registry, RegistrySpec};
use sessionfs_fuse::mount;
use sessionfs_fuse::multi::{MultiFs, RootSpec};

use crate::local_stack::LocalStack;
use crate::mount_cmd::{
    check_mountpoint, overlay_root, spawn, stop_signal, RESERVE_FILE, STOP_FLUSH,
};
use crate::sd_notify;
use crate::writeback_loop::{Policy, WriteBack};

/// How long requests in flight may take to finish after a stop signal.
const GRACE: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TCP port of the HTTP API.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address the HTTP API listens on.
    #[arg(
        long,
        env = "SESSIONFS_BIND",
        default_value = "0.0.0.0",
        value_name = "ADDR"
    )]
    pub bind: IpAddr,
    /// Also mount every session of the bucket under DIR/{sessionPath}/.
    #[arg(long, value_name = "DIR")]
    pub mount_root: Option<PathBuf>,
    /// Mount the root over a directory that holds files (hidden while mounted).
    #[arg(long)]
    pub allow_non_empty: bool,
    /// Refuse every change (API and mounts).
    #[arg(long)]
    pub read_only: bool,
    /// Let users other than the one mounting use the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Let `rmdir DIR/{sessionPath}` delete a session (its object and overlay).
    #[arg(long)]
    pub allow_delete_sessions: bool,
    /// Where overlays (changes not yet written back) live.
    #[arg(long, env = "SESSIONFS_OVERLAY_DIR", value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = crate::arg_ranges::threads)]
    pub threads: u64,
    /// Largest body of a file PUT, in bytes (413 above).
    #[arg(long, env = "SESSIONFS_MAX_FILE_BYTES", default_value_t = 100 << 20)]
    pub max_file_bytes: u64,
    /// Largest session upload, in bytes, compressed (413 above).
    #[arg(long, env = "SESSIONFS_MAX_UPLOAD_BYTES", default_value_t = 8 << 30)]
    pub max_upload_bytes: u64,
    /// Largest inflated size of an uploaded tarball, in bytes: more is
    /// refused as a decompression bomb (413).
    #[arg(long, env = "SESSIONFS_MAX_INFLATED_BYTES", default_value_t = 64 << 30)]
    pub max_inflated_bytes: u64,
    /// How often, in milliseconds, an open session not mounted here checks
    /// that its object was not replaced by another server (then it is
    /// opened again). 0: at every request.
    #[arg(
        long,
        env = "SESSIONFS_RECHECK_MS",
        default_value_t = 2000,
        value_name = "MS"
    )]
    pub recheck_ms: u64,
    /// Seconds after its last request that a session not mounted here is
    /// closed (journal synced and unlocked, tree out of memory).
    #[arg(long, env = "SESSIONFS_IDLE_CLOSE_SECS", default_value_t = 300, value_name = "SECS",
          value_parser = crate::arg_ranges::seconds)]
    pub idle_close_secs: u64,
    /// Seconds one read of the object may take, retries included, before
    /// it fails (EIO in a mount, 5xx in the API) and the log says why.
    #[arg(long, env = "SESSIONFS_READ_TIMEOUT_SECS", default_value_t = 30, value_name = "SECS",
          value_parser = crate::arg_ranges::seconds)]
    pub read_timeout_secs: u64,
    #[command(flatten)]
    pub writeback: Policy,
    #[command(flatten)]
    pub store: crate::store_args::StoreArgs,
}

/// `X-Container-ID`: `CONTAINER_ID`, else the host name.
fn container_id() -> String {
    std::env::var("CONTAINER_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn build_info() -> BuildInfo {
    let env_or = |var: &str, built: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| built.to_owned())
    };
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env_or("BUILD_COMMIT_SHA", env!("SESSIONFS_GIT_COMMIT")),
        built_at: env_or("BUILD_TIMESTAMP", env!("SESSIONFS_BUILD_TIME")),
    }
}

pub async fn serve(args: ServeArgs, stack: LocalStack, quiet: bool) -> Result<()> {
    let bucket = args.store.bucket.clone();
    sessionfs_core::store::deadline::set_read_deadline(Duration::from_secs(args.read_timeout_secs));
    let LocalStack {
        store,
        index,
        cache,
        metered,
    } = stack;
    let store_for_writeback = store.clone();
    let overlays = overlay_root(args.overlay_dir.clone())?.join(&bucket);
    sessionfs_core::overlay::reserve::set_file(overlays.join(RESERVE_FILE));
    let spool_dir = overlays.join(".spool");
    std::fs::create_dir_all(&spool_dir)
        .with_context(|| format!("creating {}", spool_dir.display()))?;
    let registry = Arc::new(Registry::new(
        RegistrySpec {
            store,
            index: Some(index),
            overlays,
            read_only: args.read_only,
            recheck: Duration::from_millis(args.recheck_ms),
        },
        tokio::runtime::Handle::current(),
    ));
    let token = std::env::var("SESSIONFS_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if token.is_none() && !args.bind.is_loopback() {
        // Logged even when quiet: it is about who can reach every session.
        tracing::warn!(
            "the API listens on {} without SESSIONFS_API_TOKEN: anyone who can reach this \
             port can read, change and delete every session; set a token, or --bind 127.0.0.1",
            args.bind
        );
    }
    let config = ApiConfig {
        container_id: container_id(),
        token,
        max_file_bytes: args.max_file_bytes,
        max_upload_bytes: args.max_upload_bytes,
        max_inflated_bytes: args.max_inflated_bytes,
        spool_dir,
        build: build_info(),
    };
    let listener = tokio::net::TcpListener::bind((args.bind, args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.bind, args.port))?;
    let addr = listener.local_addr()?;

    let mut running = match &args.mount_root {
        None => None,
        Some(root) => {
            let mountpoint = check_mountpoint(root, args.allow_non_empty)?;
            mount::check_fuse()?;
            let notifier = Arc::new(OnceLock::new());
            let spec = RootSpec {
                registry: registry.clone(),
                allow_delete: args.allow_delete_sessions,
                notifier: notifier.clone(),
            };
            let kernel = mount::kernel_config(
                format!("sessionfs:{bucket}"),
                args.read_only,
                args.allow_other,
                args.threads as usize,
            );
            let fs = MultiFs::new(spec, tokio::runtime::Handle::current());
            let mp = mountpoint.clone();
            let fuse_session =
                tokio::task::spawn_blocking(move || mount::mount(fs, &mp, &kernel)).await??;
            let _ = notifier.set(fuse_session.notifier());
            if !quiet {
                eprintln!(
                    "serving the sessions of {bucket} at {}",
                    mountpoint.display()
                );
            }
            Some(spawn(fuse_session, &mountpoint)?)
        }
    };

    let writeback = {
        let (registry, gone) = (registry.clone(), registry.clone());
        WriteBack::new(
            Arc::new(move || registry.open_sessions()),
            store_for_writeback,
            args.writeback.clone(),
            Arc::new(move |s| {
                // Deleted by another server, nothing pending here: gone here too.
                let (gone, name) = (gone.clone(), s.name.clone());
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = gone.discard(&name) {
                        tracing::warn!("session {name} was deleted in the store: {e}");
                    }
                });
            }),
        )
    };
    registry.set_on_open({
        let writeback = writeback.clone();
        Arc::new(move |s| writeback.register_control(s))
    });
    let looping = tokio::spawn(writeback.clone().run());
    tokio::spawn(crate::reload::on_sighup(writeback.clone()));
    let keep_pending = writeback.enabled();
    let idle = Duration::from_secs(args.idle_close_secs);
    let closer = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle.min(Duration::from_secs(30)));
            loop {
                tick.tick().await;
                let registry = registry.clone();
                let closed =
                    tokio::task::spawn_blocking(move || registry.close_idle(idle, keep_pending))
                        .await
                        .unwrap_or(0);
                if closed > 0 {
                    tracing::info!("closed {closed} idle session(s)");
                }
            }
        })
    };
    let state = Arc::new(AppState::new(
        config,
        registry.clone(),
        Some(metered),
        Some(cache),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(sessionfs_api::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    // Logged even when quiet: with --port 0 this is how callers learn the port.
    tracing::info!("storage-worker API of {bucket} listening on http://{addr}");
    if !quiet {
        eprintln!("storage-worker API of {bucket} on http://{addr}");
    }
    // The listener is bound and served, and the mount root (if any) is
    // answered by its own thread: ready.
    let where_ = match &args.mount_root {
        Some(root) => format!(" and the sessions at {}", root.display()),
        None => String::new(),
    };
    sd_notify::ready(&format!(
        "API on http://{addr}{where_}; {}",
        sd_notify::sessions_status(&registry.open_sessions())
    ));
    {
        let registry = registry.clone();
        sd_notify::spawn_status(move || sd_notify::sessions_status(&registry.open_sessions()));
    }
    sd_notify::spawn_watchdog();
    let mount_ended = async {
        match &mut running {
            Some(r) => {
                let _ = (&mut r.ended).await;
            }
            None => std::future::pending().await,
        }
    };
    let mut server_done = false;
    tokio::select! {
        r = stop_signal() => {
            sd_notify::stopping("finishing requests, unmounting, then writing back pending changes");
            r?
        }
        r = &mut server => {
            server_done = true;
            r.context("the HTTP server task failed")?.context("the HTTP server failed")?;
        }
        () = mount_ended => {
            tracing::warn!("the mount root was unmounted from outside; stopping");
            running = None;
        }
    }
    let _ = stop_tx.send(());
    if !server_done && tokio::time::timeout(GRACE, &mut server).await.is_err() {
        tracing::warn!("requests still running after {GRACE:?}; stopping anyway");
        server.abort();
    }
    closer.abort();
    looping.abort();
    let _ = looping.await;
    if let Some(r) = running {
        r.stop(quiet).await?;
    }
    if !args.read_only && !writeback.flush_all(STOP_FLUSH).await {
        tracing::error!("some sessions keep changes pending in their overlays");
    }
    for s in registry.open_sessions() {
        if let Err(e) = s.sync() {
            tracing::error!("syncing the overlay of {}: {e}", s.name);
        }
    }
    // The files replaced or freed last are not left for the next open.
    let _ = tokio::task::spawn_blocking(sessionfs_core::overlay::removals::drain).await;
    if !quiet {
        eprintln!("stopped");
    }
    Ok(())
}
