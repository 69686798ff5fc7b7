//! `sessionfs`: the one binary of sessionfs.
//!
//! Subcommands mount sessions (`mount`, `serve --mount-root`), serve the HTTP
//! API (`serve`), move sessions between directories and the store (`push`,
//! `pull`), inspect them (`ls`, `cat`, `versions`), and check the store
//! (`store check`). This file only parses the command line and dispatches;
//! the work lives in the library crates.

mod arg_ranges;
mod background;
mod config_file;
mod control;
mod control_socket;
mod inspect;
mod local_stack;
mod local_time;
mod logging;
mod mount_cmd;
mod mount_options;
mod reload;
mod sd_notify;
mod serve_cmd;
mod sessions_cmd;
mod store_args;
mod store_check;
mod transfer;
mod units;
mod writeback_loop;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use local_stack::LocalStack;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::ObjectStore;
use sessionfs_core::tarball::index::TocIndex;
use store_args::StoreArgs;

/// Coding sessions stored as tar.gz objects in S3, as live directories.
#[derive(Parser, Debug)]
#[command(
    name = "sessionfs",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SESSIONFS_GIT_COMMIT"), ", built ", env!("SESSIONFS_BUILD_TIME"), ")"),
    propagate_version = true
)]
pub struct Cli {
    /// The configuration file (TOML; `sessionfs config` lists its keys).
    /// [default: /etc/sessionfs/config.toml, then
    /// $XDG_CONFIG_HOME/sessionfs/config.toml]
    #[arg(
        long,
        env = "SESSIONFS_CONFIG",
        value_name = "FILE",
        global = true,
        help_heading = "Configuration"
    )]
    config: Option<PathBuf>,

    /// Log filter (e.g. `info`, `sessionfs_core=debug`); without it
    /// `RUST_LOG`, else `warn,fuser=error`.
    #[arg(long, env = "SESSIONFS_LOG", global = true, help_heading = "Output")]
    log: Option<String>,

    /// Directory of local state: the index of session TOCs and the block cache.
    /// [default: $XDG_CACHE_HOME/sessionfs or ~/.cache/sessionfs]
    #[arg(
        long,
        env = "SESSIONFS_CACHE_DIR",
        value_name = "DIR",
        global = true,
        help_heading = "Local state"
    )]
    cache_dir: Option<PathBuf>,

    /// Byte budget of the on-disk block cache, in MiB.
    #[arg(long, env = "SESSIONFS_CACHE_SIZE", value_name = "MIB", default_value_t = 4096,
          value_parser = crate::arg_ranges::cache_mib, global = true,
          help_heading = "Local state")]
    cache_size: u64,

    /// No progress bars or summaries.
    #[arg(long, short, global = true, help_heading = "Output")]
    quiet: bool,

    /// Session format version of the objects written (pack, push,
    /// write-back): 2, or 1 while hosts with a sessionfs that reads only
    /// version 1 share the sessions. Both are read.
    #[arg(long, env = "SESSIONFS_FORMAT_VERSION", value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=2), global = true,
          help_heading = "Objects")]
    format_version: u32,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work on the configured object store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Serve the storage-worker HTTP API and, with --mount-root, mount every session.
    #[command(
        after_long_help = "Examples:\n  sessionfs serve --port 3000\n  SESSIONFS_API_TOKEN=… sessionfs serve --bind 0.0.0.0\n  sessionfs serve --mount-root /srv/sessions --allow-other"
    )]
    Serve(serve_cmd::ServeArgs),
    /// Mount one session as a read-write directory.
    #[command(
        after_long_help = "Examples:\n  sessionfs mount acme__web__main /workspace --subdir workspace\n  sessionfs mount acme__web__main /mnt/s --daemon --read-only\n  sessionfs mount acme__new__main /mnt/n --create"
    )]
    Mount(mount_cmd::MountArgs),
    /// Unmount a mounted session: its pending changes are written back
    /// first, then the mount process syncs and exits.
    #[command(after_long_help = "Example:\n  sessionfs umount /workspace")]
    Umount {
        /// The mount point (of `sessionfs mount`).
        mountpoint: PathBuf,
        /// Detach now even if files are open; the mount ends when they close.
        #[arg(long)]
        lazy: bool,
    },
    /// (not built yet) Keep a plain local directory in sync with a session (hosts without FUSE).
    Sync(Pending),
    /// Pack a directory into a seekable session tarball file.
    #[command(after_long_help = "Example:\n  sessionfs pack ./checkout -o session.tar.gz")]
    Pack {
        /// The directory to pack (its contents become the session's root).
        dir: PathBuf,
        /// The file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Pack a directory and upload it as a session, replacing the session's object.
    #[command(
        after_long_help = "Examples:\n  sessionfs push ./checkout acme__web__main\n  sessionfs push ./checkout acme__web__main --json | jq .etag"
    )]
    Push {
        /// The directory to upload (its contents become the session's root:
        /// `workspace/`, `.session-metadata.json`, …).
        dir: PathBuf,
        /// Session path, e.g. `owner__repo__branch`.
        session: String,
        /// Push even though an overlay on this host holds changes of the
        /// session not yet written back (they will be merged onto the push).
        #[arg(long)]
        force: bool,
        /// Print what was stored as JSON (`sessionPath`, `entries`,
        /// `tarBytes`, `objectBytes`, `segments`, `etag`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Download a session and extract it into a directory.
    #[command(after_long_help = "Example:\n  sessionfs pull acme__web__main ./restored")]
    Pull {
        /// Session path, e.g. `owner__repo__branch`.
        session: String,
        /// Where to extract it (created if missing; nothing is written outside it).
        dir: PathBuf,
        /// Extract into a directory that holds files: the session's files
        /// replace those of the same name, the others stay.
        #[arg(long)]
        allow_non_empty: bool,
        /// Print what was extracted as JSON (`sessionPath`, `entries`,
        /// `objectBytes`, `etag`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the files of a session (reads only its index).
    // `-h` is `ls -h` here, as in ls; help stays on `--help`.
    #[command(
        disable_help_flag = true,
        after_long_help = "Examples:\n  sessionfs ls acme__web__main\n  sessionfs ls -lh acme__web__main workspace/src\n  sessionfs ls --json acme__web__main workspace/package.json"
    )]
    Ls {
        /// Session path, e.g. `owner__repo__branch`.
        session: String,
        /// A directory (lists its entries) or a file (lists itself).
        path: Option<String>,
        /// Type and mode, owner, size and modification time (local time, as `ls -l`).
        #[arg(short, long)]
        long: bool,
        /// How -l prints times: `locale` (`Dec  1 10:42`, GNU's default),
        /// `iso`, `long-iso` (`2026-12-01 10:42`) or `full-iso`.
        #[arg(long, value_enum, default_value_t, value_name = "STYLE")]
        time_style: local_time::TimeStyle,
        /// Sizes in K, M, G (with -l).
        #[arg(short = 'h', long)]
        human_readable: bool,
        /// Print help.
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        /// Every field as JSON (`path`, `type`, `mode`, `size`, `uid`,
        /// `gid`, `mtime` in RFC 3339 with nanoseconds, `target`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print one file of a session (reads only the segments holding it).
    #[command(after_long_help = "Example:\n  sessionfs cat acme__web__main workspace/README.md")]
    Cat {
        /// Session path, e.g. `owner__repo__branch`.
        session: String,
        /// The file's path in the session, e.g. `workspace/src/main.rs`.
        path: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the sessions of the bucket (path, size, last modified), and the
    /// changes each has pending in an overlay on this host.
    #[command(
        after_long_help = "Examples:\n  sessionfs sessions\n  sessionfs sessions acme__ --json"
    )]
    Sessions {
        /// Only sessions whose path starts with this.
        prefix: Option<String>,
        /// Print the list as JSON (an array of objects with `sessionPath`,
        /// `size`, `lastModified`, `inStore`, `pendingChanges`, `heldHere`).
        #[arg(long)]
        json: bool,
        /// Where overlays live (as given to `mount` or `serve`).
        #[arg(long, env = "SESSIONFS_OVERLAY_DIR", value_name = "DIR")]
        overlay_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write back pending changes now; returns once they are stored.
    #[command(
        after_long_help = "Examples:\n  sessionfs flush /workspace\n  sessionfs flush acme__web__main"
    )]
    Flush {
        /// A mount point (`sessionfs mount`, or a session's directory under
        /// `serve --mount-root`), or a session path: the process holding
        /// its overlay on this host writes it back, or this command does
        /// when no process holds it.
        target: String,
        /// Where overlays live (as given to `mount` or `serve`).
        #[arg(long, env = "SESSIONFS_OVERLAY_DIR", value_name = "DIR")]
        overlay_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write-back state: pending changes, the last write-back, the last
    /// error, conflicts (of a mount), or what a session's overlay holds.
    #[command(
        after_long_help = "Examples:\n  sessionfs status /workspace\n  sessionfs status acme__web__main --json"
    )]
    Status {
        /// A mount point, or a session path.
        target: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Where overlays live (as given to `mount` or `serve`).
        #[arg(long, env = "SESSIONFS_OVERLAY_DIR", value_name = "DIR")]
        overlay_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the effective configuration: every key, its value and where it
    /// came from (flag defaults, the environment, a configuration file);
    /// secrets masked.
    #[command(
        after_long_help = "Examples:\n  sessionfs config\n  sessionfs --config ./sessionfs.toml config --json"
    )]
    Config {
        /// As JSON: `[{key, env, value, source}]`.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell's completion script for sessionfs.
    #[command(
        after_long_help = "Examples:\n  sessionfs completions bash > /etc/bash_completion.d/sessionfs\n  sessionfs completions zsh > \"${fpath[1]}/_sessionfs\"\n  sessionfs completions fish > ~/.config/fish/completions/sessionfs.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), made from the same definitions as --help.
    #[command(after_long_help = "Example:\n  sessionfs manpage > /usr/share/man/man1/sessionfs.1")]
    Manpage,
    /// (not built yet) List the stored versions of a session.
    Versions(Pending),
    /// (not built yet) Make an earlier version of a session the current one.
    Restore(Pending),
}

impl Command {
    /// The store flags of a command that uses the store.
    fn store_mut(&mut self) -> Option<&mut StoreArgs> {
        match self {
            Command::Store(StoreCommand::Check { store })
            | Command::Push { store, .. }
            | Command::Pull { store, .. }
            | Command::Ls { store, .. }
            | Command::Cat { store, .. }
            | Command::Sessions { store, .. }
            | Command::Flush { store, .. }
            | Command::Status { store, .. }
            | Command::Mount(mount_cmd::MountArgs { store, .. })
            | Command::Serve(serve_cmd::ServeArgs { store, .. }) => Some(store),
            Command::Umount { .. }
            | Command::Config { .. }
            | Command::Completions { .. }
            | Command::Manpage
            | Command::Pack { .. }
            | Command::Sync(_)
            | Command::Versions(_)
            | Command::Restore(_) => None,
        }
    }
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Verify the configured store end to end: credentials, bucket, and a
    /// conditional put / get / delete round trip.
    #[command(
        after_long_help = "Examples:\n  sessionfs store check\n  sessionfs store check --s3-endpoint https://s3.example.com --bucket sessions"
    )]
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// A subcommand whose issue has not landed yet: it takes any arguments and
/// fails saying so.
#[derive(clap::Args, Debug)]
struct Pending {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

/// Keeps glibc's allocator from holding on to memory the process freed.
///
/// - glibc gives each thread that allocates under contention an arena of its
///   own, up to eight per core, and an arena keeps what was freed in it: two
///   are enough for the threads here.
/// - Blocks larger than the mmap threshold are mapped for themselves and
///   handed back when freed. glibc raises that threshold to the size of any
///   such block freed, so the object bytes a read fetches (runs of several
///   megabytes) then come from the arenas and leave holes there. A fixed
///   threshold keeps them mapped. At 512 KiB it maps the block cache's
///   1 MiB block reads too, which 4 MiB left in the arenas: the same mount
///   then peaked at 119–120 MB, not 130–134 (same read times). The 2 MiB
///   inflated segments are mapped as well, but reused rather than freed
///   (`tarball/segments.rs`), so they rarely cost fresh pages.
///
/// Together: a mount that read every file of a 45,000-file session peaked at
/// 225 MB resident before, about 120 MB after, as fast. `MALLOC_ARENA_MAX`
/// and `MALLOC_MMAP_THRESHOLD_`, when set, still decide. What large
/// transient work frees inside the arenas goes back with
/// [`sessionfs_core::memory::trim`].
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 512 << 10),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mallopt only changes allocator tuning; it runs first
            // thing in main, before any other thread exists.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = match mount_options::from_helper(&argv) {
        None => argv,
        Some(Ok(Some(argv))) => argv,
        // mount -f: the options were checked; nothing to mount.
        Some(Ok(None)) => return ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("mount.fuse.sessionfs: {e}");
            return ExitCode::from(1);
        }
    };
    let applied = {
        use clap::CommandFactory;
        match config_file::apply(&argv, &Cli::command()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("sessionfs: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let _ = APPLIED.set(applied);
    let mut cli = Cli::parse_from(&argv);
    let argv = match &cli.command {
        Command::Mount(m) if !m.options.is_empty() => match mount_options::expand(&argv) {
            Ok(expanded) => {
                cli = Cli::parse_from(&expanded);
                expanded
            }
            Err(e) => {
                eprintln!("sessionfs: {e}");
                return ExitCode::from(2);
            }
        },
        _ => argv,
    };
    let _ = COMMAND_LINE.set(argv);
    if let Some(store) = cli.command.store_mut() {
        store.quiet = cli.quiet;
    }
    if let Err(e) = sessionfs_core::tarball::toc_codec::set_written_version(cli.format_version) {
        eprintln!("sessionfs: {e}");
        return ExitCode::from(2);
    }
    let (log, from) = logging::filter_text(cli.log.take());
    let filter = match tracing_subscriber::EnvFilter::try_new(&log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "sessionfs: {from} {log:?} is not a log filter ({e}); examples: `warn`, `info`, \
                 `info,sessionfs_core=debug`"
            );
            return ExitCode::from(2);
        }
    };
    logging::init(filter);

    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessionfs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store = cli.command.store_mut().map(|s| s.clone());
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut said = describe(&e);
            if let Some(hint) = store.and_then(|s| unreachable_hint(&e, &s)) {
                said.push_str(&hint);
            }
            eprintln!(
                "sessionfs: {}",
                sessionfs_core::text::escape_controls(&said)
            );
            ExitCode::FAILURE
        }
    }
}

/// What to do when the store did not answer: where it was looked for.
fn unreachable_hint(e: &anyhow::Error, store: &StoreArgs) -> Option<String> {
    let unavailable = e.chain().any(|c| {
        c.downcast_ref::<sessionfs_core::store::StoreError>()
            .is_some_and(|s| s.is_unavailable())
            || c.downcast_ref::<sessionfs_core::tarball::TarballError>()
                .is_some_and(|t| matches!(t, sessionfs_core::tarball::TarballError::Store(s) if s.is_unavailable()))
            || c.downcast_ref::<sessionfs_core::overlay::OverlayError>()
                .is_some_and(|o| o.store_unavailable())
    });
    if !unavailable {
        return None;
    }
    let config = store.config().ok()?;
    let endpoint = config.s3.endpoint.as_deref()?;
    Some(format!(
        " (is the store at {endpoint} up? check --s3-endpoint, or MINIO_ENDPOINT and \
         MINIO_PORT; `sessionfs store check` tests it)"
    ))
}

/// What the configuration files set.
pub static APPLIED: std::sync::OnceLock<config_file::Applied> = std::sync::OnceLock::new();

/// The command line as understood: after the mount(8) helper's arguments
/// and `-o` options became flags (what `--daemon` runs again).
static COMMAND_LINE: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

pub fn command_line() -> Vec<OsString> {
    COMMAND_LINE
        .get()
        .cloned()
        .unwrap_or_else(|| std::env::args_os().collect())
}

/// The error and its causes, each said once: a cause whose text the
/// message before it already holds (many errors print their source) is
/// left out.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Command::Store(StoreCommand::Check { store }) => {
            return store_check::run(&store.config()?).await;
        }
        Command::Pack { dir, output } => {
            let stats = transfer::pack(&dir, &output, cli.quiet).await?;
            if !cli.quiet {
                eprintln!(
                    "packed {}: {} entries, {} bytes of tar in {} bytes ({} segments)",
                    dir.display(),
                    stats.entries,
                    stats.tar_size,
                    stats.object_size,
                    stats.segments
                );
            }
            return Ok(());
        }
        Command::Push {
            dir,
            session,
            force,
            json,
            store,
        } => {
            let session = SessionPath::parse(&session)?;
            if !force {
                transfer::refuse_pending(&store.bucket, &session)?;
            }
            let store = store.config()?.open().await?;
            return transfer::push(store, &dir, &session, cli.quiet, json).await;
        }
        Command::Pull {
            session,
            dir,
            allow_non_empty,
            json,
            store,
        } => {
            let session = SessionPath::parse(&session)?;
            if !allow_non_empty {
                transfer::refuse_non_empty(&dir)?;
            }
            let store = store.config()?.open().await?;
            return transfer::pull(store, &session, &dir, cli.quiet, json).await;
        }
        Command::Ls {
            session,
            path,
            long,
            human_readable,
            json,
            time_style,
            store,
            ..
        } => {
            let session = SessionPath::parse(&session)?;
            let (store, index) = cached_store(&store, cli.cache_dir, cli.cache_size).await?;
            let reader = inspect::open(store, &session, &index).await?;
            let style = inspect::LsStyle {
                long,
                human: human_readable,
                json,
                time_style,
            };
            return inspect::ls(&reader, path.as_deref(), style).await;
        }
        Command::Sessions {
            prefix,
            json,
            overlay_dir,
            store,
        } => {
            let overlays = mount_cmd::overlay_root(overlay_dir)?.join(&store.bucket);
            let (store, _) = cached_store(&store, cli.cache_dir, cli.cache_size).await?;
            return sessions_cmd::run(store, &overlays, prefix.as_deref(), json).await;
        }
        Command::Cat {
            session,
            path,
            store,
        } => {
            let session = SessionPath::parse(&session)?;
            let (store, index) = cached_store(&store, cli.cache_dir, cli.cache_size).await?;
            let reader = inspect::open(store, &session, &index).await?;
            return inspect::cat(&reader, &path).await;
        }
        Command::Mount(args) => {
            let stack =
                LocalStack::open(&args.store, local_state_dir(cli.cache_dir)?, cli.cache_size)
                    .await?;
            return mount_cmd::run(args, stack, cli.quiet).await;
        }
        Command::Umount { mountpoint, lazy } => {
            // Pending changes go to the store before the mount goes away.
            control::flush_before_unmount(&mountpoint);
            return mount_cmd::umount(&mountpoint, lazy);
        }
        Command::Serve(args) => {
            let stack =
                LocalStack::open(&args.store, local_state_dir(cli.cache_dir)?, cli.cache_size)
                    .await?;
            return serve_cmd::serve(args, stack, cli.quiet).await;
        }
        Command::Sync(_) => "sync",
        Command::Flush { target, .. } if std::path::Path::new(&target).exists() => {
            return control::flush(std::path::Path::new(&target), cli.quiet)
        }
        Command::Flush {
            target,
            overlay_dir,
            store,
        } => {
            let session = SessionPath::parse(&target)?;
            let overlay = control::overlay_of(overlay_dir, &store.bucket, &session)?;
            let (store, index) = cached_store(&store, cli.cache_dir, cli.cache_size).await?;
            return control::flush_session(session, overlay, store, index, cli.quiet).await;
        }
        Command::Status { target, json, .. } if std::path::Path::new(&target).exists() => {
            return control::status(std::path::Path::new(&target), json)
        }
        Command::Status {
            target,
            json,
            overlay_dir,
            store,
        } => {
            let session = SessionPath::parse(&target)?;
            let overlay = control::overlay_of(overlay_dir, &store.bucket, &session)?;
            return control::status_session(&session, &overlay, json);
        }
        Command::Config { json } => {
            use clap::CommandFactory;
            let applied = APPLIED
                .get()
                .ok_or_else(|| anyhow::anyhow!("no configuration read"))?;
            return inspect::quiet_pipe(config_file::show(&Cli::command(), applied, json));
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sessionfs", &mut out);
            return inspect::quiet_pipe(std::io::Write::write_all(&mut std::io::stdout(), &out));
        }
        Command::Manpage => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            return inspect::quiet_pipe(std::io::Write::write_all(&mut std::io::stdout(), &out));
        }
        Command::Versions(_) => "versions",
        Command::Restore(_) => "restore",
    };
    anyhow::bail!("`sessionfs {name}` is not implemented yet")
}

/// Lifts the soft limit of open descriptors to the hard one: a mount holds
/// one per file open for writing, and 1,024 (the usual soft limit) is far
/// below what a build or a package manager keeps open.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The configured store behind the block cache, and the TOC index, both in the cache directory.
async fn cached_store(
    store: &StoreArgs,
    cache_dir: Option<PathBuf>,
    cache_mib: u64,
) -> anyhow::Result<(Arc<dyn ObjectStore>, TocIndex)> {
    let stack = LocalStack::open(store, local_state_dir(cache_dir)?, cache_mib).await?;
    Ok((stack.store, stack.index))
}

fn local_state_dir(cache_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match cache_dir {
        Some(dir) => Ok(dir),
        None => xdg_dir("XDG_CACHE_HOME", ".cache", "sessionfs")
            .context("cannot tell where local state lives: set SESSIONFS_CACHE_DIR or --cache-dir"),
    }
}

/// `$VAR/sub`, or `~/home_rel/sub` when the XDG variable is unset or empty;
/// for root without a home (mount(8) runs its helpers without `HOME`, as
/// do many units), the system's own places: `/var/cache` for the cache,
/// `/var/lib` for state and data.
pub fn xdg_dir(var: &str, home_rel: &str, sub: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(home_rel))
        })
        .or_else(|| {
            // SAFETY: geteuid cannot fail and touches no memory.
            let root = unsafe { libc::geteuid() } == 0;
            root.then(|| {
                PathBuf::from(if var == "XDG_CACHE_HOME" {
                    "/var/cache"
                } else {
                    "/var/lib"
                })
            })
        })
        .map(|d| d.join(sub))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let inner = anyhow::anyhow!("reading x: {io}").context("opening the session");
        let said = super::describe(&inner);
        assert_eq!(
            said,
            "opening the session: reading x: No such file or directory (os error 2)"
        );
        let e = anyhow::Error::new(io).context("mount point /nope");
        assert_eq!(
            super::describe(&e),
            "mount point /nope: No such file or directory (os error 2)"
        );
    }
}
