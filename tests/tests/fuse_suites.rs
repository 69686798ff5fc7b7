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

#[test]
fn pjdfstest_passes_inside_a_mounted_session() {
    let site = Site::s3();
    let m = site.mount(&session("pjdfstest"), &["--allow-other"]);
    let secondary = tempfile::tempdir().unwrap();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pjdfstest/sessionfs.toml");
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&m.path)
        .arg("-s")
        .arg(secondary.path())
        .current_dir(&m.path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary:\n{text}"));
    eprintln!("{summary}");
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
    let out = Command::new(tool("fsx"))
        .args(["-N", "100000", "-S", "20261123", "-P"])
        .arg(artifacts.path())
        .arg(m.join("fsx.file"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsx failed:\n{text}");
    assert!(text.contains("All operations completed A-OK"), "{text}");
}
