//! The Debian package (`scripts/deb.sh`), made from this build's binary:
//! it holds the binary, the mount(8) helper, the units, completions, the
//! manual page and a commented configuration; `dpkg -i` installs it on this
//! machine, the installed binary and `man sessionfs` work, the units verify,
//! and `dpkg -r` then `dpkg -P` leave nothing behind.

use std::path::Path;
use std::process::Command;

use sessionfs_tests::{sessionfs_bin, stdout_ok as run};

#[test]
fn the_package_installs_works_and_removes_cleanly() {
    // The mount(8) helper link is the package's here, and the helper test's there.
    let _sbin = sessionfs_tests::sbin_lock();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let deb = run(Command::new(repo.join("scripts/deb.sh"))
        .arg("--binary")
        .arg(sessionfs_bin())
        .arg("--out")
        .arg(out.path()));
    let deb = deb.trim();
    let listed = run(Command::new("dpkg-deb").args(["-c", deb]));
    for path in [
        "./usr/bin/sessionfs",
        "./usr/sbin/mount.fuse.sessionfs -> ../bin/sessionfs",
        "./lib/systemd/system/sessionfs-mount@.service",
        "./lib/systemd/system/sessionfs-api.service",
        "./lib/systemd/system/sessionfs-root.service",
        "./usr/share/man/man1/sessionfs.1.gz",
        "./usr/share/bash-completion/completions/sessionfs",
        "./usr/share/zsh/vendor-completions/_sessionfs",
        "./usr/share/fish/vendor_completions.d/sessionfs.fish",
        "./etc/sessionfs/config.toml",
    ] {
        assert!(listed.contains(path), "{path} missing from:\n{listed}");
    }
    // Stripped: far smaller than the binary it was made from.
    let packed = std::fs::metadata(deb).unwrap().len();
    assert!(packed < std::fs::metadata(sessionfs_bin()).unwrap().len() / 2);

    run(Command::new("dpkg").args(["-i", deb]));
    let removed = scopeguard(|| {
        let _ = Command::new("dpkg").args(["-P", "sessionfs"]).status();
    });
    let version = run(Command::new("/usr/bin/sessionfs").arg("--version"));
    assert!(version.starts_with("sessionfs 0."), "{version}");
    assert_eq!(
        std::fs::canonicalize("/usr/sbin/mount.fuse.sessionfs").unwrap(),
        Path::new("/usr/bin/sessionfs")
    );
    let page = run(Command::new("man")
        .arg("sessionfs")
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert!(
        page.contains("SYNOPSIS") && page.contains("mount"),
        "{page}"
    );
    // The default configuration reads without an unknown key.
    let config = run(Command::new("/usr/bin/sessionfs").args(["config", "--json"]));
    assert!(config.contains("\"bucket\""), "{config}");
    let said = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/sessionfs-api.service",
        "/lib/systemd/system/sessionfs-root.service",
    ]));
    assert!(said.is_empty(), "{said}");

    run(Command::new("dpkg").args(["-r", "sessionfs"]));
    for gone in [
        "/usr/bin/sessionfs",
        "/usr/sbin/mount.fuse.sessionfs",
        "/lib/systemd/system/sessionfs-api.service",
        "/usr/share/man/man1/sessionfs.1.gz",
    ] {
        assert!(
            std::fs::symlink_metadata(gone).is_err(),
            "{gone} left after dpkg -r"
        );
    }
    // The configuration is a conffile: kept by -r, removed by -P.
    assert!(Path::new("/etc/sessionfs/config.toml").exists());
    run(Command::new("dpkg").args(["-P", "sessionfs"]));
    assert!(!Path::new("/etc/sessionfs").exists());
    drop(removed);
}

/// Runs `f` when dropped (the package is purged even when an assertion fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
