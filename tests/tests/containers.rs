//! A worker container gets a mounted session as its workspace, both ways a
//! container runtime offers, with the namespaces such a runtime makes
//! (`unshare --mount --pid --fork`):
//! - the host mounts, and the container sees the host's directory through
//!   slave propagation (`docker -v DIR:/workspace:rslave`, Kubernetes
//!   `mountPropagation: HostToContainer`): a mount the host makes after the
//!   container started appears in it;
//! - the container mounts itself (`/dev/fuse`, `CAP_SYS_ADMIN`): its mount
//!   stays in its own namespace, and its changes reach the object.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sessionfs_tests::mount::{is_mounted, Site};
use sessionfs_tests::sessionfs_bin;

fn pushed(site: &Site, session: &str, text: &str) {
    let src = site.dir.path().join(format!("src-{session}"));
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), text).unwrap();
    site.push(&src, session);
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Makes `dir` a mount point of its own that propagates to slaves, as a
/// runtime's host side does for `rslave` volumes.
struct SharedDir<'a>(&'a Path);

impl<'a> SharedDir<'a> {
    fn new(dir: &'a Path) -> SharedDir<'a> {
        let d = dir.display();
        let out = sh(&format!("mount --bind {d} {d} && mount --make-shared {d}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        SharedDir(dir)
    }
}

impl Drop for SharedDir<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(self.0)
            .status();
    }
}

#[test]
fn a_mount_the_host_makes_after_the_container_started_appears_in_it() {
    let site = Site::s3();
    let session = format!("tests__container{:08x}__main", rand::random::<u32>());
    pushed(&site, &session, "seen in the container\n");
    let shared = site.dir.path().join("sessions");
    std::fs::create_dir_all(shared.join(&session)).unwrap();
    let _shared = SharedDir::new(&shared);
    // The container: its own mount and pid namespaces, receiving the host's
    // mounts (slave), waiting for the workspace to appear.
    let target = shared.join(&session).join("workspace/a.txt");
    let container = sh(&format!(
        "for i in $(seq 1 600); do [ -e {t} ] && exec cat {t}; sleep 0.1; done; exit 3",
        t = target.display()
    ));
    let mut container = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--propagation", "slave"])
        .arg(container.get_program())
        .args(container.get_args())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Started before the mount exists: only propagation can show it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        container.try_wait().unwrap().is_none(),
        "the container ended early"
    );
    let m = site.mount_at(&session, &shared.join(&session), &[]);
    let out = container.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the container never saw the mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "seen in the container\n"
    );
    m.stop();
}

#[test]
fn a_container_that_mounts_for_itself_keeps_its_mount_and_writes_back() {
    let site = Site::s3();
    let session = format!("tests__inside{:08x}__main", rand::random::<u32>());
    pushed(&site, &session, "from the object\n");
    let mnt = site.dir.path().join("workspace");
    std::fs::create_dir_all(&mnt).unwrap();
    let bin = sessionfs_bin().display().to_string();
    let m = mnt.display().to_string();
    // Inside: mount, read, write, unmount (which writes back), and report
    // what the kernel listed while mounted.
    let script = format!(
        "set -e; {bin} --quiet mount {session} {m} --daemon; \
         grep -q ' {m} ' /proc/self/mountinfo; cat {m}/workspace/a.txt; \
         echo 'written in the container' > {m}/workspace/b.txt; \
         {bin} --quiet umount {m}"
    );
    let mut inside = Command::new("unshare");
    inside
        .args(["--mount", "--pid", "--fork", "--propagation", "private"])
        .args(["sh", "-c", &script])
        .envs(site.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SESSIONFS_CACHE_DIR", site.dir.path().join("cache-inside"))
        .env(
            "SESSIONFS_OVERLAY_DIR",
            site.dir.path().join("overlays-inside"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = inside.spawn().unwrap();
    // While it runs, the host never sees the container's mount.
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        assert!(
            !is_mounted(&mnt),
            "the container's mount leaked to the host"
        );
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(Instant::now() < deadline, "the container did not finish");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the object\n");
    // The change made inside is in the object.
    let got = site.run(&["cat", &session, "workspace/b.txt"]);
    assert_eq!(got, b"written in the container\n");
}
