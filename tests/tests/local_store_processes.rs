//! The local store's conditional writes hold across processes: several
//! processes putting with the same `If-Match` at the same instant, exactly one
//! wins, and the object is that winner's, whole. A writer killed mid-upload
//! leaves the old object whole, and its leftovers are swept once stale.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::{GetOptions, ObjectStore, PutOptions};

#[tokio::test]
async fn processes_racing_with_the_same_if_match_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), "sessions").unwrap();
    let key = "race/session.tar.gz";
    for round in 0..5 {
        let base = store
            .put(
                key,
                Bytes::from(format!("base {round}")),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let start_at =
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_millis(300);
        let children: Vec<_> = (0..6)
            .map(|i| {
                std::process::Command::new(env!("CARGO_BIN_EXE_store-racer"))
                    .arg(dir.path())
                    .arg(key)
                    .arg(&base.etag)
                    .arg(format!("payload of racer {i} in round {round}"))
                    .arg(start_at.as_millis().to_string())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut winners = Vec::new();
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "racer {i} failed");
            let said = String::from_utf8(out.stdout).unwrap();
            if let Some(etag) = said.trim().strip_prefix("won ") {
                winners.push((i, etag.to_owned()));
            } else {
                assert_eq!(said.trim(), "lost");
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (winner, etag) = &winners[0];
        let got = store.get(key, GetOptions::default()).await.unwrap();
        assert_eq!(
            got.body,
            format!("payload of racer {winner} in round {round}").as_bytes()
        );
        assert_eq!(&got.meta.etag, etag);
    }
}

#[tokio::test]
async fn every_write_gets_a_new_etag_even_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), "sessions").unwrap();
    let a = store
        .put("k", Bytes::from_static(b"same"), PutOptions::default())
        .await
        .unwrap();
    let b = store
        .put("k", Bytes::from_static(b"same"), PutOptions::default())
        .await
        .unwrap();
    assert_ne!(a.etag, b.etag);
}

/// Sets the modification time of `path` to two days ago.
fn age(path: &std::path::Path) {
    let st = std::process::Command::new("touch")
        .args(["-m", "-d", "2 days ago"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Every file under `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test]
async fn a_writer_killed_mid_upload_leaves_the_old_object_whole_and_its_leftovers_are_swept() {
    // A real writer (`sessionfs push` of a large tree) killed with -9 in the
    // middle of its upload: readers see the previous object, whole; what it
    // left is kept while it may still be in use, and swept once stale.
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let tree = dir.path().join("tree/workspace");
    std::fs::create_dir_all(&tree).unwrap();
    for i in 0..8u64 {
        std::fs::write(
            tree.join(format!("f{i:02}")),
            sessionfs_tests::pattern(8 << 20, i),
        )
        .unwrap();
    }
    let push = |from: &std::path::Path| {
        let mut c = std::process::Command::new(sessionfs_tests::sessionfs_bin());
        c.args(["--quiet", "push", "--store", "local", "--store-dir"])
            .arg(&store_dir)
            .env("SESSIONFS_CACHE_DIR", dir.path().join("cache"))
            .arg(from)
            .args(["crash", "--force"]);
        c
    };
    let old_tree = dir.path().join("old/workspace");
    std::fs::create_dir_all(&old_tree).unwrap();
    std::fs::write(old_tree.join("a.txt"), b"the old object").unwrap();
    assert!(push(&dir.path().join("old")).status().unwrap().success());
    let store = LocalStore::open(&store_dir, "sessions").unwrap();
    let key = "crash/session.tar.gz";
    let before = store.get(key, GetOptions::default()).await.unwrap();

    let internal = store_dir.join(".sessionfs/sessions");
    let mut writer = push(&dir.path().join("tree")).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let leftovers = loop {
        let found: Vec<_> = [internal.join("tmp"), internal.join("uploads")]
            .iter()
            .flat_map(|d| files(d))
            .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never started writing"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    writer.kill().unwrap();
    let status = writer.wait().unwrap();
    assert!(
        !status.success(),
        "the writer finished before it was killed"
    );

    // Readers see the old object, whole.
    let after = store.get(key, GetOptions::default()).await.unwrap();
    assert_eq!(after.meta.etag, before.meta.etag);
    assert!(after.body == before.body);
    // A reopen keeps fresh leftovers (another writer may be using them)...
    let reopened = LocalStore::open(&store_dir, "sessions").unwrap();
    assert!(
        leftovers.iter().all(|f| f.exists()),
        "fresh leftovers swept"
    );
    drop(reopened);
    // ...and sweeps them once stale.
    for f in files(&internal.join("tmp"))
        .into_iter()
        .chain(files(&internal.join("uploads")))
    {
        age(&f);
    }
    for d in std::fs::read_dir(internal.join("uploads"))
        .unwrap()
        .flatten()
    {
        age(&d.path());
    }
    let reopened = LocalStore::open(&store_dir, "sessions").unwrap();
    assert!(
        files(&internal.join("tmp")).is_empty() && files(&internal.join("uploads")).is_empty(),
        "stale leftovers stayed: {:?}",
        files(&internal)
    );
    assert!(reopened.get(key, GetOptions::default()).await.unwrap().body == before.body);
}
