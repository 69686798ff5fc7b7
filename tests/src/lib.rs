//! The harness of the end-to-end suite: real stores, the real binary.
//!
//! Tests that need S3 read the endpoint and credentials that
//! `scripts/s3-server.sh start` exports (`scripts/test.sh` starts the server
//! and exports them) and fail, never skip, when they are missing. Each test
//! works under a key prefix of its own in the shared bucket, because creating
//! a bucket per test is slow on the test server.

pub mod api;
pub mod extract;
pub mod fault_proxy;
pub mod json_schema;
pub mod mount;
pub mod trees;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use sessionfs_core::store::config::{minio_endpoint, S3Config};
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::s3::S3Store;
use sessionfs_core::store::ObjectStore;

/// The variables a test needs to reach the test S3 server, as `(name, value)`
/// pairs to hand to a child process; panics with instructions when unset.
pub fn s3_env() -> Vec<(String, String)> {
    let names = [
        "MINIO_ENDPOINT",
        "MINIO_PORT",
        "MINIO_USE_SSL",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MINIO_BUCKET",
    ];
    let vars: Vec<(String, String)> = names
        .iter()
        .filter_map(|n| std::env::var(n).ok().map(|v| ((*n).to_owned(), v)))
        .collect();
    let has = |n: &str| vars.iter().any(|(k, _)| k == n);
    assert!(
        has("MINIO_ENDPOINT") && has("MINIO_ROOT_USER") && has("MINIO_ROOT_PASSWORD"),
        "this test needs the test S3 server: run `eval \"$(scripts/s3-server.sh start)\"` first \
         (scripts/test.sh does it), which exports MINIO_ENDPOINT, MINIO_PORT, MINIO_ROOT_USER, \
         MINIO_ROOT_PASSWORD and MINIO_BUCKET"
    );
    vars
}

fn var(vars: &[(String, String)], name: &str) -> Option<String> {
    vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// The S3 configuration of the test server.
pub fn s3_config() -> S3Config {
    let vars = s3_env();
    let host = var(&vars, "MINIO_ENDPOINT").unwrap_or_default();
    let port = var(&vars, "MINIO_PORT").and_then(|p| p.parse().ok());
    let ssl = var(&vars, "MINIO_USE_SSL").is_some_and(|v| v == "true");
    S3Config {
        endpoint: Some(minio_endpoint(&host, port, ssl).expect("MINIO_ENDPOINT is usable")),
        region: Some("us-east-1".to_owned()),
        access_key: var(&vars, "MINIO_ROOT_USER"),
        secret_key: var(&vars, "MINIO_ROOT_PASSWORD"),
        ..S3Config::default()
    }
}

pub fn s3_bucket() -> String {
    std::env::var("MINIO_BUCKET").unwrap_or_else(|_| "sessions".to_owned())
}

pub async fn s3_store() -> Arc<dyn ObjectStore> {
    Arc::new(
        S3Store::connect(&s3_config(), &s3_bucket())
            .await
            .expect("connect to the test S3 server"),
    )
}

/// SIGTERM to `child`, then waits up to `within` for it to exit; its status,
/// or `None` if it had to be killed.
pub fn terminate(
    child: &mut std::process::Child,
    within: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `cmd` and returns its standard output and error together; panics
/// with both, naming `what`, when it fails.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Runs `cmd` and returns its standard output alone; panics with both
/// outputs if it fails.
pub fn stdout_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: could not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A local store in a fresh temporary directory (removed when the guard drops).
pub fn local_store() -> (tempfile::TempDir, Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = LocalStore::open(dir.path(), "sessions").expect("open local store");
    (dir, Arc::new(store))
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("tests/{test}-{:016x}/", rand::random::<u64>())
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for megabytes.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The `sessionfs` binary, built once per test process so a test never runs a
/// stale one.
pub fn sessionfs_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ sits in the workspace")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "sessionfs-agent",
                "--bin",
                "sessionfs",
            ])
            .current_dir(&workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the sessionfs binary failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        target.join("debug").join("sessionfs")
    })
}

/// Serialises the tests that put a file at `/sbin/mount.fuse.sessionfs`
/// (the mount(8) helper test and the package test); held until dropped.
pub fn sbin_lock() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("sessionfs-tests-sbin.lock"))
        .expect("the lock file");
    f.lock().expect("locking");
    f
}

/// The format-version word of a session object's locator.
pub fn format_version(object: &[u8]) -> u32 {
    use sessionfs_core::tarball::toc::LOCATOR_FROM_END;
    let at = object.len() - LOCATOR_FROM_END;
    u32::from_le_bytes(object[at + 8..at + 12].try_into().unwrap())
}
