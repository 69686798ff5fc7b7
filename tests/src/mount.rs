//! Real FUSE mounts of real sessions for the end-to-end suite: the
//! `sessionfs mount` binary runs in the foreground as a child process, so a
//! test can kill it (`kill -9`) and mount the same session again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sessionfs_bin;

/// Where a test's sessions live: a store, a cache and overlays of its own.
pub struct Site {
    pub dir: tempfile::TempDir,
    /// Extra environment (S3 settings), on top of the local directories.
    pub env: Vec<(String, String)>,
}

impl Site {
    /// A local store in a temporary directory.
    pub fn local() -> Site {
        let dir = tempfile::tempdir().expect("temporary directory");
        let env = vec![
            ("SESSIONFS_STORE".to_owned(), "local".to_owned()),
            (
                "SESSIONFS_STORE_DIR".to_owned(),
                dir.path().join("store").display().to_string(),
            ),
        ];
        Site { dir, env }
    }

    /// The test S3 server.
    pub fn s3() -> Site {
        let dir = tempfile::tempdir().expect("temporary directory");
        Site {
            dir,
            env: crate::s3_env(),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(sessionfs_bin());
        cmd.arg("--quiet")
            .env("SESSIONFS_CACHE_DIR", self.dir.path().join("cache"))
            .env("SESSIONFS_OVERLAY_DIR", self.dir.path().join("overlays"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Runs a non-mount subcommand; panics with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> Vec<u8> {
        let out = self.command().args(args).output().expect("run sessionfs");
        assert!(
            out.status.success(),
            "sessionfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn push(&self, dir: &Path, session: &str) {
        self.run(&["push", &dir.display().to_string(), session]);
    }

    pub fn overlay(&self, session: &str, bucket: &str) -> PathBuf {
        self.dir.path().join("overlays").join(bucket).join(session)
    }

    /// Mounts `session` at a fresh directory; `extra` are more mount flags.
    pub fn mount(&self, session: &str, extra: &[&str]) -> Mount {
        let mountpoint = self
            .dir
            .path()
            .join(format!("mnt-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&mountpoint).expect("mount point");
        self.mount_at(session, &mountpoint, extra)
    }

    pub fn mount_at(&self, session: &str, mountpoint: &Path, extra: &[&str]) -> Mount {
        // Tests mount new sessions as often as pushed ones.
        let mut args = vec!["mount", session, "--create"];
        args.extend_from_slice(extra);
        self.spawn_mount(&args, mountpoint)
    }

    /// `sessionfs serve --mount-root` at a fresh directory: every session of the bucket.
    pub fn serve_root(&self, extra: &[&str]) -> Mount {
        let mountpoint = self
            .dir
            .path()
            .join(format!("root-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&mountpoint).expect("mount point");
        // The API comes with the mount root: any free port, loopback only.
        let mut args = vec!["serve", "--port", "0", "--bind", "127.0.0.1"];
        args.extend_from_slice(extra);
        args.push("--mount-root");
        self.spawn_mount(&args, &mountpoint)
    }

    /// Runs `sessionfs ARGS MOUNTPOINT` in the foreground and waits for the mount.
    fn spawn_mount(&self, args: &[&str], mountpoint: &Path) -> Mount {
        let log = self.dir.path().join(format!(
            "mount-{}.log",
            mountpoint.file_name().unwrap_or_default().to_string_lossy()
        ));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command()
            .env("SESSIONFS_LOG", "info,fuser=error")
            .args(args)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start sessionfs mount");
        let mut m = Mount {
            child: Some(child),
            path: mountpoint.to_path_buf(),
            log,
        };
        m.wait_mounted();
        m
    }
}

pub struct Mount {
    child: Option<Child>,
    pub path: PathBuf,
    pub log: PathBuf,
}

/// Whether the kernel lists `path` as a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

impl Mount {
    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(&self.path) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "sessionfs mount exited ({status}): {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            assert!(Instant::now() < deadline, "the mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// The base URL of the API a `serve --mount-root` runs beside the mount.
    pub fn api_url(&self) -> String {
        crate::api::wait_for_url(&self.log, || false)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9 of the mount process; the dead mount point is detached.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        lazy_umount(&self.path);
    }

    /// kill -9 of the mount process, leaving its dead mount point in place
    /// ("Transport endpoint is not connected"), as a crash does.
    pub fn kill9_keep_mounted(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Drop would detach it: forget the path instead.
        self.path = PathBuf::new();
    }

    /// A stop that must be clean: SIGTERM, and the process writes back
    /// (unless told not to), syncs its journal, unmounts and exits 0.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("a running mount");
        let status = crate::terminate(&mut child, Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "the mount did not stop cleanly ({status:?}); its log:\n{}",
            self.log_text()
        );
        assert!(!is_mounted(&self.path), "the mount is still there");
        let log = self.log_text();
        assert!(
            !log.contains("syncing the overlay"),
            "the journal was not synced at the stop:\n{log}"
        );
    }

    fn stop_inner(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::terminate(&mut child, Duration::from_secs(30));
        }
        if !self.path.as_os_str().is_empty() && is_mounted(&self.path) {
            lazy_umount(&self.path);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn lazy_umount(path: &Path) {
    let _ = Command::new("umount").arg("-l").arg(path).status();
}
