//! Damaged and hostile objects get clear errors, never a panic, a hang or a
//! write outside the session: truncation, a corrupt locator or TOC, a locator
//! pointing outside the object or promising an absurd TOC, a segment whose
//! digest does not match, and (through `pull`) archives whose entries or links
//! reach out of the destination.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::{ObjectStore, PutOptions};
use sessionfs_core::tarball::reader::SessionReader;
use sessionfs_core::tarball::toc::{Locator, LOCATOR_FROM_END, LOCATOR_LEN};
use sessionfs_core::tarball::writer::{pack_dir, PackOptions};
use sessionfs_core::tarball::TarballError;
use sessionfs_tests::{pattern, sessionfs_bin};

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    object: Vec<u8>,
}

/// A session of two files far enough apart to sit in different segments.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("workspace")).unwrap();
    std::fs::write(tree.join("workspace/first.txt"), b"first file").unwrap();
    std::fs::write(tree.join("workspace/middle.bin"), pattern(2 << 20, 1)).unwrap();
    std::fs::write(tree.join("workspace/zlast.txt"), b"last file").unwrap();
    let mut object = Vec::new();
    pack_dir(&tree, &mut object, &PackOptions::default(), &|_| {}).unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(dir.path().join("store"), "sessions").unwrap());
    Fixture { dir, store, object }
}

async fn open(f: &Fixture, bytes: Vec<u8>) -> Result<SessionReader, TarballError> {
    f.store
        .put(
            "s/session.tar.gz",
            Bytes::from(bytes),
            PutOptions::default(),
        )
        .await
        .unwrap();
    SessionReader::open(f.store.clone(), "s/session.tar.gz", None).await
}

fn locator_of(object: &[u8]) -> Locator {
    let at = object.len() - LOCATOR_FROM_END;
    Locator::decode(&object[at..at + LOCATOR_LEN], object.len() as u64).unwrap()
}

fn with_locator(object: &[u8], loc: Locator) -> Vec<u8> {
    let mut bytes = object.to_vec();
    let at = bytes.len() - LOCATOR_FROM_END;
    bytes[at..at + LOCATOR_LEN].copy_from_slice(&loc.encode());
    bytes
}

#[tokio::test]
async fn the_intact_object_reads() {
    let f = fixture();
    let r = open(&f, f.object.clone()).await.unwrap();
    assert_eq!(
        &r.read_all("workspace/first.txt").await.unwrap()[..],
        b"first file"
    );
    assert_eq!(
        &r.read_all("workspace/zlast.txt").await.unwrap()[..],
        b"last file"
    );
    assert_eq!(
        r.read("workspace/middle.bin", 1000, 10).await.unwrap(),
        pattern(2 << 20, 1).slice(1000..1010)
    );
    assert!(matches!(
        r.read_all("workspace").await,
        Err(TarballError::IsADirectory(_))
    ));
    assert!(matches!(
        r.read_all("nope").await,
        Err(TarballError::NoSuchPath(_))
    ));
}

#[tokio::test]
async fn truncated_objects_are_refused() {
    let f = fixture();
    for keep in [
        f.object.len() - 1,
        f.object.len() - 100,
        f.object.len() / 2,
        20,
        0,
    ] {
        let err = open(&f, f.object[..keep].to_vec()).await.unwrap_err();
        assert!(
            matches!(
                err,
                TarballError::NotSeekable | TarballError::Corrupt(_) | TarballError::Store(_)
            ),
            "{keep}: {err}"
        );
    }
}

#[tokio::test]
async fn a_corrupt_locator_is_refused() {
    let f = fixture();
    let mut bytes = f.object.clone();
    let at = bytes.len() - LOCATOR_FROM_END + 20;
    bytes[at] ^= 0x40;
    let err = open(&f, bytes).await.unwrap_err();
    assert!(
        matches!(err, TarballError::Corrupt(ref m) if m.contains("locator")),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupt_toc_is_refused() {
    let f = fixture();
    let loc = locator_of(&f.object);
    let mut bytes = f.object.clone();
    bytes[(loc.toc_offset + 5 + 512 + 10) as usize] ^= 0x01;
    let err = open(&f, bytes).await.unwrap_err();
    assert!(
        matches!(err, TarballError::Corrupt(ref m) if m.contains("table of contents")),
        "{err}"
    );
}

#[tokio::test]
async fn a_locator_pointing_outside_the_object_is_refused() {
    let f = fixture();
    let mut loc = locator_of(&f.object);
    loc.toc_offset = f.object.len() as u64 + 1000;
    let err = open(&f, with_locator(&f.object, loc)).await.unwrap_err();
    assert!(matches!(err, TarballError::Corrupt(_)), "{err}");
    // A TOC promising a bomb's inflation ratio.
    let mut loc = locator_of(&f.object);
    loc.toc_raw_len = loc.toc_len * 5000;
    let err = open(&f, with_locator(&f.object, loc)).await.unwrap_err();
    assert!(matches!(err, TarballError::Corrupt(_)), "{err}");
    // A TOC claiming another length than it inflates to.
    let mut loc = locator_of(&f.object);
    loc.toc_raw_len -= 1;
    let err = open(&f, with_locator(&f.object, loc)).await.unwrap_err();
    assert!(matches!(err, TarballError::Corrupt(_)), "{err}");
}

#[tokio::test]
async fn a_segment_that_fails_its_digest_is_never_served() {
    let f = fixture();
    let r = open(&f, f.object.clone()).await.unwrap();
    let last = r.toc().segments.last().unwrap().clone();
    let first = r.toc().segments[0].clone();
    assert_ne!(first, last);
    let mut bytes = f.object.clone();
    bytes[(last.co + last.cl / 2) as usize] ^= 0x10;
    let r = open(&f, bytes).await.unwrap();
    let err = r.read_all("workspace/zlast.txt").await.unwrap_err();
    assert!(matches!(err, TarballError::BadSegment { .. }), "{err}");
    assert!(err.to_string().contains("digest"), "{err}");
    // What other segments hold still reads.
    assert_eq!(
        &r.read_all("workspace/first.txt").await.unwrap()[..],
        b"first file"
    );
}

#[tokio::test]
async fn foreign_objects_that_are_not_sound_archives_are_refused() {
    let f = fixture();
    let tree = f.dir.path().join("tree");
    let out = Command::new("tar")
        .arg("czf")
        .arg(f.dir.path().join("plain.tar.gz"))
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let plain = std::fs::read(f.dir.path().join("plain.tar.gz")).unwrap();
    // Whole, it opens (indexed as a foreign tarball)...
    assert!(open(&f, plain.clone()).await.unwrap().is_foreign());
    // ...cut short, or damaged inside, it does not.
    for cut in [plain.len() - 4, plain.len() / 2, 11] {
        let err = open(&f, plain[..cut].to_vec()).await.unwrap_err();
        assert!(matches!(err, TarballError::Corrupt(_)), "{cut}: {err}");
    }
    let mut damaged = plain.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    damaged[mid + 1] ^= 0xff;
    assert!(matches!(
        open(&f, damaged).await.unwrap_err(),
        TarballError::Corrupt(_)
    ));
    let err = open(&f, b"not gzip and not tar, just text".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, TarballError::Corrupt(_)), "{err}");
}

#[test]
fn a_gzip_bomb_is_refused_without_inflating_it_all() {
    use sessionfs_core::tarball::foreign::{index, Limits};
    // 64 MiB of zeros behind a tar header: tiny compressed, far past the limit.
    let mut tar = Vec::new();
    let mut header = tar::Header::new_ustar();
    header.set_path("workspace/zeros").unwrap();
    header.set_size(64 << 20);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let limits = Limits {
        max_tar_size: 8 << 20,
        ..Limits::default()
    };
    let err = index(&bomb[..], limits).unwrap_err();
    assert!(err.to_string().contains("decompression bomb"), "{err}");
}

/// A tarball with one hostile member (after a harmless one): `climb` is an
/// entry climbing out with `..` (refused), `absolute` one with an absolute
/// path into `outside` (taken as relative, as `tar x` does), `symlink` a link
/// out of the tree and a file written through it (refused).
fn hostile_tarball(path: &Path, outside: &Path, how: &str) {
    let script = r#"
import io, os, sys, tarfile
out, outside, how = sys.argv[1], sys.argv[2], sys.argv[3]
with tarfile.open(out, "w:gz") as t:
    def add(name, data=b"x", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    add("workspace/ok.txt", b"fine")
    if how == "climb":
        add("workspace/../../climbed.txt", b"climbed out")
    elif how == "absolute":
        add(os.path.join(outside, "absolute.txt"), b"absolute")
    else:
        add("escape", kind=tarfile.SYMTYPE, link=outside)
        add("escape/planted.txt", b"through the link")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(outside)
        .arg(how)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The archive holds what it says (tarfile keeps names as given).
    let listed = Command::new("tar").arg("tzf").arg(path).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let want = match how {
        "climb" => "workspace/../../climbed.txt".to_owned(),
        "absolute" => outside.join("absolute.txt").display().to_string(),
        _ => "escape/planted.txt".to_owned(),
    };
    assert!(
        listed
            .lines()
            .any(|l| l == want || l == want.trim_start_matches('/')),
        "{listed}"
    );
}

#[tokio::test]
async fn pull_never_writes_outside_the_destination() {
    let f = fixture();
    let outside = f.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for (how, member) in [
        ("climb", "climbed.txt"),
        ("absolute", "absolute.txt"),
        ("symlink", "escape/planted.txt"),
    ] {
        let archive = f.dir.path().join(format!("{how}.tar.gz"));
        hostile_tarball(&archive, &outside, how);
        let session = format!("hostile-{how}");
        f.store
            .put(
                &format!("{session}/session.tar.gz"),
                Bytes::from(std::fs::read(&archive).unwrap()),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let dest = f.dir.path().join("deep/dest").join(how);
        let out = Command::new(sessionfs_bin())
            .args(["--quiet", "pull", "--store", "local", "--store-dir"])
            .arg(f.dir.path().join("store"))
            .arg(&session)
            .arg(&dest)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        if how == "absolute" {
            // As `tar x` does: the leading `/` goes, the file lands inside.
            assert!(out.status.success(), "{said}");
            let inside = dest.join(outside.join(member).strip_prefix("/").unwrap());
            assert_eq!(std::fs::read(&inside).unwrap(), b"absolute");
        } else {
            assert!(
                !out.status.success(),
                "a hostile archive ({how}) fails the pull"
            );
            assert!(said.contains(member), "{how}: {said}");
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{how}: nothing was written outside"
        );
        assert!(!f.dir.path().join("deep/climbed.txt").exists());
        assert!(!f.dir.path().join("climbed.txt").exists());
    }
}

#[tokio::test]
async fn a_header_claiming_a_huge_size_is_refused() {
    let f = fixture();
    // A 1 TB file announced, a few bytes delivered.
    let mut header = tar::Header::new_gnu();
    header.set_path("workspace/huge.bin").unwrap();
    header.set_size(1 << 40);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&[7u8; 4096]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let err = open(&f, gz.finish().unwrap()).await.unwrap_err();
    assert!(
        matches!(err, TarballError::Corrupt(ref m) if m.contains("truncated")),
        "{err}"
    );
}
