//! Objects sessionfs writes are plain tar.gz to everyone else: GNU tar,
//! bsdtar, Python `tarfile` (random access and streaming), Node (zlib and a
//! minimal parser) and Rust's single-member `GzDecoder` all extract exactly
//! the tree that was packed. The test tools are installed by scripts/test.sh;
//! a missing one fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot};
use sessionfs_tests::{format_version, sessionfs_bin};

struct Packed {
    _dir: tempfile::TempDir,
    source: PathBuf,
    object: PathBuf,
    root: PathBuf,
}

fn packed_fixture() -> Packed {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    make_fixture(&source);
    let object = dir.path().join("session.tar.gz");
    let out = Command::new(sessionfs_bin())
        .args(["--quiet", "pack"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.path().to_path_buf();
    Packed {
        _dir: dir,
        source,
        object,
        root,
    }
}

fn run(cmd: &mut Command, who: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{who} could not run ({e}): scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{who} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn extracted_by(p: &Packed, who: &str, extract: impl FnOnce(&Path, &Path)) {
    let dest = p.root.join(format!("out-{who}"));
    std::fs::create_dir_all(&dest).unwrap();
    extract(&p.object, &dest);
    assert_same_tree(&snapshot(&p.source), &snapshot(&dest), who);
}

#[test]
fn gnu_tar_extracts_the_same_tree() {
    let p = packed_fixture();
    extracted_by(&p, "gnu-tar", |obj, dest| {
        run(
            Command::new("tar").arg("-xzf").arg(obj).arg("-C").arg(dest),
            "GNU tar",
        );
    });
    // And `gzip -t` finds one sound member.
    run(Command::new("gzip").arg("-t").arg(&p.object), "gzip -t");
}

#[test]
fn bsdtar_extracts_the_same_tree() {
    let p = packed_fixture();
    extracted_by(&p, "bsdtar", |obj, dest| {
        run(
            Command::new("bsdtar")
                .arg("-xzf")
                .arg(obj)
                .arg("-C")
                .arg(dest),
            "bsdtar",
        );
    });
}

fn python_extract(mode: &str) -> impl FnOnce(&Path, &Path) + '_ {
    move |obj, dest| {
        let script = format!(
            "import sys, tarfile\nwith tarfile.open(sys.argv[1], '{mode}') as t:\n    t.extractall(sys.argv[2], filter='tar')\n"
        );
        run(
            Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(obj)
                .arg(dest),
            &format!("python tarfile {mode}"),
        );
    }
}

#[test]
fn python_tarfile_random_access_extracts_the_same_tree() {
    let p = packed_fixture();
    extracted_by(&p, "python-r-gz", python_extract("r:gz"));
}

#[test]
fn python_tarfile_streaming_extracts_the_same_tree() {
    let p = packed_fixture();
    extracted_by(&p, "python-r-stream-gz", python_extract("r|gz"));
}

#[test]
fn node_tar_extracts_the_same_tree_from_a_file_and_from_a_stream() {
    let p = packed_fixture();
    let script = sessionfs_tests::extract::node_tar_script();
    for mode in ["extract", "extract-stream"] {
        extracted_by(&p, mode, |obj, dest| {
            run(
                Command::new("node")
                    .arg(&script)
                    .arg(mode)
                    .arg(obj)
                    .arg(dest),
                mode,
            );
        });
    }
}

#[test]
fn rust_single_member_gzdecoder_extracts_the_same_tree() {
    let p = packed_fixture();
    extracted_by(&p, "rust-flate2-tar", |obj, dest| {
        let file = std::fs::File::open(obj).unwrap();
        // GzDecoder stops after the first gzip member: it must be the only one.
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        archive.set_preserve_permissions(true);
        archive.unpack(dest).unwrap();
    });
}

#[test]
fn the_same_tree_packs_to_the_same_bytes() {
    let p = packed_fixture();
    let again = p.root.join("again.tar.gz");
    let out = Command::new(sessionfs_bin())
        .args(["--quiet", "pack"])
        .arg(&p.source)
        .arg("-o")
        .arg(&again)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        std::fs::read(&p.object).unwrap() == std::fs::read(&again).unwrap(),
        "pack is deterministic"
    );
}

#[test]
fn push_ls_cat_and_pull_round_trip_through_the_local_store() {
    let p = packed_fixture();
    let vars = [
        ("SESSIONFS_STORE", "local".to_owned()),
        (
            "SESSIONFS_STORE_DIR",
            p.root.join("store").display().to_string(),
        ),
        (
            "SESSIONFS_CACHE_DIR",
            p.root.join("cache").display().to_string(),
        ),
    ];
    let sfs = |args: &[&str]| {
        let out = Command::new(sessionfs_bin())
            .arg("--quiet")
            .args(args)
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    sfs(&["push", p.source.to_str().unwrap(), "o__r__main"]);
    let listing = String::from_utf8(sfs(&["ls", "o__r__main"])).unwrap();
    let listed: Vec<&str> = listing.lines().collect();
    let expected: Vec<String> = snapshot(&p.source).keys().cloned().collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    assert!(!listing.contains(".sessionfs"), "the index is hidden");
    // As ls: a file lists itself; -l prints modes as ls does, -h sizes.
    let size = std::fs::metadata(p.source.join("workspace/big.bin"))
        .unwrap()
        .len();
    let one = String::from_utf8(sfs(&["ls", "-l", "o__r__main", "workspace/big.bin"])).unwrap();
    assert!(one.starts_with("-rw-r--r-- "), "{one}");
    assert!(
        one.contains(&format!(" {size} ")) && one.trim_end().ends_with(" workspace/big.bin"),
        "{one}"
    );
    let human = String::from_utf8(sfs(&["ls", "-lh", "o__r__main", "workspace/big.bin"])).unwrap();
    assert!(
        human.contains(&format!(" {:.1}M ", size as f64 / 1048576.0)),
        "{human}"
    );
    let dirs = String::from_utf8(sfs(&["ls", "-l", "o__r__main"])).unwrap();
    assert!(
        dirs.lines()
            .any(|l| l.starts_with("drwx") && l.ends_with(" workspace")),
        "{dirs}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&sfs(&["ls", "--json", "o__r__main", "workspace/big.bin"])).unwrap();
    assert_eq!(json[0]["size"], size);
    assert_eq!(json[0]["type"], "file");
    assert_eq!(json[0]["mode"], "0644");
    let big = sfs(&["cat", "o__r__main", "workspace/big.bin"]);
    assert_eq!(
        big,
        std::fs::read(p.source.join("workspace/big.bin")).unwrap()
    );
    let hard = sfs(&["cat", "o__r__main", "workspace/hard-b.txt"]);
    assert_eq!(hard, b"shared by two names");
    // For scripts: what push stored and pull extracted, as JSON.
    let pushed: serde_json::Value = serde_json::from_slice(&sfs(&[
        "push",
        p.source.to_str().unwrap(),
        "o__r__again",
        "--json",
    ]))
    .unwrap();
    assert_eq!(pushed["sessionPath"], "o__r__again");
    assert!(pushed["objectBytes"].as_u64().unwrap() > 0, "{pushed}");
    assert_eq!(
        pushed["entries"].as_u64().unwrap() as usize,
        expected.len(),
        "{pushed}"
    );
    let again = p.root.join("pulled-again");
    let pulled: serde_json::Value = serde_json::from_slice(&sfs(&[
        "pull",
        "o__r__again",
        again.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(pulled["etag"], pushed["etag"]);
    assert_eq!(pulled["objectBytes"], pushed["objectBytes"]);
    let dest = p.root.join("pulled");
    sfs(&["pull", "o__r__main", dest.to_str().unwrap()]);
    assert_same_tree(&snapshot(&p.source), &snapshot(&dest), "sessionfs pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_push_goes_up_in_parts_and_pulls_back_whole() {
    // Incompressible, so the object passes the 64 MiB multipart threshold.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir_all(source.join("workspace/data")).unwrap();
    for i in 0..3u64 {
        std::fs::write(
            source.join(format!("workspace/data/part{i}.bin")),
            sessionfs_tests::pattern(25 << 20, 7 + i),
        )
        .unwrap();
    }
    std::fs::write(source.join("workspace/readme.txt"), b"three big parts\n").unwrap();
    let session = format!("tests__multipart{:08x}__main", rand::random::<u32>());
    let sfs = |args: &[&str]| {
        let out = Command::new(sessionfs_bin())
            .arg("--quiet")
            .args(args)
            .env("SESSIONFS_CACHE_DIR", dir.path().join("cache"))
            .envs(sessionfs_tests::s3_env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    sfs(&["push", source.to_str().unwrap(), &session]);
    let store = sessionfs_tests::s3_store().await;
    let meta = store
        .head(&format!("{session}/session.tar.gz"))
        .await
        .unwrap();
    assert!(meta.size > 75 << 20, "{}", meta.size);
    // An S3 multipart ETag is "<md5 of part md5s>-<parts>".
    assert!(meta.etag.ends_with("-3\""), "{}", meta.etag);
    assert_eq!(
        sfs(&["cat", &session, "workspace/readme.txt"]),
        b"three big parts\n"
    );
    let dest = dir.path().join("pulled");
    sfs(&["pull", &session, dest.to_str().unwrap()]);
    assert_same_tree(&snapshot(&source), &snapshot(&dest), "multipart push");
}

/// For fleets mid-upgrade: `--format-version 1` (or its variable) packs
/// what a sessionfs reading only version 1 reads, version 2 is the default,
/// every object extracts whole and reads back by its TOC, and a version
/// that does not exist is refused.
#[test]
fn objects_are_written_in_the_format_version_asked_for() {
    let p = packed_fixture();
    assert_eq!(format_version(&std::fs::read(&p.object).unwrap()), 2);
    let pack = |version: Option<&str>, var: Option<&str>, out: &str| {
        let mut c = Command::new(sessionfs_bin());
        c.arg("--quiet");
        if let Some(v) = version {
            c.args(["--format-version", v]);
        }
        if let Some(v) = var {
            c.env("SESSIONFS_FORMAT_VERSION", v);
        }
        c.arg("pack")
            .arg(&p.source)
            .arg("-o")
            .arg(p.root.join(out))
            .output()
            .unwrap()
    };
    for (flag, var, name) in [(Some("1"), None, "v1-flag"), (None, Some("1"), "v1-var")] {
        let out = pack(flag, var, &format!("{name}.tar.gz"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let object = p.root.join(format!("{name}.tar.gz"));
        assert_eq!(
            format_version(&std::fs::read(&object).unwrap()),
            1,
            "{name}"
        );
        let dest = p.root.join(format!("out-{name}"));
        std::fs::create_dir_all(&dest).unwrap();
        run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&object)
                .arg("-C")
                .arg(&dest),
            "GNU tar",
        );
        assert_same_tree(&snapshot(&p.source), &snapshot(&dest), name);
    }
    // Pushed as version 1, read back by the TOC (ls, cat) by a default process.
    let local = |args: &[&str]| {
        Command::new(sessionfs_bin())
            .arg("--quiet")
            .args(args)
            .env("SESSIONFS_STORE", "local")
            .env("SESSIONFS_STORE_DIR", p.root.join("store"))
            .env("SESSIONFS_CACHE_DIR", p.root.join("cache"))
            .output()
            .unwrap()
    };
    let src = p.source.to_str().unwrap();
    let pushed = local(&["--format-version", "1", "push", src, "o__v1__main"]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let listed = local(&["ls", "o__v1__main"]);
    assert_eq!(
        String::from_utf8(listed.stdout).unwrap().lines().count(),
        snapshot(&p.source).len()
    );
    let cat = local(&["cat", "o__v1__main", "workspace/big.bin"]);
    assert_eq!(
        cat.stdout,
        std::fs::read(p.source.join("workspace/big.bin")).unwrap()
    );
    let refused = pack(Some("3"), None, "v3.tar.gz");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--format-version"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!p.root.join("v3.tar.gz").exists());
}

#[test]
fn mtimes_ustar_cannot_hold_come_back_from_every_reader() {
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, UNIX_EPOCH};
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src/workspace");
    std::fs::create_dir_all(&w).unwrap();
    // 1901 (a 32-bit time's lowest), a second before 1970, now, and 2300
    // (past ustar's eleven octal digits).
    let times: [(&str, i64); 4] = [
        ("old", -2_147_472_000),
        ("before-epoch", -1),
        ("now", 1_796_000_000),
        ("far", 10_413_792_000),
    ];
    for (name, secs) in times {
        let f = std::fs::File::create(w.join(name)).unwrap();
        let t = if secs < 0 {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        };
        f.set_modified(t).unwrap();
    }
    let object = dir.path().join("session.tar.gz");
    sessionfs_tests::run_ok(
        Command::new(sessionfs_bin())
            .args(["--quiet", "pack"])
            .arg(dir.path().join("src"))
            .arg("-o")
            .arg(&object),
        "pack",
    );
    let scratch = dir.path().join("out");
    sessionfs_tests::extract::every_reader(&object, &scratch);
    for who in std::fs::read_dir(&scratch).unwrap() {
        let who = who.unwrap().path();
        for (name, secs) in times {
            let md = std::fs::metadata(who.join("workspace").join(name)).unwrap();
            assert_eq!(md.mtime(), secs, "{}: {name}", who.display());
        }
    }
}
