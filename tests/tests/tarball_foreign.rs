//! Tarballs sessionfs did not write open after one indexing pass and then
//! list and read exactly like `tar x` of the same file: a corpus made by GNU
//! tar (gnu and posix formats), Python's tarfile, Node's npm tar, pigz, a tar stream split
//! over several gzip members, an uncompressed tar, and an archive with a
//! duplicated name (the later wins). Through the real S3 server the index
//! makes later reads lazy: about one span per small file.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::metered::MeteredStore;
use sessionfs_core::store::{ObjectStore, PutOptions};
use sessionfs_core::tarball::index::TocIndex;
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::toc::Kind;
use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot, Node};
use sessionfs_tests::{pattern, s3_store, unique_prefix};

fn sh(script: &str, dir: &Path) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the reader says the tree is, in the shape of a snapshot.
async fn reader_snapshot(r: &SessionReader) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    for e in r.entries() {
        let node = match e.t {
            Kind::Dir => Node::Dir { mode: e.m },
            Kind::Symlink => Node::Symlink {
                target: e.lt().map(str::to_owned).unwrap(),
            },
            Kind::File | Kind::HardLink => {
                let target = if e.t == Kind::HardLink {
                    r.stat(e.lt().unwrap()).unwrap()
                } else {
                    e
                };
                Node::File {
                    mode: target.m,
                    content: r.read_all(&e.p).await.unwrap().to_vec(),
                }
            }
            other => panic!("{}: unexpected {other:?}", e.p),
        };
        out.insert(e.p.to_string(), node);
    }
    out
}

/// Builds the corpus in `dir` from the fixture tree `src`; returns (name, file).
fn corpus(dir: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    sh(
        r#"
        tar czf gnu.tar.gz -C src .
        tar --format=posix -czf posix.tar.gz -C src .
        tar cf - -C src . | pigz -p 2 > pigz.tar.gz
        tar cf plain.tar -C src .
        tar cf whole.tar -C src .
        half=$(( $(stat -c %s whole.tar) / 2 ))
        head -c $half whole.tar | gzip > members.tar.gz
        tail -c +$(( half + 1 )) whole.tar | gzip >> members.tar.gz
        python3 - <<'PY'
import tarfile
with tarfile.open("python.tar.gz", "w:gz") as t:
    t.add("src", arcname=".")
PY
        mkdir -p dup/workspace && echo first > dup/workspace/twice.txt
        tar cf dup.tar -C dup workspace
        echo second, longer > dup/workspace/twice.txt
        tar rf dup.tar -C dup workspace/twice.txt
        gzip -k dup.tar
        # Sparse files: chunks inside the header, in GNU extension blocks
        # (more than 4, and more than 21 more), holes at both ends, all hole.
        mkdir -p sparse/d
        python3 - <<'PY'
def write(path, size, chunks):
    with open(path, "wb") as f:
        for off, data in chunks:
            f.seek(off)
            f.write(data)
        f.truncate(size)
write("sparse/d/eight", 9 << 20, [(i << 20, bytes([65 + i]) * 5000) for i in range(8)])
write("sparse/d/many", 100 << 16, [(i << 16, b"%d;" % i * 300) for i in range(0, 100, 2)])
write("sparse/d/ends", 3 << 20, [(1 << 20, b"middle" * 1000)])
write("sparse/d/empty", 1 << 20, [])
with open("sparse/d/dense", "wb") as f:
    f.write(b"not sparse at all\n" * 1000)
PY
        tar --sparse -czf sparse-gnu.tar.gz -C sparse .
        tar --sparse --format=posix -czf sparse-pax10.tar.gz -C sparse .
        tar --sparse --format=posix --sparse-version=0.1 -czf sparse-pax01.tar.gz -C sparse .
        tar --sparse --format=posix --sparse-version=0.0 -czf sparse-pax00.tar.gz -C sparse .
        "#,
        dir,
    );
    // Node services write sessions with the npm tar package.
    sessionfs_tests::run_ok(
        Command::new("node")
            .arg(sessionfs_tests::extract::node_tar_script())
            .arg("create")
            .arg(dir.join("node.tar.gz"))
            .arg(dir.join("src")),
        "node tar create",
    );
    [
        ("gnu", "gnu.tar.gz"),
        ("node-tar", "node.tar.gz"),
        ("posix", "posix.tar.gz"),
        ("pigz", "pigz.tar.gz"),
        ("plain", "plain.tar"),
        ("members", "members.tar.gz"),
        ("python", "python.tar.gz"),
        ("duplicates", "dup.tar.gz"),
        ("sparse-gnu", "sparse-gnu.tar.gz"),
        ("sparse-pax10", "sparse-pax10.tar.gz"),
        ("sparse-pax01", "sparse-pax01.tar.gz"),
        ("sparse-pax00", "sparse-pax00.tar.gz"),
    ]
    .into_iter()
    .map(|(name, file)| (name, dir.join(file)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_tarballs_list_and_read_like_tar_x() {
    let dir = tempfile::tempdir().unwrap();
    make_fixture(&dir.path().join("src"));
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(dir.path().join("store"), "sessions").unwrap());
    let index = TocIndex::open(&dir.path().join("index.db")).unwrap();
    for (name, file) in corpus(dir.path()) {
        let extracted = dir.path().join(format!("x-{name}"));
        std::fs::create_dir_all(&extracted).unwrap();
        sh(
            &format!("tar xf {} -C {}", file.display(), extracted.display()),
            dir.path(),
        );
        let key = format!("{name}/session.tar.gz");
        store
            .put(
                &key,
                Bytes::from(std::fs::read(&file).unwrap()),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let r = SessionReader::open(store.clone(), &key, Some(&index))
            .await
            .unwrap();
        assert!(r.is_foreign(), "{name}");
        if name.starts_with("sparse") {
            let many = r.stat("d/many").unwrap();
            assert!(many.sp().is_some_and(|m| m.len() == 50), "{name}");
            // A read inside one file, crossing holes and chunks.
            let part = r.read("d/many", (3 << 16) - 10, 3 << 16).await.unwrap();
            let whole = std::fs::read(extracted.join("d/many")).unwrap();
            assert_eq!(&part[..], &whole[(3 << 16) - 10..(6 << 16) - 10], "{name}");
        }
        assert_same_tree(&snapshot(&extracted), &reader_snapshot(&r).await, name);
        // File mtimes to the nanosecond, where the archive has them (PAX).
        for e in r.entries().iter().filter(|e| e.t == Kind::File) {
            let md = std::fs::metadata(extracted.join(&*e.p)).unwrap();
            assert_eq!(
                (e.mt, e.mn),
                (md.mtime(), u32::try_from(md.mtime_nsec()).unwrap()),
                "{name}: {}",
                e.p
            );
        }
        // Opened again, the index comes from the database and reads the same.
        let again = SessionReader::open(store.clone(), &key, Some(&index))
            .await
            .unwrap();
        assert_same_tree(&snapshot(&extracted), &reader_snapshot(&again).await, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_session_reads_lazily_after_its_index_pass() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src/workspace");
    std::fs::create_dir_all(&w).unwrap();
    // ~24 MiB of tar: enough access points that one read touches one span.
    for i in 0..12 {
        std::fs::write(w.join(format!("blob{i:02}.bin")), pattern(2 << 20, i)).unwrap();
    }
    std::fs::write(w.join("needle.txt"), b"found me").unwrap();
    for i in 12..24 {
        std::fs::write(w.join(format!("blob{i:02}.bin")), pattern(2 << 20, i)).unwrap();
    }
    sh("tar czf plain.tar.gz -C src .", dir.path());
    let key = format!("{}session.tar.gz", unique_prefix("foreign-lazy"));
    let s3 = s3_store().await;
    let object = std::fs::read(dir.path().join("plain.tar.gz")).unwrap();
    s3.put(&key, Bytes::from(object.clone()), PutOptions::default())
        .await
        .unwrap();

    let index = TocIndex::open(&dir.path().join("index.db")).unwrap();
    let first = SessionReader::open(s3.clone(), &key, Some(&index))
        .await
        .unwrap();
    assert_eq!(
        &first.read_all("workspace/needle.txt").await.unwrap()[..],
        b"found me"
    );

    let metered = Arc::new(MeteredStore::new(s3.clone()));
    let warm = SessionReader::open(metered.clone() as Arc<dyn ObjectStore>, &key, Some(&index))
        .await
        .unwrap();
    assert_eq!(
        metered.snapshot().requests,
        1,
        "with the index cached, open is one HEAD"
    );
    assert_eq!(
        &warm.read_all("workspace/needle.txt").await.unwrap()[..],
        b"found me"
    );
    let after = metered.snapshot();
    println!(
        "foreign read: {} requests, {} bytes of a {} byte object",
        after.requests - 1,
        after.bytes_in,
        object.len()
    );
    assert_eq!(after.requests, 2, "one GET for the read");
    assert!(
        after.bytes_in <= 3 << 20,
        "about one span, not the object: {}",
        after.bytes_in
    );
    let big = warm
        .read("workspace/blob20.bin", 1_000_000, 3_000_000)
        .await
        .unwrap();
    assert_eq!(big, pattern(2 << 20, 20).slice(1_000_000..));
    s3.delete(&key).await.unwrap();
}

#[tokio::test]
async fn foreign_entries_climbing_out_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    sh(
        r#"
        python3 - <<'PY'
import io, tarfile
with tarfile.open("hostile.tar.gz", "w:gz") as t:
    for name in ["workspace/ok.txt", "../escape.txt", "/etc/abs.txt", "workspace/../../up.txt"]:
        data = name.encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
PY
        "#,
        dir.path(),
    );
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(dir.path().join("store"), "sessions").unwrap());
    let object = std::fs::read(dir.path().join("hostile.tar.gz")).unwrap();
    store
        .put(
            "h/session.tar.gz",
            Bytes::from(object),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let r = SessionReader::open(store, "h/session.tar.gz", None)
        .await
        .unwrap();
    let names: Vec<&str> = r.entries().iter().map(|e| &*e.p).collect();
    // As `tar x` does: `..` members skipped, a leading `/` stripped.
    assert!(names.contains(&"workspace/ok.txt"), "{names:?}");
    assert!(names.contains(&"etc/abs.txt"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("..")), "{names:?}");
}
