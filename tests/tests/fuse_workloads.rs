//! Real tools inside a mounted session on the S3 server, each compared with
//! the same run on a local directory (tests/scripts/workloads.sh): git on a
//! 5,000-file tree, extracting a 10,000-file tarball, SQLite transactions, an
//! editor's save, a package manager's install. Then kill -9 of the mount
//! process in the middle of writes: everything that returned from fsync is
//! there after a new mount. And a corrupt object: EIO and a log line, no hang.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessionfs_tests::mount::Site;
use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot, Node};

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/workloads.sh")
}

fn run_workloads(dir: &Path, tarball: &Path) -> String {
    let out = Command::new("bash")
        .arg(script())
        .arg(dir)
        .arg(tarball)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "workloads in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tree without git's own files (pack names depend on timing).
fn tree_without_git(root: &Path) -> BTreeMap<String, Node> {
    snapshot(root)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("repo/.git"))
        .collect()
}

fn ten_thousand_file_tarball(dir: &Path) -> PathBuf {
    let src = dir.join("tar-src");
    for i in 0..10_000 {
        let d = src.join(format!("pkg{:02}/lib{}", i % 64, i % 5));
        if i < 320 {
            fs::create_dir_all(&d).unwrap();
        }
        fs::write(
            d.join(format!("f{i:05}.js")),
            format!("export const n = {i};\n"),
        )
        .unwrap();
    }
    let tarball = dir.join("ten-thousand.tar.gz");
    let status = Command::new("tar")
        .arg("czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    tarball
}

#[test]
fn tools_inside_a_mount_do_what_they_do_on_a_local_disk() {
    let site = Site::s3();
    let tarball = ten_thousand_file_tarball(site.dir.path());
    let local = site.dir.path().join("local");
    fs::create_dir_all(&local).unwrap();
    let expected = run_workloads(&local, &tarball);

    let name = session("workloads");
    let m = site.mount(&name, &["--subdir", "workspace"]);
    let got = run_workloads(&m.path, &tarball);
    assert_eq!(got, expected, "the same tools, the same results");
    assert_same_tree(
        &tree_without_git(&local),
        &tree_without_git(&m.path),
        "workloads",
    );

    // All of it is still there after a remount; git agrees.
    m.stop();
    let m = site.mount(&name, &["--subdir", "workspace"]);
    assert_same_tree(
        &tree_without_git(&local),
        &tree_without_git(&m.path),
        "after remount",
    );
    let status = Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(m.join("repo"))
        .output()
        .unwrap();
    assert!(status.status.success());
    assert_eq!(String::from_utf8_lossy(&status.stdout), "");
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes files and returns each one's name once fsync has returned for it.
fn write_until_failure(dir: &Path, acked: &Mutex<Vec<(String, Vec<u8>)>>) {
    for i in 0u64.. {
        let name = format!("f{i:05}");
        let data = sessionfs_tests::pattern(1 + (i as usize * 7919) % (200 << 10), i).to_vec();
        let result = (|| {
            // Half are written in place, half as an editor saves (temp + rename).
            if i % 2 == 0 {
                let mut f = File::create(dir.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
            } else {
                let tmp = dir.join(format!(".{name}.tmp"));
                let mut f = File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                fs::rename(&tmp, dir.join(&name))?;
            }
            fsync_dir(dir)
        })();
        if result.is_err() {
            return;
        }
        acked.lock().unwrap().push((name, data));
    }
}

#[test]
fn kill_9_during_writes_loses_nothing_that_was_fsynced() {
    let site = Site::s3();
    let name = session("kill9");
    let m = site.mount(&name, &[]);
    let dir = m.join("w");
    fs::create_dir(&dir).unwrap();
    // A file that is rewritten in place and fsynced before the storm.
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.join("log"))
        .unwrap();
    f.write_all(b"first line\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Written and closed but never fsynced: the kernel has the bytes, and
    // the overlay keeps what the kernel has when only the process dies.
    fs::write(m.join("unsynced"), b"closed, not fsynced").unwrap();

    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (dir, acked) = (dir.clone(), acked.clone());
        std::thread::spawn(move || write_until_failure(&dir, &acked))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let mountpoint = m.path.clone();
    m.kill9();
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "only {} writes before the kill",
        acked.len()
    );

    let m = site.mount_at(&name, &mountpoint, &[]);
    assert_eq!(fs::read(m.join("log")).unwrap(), b"first line\n");
    assert_eq!(
        fs::read(m.join("unsynced")).unwrap(),
        b"closed, not fsynced"
    );
    for (file, data) in &acked {
        let got = fs::read(m.join("w").join(file))
            .unwrap_or_else(|e| panic!("{file} was fsynced before the kill but is gone: {e}"));
        assert!(
            got == *data,
            "{file}: {} bytes back, {} written",
            got.len(),
            data.len()
        );
    }
    eprintln!("{} fsynced writes all present after kill -9", acked.len());
}

#[test]
fn a_corrupt_object_fails_reads_with_eio_and_a_log_line() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    make_fixture(&src);
    let name = "tests__corrupt__main";
    site.push(&src, name);
    // Flip bytes in the middle of the stored object (inside big.bin's segments).
    let object = site
        .dir
        .path()
        .join("store/sessions")
        .join(name)
        .join("session.tar.gz");
    let mut bytes = fs::read(&object).unwrap();
    let mid = bytes.len() / 3;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    fs::write(&object, &bytes).unwrap();

    let m = site.mount(name, &["--read-only"]);
    let started = std::time::Instant::now();
    let err = fs::read(m.join("workspace/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a failed read must not hang"
    );
    // The rest of the tree still lists and the small files outside the damage read.
    assert!(m.join("workspace/README.md").exists());
    std::thread::sleep(Duration::from_millis(100));
    let log = m.log_text();
    assert!(
        log.contains("ERROR") && log.contains("segment"),
        "the failure is logged: {log}"
    );
}
