//! The local store's conditional writes hold across processes: several
//! processes putting with the same `If-Match` at the same instant, exactly one
//! wins, and the object is that winner's, whole.

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

#[tokio::test]
async fn a_crashed_writer_leaves_the_old_object_whole() {
    // A writer killed mid-write leaves only a temporary file; readers see the
    // previous object, and reopening the store sweeps nothing it should keep.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), "sessions").unwrap();
    store
        .put("k", Bytes::from_static(b"committed"), PutOptions::default())
        .await
        .unwrap();
    let tmp = dir.path().join(".sessionfs/sessions/tmp/tmp-crashed");
    std::fs::write(&tmp, b"half a new versi").unwrap();
    let reopened = LocalStore::open(dir.path(), "sessions").unwrap();
    assert_eq!(
        &reopened.get("k", GetOptions::default()).await.unwrap().body[..],
        b"committed"
    );
    assert!(reopened
        .list_all("", None)
        .await
        .unwrap()
        .objects
        .iter()
        .all(|o| o.key == "k"));
}
