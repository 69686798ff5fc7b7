//! A repository committed on one host is clean at once in a fresh mount on
//! another: git trusts its index only while ctime, mtime, inode number,
//! owner and size match `lstat`, and sessionfs keeps the inode numbers and
//! ctimes the files had where they were packed (a pushed directory, then a
//! mount's write-back) and shows them again. Checked entry by entry against
//! `git ls-files --debug`, with real git, a real mount and the S3 server.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sessionfs_tests::mount::Site;
use sessionfs_tests::stdout_ok;

fn git(dir: &Path, args: &[&str]) -> String {
    let identity = [
        "-c",
        "gc.auto=0",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
    ];
    stdout_ok(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(identity)
            .args(args),
    )
}

/// Entries of the index whose stat data match `lstat` in `repo`, and all.
/// `git ls-files --debug` prints each path, then lines of `name: value`
/// pairs (`ctime: SEC:NSEC`, `dev: D\tino: I`, `uid: U\tgid: G`, `size: S`).
fn matching(repo: &Path) -> (usize, usize) {
    let listing = git(repo, &["ls-files", "--debug"]);
    let mut entries: Vec<(String, HashMap<String, u64>)> = Vec::new();
    for line in listing.lines() {
        if !line.starts_with(' ') {
            entries.push((line.to_owned(), HashMap::new()));
            continue;
        }
        let fields = &mut entries.last_mut().expect("a path first").1;
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.chunks(2) {
            if let [name, value] = pair {
                let seconds = value.split(':').next().unwrap_or_default();
                if let Ok(v) = seconds.parse() {
                    fields.insert(name.trim_end_matches(':').to_owned(), v);
                }
            }
        }
    }
    let matched = entries
        .iter()
        .filter(|(path, f)| {
            let md = std::fs::symlink_metadata(repo.join(path)).unwrap();
            f["ctime"] == md.ctime() as u64
                && f["mtime"] == md.mtime() as u64
                && f["ino"] == u64::from(md.ino() as u32)
                && f["uid"] == u64::from(md.uid())
                && f["gid"] == u64::from(md.gid())
                && f["size"] == md.size()
        })
        .count();
    (matched, entries.len())
}

#[test]
fn a_repository_committed_elsewhere_is_clean_in_a_fresh_mount_and_after_its_write_back() {
    let site = Site::s3();
    let src = site.dir.path().join("src");
    let repo = src.join("workspace");
    for i in 0..600 {
        let d = repo.join(format!("pkg{:02}", i % 20));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i:04}.rs")), format!("fn f{i}() {{}}\n")).unwrap();
    }
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let (m0, t0) = matching(&repo);
    assert_eq!((m0, t0), (600, 600), "the source repository itself");
    let session = format!("gitstat-{:08x}", rand::random::<u32>());
    site.push(&src, &session);

    // Another host: nothing cached, nothing in an overlay.
    let host_b = Site::s3();
    let m = host_b.mount(&session, &["--writeback-quiet-ms", "300"]);
    let mounted = m.path.join("workspace");
    let (matched, total) = matching(&mounted);
    eprintln!("fresh mount of the pushed repository: {matched} of {total} entries match lstat");
    assert_eq!(total, 600);
    assert!(
        matched * 100 >= total * 99,
        "{matched} of {total} entries match: git would rehash the rest"
    );
    assert_eq!(git(&mounted, &["status", "--porcelain"]), "");

    // Work in the mount, committed there: git records the mount's stat data.
    std::fs::write(mounted.join("pkg00/f0000.rs"), "fn changed() {}\n").unwrap();
    std::fs::write(mounted.join("pkg01/new.rs"), "fn new() {}\n").unwrap();
    git(&mounted, &["add", "-A"]);
    git(&mounted, &["commit", "-q", "-m", "second"]);
    host_b.run(&["flush", &m.path.display().to_string()]);
    m.stop();

    // A third host mounts what the write-back stored.
    let host_c = Site::s3();
    let m = host_c.mount(&session, &[]);
    let mounted = m.path.join("workspace");
    let start = Instant::now();
    let (matched, total) = matching(&mounted);
    eprintln!(
        "fresh mount after the write-back: {matched} of {total} entries match lstat ({:?})",
        start.elapsed()
    );
    assert_eq!(total, 601);
    assert!(
        matched * 100 >= total * 99,
        "{matched} of {total} entries match after the write-back"
    );
    assert_eq!(git(&mounted, &["status", "--porcelain"]), "");
    assert_eq!(
        std::fs::read_to_string(mounted.join("pkg00/f0000.rs")).unwrap(),
        "fn changed() {}\n"
    );
    m.stop();
}
