//! The flags and environment variables that choose and reach the object
//! store, shared by every subcommand, and their translation into a
//! [`StoreConfig`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use sessionfs_core::store::config::{minio_endpoint, S3Config};
use sessionfs_core::store::{StoreConfig, StoreKind};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Object store (flags or environment)")]
pub struct StoreArgs {
    /// Which store holds the sessions: `local` (a directory, the default) or
    /// `s3`. Defaults to `s3` when an S3 endpoint is configured.
    #[arg(long, env = "SESSIONFS_STORE", value_parser = ["local", "s3"])]
    pub store: Option<String>,

    /// Directory of the local store.
    /// [default: $XDG_DATA_HOME/sessionfs/store or ~/.local/share/sessionfs/store]
    #[arg(long, env = "SESSIONFS_STORE_DIR", value_name = "DIR")]
    pub store_dir: Option<PathBuf>,

    /// Bucket holding `{sessionPath}/session.tar.gz` objects.
    #[arg(long, env = "MINIO_BUCKET", default_value = "sessions")]
    pub bucket: String,

    /// Full S3 endpoint URL (e.g. `https://ACCOUNT.r2.cloudflarestorage.com`);
    /// overrides MINIO_ENDPOINT. Without either, AWS_ENDPOINT_URL or AWS itself.
    #[arg(long, env = "SESSIONFS_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// MinIO/S3 host name, as the storage worker configures it.
    #[arg(long, env = "MINIO_ENDPOINT", value_name = "HOST")]
    pub minio_endpoint: Option<String>,

    /// Port for MINIO_ENDPOINT [default: 9000].
    #[arg(long, env = "MINIO_PORT", value_name = "PORT")]
    pub minio_port: Option<u16>,

    /// Use https for MINIO_ENDPOINT.
    #[arg(long, env = "MINIO_USE_SSL", value_parser = BoolishValueParser::new(),
          action = ArgAction::Set, default_value = "false")]
    pub minio_use_ssl: bool,

    /// S3 access key; without it the standard AWS chain (AWS_ACCESS_KEY_ID, profiles, …).
    #[arg(long, env = "MINIO_ROOT_USER", value_name = "KEY")]
    pub s3_access_key: Option<String>,

    /// S3 secret key.
    #[arg(
        long,
        env = "MINIO_ROOT_PASSWORD",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub s3_secret_key: Option<String>,

    /// S3 region; `auto` for R2. [default: the AWS chain's, else us-east-1]
    #[arg(long, env = "SESSIONFS_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Attempts per S3 request, the first included, with jittered exponential backoff.
    #[arg(long, env = "SESSIONFS_S3_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = crate::arg_ranges::attempts)]
    pub s3_max_attempts: u32,

    /// Seconds to wait for an S3 connection, then for a response to start.
    #[arg(long, env = "SESSIONFS_S3_TIMEOUT", value_name = "SECS", default_value_t = 60,
          value_parser = crate::arg_ranges::store_timeout)]
    pub s3_timeout: u64,

    /// `--quiet`, which also silences the note on the local store chosen by default.
    #[arg(skip)]
    pub quiet: bool,
}

/// The note on a local store nobody asked for is said once per process.
static LOCAL_DEFAULT_SAID: std::sync::Once = std::sync::Once::new();

impl StoreArgs {
    pub fn config(&self) -> Result<StoreConfig> {
        let endpoint = match (&self.s3_endpoint, &self.minio_endpoint) {
            (Some(url), _) => Some(url.trim_end_matches('/').to_owned()),
            (None, Some(host)) => Some(minio_endpoint(host, self.minio_port, self.minio_use_ssl)?),
            (None, None) => None,
        };
        let kind = match self.store.as_deref() {
            Some(kind) => kind.parse()?,
            None if endpoint.is_some() => StoreKind::S3,
            None => StoreKind::Local,
        };
        let local_dir = match (&self.store_dir, kind) {
            (Some(dir), _) => dir.clone(),
            (None, StoreKind::Local) => default_store_dir().context(
                "cannot tell where the local store lives: set SESSIONFS_STORE_DIR or --store-dir",
            )?,
            // Not used by an S3 store.
            (None, StoreKind::S3) => default_store_dir().unwrap_or_default(),
        };
        // A newcomer who forgot the S3 settings would otherwise see only
        // "not found" for sessions that live in S3.
        if self.store.is_none() && kind == StoreKind::Local && !self.quiet {
            LOCAL_DEFAULT_SAID.call_once(|| {
                eprintln!(
                    "sessionfs: no S3 endpoint set (SESSIONFS_S3_ENDPOINT or MINIO_ENDPOINT): using \
                     the local store in {}; pass --store local (SESSIONFS_STORE=local) to choose \
                     it and silence this",
                    local_dir.display()
                );
            });
        }
        Ok(StoreConfig {
            kind,
            bucket: self.bucket.clone(),
            local_dir,
            s3: S3Config {
                endpoint,
                region: self.s3_region.clone(),
                access_key: self.s3_access_key.clone(),
                secret_key: self.s3_secret_key.clone(),
                force_path_style: true,
                max_attempts: self.s3_max_attempts,
                connect_timeout: Duration::from_secs(self.s3_timeout.min(10)),
                read_timeout: Duration::from_secs(self.s3_timeout),
            },
        })
    }
}

fn default_store_dir() -> Option<PathBuf> {
    crate::xdg_dir("XDG_DATA_HOME", ".local/share", "sessionfs/store")
}
