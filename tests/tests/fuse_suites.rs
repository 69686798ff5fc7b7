//! The standard filesystem suites, run inside a mounted session on the S3
//! server: pjdfstest (POSIX semantics, as root and as other users, so the
//! mount allows other users) and fsx (random reads, writes, truncates and
//! mapped I/O on one file, every read checked against a model).
//!
//! Both tools are installed by scripts/test.sh into `.tools/cargo/bin`;
//! pjdfstest also needs the `tests` user, which the script creates.

use std::path::PathBuf;
use std::process::Command;

use sessionfs_tests::mount::Site;
use sessionfs_tests::pattern;

fn tool(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/cargo/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: scripts/test.sh installs it (cargo install --root .tools/cargo {name})",
        path.display()
    );
    path
}

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

/// What the README claims for pjdfstest 0.2.2 (pinned by scripts/test.sh).
const PJDFSTEST_PASSED: u32 = 384;

/// pjdfstest inside a directory of a pushed session (a tree that lives in
/// the object, mounted on another host with an empty cache), so the journal
/// runs over an object-backed tree.
#[test]
fn pjdfstest_passes_inside_a_mounted_session() {
    let site = Site::s3();
    let name = session("pjdfstest");
    let src = site.dir.path().join("src");
    sessionfs_tests::trees::make_fixture(&src);
    std::fs::create_dir_all(src.join("workspace/suite")).unwrap();
    site.push(&src, &name);
    let host = Site::s3();
    let m = host.mount(&name, &["--allow-other"]);
    let dir = m.join("workspace/suite");
    let secondary = tempfile::tempdir().unwrap();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pjdfstest/sessionfs.toml");
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&dir)
        .arg("-s")
        .arg(secondary.path())
        .current_dir(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary:\n{text}"));
    eprintln!("{summary}");
    // "Summary: N passed, M failed, K skipped"
    let count = |what: &str| -> u32 {
        summary
            .split(',')
            .find(|p| p.trim_end().ends_with(what))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {what} count in {summary:?}"))
    };
    assert_eq!(count("failed"), 0, "{summary}");
    assert!(
        count("passed") >= PJDFSTEST_PASSED,
        "fewer than the {PJDFSTEST_PASSED} passes the README claims: {summary}"
    );
    let failed: Vec<&str> = text.lines().filter(|l| l.ends_with("FAILED")).collect();
    assert!(failed.is_empty(), "pjdfstest failures: {failed:#?}\n{text}");
    assert!(out.status.success(), "{text}");
    // The skips are the read-only remount cases (FUSE mounts cannot be
    // remounted read-only in place) and LINK_MAX, which has no fixed value here.
    for line in text.lines().filter(|l| l.ends_with("skipped")) {
        assert!(
            line.contains("erofs") || line.contains("link_count_max"),
            "unexpected skip: {line}"
        );
    }
}

#[test]
fn fsx_runs_100000_operations_without_a_mismatch() {
    let site = Site::s3();
    let m = site.mount(&session("fsx"), &[]);
    let artifacts = tempfile::tempdir().unwrap();
    fsx(Command::new(tool("fsx"))
        .args(["-N", "100000", "-S", "20261123", "-P"])
        .arg(artifacts.path())
        .arg(m.join("fsx.file")));
}

/// Runs fsx; it must complete every operation.
fn fsx(cmd: &mut Command) {
    let text = sessionfs_tests::run_ok(cmd, "fsx");
    assert!(text.contains("All operations completed A-OK"), "{text}");
}

/// fsx on a file that lives in the session object, in a mount with an
/// empty cache: opening it for writing copies it up from the store, every
/// read is checked against fsx's model, and what the mount ends with is
/// what the written-back object holds (read by a fresh process).
#[test]
fn fsx_on_a_file_from_the_object_and_its_write_back() {
    let site = Site::s3();
    let name = session("fsxobject");
    let src = site.dir.path().join("src/workspace");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("fsx.file"), pattern(1 << 20, 5)).unwrap();
    std::fs::write(src.join("beside.txt"), b"unchanged").unwrap();
    site.push(&site.dir.path().join("src"), &name);

    let host = Site::s3();
    let m = host.mount(&name, &["--writeback-quiet-ms", "200"]);
    // fsx zeroes its file first: check the copy-up itself (opening for
    // writing copies the object's bytes up; they read back the same).
    {
        use std::io::Read;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("workspace/fsx.file"))
            .unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(got == pattern(1 << 20, 5), "the copy-up holds other bytes");
    }
    let artifacts = tempfile::tempdir().unwrap();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fsx/object-file.toml");
    fsx(Command::new(tool("fsx"))
        .args(["-N", "100000", "-S", "20261201", "-f"])
        .arg(&config)
        .arg("-P")
        .arg(artifacts.path())
        .arg(m.join("workspace/fsx.file")));
    let ended = std::fs::read(m.join("workspace/fsx.file")).unwrap();
    assert_eq!(ended.len(), 1 << 20);
    assert!(ended != pattern(1 << 20, 5), "fsx changed nothing");
    host.run(&["flush", &m.path.display().to_string()]);
    m.stop();

    let fresh = Site::s3();
    assert!(fresh.run(&["cat", &name, "workspace/fsx.file"]) == ended);
    assert_eq!(
        fresh.run(&["cat", &name, "workspace/beside.txt"]),
        b"unchanged"
    );
}
