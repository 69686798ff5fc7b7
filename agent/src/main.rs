//! `sessionfs`: the one binary of sessionfs.
//!
//! Subcommands mount sessions (`mount`, `serve --mount-root`), serve the HTTP
//! API (`serve`), move sessions between directories and the store (`push`,
//! `pull`), inspect them (`ls`, `cat`, `versions`), and check the store
//! (`store check`). This file only parses the command line and dispatches;
//! the work lives in the library crates.

mod store_args;
mod store_check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use store_args::StoreArgs;

/// Coding sessions stored as tar.gz objects in S3, as live directories.
#[derive(Parser, Debug)]
#[command(name = "sessionfs", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,

    /// Log filter (e.g. `info`, `sessionfs_core=debug`); also SESSIONFS_LOG.
    #[arg(long, env = "SESSIONFS_LOG", default_value = "warn", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work on the configured object store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Serve the storage-worker HTTP API and, with --mount-root, mount every session.
    Serve(Pending),
    /// Mount one session as a read-write directory.
    Mount(Pending),
    /// Keep a plain local directory in sync with a session (hosts without FUSE).
    Sync(Pending),
    /// Pack a directory and upload it as a session.
    Push(Pending),
    /// Download a session and extract it into a directory.
    Pull(Pending),
    /// List the files of a session.
    Ls(Pending),
    /// Print one file of a session.
    Cat(Pending),
    /// Write back a mount's pending changes now.
    Flush(Pending),
    /// List the stored versions of a session.
    Versions(Pending),
    /// Make an earlier version of a session the current one.
    Restore(Pending),
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Verify the configured store end to end: credentials, bucket, and a
    /// conditional put / get / delete round trip.
    Check,
}

/// A subcommand whose issue has not landed yet: it takes any arguments and
/// fails saying so.
#[derive(clap::Args, Debug)]
struct Pending {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessionfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Command::Store(StoreCommand::Check) => {
            return store_check::run(&cli.store.config()?).await;
        }
        Command::Serve(_) => "serve",
        Command::Mount(_) => "mount",
        Command::Sync(_) => "sync",
        Command::Push(_) => "push",
        Command::Pull(_) => "pull",
        Command::Ls(_) => "ls",
        Command::Cat(_) => "cat",
        Command::Flush(_) => "flush",
        Command::Versions(_) => "versions",
        Command::Restore(_) => "restore",
    };
    anyhow::bail!("`sessionfs {name}` is not implemented yet")
}
