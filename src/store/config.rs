//! Which object store to use and how to reach it: the one place that turns
//! flags and environment variables into an [`ObjectStore`].
//!
//! The S3 endpoint comes from the storage-worker variables (`MINIO_ENDPOINT`,
//! `MINIO_PORT`, `MINIO_USE_SSL`) or from `AWS_ENDPOINT_URL`; credentials from
//! `MINIO_ROOT_USER`/`MINIO_ROOT_PASSWORD` or else the standard AWS chain
//! (`AWS_ACCESS_KEY_ID`, profiles, …). Without any S3 setting the embedded
//! default is a local directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::local::LocalStore;
use super::s3::S3Store;
use super::{ObjectStore, Result, StoreError};

/// The two kinds of store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Local,
    S3,
}

impl std::str::FromStr for StoreKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(StoreKind::Local),
            "s3" => Ok(StoreKind::S3),
            other => Err(StoreError::Config(format!(
                "unknown store {other:?}: use \"local\" or \"s3\""
            ))),
        }
    }
}

/// How to reach an S3-compatible server.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Full endpoint URL (`http://127.0.0.1:9000`); `None` uses the AWS
    /// chain's (`AWS_ENDPOINT_URL`, profile) or AWS itself.
    pub endpoint: Option<String>,
    /// `None` uses the AWS chain's region, else `us-east-1`. R2 wants `auto`.
    pub region: Option<String>,
    /// Explicit credentials (the MinIO variables); `None` uses the AWS chain.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), what MinIO and most
    /// self-hosted servers need; on by default whenever an endpoint is set.
    pub force_path_style: bool,
    /// Attempts per request, the first included (jittered exponential backoff between).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Longest wait for a response to start, per attempt.
    pub read_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            access_key: None,
            secret_key: None,
            force_path_style: true,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything needed to open the configured store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub bucket: String,
    /// Directory of the local store (unused for S3).
    pub local_dir: PathBuf,
    pub s3: S3Config,
}

impl StoreConfig {
    /// Opens the configured store. For S3 this resolves credentials (so a missing
    /// one is reported now, naming the variables to set) but sends no request.
    pub async fn open(&self) -> Result<Arc<dyn ObjectStore>> {
        validate_bucket(&self.bucket)?;
        match self.kind {
            StoreKind::Local => Ok(Arc::new(LocalStore::open(&self.local_dir, &self.bucket)?)),
            StoreKind::S3 => Ok(Arc::new(S3Store::connect(&self.s3, &self.bucket).await?)),
        }
    }
}

/// The endpoint URL for the storage worker's MinIO variables: `MINIO_ENDPOINT`
/// is a host name (a full URL is accepted too), `MINIO_PORT` defaults to 9000.
pub fn minio_endpoint(host: &str, port: Option<u16>, use_ssl: bool) -> Result<String> {
    let host = host.trim();
    if host.is_empty() {
        return Err(StoreError::Config("MINIO_ENDPOINT is empty".to_owned()));
    }
    if host.contains("://") {
        return Ok(host.trim_end_matches('/').to_owned());
    }
    if host.contains('/') {
        return Err(StoreError::Config(format!(
            "MINIO_ENDPOINT {host:?} must be a host name, without a path"
        )));
    }
    let scheme = if use_ssl { "https" } else { "http" };
    Ok(format!("{scheme}://{host}:{}", port.unwrap_or(9000)))
}

/// S3's bucket naming rules (also enforced for the local store, whose bucket
/// is a directory name).
pub fn validate_bucket(bucket: &str) -> Result<()> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric()
        && !bucket.contains("..");
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "invalid bucket name {bucket:?}: 3-63 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minio_variables_make_an_endpoint() {
        assert_eq!(
            minio_endpoint("minio", None, false).unwrap(),
            "http://minio:9000"
        );
        assert_eq!(
            minio_endpoint("127.0.0.1", Some(8333), true).unwrap(),
            "https://127.0.0.1:8333"
        );
        assert_eq!(
            minio_endpoint("http://x:1/", Some(5), false).unwrap(),
            "http://x:1"
        );
        assert!(minio_endpoint("", None, false).is_err());
        assert!(minio_endpoint("host/path", None, false).is_err());
    }

    #[test]
    fn bucket_names() {
        for good in ["sessions", "a.b-c", "abc"] {
            assert!(validate_bucket(good).is_ok(), "{good}");
        }
        for bad in ["", "ab", "Sessions", "-abc", "abc-", "a..b", "a/b", "../x"] {
            assert!(validate_bucket(bad).is_err(), "{bad}");
        }
    }
}
