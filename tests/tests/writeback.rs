//! Write-back end to end, against the real S3 server: changes made in a
//! mount or through the API reach the stored object (incrementally), other
//! writers' objects are followed and merged, nothing acknowledged is lost
//! to kill -9 or store faults, and every reader extracts what is stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::GetOptions;
use sessionfs_tests::extract::every_reader;
use sessionfs_tests::mount::{Mount, Site};
use sessionfs_tests::trees::{assert_same_tree, make_fixture, snapshot, Node};
use sessionfs_tests::{pattern, s3_store};

const API: &str = "/api/storage-worker/sessions";

fn session_name(test: &str) -> String {
    format!("wb-{test}-{:08x}", rand::random::<u32>())
}

/// Waits for `cond`, up to `within`; panics with `what` after.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sessionfs status --json` of a mount.
fn status(site: &Site, m: &Mount) -> Value {
    let out = site.run(&["status", "--json", &m.path.display().to_string()]);
    serde_json::from_slice(&out).expect("status is JSON")
}

/// The stored object, fetched with a plain GET (not through sessionfs).
async fn stored_object(session: &str, into: &Path) -> Option<(String, PathBuf)> {
    let store = s3_store().await;
    let key = SessionPath::parse(session).unwrap().object_key();
    match store.get(&key, GetOptions::default()).await {
        Ok(got) => {
            let path = into.join(format!("{session}.tar.gz"));
            std::fs::write(&path, &got.body).unwrap();
            Some((got.meta.etag, path))
        }
        Err(sessionfs_core::store::StoreError::NotFound { .. }) => None,
        Err(e) => panic!("GET {key}: {e}"),
    }
}

/// The stored object's tree, as GNU tar extracts it.
async fn stored_tree(session: &str, scratch: &Path) -> BTreeMap<String, Node> {
    let (_, object) = stored_object(session, scratch)
        .await
        .expect("a stored object");
    let into = tempfile::tempdir().unwrap();
    every_reader(&object, into.path()).remove(0).1
}

/// `sessionfs flush SESSION`, then the object it stored, fetched into `into`.
async fn flushed_object(site: &Site, session: &str, into: &Path) -> PathBuf {
    site.run(&["flush", session]);
    let (_, object) = stored_object(session, into)
        .await
        .expect("the flush returned before the object was stored");
    object
}

/// `serve` flags under which nothing is written back but by `flush`.
const ONLY_FLUSHED: [&str; 4] = [
    "--writeback-quiet-ms",
    "600000",
    "--writeback-max-lag-ms",
    "600000",
];

/// A site whose processes reach the S3 server through a fault proxy.
async fn site_through_proxy() -> (sessionfs_tests::fault_proxy::FaultProxy, Site) {
    let upstream: std::net::SocketAddr = format!(
        "127.0.0.1:{}",
        std::env::var("MINIO_PORT").expect("the test S3 server")
    )
    .parse()
    .unwrap();
    let proxy = sessionfs_tests::fault_proxy::FaultProxy::start(upstream).await;
    let mut site = Site::s3();
    for (k, v) in site.env.iter_mut() {
        if k == "MINIO_PORT" {
            *v = proxy.addr.port().to_string();
        }
    }
    (proxy, site)
}

/// Every reader extracts `object` to `expected`.
fn every_reader_agrees(object: &Path, expected: &BTreeMap<String, Node>) {
    let scratch = tempfile::tempdir().unwrap();
    for (who, tree) in every_reader(object, scratch.path()) {
        assert_same_tree(expected, &tree, who);
    }
}

/// A session with the fixture and 40 MiB of incompressible files, so the
/// object is far above the single-PUT size and write-backs go incremental
/// (`SESSIONFS_WB_TEST_MIB` makes it larger: 1024 for a 1 GiB session).
fn big_source(root: &Path) {
    make_fixture(root);
    let blob = root.join("workspace/blob");
    std::fs::create_dir_all(&blob).unwrap();
    let mib: u64 = std::env::var("SESSIONFS_WB_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
        .max(40);
    for i in 0..mib {
        std::fs::write(
            blob.join(format!("b_{i:03}.bin")),
            pattern(1 << 20, 1000 + i),
        )
        .unwrap();
    }
}

/// The same changes, in a mount or in a plain directory.
fn change_tree(root: &Path) {
    let w = root.join("workspace");
    std::fs::write(w.join("many/mod_007.rs"), b"// rewritten\n").unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(w.join("blob/b_020.bin"))
            .unwrap();
        f.write_all(b"appended").unwrap();
        f.sync_all().unwrap();
    }
    std::fs::create_dir_all(w.join("new/dir")).unwrap();
    std::fs::write(w.join("new/dir/file.txt"), b"brand new\n").unwrap();
    std::fs::remove_file(w.join("many/mod_200.rs")).unwrap();
    std::fs::rename(w.join("blob/b_030.bin"), w.join("moved.bin")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        w.join("many/mod_100.rs"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_writes_back_what_changed_and_every_reader_extracts_it() {
    let site = Site::s3();
    let session = session_name("mount");
    let src = site.dir.path().join("src");
    big_source(&src);
    site.push(&src, &session);
    let (pushed_etag, _) = stored_object(&session, site.dir.path()).await.unwrap();

    let quiet = Duration::from_millis(500);
    let m = site.mount(&session, &["--writeback-quiet-ms", "500"]);
    change_tree(&m.path);
    let took = wait_for(Duration::from_secs(60), "the write-back", || {
        let s = status(&site, &m);
        s["pendingChanges"] == 0 && !s["lastWriteBack"].is_null()
    });
    let s = status(&site, &m);
    let last = &s["lastWriteBack"];
    assert_eq!(last["full"], false, "incremental: {s}");
    let uploaded = last["uploadedBytes"].as_u64().unwrap();
    let copied = last["copiedBytes"].as_u64().unwrap();
    eprintln!("write-back {took:?} after the last change: {last}");
    assert!(uploaded <= 16 << 20, "uploaded {uploaded} bytes: {s}");
    assert!(copied >= 16 << 20, "copied only {copied} bytes: {s}");
    assert!(
        took <= quiet + Duration::from_secs(5),
        "the write-back came {took:?} after the last change: {s}"
    );

    // Straight from S3: a new version, which every reader extracts to the
    // tree the mount shows, and the mount shows what the changes made.
    let expected_dir = site.dir.path().join("expected");
    big_source(&expected_dir);
    change_tree(&expected_dir);
    let expected = snapshot(&expected_dir);
    assert_same_tree(
        &expected,
        &snapshot(&m.path),
        "the mount after the write-back",
    );
    let (etag, object) = stored_object(&session, site.dir.path()).await.unwrap();
    assert_ne!(etag, pushed_etag);
    let key = SessionPath::parse(&session).unwrap().object_key();
    let head = s3_store().await.head(&key).await.unwrap();
    assert!(
        head.metadata
            .get(sessionfs_core::tarball::toc::DIGEST_KEY)
            .is_some_and(|d| d.len() == 64),
        "the written-back object carries its digest: {:?}",
        head.metadata
    );
    assert_eq!(
        Some(etag.clone()),
        s["baseEtag"].as_str().map(str::to_owned)
    );
    every_reader_agrees(&object, &expected);

    // A fresh process with an empty cache reads the new bytes.
    let fresh = Site::s3();
    let got = fresh.run(&["cat", &session, "workspace/blob/b_020.bin"]);
    let mut want = pattern(1 << 20, 1020).to_vec();
    want.extend_from_slice(b"appended");
    assert!(got == want, "cat in a fresh process read other bytes");
    let moved = fresh.run(&["cat", &session, "workspace/moved.bin"]);
    assert!(moved == pattern(1 << 20, 1030).to_vec());
    m.stop();
}

/// Files created through a mount stay in its overlay after a write-back
/// (the kernel knows them and may write without asking), and the object
/// holds them too: a later write-back copies them from it server-side
/// instead of packing and sending the session again, and what it stores is
/// what the mount shows after edits, renames and swaps alike.
#[tokio::test(flavor = "multi_thread")]
async fn files_made_in_a_mount_are_copied_by_later_write_backs_not_packed_again() {
    let site = Site::s3();
    let session = session_name("heldcopy");
    let src = site.dir.path().join("src");
    make_fixture(&src);
    site.push(&src, &session);
    let m = site.mount(&session, &ONLY_FLUSHED);
    let mnt = m.path.display().to_string();
    let made = m.path.join("workspace/made");
    for dir in ["a", "b"] {
        std::fs::create_dir_all(made.join(dir)).unwrap();
    }
    for i in 0..12u64 {
        for (k, dir) in ["a", "b"].into_iter().enumerate() {
            let seed = 5000 + 100 * k as u64 + i;
            std::fs::write(
                made.join(dir).join(format!("f{i:02}")),
                pattern(1 << 20, seed),
            )
            .unwrap();
        }
    }
    let last = |site: &Site| status(site, &m)["lastWriteBack"].clone();
    site.run(&["flush", &mnt]);
    assert_eq!(last(&site)["full"], true, "{}", last(&site));

    std::fs::write(m.path.join("workspace/small.txt"), b"small").unwrap();
    site.run(&["flush", &mnt]);
    let second = last(&site);
    assert_eq!(second["full"], false, "{second}");
    assert!(
        second["copiedBytes"].as_u64().unwrap() >= 16 << 20,
        "{second}"
    );
    assert!(
        second["uploadedBytes"].as_u64().unwrap() < 8 << 20,
        "{second}"
    );

    // An edit in place, then the two directories swapped (no file of them
    // changes; each `fNN` lands where the object holds the other one).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(made.join("a/f03"))
            .unwrap();
        f.write_all_at(b"edited in place", 4096).unwrap();
    }
    site.run(&["flush", &mnt]);
    let swapped = made.join("swap");
    std::fs::rename(made.join("a"), &swapped).unwrap();
    std::fs::rename(made.join("b"), made.join("a")).unwrap();
    std::fs::rename(&swapped, made.join("b")).unwrap();
    site.run(&["flush", &mnt]);
    let expected = snapshot(&m.path);
    let (_, object) = stored_object(&session, site.dir.path()).await.unwrap();
    every_reader_agrees(&object, &expected);
    let fresh = Site::s3();
    let got = fresh.run(&["cat", &session, "workspace/made/b/f03"]);
    let mut want = pattern(1 << 20, 5003).to_vec();
    want[4096..4096 + 15].copy_from_slice(b"edited in place");
    assert!(got == want, "the edit in place was not stored");
    m.stop();
}

/// A close does not wait for the journal (files are opened with
/// `FOPEN_NOFLUSH`), and a handle's writes are journaled as a change at the
/// first write after each write-back: a file kept open and rewritten in
/// place, flushed after every write, reaches the object every time; so does
/// a write closed and flushed at once.
#[test]
fn a_flush_right_after_a_write_stores_it() {
    let site = Site::s3();
    let session = session_name("writeflush");
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"round 00, pushed..").unwrap();
    site.push(&src, &session);
    let m = site.mount(&session, &["--writeback-quiet-ms", "600000"]);
    let mnt = m.path.display().to_string();
    let stored = || site.run(&["cat", &session, "f"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("f"))
        .unwrap();
    for round in 1..=6 {
        let text = format!("round {round:02}, open....");
        std::os::unix::fs::FileExt::write_all_at(&f, text.as_bytes(), 0).unwrap();
        site.run(&["flush", &mnt]);
        assert_eq!(stored(), text.as_bytes(), "round {round}, the file open");
    }
    drop(f);
    for round in 7..=10 {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("f"))
            .unwrap();
        let text = format!("round {round:02}, closed..");
        std::os::unix::fs::FileExt::write_all_at(&f, text.as_bytes(), 0).unwrap();
        drop(f);
        site.run(&["flush", &mnt]);
        assert_eq!(stored(), text.as_bytes(), "round {round}, the file closed");
    }
    m.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_put_reaches_the_object_in_s3() {
    let site = Site::s3();
    let session = session_name("api");
    let server = site.serve_api(&["--writeback-quiet-ms", "200"], &[]);
    let url = format!("{}{API}/{session}/files/workspace/notes.md", server.url);
    let http = reqwest::Client::new();
    let r = http
        .put(&url)
        .body("# written through the API\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let scratch = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let object = loop {
        if let Some((_, path)) = stored_object(&session, scratch.path()).await {
            break path;
        }
        assert!(Instant::now() < deadline, "the object never appeared in S3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut expected = BTreeMap::new();
    expected.insert("workspace".to_owned(), Node::Dir { mode: 0o755 });
    expected.insert(
        "workspace/notes.md".to_owned(),
        Node::File {
            mode: 0o644,
            content: b"# written through the API\n".to_vec(),
        },
    );
    every_reader_agrees(&object, &expected);

    // The metadata reports it, and the download serves the stored object.
    let meta: Value = http
        .get(format!("{}{API}/{session}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["pendingChanges"], false, "{meta}");
    assert!(
        meta["lastWriteBack"]["uploadedBytes"].as_u64().unwrap() > 0,
        "{meta}"
    );
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sessionfs_writebacks_total 1"),
        "{metrics}"
    );
    assert_eq!(server.stop().code(), Some(0));
}

/// A standalone mount serves `/metrics` with `--metrics-addr`: its cache,
/// its store traffic and its write-backs, as the API's `/metrics` does.
#[tokio::test(flavor = "multi_thread")]
async fn a_mount_serves_its_metrics_when_asked() {
    let site = Site::s3();
    let session = session_name("metrics");
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("workspace")).unwrap();
    std::fs::write(src.path().join("workspace/a.txt"), pattern(3 << 20, 5)).unwrap();
    site.push(src.path(), &session);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let m = site.mount(
        &session,
        &["--metrics-addr", &addr, "--writeback-quiet-ms", "600000"],
    );
    assert!(std::fs::read(m.join("workspace/a.txt")).unwrap() == pattern(3 << 20, 5));
    std::fs::write(m.join("workspace/b.txt"), "new\n").unwrap();
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    let url = format!("http://{addr}/metrics");
    let before = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&before, "sessionfs_open_sessions"), 1);
    assert_eq!(
        metric(&before, "sessionfs_sessions_with_pending_changes"),
        1
    );
    assert!(metric(&before, "sessionfs_store_received_bytes_total") >= 3 << 20);
    assert!(metric(&before, "sessionfs_cache_bytes") >= 3 << 20);
    assert_eq!(metric(&before, "sessionfs_writebacks_total"), 0);
    site.run(&["flush", &m.path.display().to_string()]);
    let after = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&after, "sessionfs_writebacks_total"), 1);
    assert_eq!(metric(&after, "sessionfs_sessions_with_pending_changes"), 0);
    assert!(metric(&after, "sessionfs_store_sent_bytes_total") > 0);
    m.stop();
}

/// The store carries out the write-back's PUT but its answer is lost (the
/// client retries, and the retry is refused: the object it made exists).
/// The write-back finds its own object there and counts as done: one copy
/// of each file, no conflict with itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_back_whose_answer_is_lost_is_not_a_conflict_with_itself() {
    use sessionfs_tests::fault_proxy::Fault;
    let (proxy, site) = site_through_proxy().await;
    let session = session_name("lost-answer");
    let server = site.serve_api(&ONLY_FLUSHED, &[]);
    let http = reqwest::Client::new();
    for (path, body) in [("a.txt", "one\n"), ("dir/b.txt", "two\n")] {
        let r = http
            .put(format!(
                "{}{API}/{session}/files/workspace/{path}",
                server.url
            ))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The write-back's one request (a new session: nothing to read, one
    // PUT) meets the fault on a fresh connection.
    proxy.plan(&[Fault::LoseAnswer], Fault::Forward);
    proxy.cut_all();
    let scratch = tempfile::tempdir().unwrap();
    let object = flushed_object(&site, &session, scratch.path()).await;
    assert_eq!(proxy.planned(), 0, "the fault was not met");
    let mut expected = BTreeMap::new();
    expected.insert("workspace".to_owned(), Node::Dir { mode: 0o755 });
    expected.insert("workspace/dir".to_owned(), Node::Dir { mode: 0o755 });
    for (path, body) in [
        ("workspace/a.txt", "one\n"),
        ("workspace/dir/b.txt", "two\n"),
    ] {
        expected.insert(
            path.to_owned(),
            Node::File {
                mode: 0o644,
                content: body.as_bytes().to_vec(),
            },
        );
    }
    every_reader_agrees(&object, &expected);
    let status: Value = serde_json::from_slice(&site.run(&["status", &session, "--json"])).unwrap();
    assert_eq!(status["pendingChanges"], 0, "{status}");
    assert_eq!(status["conflicts"], 0, "{status}\n{}", server.log_text());
    assert_eq!(server.stop().code(), Some(0));
}

/// `flush SESSION` and `status SESSION` reach the server holding the
/// session (through its control socket): the flush returns once the change
/// is in S3, long before the server's own quiet period ends.
#[tokio::test(flavor = "multi_thread")]
async fn flush_of_a_session_name_reaches_the_server_holding_it() {
    let site = Site::s3();
    let session = session_name("flushapi");
    let server = site.serve_api(&ONLY_FLUSHED, &[]);
    let http = reqwest::Client::new();
    let r = http
        .put(format!(
            "{}{API}/{session}/files/workspace/a.txt",
            server.url
        ))
        .body("flushed by name\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before: Value = serde_json::from_slice(&site.run(&["status", &session, "--json"])).unwrap();
    assert!(before["pendingChanges"].as_u64().unwrap() > 0, "{before}");
    assert!(before["lastWriteBack"].is_null(), "{before}");

    let scratch = tempfile::tempdir().unwrap();
    let object = flushed_object(&site, &session, scratch.path()).await;
    let mut expected = BTreeMap::new();
    expected.insert("workspace".to_owned(), Node::Dir { mode: 0o755 });
    expected.insert(
        "workspace/a.txt".to_owned(),
        Node::File {
            mode: 0o644,
            content: b"flushed by name\n".to_vec(),
        },
    );
    every_reader_agrees(&object, &expected);
    let after: Value = serde_json::from_slice(&site.run(&["status", &session, "--json"])).unwrap();
    assert_eq!(after["pendingChanges"], 0, "{after}");
    assert!(
        after["lastWriteBack"]["uploadedBytes"].as_u64().unwrap() > 0,
        "{after}"
    );
    assert_eq!(server.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_api_servers_on_one_bucket_see_each_others_changes() {
    let (a_site, b_site) = (Site::s3(), Site::s3());
    let flags = [
        "--writeback-quiet-ms",
        "200",
        "--recheck-ms",
        "500",
        "--follow-ms",
        "500",
    ];
    let a = a_site.serve_api(&flags, &[]);
    let b = b_site.serve_api(&flags, &[]);
    let session = session_name("replicas");
    let http = reqwest::Client::new();
    let file = |server: &str| format!("{server}{API}/{session}/files/workspace/shared.txt");
    let read = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap())
        }
    };
    // Within the quiet period plus the recheck interval, and some slack.
    let bound = Duration::from_millis(200 + 500) + Duration::from_secs(5);
    for round in 0..3 {
        let body = format!("version {round}");
        let r = http
            .put(file(&a.url))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let start = Instant::now();
        loop {
            let (status, bytes) = read(file(&b.url)).await;
            if status == 200 && bytes == body.as_bytes() {
                break;
            }
            assert!(
                start.elapsed() < bound,
                "B still answers {status} {:?} for round {round}\n--- A's log:\n{}\n--- B's log:\n{}",
                String::from_utf8_lossy(&bytes),
                a.log_text(),
                b.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Deleted on B: gone on A as well.
    let r = http
        .delete(format!("{}{API}/{session}", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let start = Instant::now();
    loop {
        let (status, _) = read(file(&a.url)).await;
        if status == 404 {
            break;
        }
        assert!(
            start.elapsed() < bound,
            "A still serves the deleted session\n--- A's log:\n{}\n--- B's log:\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.stop().code(), Some(0));
    assert_eq!(b.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_follows_a_push_and_merges_what_is_pending() {
    let site = Site::s3();
    let pusher = Site::s3();
    let session = session_name("follow");
    let tree = |root: &Path, tag: &str, n: usize| {
        let w = root.join("workspace");
        std::fs::create_dir_all(&w).unwrap();
        for i in 0..n {
            std::fs::write(w.join(format!("{tag}-{i}.txt")), format!("{tag} {i}\n")).unwrap();
        }
        std::fs::write(w.join("common.txt"), format!("common from {tag}\n")).unwrap();
    };
    let one = site.dir.path().join("one");
    tree(&one, "one", 20);
    site.push(&one, &session);
    // A long quiet period: what the mount writes stays pending until asked.
    let m = site.mount(
        &session,
        &["--writeback-quiet-ms", "600000", "--follow-ms", "300"],
    );
    assert_eq!(
        std::fs::read(m.join("workspace/common.txt")).unwrap(),
        b"common from one\n"
    );

    // No pending changes: the mount moves onto the pushed tree.
    let two = site.dir.path().join("two");
    tree(&two, "two", 30);
    pusher.push(&two, &session);
    wait_for(
        Duration::from_secs(20),
        "the mount following the push",
        || m.join("workspace/two-29.txt").exists() && !m.join("workspace/one-0.txt").exists(),
    );
    assert_same_tree(
        &snapshot(&two),
        &snapshot(&m.path),
        "the mount after the push",
    );

    // Pending changes: kept and merged onto the next push.
    std::fs::write(m.join("workspace/local.txt"), b"made in the mount\n").unwrap();
    std::fs::write(m.join("workspace/two-3.txt"), b"edited in the mount\n").unwrap();
    let three = site.dir.path().join("three");
    tree(&three, "three", 10);
    pusher.push(&three, &session);
    wait_for(
        Duration::from_secs(20),
        "the mount following the second push",
        || m.join("workspace/three-9.txt").exists(),
    );
    let mut expected = snapshot(&three);
    expected.insert(
        "workspace/local.txt".into(),
        Node::File {
            mode: 0o644,
            content: b"made in the mount\n".to_vec(),
        },
    );
    // Changed here, deleted there: the change stays.
    expected.insert(
        "workspace/two-3.txt".into(),
        Node::File {
            mode: 0o644,
            content: b"edited in the mount\n".to_vec(),
        },
    );
    assert_same_tree(&expected, &snapshot(&m.path), "the mount after the merge");
    site.run(&["flush", &m.path.display().to_string()]);
    let (_, object) = stored_object(&session, site.dir.path()).await.unwrap();
    every_reader_agrees(&object, &expected);
    m.stop();
}

/// Two hosts (sites of their own) and a session pushed from the first
/// with `files` (paths under `workspace/`).
fn two_hosts(test: &str, files: &[(&str, &[u8])]) -> (Site, Site, String) {
    let (a_site, b_site) = (Site::s3(), Site::s3());
    let session = session_name(test);
    let src = a_site.dir.path().join("src");
    for (path, bytes) in files {
        let path = src.join("workspace").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    a_site.push(&src, &session);
    (a_site, b_site, session)
}

/// Mount flags for hosts that write back and follow each other quickly.
const FOLLOWING: [&str; 4] = ["--writeback-quiet-ms", "200", "--follow-ms", "200"];

#[tokio::test(flavor = "multi_thread")]
async fn two_mounts_writing_at_once_lose_nothing() {
    let (a_site, b_site, session) = two_hosts("two-mounts", &[("same.txt", b"base\n")]);
    let a = a_site.mount(&session, &FOLLOWING);
    let b = b_site.mount(&session, &FOLLOWING);
    // The later mount warns that another overlay of the session is held here.
    wait_for(
        Duration::from_secs(10),
        "the warning of another overlay",
        || {
            b.log_text()
                .contains("other process(es) on this host hold this session")
        },
    );
    assert!(!a.log_text().contains("other process(es) on this host"));
    let (pa, pb) = (a.path.clone(), b.path.clone());
    // 40 files each (6 s); SESSIONFS_TWO_MOUNTS_FILES=400 writes for a minute.
    let files: usize = std::env::var("SESSIONFS_TWO_MOUNTS_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let writer = |root: PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            for i in 0..files {
                std::fs::write(
                    root.join(format!("workspace/{tag}-{i:02}.txt")),
                    format!("{tag} {i}\n"),
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let (ta, tb) = (writer(pa.clone(), "a"), writer(pb.clone(), "b"));
    ta.join().unwrap();
    tb.join().unwrap();
    // Both change the same file: one version wins the name, the other is
    // kept beside it.
    std::fs::write(pa.join("workspace/same.txt"), b"from a\n").unwrap();
    std::fs::write(pb.join("workspace/same.txt"), b"from b\n").unwrap();
    let logs = [a.log.clone(), b.log.clone()];
    let logs = move || {
        let [a, b] = logs
            .each_ref()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default());
        format!("--- A's log:\n{a}\n--- B's log:\n{b}")
    };
    a.stop();
    b.stop();
    let tree = stored_tree(&session, a_site.dir.path()).await;
    for tag in ["a", "b"] {
        for i in 0..files {
            let p = format!("workspace/{tag}-{i:02}.txt");
            match tree.get(&p) {
                Some(Node::File { content, .. }) => {
                    assert_eq!(
                        content,
                        format!("{tag} {i}\n").as_bytes(),
                        "{p}\n{}",
                        logs()
                    )
                }
                other => panic!("{p}: {other:?}\n{}", logs()),
            }
        }
    }
    let versions: Vec<&Vec<u8>> = tree
        .iter()
        .filter(|(p, _)| p.starts_with("workspace/same.txt"))
        .filter_map(|(_, n)| match n {
            Node::File { content, .. } => Some(content),
            _ => None,
        })
        .collect();
    let mut got: Vec<&[u8]> = versions.iter().map(|v| v.as_slice()).collect();
    got.sort();
    assert_eq!(
        got,
        [&b"from a\n"[..], &b"from b\n"[..]],
        "both versions kept\n{}",
        logs()
    );
}

/// Two mounts settle on one object and stop writing back after they changed
/// the same small file at once (the later one keeps the other's version as
/// a conflict copy) and after each changed a large file in place (copied up
/// chunk by chunk) in turn. Neither takes the other's version for a change
/// of its own (two hosts once made a new conflict copy of each other's file
/// at every follow, writing back without end).
#[tokio::test(flavor = "multi_thread")]
async fn two_mounts_settle_after_a_conflict() {
    // The big file is large enough to be copied up chunk by chunk when
    // written in place.
    let big = pattern(9 << 20, 5);
    let files: [(&str, &[u8]); 2] = [("same.txt", b"base\n"), ("big.bin", &big)];
    let (a_site, b_site, session) = two_hosts("settle", &files);
    let a = a_site.mount(&session, &FOLLOWING);
    let b = b_site.mount(&session, &FOLLOWING);
    let flush = |site: &Site, m: &Mount| {
        site.run(&["flush", &m.path.display().to_string()]);
    };
    // The two bytes each mount writes into the big file, in turn.
    let at = [1u64 << 20, 7 << 20];
    let names = |m: &Mount| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(m.join("workspace"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let mut bytes = std::fs::read(e.path()).unwrap();
                if bytes.len() > 1 << 20 {
                    bytes = at.iter().map(|&o| bytes[o as usize]).collect();
                }
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect()
    };
    let settled = |what: &str| {
        wait_for(Duration::from_secs(20), what, || names(&a) == names(&b));
    };
    for (m, tag) in [(&a, b"a"), (&b, b"b")] {
        std::fs::write(
            m.join("workspace/same.txt"),
            [&b"from "[..], tag, b"\n"].concat(),
        )
        .unwrap();
    }
    flush(&a_site, &a);
    flush(&b_site, &b);
    settled("both mounts on the object with the conflict copy");
    for (i, (site, m)) in [(&a_site, &a), (&b_site, &b)].into_iter().enumerate() {
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("workspace/big.bin"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&big, b"!", at[i]).unwrap();
        drop(big);
        flush(site, m);
        settled("the other mount following the big file's change");
    }
    // Twenty follow intervals later nothing has moved: the same object, the
    // same files in both mounts, nothing pending.
    let (etag, _) = stored_object(&session, a_site.dir.path()).await.unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let (later, object) = stored_object(&session, a_site.dir.path()).await.unwrap();
    let (in_a, in_b) = (names(&a), names(&b));
    let diag = format!(
        "A: {in_a:?}\nB: {in_b:?}\n--- A's log:\n{}\n--- B's log:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert_eq!(etag, later, "written back again without a change\n{diag}");
    assert_eq!(in_a, in_b, "{diag}");
    assert_eq!(in_a.len(), 3, "{diag}");
    assert_eq!(
        in_a["big.bin"], b"!!",
        "both changes to the big file\n{diag}"
    );
    let mut small: Vec<&[u8]> = in_a
        .iter()
        .filter(|(name, _)| name.starts_with("same.txt"))
        .map(|(_, v)| v.as_slice())
        .collect();
    small.sort();
    assert_eq!(small, [&b"from a\n"[..], b"from b\n"], "{diag}");
    for (site, m) in [(&a_site, &a), (&b_site, &b)] {
        let st = status(site, m);
        assert_eq!(st["pendingChanges"], 0, "{st}\n{diag}");
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_, tree) = every_reader(&object, scratch.path()).remove(0);
    let stored: Vec<&String> = tree
        .keys()
        .filter(|p| p.starts_with("workspace/"))
        .collect();
    assert_eq!(stored.len(), 3, "{stored:?}\n{diag}");
    a.stop();
    b.stop();
}

/// A mount stopped after its write-back and mounted again still knows the
/// files it wrote back are the stored ones: another writer's later change
/// to them is taken, not kept beside a stale copy (it was, and the stale
/// copy then overwrote that change in the store).
#[tokio::test(flavor = "multi_thread")]
async fn a_remounted_mount_takes_the_next_writers_version_of_what_it_wrote_back() {
    let (a_site, b_site, session) = two_hosts("remounted", &[("f.txt", b"base\n")]);
    let flags = FOLLOWING;
    let a = a_site.mount(&session, &flags);
    std::fs::write(a.join("workspace/f.txt"), b"from a\n").unwrap();
    std::fs::write(a.join("workspace/new.txt"), b"new from a\n").unwrap();
    a.stop();
    let a = a_site.mount(&session, &flags);
    let b = b_site.mount(&session, &flags);
    std::fs::write(b.join("workspace/f.txt"), b"from b\n").unwrap();
    std::fs::write(b.join("workspace/new.txt"), b"new from b\n").unwrap();
    b_site.run(&["flush", &b.path.display().to_string()]);
    wait_for(Duration::from_secs(20), "A following B's object", || {
        std::fs::read(a.join("workspace/f.txt")).is_ok_and(|v| v == b"from b\n")
    });
    let names: Vec<String> = std::fs::read_dir(a.join("workspace"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "no conflict copies: {names:?}\n{}",
        a.log_text()
    );
    assert_eq!(
        std::fs::read(a.join("workspace/new.txt")).unwrap(),
        b"new from b\n"
    );
    let st = status(&a_site, &a);
    assert_eq!(st["pendingChanges"], 0, "{st}");
    a.stop();
    b.stop();
    let tree = stored_tree(&session, a_site.dir.path()).await;
    assert_eq!(
        tree["workspace/f.txt"],
        Node::File {
            mode: 0o644,
            content: b"from b\n".to_vec()
        }
    );
}

/// `chmod +x` on one host while another edits the file: both land, on
/// both hosts and in the store, with no conflict copy. (The chmodded file
/// still read the replaced object's bytes, which were gone: the host was
/// stuck, and the file unreadable there.)
#[tokio::test(flavor = "multi_thread")]
async fn a_chmod_here_and_an_edit_there_both_land() {
    let (a_site, b_site, session) = two_hosts("chmod-edit", &[("run.sh", b"echo v1\n")]);
    let a = a_site.mount(&session, &FOLLOWING);
    let b = b_site.mount(&session, &FOLLOWING);
    std::fs::write(a.join("workspace/run.sh"), b"echo v2\n").unwrap();
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(b.join("workspace/run.sh"), exec).unwrap();
    a_site.run(&["flush", &a.path.display().to_string()]);
    b_site.run(&["flush", &b.path.display().to_string()]);
    let seen = |m: &Mount| {
        let p = m.join("workspace/run.sh");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
        (mode & 0o777, std::fs::read(&p).unwrap_or_default())
    };
    let want = (0o755, b"echo v2\n".to_vec());
    wait_for(
        Duration::from_secs(20),
        "both hosts with both changes",
        || seen(&a) == want && seen(&b) == want,
    );
    let names = std::fs::read_dir(b.join("workspace")).unwrap().count();
    assert_eq!(names, 1, "no conflict copy\n{}", b.log_text());
    a.stop();
    b.stop();
    let tree = stored_tree(&session, a_site.dir.path()).await;
    assert_eq!(
        tree["workspace/run.sh"],
        Node::File {
            mode: 0o755,
            content: want.1
        }
    );
}

/// Two mounts change one large file in place at once (each copied up chunk
/// by chunk). Once one writes back, the other's version still reads bytes of
/// the object that replaced no longer holds, and its cache does not either:
/// it cannot be kept, so the other's changes stay pending and `status` says
/// why and what to do; deleting the file there lets the rest go.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_file_changed_in_place_on_two_hosts_at_once_says_what_to_do() {
    let big = pattern(40 << 20, 9);
    let (a_site, b_site, session) = two_hosts("bytes-gone", &[("big.bin", &big)]);
    let flags = ["--writeback-quiet-ms", "600000", "--follow-ms", "200"];
    let a = a_site.mount(&session, &flags);
    let b = b_site.mount(&session, &flags);
    for (m, at) in [(&a, 39u64 << 20), (&b, 0)] {
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("workspace/big.bin"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&big, b"!", at).unwrap();
    }
    std::fs::write(b.join("workspace/note.txt"), b"from b\n").unwrap();
    a_site.run(&["flush", &a.path.display().to_string()]);
    let flush_b = || {
        b_site
            .command()
            .args(["flush", &b.path.display().to_string()])
            .output()
            .unwrap()
    };
    let refused = flush_b();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{}", b.log_text());
    // The flush says why, not only "see its log".
    assert!(said.contains("delete it here"), "{said}");
    let st = status(&b_site, &b);
    let said = st["lastError"].as_str().unwrap_or_default().to_owned();
    assert!(
        said.contains("workspace/big.bin") && said.contains("delete it here"),
        "{st}"
    );
    assert_ne!(st["pendingChanges"], 0, "{st}");
    // Meanwhile the checks for a newer object back off: 2 s, 4 s, ... apart,
    // not 200 ms (fifteen failed follows in these three seconds).
    let failed = || {
        b.log_text()
            .matches("moving onto the newer stored object")
            .count()
    };
    let before = failed();
    std::thread::sleep(Duration::from_secs(3));
    assert!(failed() - before <= 3, "{}", b.log_text());
    std::fs::remove_file(b.join("workspace/big.bin")).unwrap();
    wait_for(
        Duration::from_secs(20),
        "B's write-back after the delete",
        || flush_b().status.success(),
    );
    let tree = stored_tree(&session, a_site.dir.path()).await;
    match (&tree["workspace/note.txt"], &tree["workspace/big.bin"]) {
        (Node::File { content: note, .. }, Node::File { content: big, .. }) => {
            assert_eq!(note, b"from b\n");
            assert_eq!(big[39 << 20], b'!', "A's version came back");
            assert_ne!(big[0], b'!');
        }
        other => panic!("{other:?}"),
    }
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_write_back_loses_nothing_acknowledged() {
    let site = Site::s3();
    let session = session_name("kill9");
    let src = site.dir.path().join("src");
    big_source(&src);
    site.push(&src, &session);
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    // Six rounds in the suite; SESSIONFS_KILL_ROUNDS=50 for the soak.
    let rounds: u64 = std::env::var("SESSIONFS_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6);
    for round in 0..rounds {
        let m = site.mount(&session, &["--writeback-quiet-ms", "50"]);
        let name = format!("workspace/round-{round}.bin");
        let data = pattern(200_000 + round as usize * 1000, round).to_vec();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(m.join(&name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
        }
        written.push((name, data));
        // Somewhere in the debounce, the pack or the upload.
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 600));
        m.kill9();
        // Whatever is stored now is a whole, valid object.
        let (_, object) = stored_object(&session, site.dir.path()).await.unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-t")
            .arg(&object)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: a torn object is visible"
        );
    }
    // Restarted, the overlay writes back what is pending (exactly once: the
    // object holds each file once, with its bytes).
    let m = site.mount(&session, &["--writeback-quiet-ms", "50"]);
    site.run(&["flush", &m.path.display().to_string()]);
    m.stop();
    // No multipart upload is left behind.
    let key = SessionPath::parse(&session).unwrap().object_key();
    let left = s3_store().await.list_multipart(&key).await.unwrap();
    assert!(left.is_empty(), "uploads left behind: {left:?}");
    let (_, object) = stored_object(&session, site.dir.path()).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for (who, tree) in every_reader(&object, scratch.path()) {
        for (name, data) in &written {
            match tree.get(name) {
                Some(Node::File { content, .. }) => assert!(content == data, "{who}: {name}"),
                other => panic!("{who}: {name} is {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn store_faults_delay_the_write_back_but_never_tear_the_object() {
    use sessionfs_tests::fault_proxy::Fault;
    let (proxy, site) = site_through_proxy().await;
    let session = session_name("faults");
    let src = site.dir.path().join("src");
    big_source(&src);
    site.push(&src, &session);
    let server = site.serve_api(
        &["--writeback-quiet-ms", "100"],
        &[
            ("SESSIONFS_S3_MAX_ATTEMPTS", "2"),
            ("SESSIONFS_S3_TIMEOUT", "3"),
        ],
    );
    let http = reqwest::Client::new();
    let url = format!("{}{API}/{session}/files/workspace/faulty.txt", server.url);
    // Open the session while the store answers.
    let r = http
        .get(format!(
            "{}{API}/{session}/files/workspace/hard-a.txt",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (before, _) = stored_object(&session, site.dir.path()).await.unwrap();
    // Bursts of errors, resets and stalls for a few seconds.
    let burst: Vec<Fault> = [
        Fault::ServiceUnavailable,
        Fault::Drop,
        Fault::SlowDown,
        Fault::Hang,
    ]
    .iter()
    .cycle()
    .take(40)
    .copied()
    .collect();
    proxy.plan(&burst, Fault::ServiceUnavailable);
    proxy.cut_all();
    let r = http
        .put(&url)
        .body("written during the outage")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "writes are local: the outage does not fail them"
    );
    // Meanwhile the session keeps answering from its overlay and cache.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(
        r.bytes().await.unwrap(),
        "written during the outage".as_bytes()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (during, _) = stored_object(&session, site.dir.path()).await.unwrap();
    assert_eq!(during, before, "nothing is stored while the store fails");
    // The store comes back: the write-back completes by itself.
    proxy.plan(&[], Fault::Forward);
    let scratch = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let object = loop {
        let (etag, object) = stored_object(&session, scratch.path()).await.unwrap();
        if etag != before {
            break object;
        }
        assert!(
            Instant::now() < deadline,
            "no write-back after the outage: {}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut expected = {
        let dir = site.dir.path().join("expected");
        big_source(&dir);
        snapshot(&dir)
    };
    expected.insert(
        "workspace/faulty.txt".into(),
        Node::File {
            mode: 0o644,
            content: b"written during the outage".to_vec(),
        },
    );
    every_reader_agrees(&object, &expected);
    assert!(
        server.log_text().contains("write-back failed"),
        "the faults were seen"
    );
    assert_eq!(server.stop().code(), Some(0));
}

#[test]
fn push_refuses_a_session_with_changes_pending_here() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), b"a").unwrap();
    site.push(&src, "pending");
    let m = site.mount("pending", &["--no-writeback"]);
    std::fs::write(m.join("workspace/b.txt"), b"b").unwrap();
    m.stop();
    let out = site
        .command()
        .args(["push", &src.display().to_string(), "pending"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not yet written back") && err.contains("--force"),
        "{err}"
    );
    // The overlay no process holds is written back by `flush SESSION`.
    let before: Value =
        serde_json::from_slice(&site.run(&["status", "--json", "pending"])).unwrap();
    assert!(before["pendingChanges"].as_u64().unwrap() > 0, "{before}");
    site.run(&["flush", "pending"]);
    let after: Value = serde_json::from_slice(&site.run(&["status", "--json", "pending"])).unwrap();
    assert_eq!(after["pendingChanges"], 0, "{after}");
    let b = site.run(&["cat", "pending", "workspace/b.txt"]);
    assert_eq!(b, b"b");
    site.run(&["push", &src.display().to_string(), "pending"]);
}

#[test]
fn two_hundred_write_backs_keep_the_object_within_ten_percent_of_a_fresh_pack() {
    use sessionfs_core::overlay::export;
    use sessionfs_core::overlay::open::{open, OpenSpec};
    use sessionfs_core::overlay::writeback::{write_back, WriteBackOptions};
    use sessionfs_core::tarball::reader::SessionReader;
    use sessionfs_core::tarball::writer::{pack_dir, pack_entries, PackOptions};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dir, store) = sessionfs_tests::local_store();
    let src = dir.path().join("src");
    big_source(&src);
    let mut packed = Vec::new();
    pack_dir(&src, &mut packed, &PackOptions::default(), &|_| {}).unwrap();
    let session = SessionPath::parse("compact").unwrap();
    let key = session.object_key();
    rt.block_on(store.put(&key, packed.into(), Default::default()))
        .unwrap();
    let live = open(
        &OpenSpec {
            store: store.clone(),
            index: None,
            session,
            overlay: dir.path().join("overlay"),
            read_only: false,
            offline: sessionfs_core::overlay::open::Offline::Never,
        },
        rt.handle(),
    )
    .unwrap();
    let opts = WriteBackOptions::default();
    let mut incremental = 0;
    for i in 0..200 {
        let path = format!("workspace/many/mod_{:03}.rs", (i * 37) % 300);
        live.put_file(&path, format!("// change {i}\n").as_bytes())
            .unwrap();
        let report = write_back(&live, &store, &opts)
            .unwrap()
            .expect("a write-back");
        if !report.full {
            incremental += 1;
            assert!(report.copied > 0);
        }
    }
    assert!(
        incremental >= 150,
        "only {incremental} of 200 were incremental"
    );
    let stored = rt.block_on(store.head(&key)).unwrap().size;
    let mut fresh = Vec::new();
    pack_entries(
        export::entries(&live).unwrap(),
        &mut fresh,
        &PackOptions::default(),
        &|_| {},
    )
    .unwrap();
    let fresh = fresh.len() as u64;
    assert!(
        stored * 100 <= fresh * 110,
        "after 200 write-backs the object is {stored} bytes, a fresh pack {fresh}"
    );
    // The last object reads back whole, TOC and all.
    let reader = rt
        .block_on(SessionReader::open(store.clone(), &key, None))
        .unwrap();
    let last = (199 * 37) % 300;
    let got = rt
        .block_on(reader.read_all(&format!("workspace/many/mod_{last:03}.rs")))
        .unwrap();
    assert_eq!(&got[..], b"// change 199\n");
    assert!(!live.has_pending_changes().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reserved_name_is_refused_in_mounts_and_through_the_api() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), b"a").unwrap();
    site.push(&src, "reserved");
    let m = site.mount("reserved", &[]);
    let e = std::fs::create_dir(m.join(".sessionfs")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::write(m.join(".sessionfs"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::rename(m.join("workspace"), m.join(".sessionfs")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Below the root the name is anyone's.
    std::fs::create_dir(m.join("workspace/.sessionfs")).unwrap();
    m.stop();
    let server = site.serve_api(&[], &[]);
    let r = reqwest::Client::new()
        .put(format!("{}{API}/reserved/files/.sessionfs/toc", server.url))
        .body("not a TOC")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_file_path", "{v}");
    assert_eq!(server.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_after_a_push_moves_onto_the_new_object_instead_of_failing() {
    let site = Site::s3();
    let pusher = Site::s3();
    let session = session_name("read-follow");
    // The file sits in the first segment, far from the tail the mount
    // read at open (and so cached), behind 4 MiB of incompressible bytes.
    let tree = |root: &Path, tag: &str| {
        std::fs::create_dir_all(root.join("workspace")).unwrap();
        std::fs::write(root.join("workspace/0-y.txt"), format!("{tag}-y")).unwrap();
        std::fs::write(root.join("workspace/big.bin"), pattern(4 << 20, 9)).unwrap();
    };
    let one = site.dir.path().join("one");
    tree(&one, "old");
    site.push(&one, &session);
    // Never polls: only the failed read can tell the object changed.
    let m = site.mount(&session, &["--follow-ms", "0"]);
    let two = site.dir.path().join("two");
    tree(&two, "new");
    pusher.push(&two, &session);
    assert_eq!(
        std::fs::read(m.join("workspace/0-y.txt")).unwrap(),
        b"new-y"
    );
    m.stop();
}

#[test]
fn the_object_digest_in_the_metadata_is_checked_at_open() {
    use sessionfs_core::store::PutOptions;
    use sessionfs_core::tarball::reader::SessionReader;
    use sessionfs_core::tarball::toc::DIGEST_KEY;
    use sessionfs_core::tarball::writer::{pack_dir, PackOptions};
    use sessionfs_core::tarball::TarballError;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dir, store) = sessionfs_tests::local_store();
    let src = dir.path().join("src");
    make_fixture(&src);
    let mut packed = Vec::new();
    let stats = pack_dir(&src, &mut packed, &PackOptions::default(), &|_| {}).unwrap();
    assert_eq!(stats.digest.len(), 64);
    for (key, digest, good) in [
        ("good/session.tar.gz", stats.digest.clone(), true),
        ("bad/session.tar.gz", "0".repeat(64), false),
    ] {
        let opts = PutOptions {
            metadata: [(DIGEST_KEY.to_owned(), digest)].into(),
            ..PutOptions::default()
        };
        rt.block_on(store.put(key, packed.clone().into(), opts))
            .unwrap();
        let opened = rt.block_on(SessionReader::open(store.clone(), key, None));
        match (good, opened) {
            (true, Ok(_)) => {}
            (false, Err(TarballError::Corrupt(why))) => assert!(why.contains("digest"), "{why}"),
            (good, other) => panic!("good={good}: {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn a_stale_mount_left_by_kill_9_is_detached_by_the_next_mount() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.txt"), b"a").unwrap();
    site.push(&src, "stale");
    let m = site.mount("stale", &[]);
    let path = m.path.clone();
    m.kill9_keep_mounted();
    let e = std::fs::metadata(&path).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let m = site.mount_at("stale", &path, &[]);
    // The stale mount is listed until the new process detaches it.
    wait_for(Duration::from_secs(30), "the new mount", || {
        std::fs::read(m.join("workspace/a.txt")).is_ok_and(|b| b == b"a")
    });
    assert!(
        m.log_text().contains("detached a stale mount"),
        "{}",
        m.log_text()
    );
    m.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn crafted_names_reach_the_terminal_escaped() {
    let site = Site::local();
    let crafted = "workspace/\u{1b}]0;PWNED-TITLE\u{7}\u{1b}[2J.txt";
    let mut tgz = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
        let mut t = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        t.append_data(&mut h, crafted, &b"hi"[..]).unwrap();
        t.finish().unwrap();
    }
    let store =
        sessionfs_core::store::local::LocalStore::open(site.dir.path().join("store"), "sessions")
            .unwrap();
    use sessionfs_core::store::ObjectStore;
    store
        .put("crafted/session.tar.gz", tgz.into(), Default::default())
        .await
        .unwrap();
    // The reader leaves the name out as unsafe, and says so in the log:
    // escaped, like every message.
    let out = site
        .command()
        .args(["ls", "-l", "crafted"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = [out.stdout.clone(), out.stderr.clone()].concat();
    assert!(
        !all.contains(&0x1b) && !all.contains(&0x07),
        "raw control bytes: {all:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("PWNED-TITLE"));
    let out = site
        .command()
        .args(["cat", "crafted", &format!("{crafted}.missing")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !out.stderr.contains(&0x1b) && String::from_utf8_lossy(&out.stderr).contains("\\x1b"),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets this process's soft limit of descriptors (`None`: the hard limit);
/// children started meanwhile inherit it.
fn set_own_nofile(soft: Option<u64>) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit for both calls.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = soft.unwrap_or(lim.rlim_max).min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn thousands_of_files_open_for_writing_and_a_lowered_descriptor_limit() {
    let site = Site::local();
    let src = site.dir.path().join("src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    site.push(&src, "many-open");
    // Started with the soft limit of 1,024 a login shell gives, the mount
    // raises it to the hard one by itself.
    set_own_nofile(Some(1024));
    let m = site.mount("many-open", &[]);
    set_own_nofile(None);
    let w = m.join("workspace");
    let mut open = Vec::new();
    for i in 0..5000 {
        let f = std::fs::File::create(w.join(format!("f{i:04}")))
            .unwrap_or_else(|e| panic!("file {i}: {e}"));
        open.push(f);
    }
    // The mount does not hold a descriptor per open file.
    let held = std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count();
    assert!(
        held < 1000,
        "the mount holds {held} descriptors for 5,000 open files"
    );
    // Every handle still writes to its file (the mount opens it again).
    for (i, f) in open.iter_mut().enumerate() {
        std::io::Write::write_all(f, format!("file {i}").as_bytes()).unwrap();
    }
    drop(open);
    for i in (0..5000).step_by(97) {
        assert_eq!(
            std::fs::read_to_string(w.join(format!("f{i:04}"))).unwrap(),
            format!("file {i}")
        );
    }
    // Now the mount's own limit, lowered under it: a create needs no
    // descriptor, and a write to more files than the limit leaves room for
    // closes idle overlay descriptors rather than fail.
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", m.pid()))
        .arg("--nofile=200:200")
        .status()
        .unwrap();
    assert!(status.success());
    let mut held = Vec::new();
    for i in 0..400 {
        let mut f = std::fs::File::create(w.join(format!("g{i:04}")))
            .unwrap_or_else(|e| panic!("create {i} under the lowered limit: {e}"));
        std::io::Write::write_all(&mut f, format!("g {i}").as_bytes())
            .unwrap_or_else(|e| panic!("write {i} under the lowered limit: {e}"));
        held.push(f);
    }
    drop(held);
    for i in (0..400).step_by(37) {
        assert_eq!(
            std::fs::read_to_string(w.join(format!("g{i:04}"))).unwrap(),
            format!("g {i}")
        );
    }
    m.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_store_fails_reads_at_their_deadline_and_cached_reads_go_on() {
    use sessionfs_tests::fault_proxy::Fault;
    let (proxy, site) = site_through_proxy().await;
    let session = session_name("stall");
    let src = site.dir.path().join("src");
    let w = src.join("workspace");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("a-cached.txt"), b"cached bytes").unwrap();
    std::fs::write(w.join("b-cached.txt"), b"beside it").unwrap();
    // Incompressible, so each sits in segments of its own.
    for i in 0..14u64 {
        std::fs::write(w.join(format!("big-{i}.bin")), pattern(3 << 20, 50 + i)).unwrap();
    }
    site.push(&src, &session);
    let m = site.mount(&session, &["--read-timeout-secs", "3"]);
    assert_eq!(
        std::fs::read(m.join("workspace/a-cached.txt")).unwrap(),
        b"cached bytes"
    );
    // That read brought its segment, the other small file too, into the
    // block cache; the kernel has pages of this one only.
    // The end of big-2 read now makes the read of big-3 below look
    // sequential, so it also starts a readahead of big-3's later segments
    // that stalls with it.
    let mut tail = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(m.join("workspace/big-2.bin")).unwrap(),
        &mut tail,
        (3 << 20) - 4096,
    )
    .unwrap();

    proxy.plan(&[], Fault::Hang);
    proxy.cut_all();
    let started = Instant::now();
    let read = |i: usize| {
        let p = m.join(format!("workspace/big-{i}.bin"));
        std::thread::spawn(move || (std::fs::read(p), Instant::now()))
    };
    let mut stuck = vec![read(3)];
    std::thread::sleep(Duration::from_millis(200));
    stuck.extend([0, 1, 2, 4, 5].map(read));
    // A first write copies the file up from the store: stalled too.
    stuck.extend((6..12).map(|i| {
        let p = m.join(format!("workspace/big-{i}.bin"));
        std::thread::spawn(move || {
            let r = std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"+"));
            (r.map(|()| Vec::new()), Instant::now())
        })
    }));
    // So does a truncate that keeps part of the file (a copy-up as well).
    stuck.extend((12..14).map(|i| {
        let p = m.join(format!("workspace/big-{i}.bin"));
        std::thread::spawn(move || {
            let r = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(1 << 20));
            (r.map(|()| Vec::new()), Instant::now())
        })
    }));
    // More stalled reads than FUSE threads: cached reads and listings still answer.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert_eq!(
        std::fs::read(m.join("workspace/b-cached.txt")).unwrap(),
        b"beside it"
    );
    assert_eq!(std::fs::read_dir(m.join("workspace")).unwrap().count(), 16);
    let answered = t.elapsed();
    assert!(
        answered < Duration::from_secs(2),
        "a cached read and a listing waited {answered:?} behind stalled reads"
    );
    for h in stuck {
        let (r, at) = h.join().unwrap();
        let e = r.expect_err("a read or copy-up from a stalled store");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        let took = at - started;
        assert!(
            took <= Duration::from_secs(3 + 5),
            "a stalled read ended after {took:?}"
        );
    }
    assert!(
        m.log_text().contains("--read-timeout-secs"),
        "{}",
        m.log_text()
    );
    // The store back, the same reads succeed: the stalled readahead of
    // big-3 gave up at the deadline too, rather than holding its segments.
    proxy.plan(&[], Fault::Forward);
    let got = std::fs::read(m.join("workspace/big-3.bin")).unwrap();
    assert!(got == pattern(3 << 20, 53).to_vec());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("workspace/big-7.bin"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"+").unwrap();
    drop(f);
    let got = std::fs::read(m.join("workspace/big-7.bin")).unwrap();
    assert_eq!(got.len(), (3 << 20) + 1);
    assert!(got[..3 << 20] == pattern(3 << 20, 57)[..]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("workspace/big-13.bin"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let got = std::fs::read(m.join("workspace/big-13.bin")).unwrap();
    assert!(got == pattern(3 << 20, 63)[..1 << 20]);
    m.stop();
}

/// A session stored by another tool (GNU tar's tar.gz, no index) is
/// converted at its first write-back: a full pack with its index and
/// digest, holding the other tool's tree and the change.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_object_is_converted_at_its_first_write_back() {
    let site = Site::s3();
    let session = session_name("foreign");
    let src = site.dir.path().join("src");
    make_fixture(&src);
    let plain = site.dir.path().join("plain.tar.gz");
    let out = std::process::Command::new("tar")
        .arg("czf")
        .arg(&plain)
        .arg("-C")
        .arg(&src)
        .args(
            std::fs::read_dir(&src)
                .unwrap()
                .map(|e| e.unwrap().file_name()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = SessionPath::parse(&session).unwrap().object_key();
    let store = s3_store().await;
    store
        .put(
            &key,
            std::fs::read(&plain).unwrap().into(),
            Default::default(),
        )
        .await
        .unwrap();
    assert!(!store
        .head(&key)
        .await
        .unwrap()
        .metadata
        .contains_key(sessionfs_core::tarball::toc::DIGEST_KEY));

    let m = site.mount(&session, &["--writeback-quiet-ms", "100"]);
    std::fs::write(m.path.join("workspace/added.txt"), b"after conversion\n").unwrap();
    std::fs::write(src.join("workspace/added.txt"), b"after conversion\n").unwrap();
    wait_for(Duration::from_secs(30), "the write-back", || {
        let s = status(&site, &m);
        s["pendingChanges"] == 0 && !s["lastWriteBack"].is_null()
    });
    assert_eq!(status(&site, &m)["lastWriteBack"]["full"], true);
    m.stop();

    let head = store.head(&key).await.unwrap();
    assert!(
        head.metadata
            .contains_key(sessionfs_core::tarball::toc::DIGEST_KEY),
        "converted to a sessionfs object: {:?}",
        head.metadata
    );
    let (_, object) = stored_object(&session, site.dir.path()).await.unwrap();
    every_reader_agrees(&object, &snapshot(&src));
    // Its index is found again by a fresh process (no foreign indexing).
    let fresh = Site::s3();
    assert_eq!(
        fresh.run(&["cat", &session, "workspace/added.txt"]),
        b"after conversion\n"
    );
}

/// A store outage before or during a large GET through the API: a 5xx
/// before any byte, or a connection cut short of its `Content-Length`;
/// never a 200 that looks complete with fewer or other bytes.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_during_a_large_get_never_looks_like_a_complete_answer() {
    use sessionfs_tests::fault_proxy::Fault;
    let session = session_name("outage");
    let len = 48usize << 20;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("workspace")).unwrap();
    std::fs::write(src.path().join("workspace/big.bin"), pattern(len, 77)).unwrap();
    // Pushed from elsewhere: the server below starts with an empty cache.
    Site::s3().push(src.path(), &session);
    let (proxy, site) = site_through_proxy().await;
    let server = site.serve_api(&["--read-timeout-secs", "3"], &[]);
    let url = format!("{}{API}/{session}/files/workspace/big.bin", server.url);
    let http = reqwest::Client::new();

    // The store down before the request: an error status, no body.
    proxy.plan(&[], Fault::Drop);
    proxy.cut_all();
    let r = http.get(&url).send().await.unwrap();
    assert!(r.status().is_server_error(), "answered {}", r.status());

    // Down in the middle of the body.
    proxy.plan(&[], Fault::Forward);
    let mut r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(len as u64));
    let mut got = Vec::new();
    while got.len() < 1 << 20 {
        got.extend_from_slice(&r.chunk().await.unwrap().expect("more body"));
    }
    proxy.plan(&[], Fault::Drop);
    proxy.cut_all();
    let ended = loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match ended {
        Ok(()) => {
            // Only if every byte came (from what was already fetched).
            assert_eq!(got.len(), len, "a body ended short without an error");
            assert!(got == pattern(len, 77));
        }
        Err(e) => {
            eprintln!("cut after {} of {len} bytes: {e}", got.len());
            assert!(got.len() < len, "an error after the whole body: {e}")
        }
    }
    assert!(got[..1 << 20] == pattern(len, 77)[..1 << 20]);
    // The server goes on answering once the store is back.
    proxy.plan(&[], Fault::Forward);
    let whole = http.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert!(whole.bytes().await.unwrap() == pattern(len, 77));
    assert_eq!(server.stop().code(), Some(0));
}

/// The block cache directory deleted under a running mount is made again
/// and used: later reads fill it, without a flood of warnings.
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_directory_deleted_under_a_mount_is_made_again_and_used() {
    let site = Site::s3();
    let session = session_name("cachedir");
    let src = site.dir.path().join("src/workspace");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join(format!("f{i}.bin")), pattern(2 << 20, 900 + i)).unwrap();
    }
    Site::s3().push(&site.dir.path().join("src"), &session);
    let m = site.mount(&session, &[]);
    assert!(std::fs::read(m.join("workspace/f0.bin")).unwrap() == pattern(2 << 20, 900));
    let cache = site.dir.path().join("cache");
    assert!(cache.exists());
    // (Readahead may still be writing blocks into it: try again then.)
    let mut tries = 0;
    while let Err(e) = std::fs::remove_dir_all(&cache) {
        tries += 1;
        assert!(tries < 100, "deleting the cache directory: {e}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 1..4u64 {
        let got = std::fs::read(m.join(format!("workspace/f{i}.bin"))).unwrap();
        assert!(got == pattern(2 << 20, 900 + i), "f{i}.bin");
    }
    let blocks = walk_files(&cache);
    assert!(
        blocks.iter().map(|(_, len)| len).sum::<u64>() >= 2 << 20,
        "the cache holds no blocks again: {blocks:?}"
    );
    let warnings = m.log_text().matches("WARN").count();
    assert!(warnings <= 3, "{warnings} warnings:\n{}", m.log_text());
    m.stop();
}

/// Every regular file under `dir` with its length.
fn walk_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let md = e.metadata().unwrap();
        if md.is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push((e.path(), md.len()));
        }
    }
    out
}
