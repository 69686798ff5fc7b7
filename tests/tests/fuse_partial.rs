//! Block-level copy-up on the real S3 server: a large file of a session,
//! mounted on a host that never read it, is changed in place without being
//! fetched whole. A 1-byte change and its fsync move a few MiB at most;
//! writes across chunk edges, whole chunks, appends, a truncation and an
//! extension then read back as a model file says, also after kill -9 of the
//! mount and a new mount of the same overlay; the write-back stores exactly
//! that file, read by a fresh host.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sessionfs_tests::mount::Site;
use sessionfs_tests::pattern;

const MIB: u64 = 1 << 20;

/// Mount flags that keep changes pending until `flush`.
const QUIET: [&str; 4] = [
    "--writeback-quiet-ms",
    "3600000",
    "--writeback-max-lag-ms",
    "3600000",
];

fn session(name: &str) -> String {
    format!("tests__{name}{:08x}__main", rand::random::<u32>())
}

/// A session pushed from a tree of `workspace/big.bin` (`mib` MiB of
/// pseudo-random bytes from `seed`) and, if given, `workspace/small.txt`.
/// Returns the pushing site (its `src` is the tree), the session and the
/// big file's bytes.
fn pushed(tag: &str, mib: u64, seed: u64, small: Option<&[u8]>) -> (Site, String, Vec<u8>) {
    let site = Site::s3();
    let name = session(tag);
    let src = site.dir.path().join("src/workspace");
    std::fs::create_dir_all(&src).unwrap();
    let big = pattern((mib * MIB) as usize, seed).to_vec();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    if let Some(small) = small {
        std::fs::write(src.join("small.txt"), small).unwrap();
    }
    site.push(&site.dir.path().join("src"), &name);
    (site, name, big)
}

/// A file of the session's stored object, as a fresh host reads it.
fn stored(name: &str, path: &str) -> Vec<u8> {
    Site::s3().run(&["cat", name, path])
}

/// The stored object's `workspace/big.bin` is `model`.
fn assert_stored_big(name: &str, model: &[u8]) {
    assert!(
        stored(name, "workspace/big.bin") == model,
        "the written-back object holds another file"
    );
}

/// Bytes the block cache holds: what the mount fetched from the store.
fn cache_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let md = e.metadata().unwrap();
        if md.is_dir() {
            total += cache_bytes(&e.path());
        } else if !e.file_name().to_string_lossy().contains(".db") {
            total += md.len();
        }
    }
    total
}

/// A write through the mount, mirrored in `model`.
fn write(path: &Path, model: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    let end = at as usize + bytes.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[at as usize..end].copy_from_slice(bytes);
}

/// Pieces read through the mount (`pread`), against the model: across
/// chunks held and not, and the whole file.
fn check(path: &Path, model: &[u8], what: &str) {
    let f = OpenOptions::new().read(true).open(path).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        model.len() as u64,
        "{what}: size"
    );
    for (at, len) in [
        (0, 4096),
        (3 * MIB - 4096, 8192),
        (10 * MIB - 1, MIB + 2),
        (20 * MIB - 200, 3 * MIB),
        (40 * MIB, MIB),
    ] {
        let end = (at + len).min(model.len() as u64);
        if at >= end {
            continue;
        }
        let mut buf = vec![0u8; (end - at) as usize];
        f.read_exact_at(&mut buf, at).unwrap();
        assert!(
            buf == model[at as usize..end as usize],
            "{what}: bytes {at}..{end} differ from the model"
        );
    }
    let all = std::fs::read(path).unwrap();
    assert!(
        all == model,
        "{what}: the whole file differs from the model"
    );
}

#[test]
fn a_large_file_changes_in_place_without_being_fetched_whole() {
    let (_site, name, original) = pushed("partial", 48, 41, Some(b"unchanged"));

    let host = Site::s3();
    let cache = host.dir.path().join("cache");
    let m = host.mount(&name, &QUIET);
    let big = m.join("workspace/big.bin");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 48 * MIB);

    // One byte in the middle, then fsync: a few MiB fetched, not 48.
    let mut model = original.clone();
    let before = cache_bytes(&cache);
    {
        let f = OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(b"X", 40 * MIB + 12345).unwrap();
        f.sync_all().unwrap();
    }
    model[(40 * MIB + 12345) as usize] = b'X';
    let fetched = cache_bytes(&cache) - before;
    assert!(
        fetched <= 4 * MIB,
        "changing one byte fetched {fetched} bytes of a 48 MiB file"
    );

    // Across a chunk edge, one whole chunk, a run of chunks with ragged
    // ends, and an append.
    write(
        &big,
        &mut model,
        3 * MIB - 10,
        b"across the edge of a chunk",
    );
    write(&big, &mut model, 10 * MIB, &pattern(MIB as usize, 9));
    write(
        &big,
        &mut model,
        20 * MIB - 100,
        &pattern(2 * MIB as usize + 200, 10),
    );
    {
        let mut f = OpenOptions::new().append(true).open(&big).unwrap();
        std::io::Write::write_all(&mut f, &pattern(5000, 11)).unwrap();
    }
    model.extend_from_slice(&pattern(5000, 11));
    check(&big, &model, "after the writes");

    // Cut below the object's end, then grown back: zeros, not the object's.
    {
        let f = OpenOptions::new().write(true).open(&big).unwrap();
        f.set_len(30 * MIB + 7).unwrap();
        f.set_len(35 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    model.truncate((30 * MIB + 7) as usize);
    model.resize(35 * MIB as usize, 0);
    check(&big, &model, "after a truncation and an extension");

    // kill -9 after the writes returned: a new mount of the same overlay
    // reads the same file, and writes go on in it.
    m.kill9();
    let m = host.mount(&name, &QUIET);
    let big = m.join("workspace/big.bin");
    check(&big, &model, "after kill -9 and a new mount");
    write(&big, &mut model, 5 * MIB + 3, b"after the new mount");
    check(&big, &model, "written after the new mount");

    host.run(&["flush", &m.path.display().to_string()]);
    check(&big, &model, "after the write-back");
    m.stop();

    assert_stored_big(&name, &model);
    assert_eq!(stored(&name, "workspace/small.txt"), b"unchanged");
}

/// Another writer stores the session while a large file is changed here in
/// place: the mount moves onto its object, the chunks it does not hold are
/// then read from that object (the file is unchanged there), and its own
/// write-back stores both changes.
#[test]
fn a_file_changed_in_place_moves_onto_another_writers_object() {
    let (_site, name, original) = pushed("partialfollow", 24, 43, Some(b"pushed"));

    let here = Site::s3();
    let m = here.mount(
        &name,
        &["--writeback-quiet-ms", "600000", "--follow-ms", "300"],
    );
    let big = m.join("workspace/big.bin");
    let mut model = original.clone();
    write(&big, &mut model, 13 * MIB + 5, b"changed here");

    let there = Site::s3();
    let other = there.mount(&name, &["--writeback-quiet-ms", "600000"]);
    std::fs::write(other.join("workspace/small.txt"), b"changed there").unwrap();
    there.run(&["flush", &other.path.display().to_string()]);
    other.stop();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read(m.join("workspace/small.txt")).unwrap() != b"changed there" {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount did not move onto the other writer's object"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    check(&big, &model, "after moving onto the other writer's object");
    here.run(&["flush", &m.path.display().to_string()]);
    m.stop();

    assert_stored_big(&name, &model);
    assert_eq!(stored(&name, "workspace/small.txt"), b"changed there");
}

/// Random writes, reads and size changes on a file copied up chunk by
/// chunk (never zeroed first, unlike fsx's), each read checked against a
/// model; then kill -9, a new mount and the write-back, also checked.
#[test]
fn random_operations_on_a_file_changed_in_place_match_a_model() {
    let (_site, name, original) = pushed("partialfsx", 20, 47, None);

    let host = Site::s3();
    let m = host.mount(&name, &QUIET);
    let big = m.join("workspace/big.bin");
    let mut model = original;
    let mut rng = 0x2026_1202_u64;
    let mut next = move |below: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % below.max(1)
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&big)
        .unwrap();
    for op in 0..1500u64 {
        let len = model.len() as u64;
        match next(10) {
            0..=4 => {
                // Mostly small writes, some over whole chunks.
                let n = if next(4) == 0 {
                    next(3 * MIB) + 1
                } else {
                    next(64 << 10) + 1
                };
                let at = next(len + 4096);
                let bytes = pattern(n as usize, op);
                f.write_all_at(&bytes, at).unwrap();
                let end = (at + n) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[at as usize..end].copy_from_slice(&bytes);
            }
            5..=8 => {
                let at = next(len);
                let n = (next(256 << 10) + 1).min(len - at);
                let mut buf = vec![0u8; n as usize];
                f.read_exact_at(&mut buf, at).unwrap();
                assert!(
                    buf == model[at as usize..(at + n) as usize],
                    "operation {op}: a read of {n} bytes at {at} differs from the model"
                );
            }
            _ => {
                let to = next(len + MIB).max(1);
                f.set_len(to).unwrap();
                model.resize(to as usize, 0);
            }
        }
    }
    f.sync_all().unwrap();
    drop(f);
    check(&big, &model, "after the random operations");
    m.kill9();
    let m = host.mount(&name, &QUIET);
    check(
        &m.join("workspace/big.bin"),
        &model,
        "after kill -9 and a new mount",
    );
    host.run(&["flush", &m.path.display().to_string()]);
    m.stop();
    assert_stored_big(&name, &model);
}

/// The write-back of a change in place copies the file's unchanged
/// segments server-side: little is fetched or uploaded, and GNU tar,
/// bsdtar, Python's tarfile and Node extract the new object to the tree
/// with the change.
#[tokio::test(flavor = "multi_thread")]
async fn the_write_back_of_a_change_in_place_copies_the_unchanged_segments() {
    let (site, name, mut model) = pushed("partialwb", 48, 53, Some(b"unchanged"));
    let root = site.dir.path().join("src");
    let src = root.join("workspace");

    let host = Site::s3();
    let cache = host.dir.path().join("cache");
    let m = host.mount(&name, &QUIET);
    let big = m.join("workspace/big.bin");
    write(&big, &mut model, 25 * MIB + 77, b"changed in place");
    std::fs::write(src.join("big.bin"), &model).unwrap();
    let before = cache_bytes(&cache);
    host.run(&["flush", &m.path.display().to_string()]);
    let fetched = cache_bytes(&cache) - before;
    let status: serde_json::Value =
        serde_json::from_slice(&host.run(&["status", "--json", &m.path.display().to_string()]))
            .unwrap();
    let last = &status["lastWriteBack"];
    let (uploaded, copied) = (
        last["uploadedBytes"].as_u64().unwrap(),
        last["copiedBytes"].as_u64().unwrap(),
    );
    eprintln!("write-back: uploaded {uploaded}, copied {copied}, fetched {fetched} bytes");
    assert!(
        uploaded <= 16 * MIB && copied >= 32 * MIB && fetched <= 12 * MIB,
        "the write-back uploaded {uploaded}, copied {copied} and fetched {fetched} bytes: {last}"
    );
    check(&big, &model, "after the write-back");
    m.stop();

    let store = sessionfs_tests::s3_store().await;
    let key = sessionfs_core::session::SessionPath::parse(&name)
        .unwrap()
        .object_key();
    let got = store
        .get(&key, sessionfs_core::store::GetOptions::default())
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let object = scratch.path().join("object.tar.gz");
    std::fs::write(&object, &got.body).unwrap();
    let expected = sessionfs_tests::trees::snapshot(&root);
    for (who, tree) in sessionfs_tests::extract::every_reader(&object, scratch.path()) {
        sessionfs_tests::trees::assert_same_tree(&expected, &tree, who);
    }
    assert_stored_big(&name, &model);
}

/// The API over a file changed in place in the mount beside it: GET (whole
/// and ranges across chunks held and not), the session's download (what
/// tar extracts), then a PUT that replaces the file.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_reads_and_replaces_a_file_changed_in_place() {
    const API: &str = "/api/storage-worker/sessions";
    let (_site, name, mut model) = pushed("partialapi", 24, 59, None);

    let host = Site::s3();
    let m = host.serve_root(&["--writeback-quiet-ms", "3600000"]);
    let url = format!("{}{API}/{name}", m.api_url());
    let big = m.join(&name).join("workspace/big.bin");
    write(&big, &mut model, 9 * MIB - 3, b"changed in the mount");
    let c = reqwest::Client::new();
    let get = |range: Option<String>| {
        let mut r = c.get(format!("{url}/files/workspace/big.bin"));
        if let Some(range) = range {
            r = r.header("range", range);
        }
        async move {
            let r = r.send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.bytes().await.unwrap().to_vec()
        }
    };
    assert!(get(None).await == model, "GET gives another file");
    for (a, b) in [(9 * MIB - 10, 9 * MIB + 30), (MIB, 12 * MIB)] {
        let got = get(Some(format!("bytes={a}-{}", b - 1))).await;
        assert!(got == model[a as usize..b as usize], "range {a}-{b}");
    }

    let r = c.get(format!("{url}/download")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let scratch = tempfile::tempdir().unwrap();
    let object = scratch.path().join("download.tar.gz");
    std::fs::write(&object, r.bytes().await.unwrap()).unwrap();
    let out = scratch.path().join("x");
    std::fs::create_dir_all(&out).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&object)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(tar.success());
    assert!(std::fs::read(out.join("workspace/big.bin")).unwrap() == model);

    let r = c
        .put(format!("{url}/files/workspace/big.bin"))
        .body("replaced through the API")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(get(None).await, b"replaced through the API");
    assert_eq!(std::fs::read(&big).unwrap(), b"replaced through the API");
    m.stop();
}
