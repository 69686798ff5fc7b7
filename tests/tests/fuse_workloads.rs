//! Real tools inside a mounted session on the S3 server, each compared with
//! the same run on a local directory (tests/scripts/workloads.sh): git on a
//! 5,000-file tree, extracting a 10,000-file tarball, SQLite transactions, an
//! editor's save, a package manager's install; and the same tools again on
//! that tree once pushed and mounted fresh elsewhere (lazy reads, copy-ups),
//! its write-back checked by every reader. Then kill -9 of the mount
//! process in the middle of writes: everything that returned from fsync is
//! there after a new mount. And a corrupt object: EIO and a log line, no hang.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessionfs_core::session::SessionPath;
use sessionfs_core::store::GetOptions;
use sessionfs_tests::extract::every_reader;
use sessionfs_tests::mount::Site;
use sessionfs_tests::s3_store;
use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot, Node};

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

/// Runs `tests/scripts/NAME` with `args`; returns what it printed.
fn run_script(name: &str, args: &[&Path]) -> String {
    let out = Command::new("bash")
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(name),
        )
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_workloads(dir: &Path, tarball: &Path) -> String {
    run_script("workloads.sh", &[dir, tarball])
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

/// The blind spot of the test above: the same tools on a tree that lives in
/// the object (pushed, then mounted fresh with an empty cache), so lazy
/// reads, the block cache and copy-ups run under them; then the written-back
/// object holds exactly the mount's tree, for every reader.
#[test]
fn tools_work_on_a_pushed_session_and_the_write_back_holds_their_tree() {
    let site = Site::s3();
    let tarball = ten_thousand_file_tarball(site.dir.path());
    let made = site.dir.path().join("made/workspace");
    fs::create_dir_all(&made).unwrap();
    run_workloads(&made, &tarball);
    let name = session("pushed");
    site.push(&site.dir.path().join("made"), &name);

    let local = site.dir.path().join("local");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&made)
        .arg(&local)
        .status()
        .unwrap();
    assert!(copied.success());
    let second = |dir: &Path| run_script("workloads-pushed.sh", &[dir]);
    let expected = second(&local);
    assert!(expected.contains("git status: []"), "{expected}");

    // Another host: an empty cache, the session only in S3.
    let host = Site::s3();
    let m = host.mount(
        &name,
        &["--subdir", "workspace", "--writeback-quiet-ms", "200"],
    );
    let got = second(&m.path);
    assert_eq!(got, expected, "the same tools, the same results");
    assert_same_tree(
        &tree_without_git(&local),
        &tree_without_git(&m.path),
        "workloads on the pushed session",
    );
    host.run(&["flush", &m.path.display().to_string()]);
    let mounted = snapshot(&m.path);
    m.stop();

    let key = SessionPath::parse(&name).unwrap().object_key();
    let object = host.dir.path().join("written-back.tar.gz");
    let body = tokio::runtime::Runtime::new().unwrap().block_on(async {
        s3_store()
            .await
            .get(&key, GetOptions::default())
            .await
            .unwrap()
            .body
    });
    fs::write(&object, &body).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for (who, tree) in every_reader(&object, scratch.path()) {
        let workspace: BTreeMap<String, Node> = tree
            .into_iter()
            .filter_map(|(p, n)| p.strip_prefix("workspace/").map(|p| (p.to_owned(), n)))
            .collect();
        assert_same_tree(&mounted, &workspace, who);
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Files of the pushed session the kill -9 writer finds in place.
const OBJECT_FILES: u64 = 300;

/// Writes files and returns each one's name once fsync has returned for it.
fn write_until_failure(dir: &Path, acked: &Mutex<Vec<(String, Vec<u8>)>>) {
    for i in 0u64.. {
        let name = format!("f{i:05}");
        // A quarter of the object files patched in place: 64 bytes in the
        // middle, every other byte is what the copy-up fetched.
        let patch = i % 4 == 3 && i < OBJECT_FILES;
        let data = if patch {
            let mut d = sessionfs_tests::pattern(3000 + i as usize * 13, 1_000_000 + i).to_vec();
            d[100..164].copy_from_slice(&sessionfs_tests::pattern(64, i));
            d
        } else {
            sessionfs_tests::pattern(1 + (i as usize * 7919) % (200 << 10), i).to_vec()
        };
        let result = (|| {
            // The rest replaced (create + truncate), rewritten in place over
            // what was there (a copy-up of an object file, then a truncation
            // to the new length), or saved as editors do (temp + rename).
            if patch {
                let mut f = OpenOptions::new().write(true).open(dir.join(&name))?;
                f.seek(std::io::SeekFrom::Start(100))?;
                f.write_all(&data[100..164])?;
                f.sync_all()?;
            } else if i % 3 == 0 {
                let mut f = File::create(dir.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
            } else if i % 3 == 1 {
                let mut f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(&name))?;
                f.write_all(&data)?;
                f.set_len(data.len() as u64)?;
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
    // The session lives in the object: the writes below replace and rewrite
    // object files (copy-ups) as much as they create new ones.
    let src = site.dir.path().join("src");
    fs::create_dir_all(src.join("w")).unwrap();
    fs::write(
        src.join("log"),
        b"the pushed log, longer than what replaces it\n",
    )
    .unwrap();
    for i in 0..OBJECT_FILES {
        fs::write(
            src.join("w").join(format!("f{i:05}")),
            sessionfs_tests::pattern(3000 + i as usize * 13, 1_000_000 + i),
        )
        .unwrap();
    }
    site.push(&src, &name);
    let m = site.mount(&name, &[]);
    let dir = m.join("w");
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
    // Still open at the kill, written twice: the journal recorded the first
    // write only; the second is found in the overlay file at remount.
    let mut open_at_kill = File::create(m.join("open_at_kill")).unwrap();
    open_at_kill.write_all(b"first write; ").unwrap();
    open_at_kill
        .write_all(b"second write, never closed")
        .unwrap();
    // A modification time set into the past, as `tar x` and `cp -p` do:
    // the overlay file itself was written later, and must not win.
    let aged = File::create(m.join("aged")).unwrap();
    aged.set_len(3).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    aged.set_modified(old).unwrap();
    drop(aged);

    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (dir, acked) = (dir.clone(), acked.clone());
        std::thread::spawn(move || write_until_failure(&dir, &acked))
    };
    // Kill once the writer is well under way (not after a fixed time).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 30 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mountpoint = m.path.clone();
    m.kill9();
    drop(open_at_kill);
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
    assert_eq!(
        fs::read(m.join("open_at_kill")).unwrap(),
        b"first write; second write, never closed"
    );
    let md = fs::metadata(m.join("aged")).unwrap();
    assert_eq!((md.len(), md.modified().unwrap()), (3, old), "aged");
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
    // Object files the writer never reached are as pushed (the one it was
    // writing at the kill may be either).
    for i in acked.len() as u64 + 1..OBJECT_FILES {
        let got = fs::read(m.join("w").join(format!("f{i:05}"))).unwrap();
        assert!(
            got == sessionfs_tests::pattern(3000 + i as usize * 13, 1_000_000 + i),
            "f{i:05}, never written, changed"
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = m.log_text();
        if log.contains("ERROR") && log.contains("segment") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failure is logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
