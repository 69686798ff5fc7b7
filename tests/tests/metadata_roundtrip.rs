//! What a session keeps besides names and bytes: modification times to the
//! nanosecond, owners, extended attributes and hard-link identity. Each must
//! come back the same through push → mount, mount → pull, a write-back of
//! other changes, and the API's download (extracted by GNU tar, which keeps
//! whole seconds: ustar has no finer field).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use sessionfs_tests::mount::Site;

/// What is compared, per path.
#[derive(Debug, PartialEq, Eq)]
struct Meta {
    mtime: (i64, i64),
    uid: u32,
    gid: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// For a hard-linked file, the first path (in order) of its inode.
    link_of: Option<String>,
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: NUL-terminated path; the buffer is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(n >= 0);
        value.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Every path under `root` (but `skip`) with its metadata; `whole_seconds`
/// drops the nanoseconds.
fn meta_of(root: &Path, whole_seconds: bool) -> BTreeMap<String, Meta> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    let mut first_of_inode: BTreeMap<u64, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let link_of = (md.is_file() && md.nlink() > 1).then(|| {
            first_of_inode
                .entry(md.ino())
                .or_insert(rel.clone())
                .clone()
        });
        // A directory's mtime moves with what happens inside it (a pull
        // creates its entries after setting it): files and links only.
        let mtime = if md.is_dir() {
            (0, 0)
        } else if whole_seconds {
            (md.mtime(), 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        out.insert(
            rel,
            Meta {
                mtime,
                uid: md.uid(),
                gid: md.gid(),
                xattrs: if md.file_type().is_symlink() {
                    BTreeMap::new()
                } else {
                    xattrs(&p)
                },
                link_of,
            },
        );
    }
    out
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings; the value is valid for its length.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr {name} on {}", path.display());
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
    // SAFETY: NUL-terminated path; two valid timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// A tree with odd mtimes, several owners, xattrs and hard links.
fn source(root: &Path) {
    let w = root.join("workspace");
    std::fs::create_dir_all(w.join("sub")).unwrap();
    std::fs::write(root.join(".session-metadata.json"), b"{}").unwrap();
    std::fs::write(w.join("a.txt"), b"a").unwrap();
    std::fs::write(w.join("sub/b.bin"), vec![7u8; 70_000]).unwrap();
    std::fs::hard_link(w.join("a.txt"), w.join("sub/a-link.txt")).unwrap();
    std::os::unix::fs::symlink("a.txt", w.join("to-a")).unwrap();
    set_xattr(&w.join("a.txt"), "user.origin", b"metadata test");
    set_xattr(&w.join("sub/b.bin"), "user.bin", &[0, 1, 2, 255]);
    std::os::unix::fs::chown(w.join("sub/b.bin"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(w.join("to-a"), Some(4321), Some(8765)).unwrap();
    std::os::unix::fs::chown(w.join("sub"), Some(1000), Some(1000)).unwrap();
    set_mtime(&w.join("a.txt"), 1_700_000_000, 123_456_789);
    set_mtime(&w.join("sub/b.bin"), 1_600_000_000, 999_999_999);
    set_mtime(&w.join("to-a"), 1_500_000_000, 1);
}

fn assert_same(want: &BTreeMap<String, Meta>, got: &BTreeMap<String, Meta>, what: &str) {
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}: paths"
    );
    for (path, w) in want {
        assert_eq!(Some(w), got.get(path), "{what}: {path}");
    }
}

fn pull(site: &Site, session: &str, into: &Path) {
    site.run(&["pull", session, &into.display().to_string()]);
}

#[test]
fn times_owners_xattrs_and_hard_links_survive_every_way_through() {
    let site = Site::s3();
    let session = format!("tests__meta{:08x}__main", rand::random::<u32>());
    let src = site.dir.path().join("src");
    source(&src);
    let want = meta_of(&src, false);
    site.push(&src, &session);

    // Mounted on another host.
    let host = Site::s3();
    let m = host.mount(&session, &["--writeback-quiet-ms", "200"]);
    assert_same(&want, &meta_of(&m.path, false), "the mount");

    // Pulled.
    let pulled = site.dir.path().join("pulled");
    pull(&host, &session, &pulled);
    assert_same(&want, &meta_of(&pulled, false), "pull");

    // A write-back of another change keeps all of it.
    std::fs::write(m.join("workspace/new.txt"), b"new").unwrap();
    set_mtime(&m.join("workspace/new.txt"), 1_650_000_000, 42);
    host.run(&["flush", &m.path.display().to_string()]);
    let mut want_after = meta_of(&m.path, false);
    m.stop();
    let again = site.dir.path().join("pulled-again");
    pull(&Site::s3(), &session, &again);
    assert_same(
        &want_after,
        &meta_of(&again, false),
        "pull after a write-back",
    );

    // The API's download, extracted by GNU tar (whole seconds).
    let server = site.serve_api(&[], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        reqwest::get(format!(
            "{}/api/storage-worker/sessions/{session}/download",
            server.url
        ))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
    });
    assert_eq!(server.stop().code(), Some(0));
    let tgz = site.dir.path().join("download.tar.gz");
    std::fs::write(&tgz, &body).unwrap();
    let extracted = site.dir.path().join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    sessionfs_tests::run_ok(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=user.*",
                "--same-owner",
                "-xzf",
            ])
            .arg(&tgz)
            .arg("-C")
            .arg(&extracted),
        "GNU tar",
    );
    // sessionfs's own index is an entry of the archive too.
    std::fs::remove_dir_all(extracted.join(".sessionfs")).unwrap();
    for m in want_after.values_mut() {
        m.mtime.1 = 0;
    }
    assert_same(
        &want_after,
        &meta_of(&extracted, true),
        "the API download, GNU tar",
    );
}
