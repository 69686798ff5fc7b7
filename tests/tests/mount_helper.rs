//! mount(8) and `/etc/fstab`: with the binary linked as
//! `/sbin/mount.fuse.sessionfs`, `mount -t fuse.sessionfs SESSION DIR -o …`
//! and an fstab line mount a session through util-linux's own `mount`, the
//! options becoming flags; `umount` ends it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sessionfs_tests::mount::{is_mounted, Site};
use sessionfs_tests::{sessionfs_bin, stdout_ok as run};

const HELPER: &str = "/sbin/mount.fuse.sessionfs";

/// The helper link for the test's duration (removed after, when the test
/// made it).
struct HelperLink(bool);

impl HelperLink {
    fn install() -> HelperLink {
        let target = sessionfs_bin();
        match std::fs::read_link(HELPER) {
            Ok(t) if t == target => HelperLink(false),
            Ok(t) => panic!("{HELPER} points to {}, not this build", t.display()),
            Err(_) => {
                std::os::unix::fs::symlink(target, HELPER).expect("linking the mount helper");
                HelperLink(true)
            }
        }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file(HELPER);
        }
    }
}

fn mount_type(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(&*mnt.to_string_lossy()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .map(str::to_owned)
}

fn umount(mnt: &Path) {
    run(Command::new("umount").arg(mnt));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while is_mounted(mnt) {
        assert!(std::time::Instant::now() < deadline, "still mounted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn mount_8_and_fstab_mount_a_session_with_options() {
    let _sbin = sessionfs_tests::sbin_lock();
    let _helper = HelperLink::install();
    let site = Site::s3();
    let session = format!("tests__helper{:08x}__main", rand::random::<u32>());
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/hello.txt"), "from the object\n").unwrap();
    site.push(&src, &session);
    // mount(8) hands the helper its environment: the S3 settings, and
    // this site's own cache and overlays.
    let env: Vec<(String, String)> = site
        .env
        .iter()
        .cloned()
        .chain([
            (
                "SESSIONFS_CACHE_DIR".into(),
                site.dir.path().join("cache").display().to_string(),
            ),
            (
                "SESSIONFS_OVERLAY_DIR".into(),
                site.dir.path().join("overlays").display().to_string(),
            ),
        ])
        .collect();
    let mount = || {
        let mut c = Command::new("mount");
        c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    };

    let mnt: PathBuf = site.dir.path().join("ro");
    std::fs::create_dir_all(&mnt).unwrap();
    run(mount()
        .args(["-t", "fuse.sessionfs", &session])
        .arg(&mnt)
        .args(["-o", "ro,subdir=workspace,_netdev,nofail,cache_size=64"]));
    assert_eq!(mount_type(&mnt).as_deref(), Some("fuse.sessionfs"));
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "from the object\n"
    );
    let err = std::fs::write(mnt.join("new.txt"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    umount(&mnt);

    // An unknown option: mount(8) fails, saying which.
    let out = mount()
        .args(["-t", "fuse.sessionfs", &session])
        .arg(&mnt)
        .args(["-o", "ro,colour=blue"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown mount option \"colour\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt));

    // An fstab line (read-write, with systemd's options), mounted by
    // `mount -a` of a test fstab.
    let rw = site.dir.path().join("rw");
    std::fs::create_dir_all(&rw).unwrap();
    let fstab = site.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# sessions\n{session} {} fuse.sessionfs rw,subdir=workspace,_netdev,nofail,x-systemd.automount,writeback_quiet_ms=600000 0 0\n",
            rw.display()
        ),
    )
    .unwrap();
    run(mount().arg("-a").arg("-T").arg(&fstab));
    assert_eq!(mount_type(&rw).as_deref(), Some("fuse.sessionfs"));
    std::fs::write(rw.join("from-fstab.txt"), "written\n").unwrap();
    run(site
        .command()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("flush")
        .arg(&rw));
    umount(&rw);
    let got = run(site
        .command()
        .args(["cat", &session, "workspace/from-fstab.txt"]));
    assert_eq!(got, "written\n");
}
