//! One conformance suite for both object stores: each behaviour is a case
//! function, run once against a local store and once against the real S3
//! server. A difference between the two is a bug in one of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sessionfs_core::store::{
    ByteRange, CompletedPart, CopySource, GetOptions, ListRequest, ObjectStore, Precondition,
    PutOptions, StoreError, MIN_PART_SIZE,
};
use sessionfs_tests::pattern;

type Store = Arc<dyn ObjectStore>;

fn put_opts() -> PutOptions {
    PutOptions::default()
}

fn if_match(etag: &str) -> PutOptions {
    PutOptions {
        precondition: Precondition::IfMatch(etag.to_owned()),
        ..PutOptions::default()
    }
}

fn if_none_match() -> PutOptions {
    PutOptions {
        precondition: Precondition::IfNoneMatch,
        ..PutOptions::default()
    }
}

async fn body(store: &Store, key: &str) -> Bytes {
    store.get(key, GetOptions::default()).await.unwrap().body
}

async fn range(store: &Store, key: &str, r: ByteRange) -> Result<Bytes, StoreError> {
    store.get(key, GetOptions::range(r)).await.map(|g| g.body)
}

mod cases {
    use super::*;

    pub async fn missing_key(store: Store, p: String) {
        let key = format!("{p}nothing-here");
        let err = store.head(&key).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("head") && msg.contains(&key), "{msg}");
        let err = store.get(&key, GetOptions::default()).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let err = store
            .get_stream(&key, GetOptions::range(ByteRange::Suffix(10)))
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        // Deleting what is not there succeeds.
        store.delete(&key).await.unwrap();
    }

    pub async fn empty_object(store: Store, p: String) {
        let key = format!("{p}empty");
        store.put(&key, Bytes::new(), put_opts()).await.unwrap();
        assert_eq!(store.head(&key).await.unwrap().size, 0);
        let got = store.get(&key, GetOptions::default()).await.unwrap();
        assert!(got.body.is_empty());
        assert_eq!(got.range, 0..0);
        let streamed: Vec<Bytes> = store
            .get_stream(&key, GetOptions::default())
            .await
            .unwrap()
            .body
            .try_collect()
            .await
            .unwrap();
        assert_eq!(streamed.concat().len(), 0);
        for r in [
            ByteRange::From(0),
            ByteRange::Suffix(4),
            ByteRange::Bounded { start: 0, end: 1 },
        ] {
            let err = range(&store, &key, r).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidRange { .. }), "{r}: {err}");
        }
    }

    pub async fn metadata_round_trip(store: Store, p: String) {
        let key = format!("{p}meta");
        let mut metadata = BTreeMap::new();
        metadata.insert("sha256".to_owned(), "0123abcd".to_owned());
        metadata.insert("session-format".to_owned(), "v1".to_owned());
        let put = store
            .put(
                &key,
                Bytes::from_static(b"hello"),
                PutOptions {
                    content_type: Some("application/gzip".to_owned()),
                    metadata: metadata.clone(),
                    ..PutOptions::default()
                },
            )
            .await
            .unwrap();
        let head = store.head(&key).await.unwrap();
        assert_eq!(head.size, 5);
        assert_eq!(head.etag, put.etag);
        assert_eq!(head.metadata, metadata);
        assert_eq!(head.content_type.as_deref(), Some("application/gzip"));
        let got = store.get(&key, GetOptions::default()).await.unwrap();
        assert_eq!(got.meta.metadata, metadata);
        assert_eq!(got.meta.etag, put.etag);
        assert_eq!(&got.body[..], b"hello");
        // Metadata S3 could not carry is refused, not mangled.
        let mut bad = BTreeMap::new();
        bad.insert("Upper Case".to_owned(), "x".to_owned());
        let err = store
            .put(
                &format!("{p}bad-meta"),
                Bytes::new(),
                PutOptions {
                    metadata: bad,
                    ..PutOptions::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err}");
    }

    pub async fn byte_ranges(store: Store, p: String) {
        let key = format!("{p}ranges");
        let data = pattern(1000, 7);
        store.put(&key, data.clone(), put_opts()).await.unwrap();
        let b = |start, end| ByteRange::Bounded { start, end };
        assert_eq!(
            range(&store, &key, b(10, 20)).await.unwrap(),
            data.slice(10..20)
        );
        // Past the end: clipped.
        assert_eq!(
            range(&store, &key, b(990, 5000)).await.unwrap(),
            data.slice(990..)
        );
        assert_eq!(
            range(&store, &key, ByteRange::From(995)).await.unwrap(),
            data.slice(995..)
        );
        // Starting at or past the end: refused.
        for r in [b(1000, 1001), ByteRange::From(1000), b(5000, 6000)] {
            let err = range(&store, &key, r).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidRange { .. }), "{r}: {err}");
        }
        let got = store
            .get(&key, GetOptions::range(b(100, 200)))
            .await
            .unwrap();
        assert_eq!(got.range, 100..200);
        assert_eq!(got.meta.size, 1000);
        // Streamed reads select the same bytes.
        let stream = store
            .get_stream(&key, GetOptions::range(b(3, 777)))
            .await
            .unwrap();
        assert_eq!(stream.range, 3..777);
        let parts: Vec<Bytes> = stream.body.try_collect().await.unwrap();
        assert_eq!(parts.concat(), &data[3..777]);
    }

    pub async fn suffix_range(store: Store, p: String) {
        let key = format!("{p}suffix");
        let data = pattern(4096, 9);
        store.put(&key, data.clone(), put_opts()).await.unwrap();
        let got = store
            .get(&key, GetOptions::range(ByteRange::Suffix(100)))
            .await
            .unwrap();
        assert_eq!(got.body, data.slice(3996..));
        assert_eq!(got.range, 3996..4096);
        assert_eq!(got.meta.size, 4096);
        // Longer than the object: the whole object.
        assert_eq!(
            range(&store, &key, ByteRange::Suffix(1 << 20))
                .await
                .unwrap(),
            data
        );
        let err = range(&store, &key, ByteRange::Suffix(0)).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidRange { .. }), "{err}");
    }

    pub async fn keys_with_spaces_and_utf8(store: Store, p: String) {
        let keys = [
            format!("{p}dir with spaces/file name.txt"),
            format!("{p}ünïcødé/日本語 ファイル.tar.gz"),
            format!("{p}symbols/a+b=c&d'e(f)@!$,;%.bin"),
        ];
        for (i, key) in keys.iter().enumerate() {
            store
                .put(key, Bytes::from(format!("content {i}")), put_opts())
                .await
                .unwrap();
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(body(&store, key).await, format!("content {i}").as_bytes());
        }
        let listed: Vec<String> = store
            .list_all(&p, None)
            .await
            .unwrap()
            .objects
            .into_iter()
            .map(|o| o.key)
            .collect();
        let mut expected = keys.to_vec();
        expected.sort();
        assert_eq!(listed, expected);
    }

    pub async fn stale_if_match_is_refused(store: Store, p: String) {
        let key = format!("{p}cas");
        let v1 = store
            .put(&key, Bytes::from_static(b"one"), put_opts())
            .await
            .unwrap();
        let v2 = store
            .put(&key, Bytes::from_static(b"two"), if_match(&v1.etag))
            .await
            .unwrap();
        assert_ne!(v1.etag, v2.etag);
        let err = store
            .put(&key, Bytes::from_static(b"three"), if_match(&v1.etag))
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert_eq!(body(&store, &key).await, &b"two"[..]);
        // Reads pinned to a stale version are refused too.
        let err = store
            .get(&key, GetOptions::default().if_match(v1.etag.clone()))
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        let pinned = store
            .get(&key, GetOptions::default().if_match(v2.etag.clone()))
            .await;
        assert_eq!(&pinned.unwrap().body[..], b"two");
        // If-Match on a key that does not exist is an unmet condition as well.
        let err = store
            .put(
                &format!("{p}absent"),
                Bytes::from_static(b"x"),
                if_match(&v2.etag),
            )
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert!(store
            .head(&format!("{p}absent"))
            .await
            .unwrap_err()
            .is_not_found());
    }

    pub async fn if_none_match_on_existing_key(store: Store, p: String) {
        let key = format!("{p}create-once");
        store
            .put(&key, Bytes::from_static(b"first"), if_none_match())
            .await
            .unwrap();
        let err = store
            .put(&key, Bytes::from_static(b"second"), if_none_match())
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert_eq!(body(&store, &key).await, &b"first"[..]);
        // Once deleted, the key can be created again.
        store.delete(&key).await.unwrap();
        store
            .put(&key, Bytes::from_static(b"third"), if_none_match())
            .await
            .unwrap();
        assert_eq!(body(&store, &key).await, &b"third"[..]);
    }

    pub async fn racing_conditional_puts(store: Store, p: String) {
        let key = format!("{p}race");
        let base = store
            .put(&key, Bytes::from_static(b"base"), put_opts())
            .await
            .unwrap();
        let racers = 8;
        let results = futures::future::join_all((0..racers).map(|i| {
            let store = store.clone();
            let key = key.clone();
            let etag = base.etag.clone();
            tokio::spawn(async move {
                store
                    .put(&key, Bytes::from(format!("racer {i}")), if_match(&etag))
                    .await
            })
        }))
        .await;
        let mut winners = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r.unwrap() {
                Ok(put) => winners.push((i, put.etag)),
                Err(e) => assert!(
                    matches!(
                        e,
                        StoreError::PreconditionFailed { .. } | StoreError::Conflict { .. }
                    ),
                    "racer {i}: {e}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one racer wins: {winners:?}");
        let (winner, etag) = &winners[0];
        let got = store.get(&key, GetOptions::default()).await.unwrap();
        assert_eq!(got.body, format!("racer {winner}").as_bytes());
        assert_eq!(&got.meta.etag, etag);
    }

    pub async fn delete_and_delete_many(store: Store, p: String) {
        let keys: Vec<String> = (0..5).map(|i| format!("{p}del/{i}")).collect();
        for k in &keys {
            store
                .put(k, Bytes::from_static(b"x"), put_opts())
                .await
                .unwrap();
        }
        store.delete(&keys[0]).await.unwrap();
        assert!(store.head(&keys[0]).await.unwrap_err().is_not_found());
        let mut batch = keys[1..].to_vec();
        batch.push(format!("{p}del/never-existed"));
        let outcomes = store.delete_many(&batch).await.unwrap();
        assert_eq!(outcomes.len(), batch.len());
        for o in &outcomes {
            assert!(o.error.is_none(), "{}: {:?}", o.key, o.error);
        }
        assert!(store.list_all(&p, None).await.unwrap().objects.is_empty());
    }

    pub async fn list_pages_and_delimiters(store: Store, p: String) {
        let total = 1500;
        let keys: Vec<String> = (0..total).map(|i| format!("{p}many/{i:05}")).collect();
        futures::stream::iter(keys.iter().cloned())
            .map(|k| {
                let store = store.clone();
                async move { store.put(&k, Bytes::from_static(b"."), put_opts()).await }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
        let first = store
            .list(ListRequest {
                prefix: format!("{p}many/"),
                max_keys: 1000,
                ..ListRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(first.objects.len(), 1000);
        let token = first.next.clone().expect("a second page");
        let second = store
            .list(ListRequest {
                prefix: format!("{p}many/"),
                continuation: Some(token),
                max_keys: 1000,
                ..ListRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(second.objects.len(), 500);
        assert_eq!(second.next, None);
        let all: Vec<String> = first
            .objects
            .iter()
            .chain(&second.objects)
            .map(|o| o.key.clone())
            .collect();
        assert_eq!(all, keys, "every key once, in order");
        assert_eq!(
            store
                .list_all(&format!("{p}many/"), None)
                .await
                .unwrap()
                .objects
                .len(),
            total
        );
        // A prefix that is not a whole segment still matches.
        let tens = store
            .list_all(&format!("{p}many/0001"), None)
            .await
            .unwrap();
        assert_eq!(tens.objects.len(), 10);

        // Delimiters roll keys up into common prefixes, across small pages too.
        for k in ["tree/a/1", "tree/a/2", "tree/b", "tree/c/d/e", "tree/d"] {
            store
                .put(&format!("{p}{k}"), Bytes::from_static(b"."), put_opts())
                .await
                .unwrap();
        }
        let page = store
            .list_all(&format!("{p}tree/"), Some("/"))
            .await
            .unwrap();
        let objects: Vec<String> = page.objects.iter().map(|o| o.key.clone()).collect();
        assert_eq!(objects, [format!("{p}tree/b"), format!("{p}tree/d")]);
        assert_eq!(
            page.common_prefixes,
            [format!("{p}tree/a/"), format!("{p}tree/c/")]
        );
        let mut seen = Vec::new();
        let mut continuation = None;
        loop {
            let page = store
                .list(ListRequest {
                    prefix: format!("{p}tree/"),
                    delimiter: Some("/".to_owned()),
                    continuation,
                    max_keys: 1,
                })
                .await
                .unwrap();
            assert_eq!(page.objects.len() + page.common_prefixes.len(), 1);
            seen.extend(page.objects.into_iter().map(|o| o.key));
            seen.extend(page.common_prefixes);
            match page.next {
                Some(next) => continuation = Some(next),
                None => break,
            }
        }
        let short: Vec<&str> = seen.iter().map(|s| &s[p.len()..]).collect();
        assert_eq!(short, ["tree/a/", "tree/b", "tree/c/", "tree/d"]);
        // A listing of an empty prefix is empty.
        assert!(store
            .list_all(&format!("{p}nothing/"), Some("/"))
            .await
            .unwrap()
            .objects
            .is_empty());
    }

    pub async fn multipart_upload(store: Store, p: String) {
        let key = format!("{p}multi");
        let mut metadata = BTreeMap::new();
        metadata.insert("parts".to_owned(), "2".to_owned());
        let id = store
            .create_multipart(
                &key,
                PutOptions {
                    metadata: metadata.clone(),
                    content_type: Some("application/gzip".to_owned()),
                    ..PutOptions::default()
                },
            )
            .await
            .unwrap();
        let one = pattern(MIN_PART_SIZE as usize, 1);
        let two = pattern(12345, 2);
        let p1 = store.upload_part(&key, &id, 1, one.clone()).await.unwrap();
        let p2 = store.upload_part(&key, &id, 2, two.clone()).await.unwrap();
        // Not visible before completion.
        assert!(store.head(&key).await.unwrap_err().is_not_found());
        let done = store
            .complete_multipart(&key, &id, &[p1, p2], Precondition::IfNoneMatch)
            .await
            .unwrap();
        let got = store.get(&key, GetOptions::default()).await.unwrap();
        assert_eq!(got.body.len(), one.len() + two.len());
        assert_eq!(got.body.slice(..one.len()), one);
        assert_eq!(got.body.slice(one.len()..), two);
        assert_eq!(got.meta.etag, done.etag);
        assert_eq!(got.meta.metadata, metadata);
        assert_eq!(got.meta.content_type.as_deref(), Some("application/gzip"));
    }

    pub async fn part_copy_of_a_range(store: Store, p: String) {
        let src = format!("{p}source");
        let data = pattern(MIN_PART_SIZE as usize + 2 * 1024 * 1024, 3);
        let src_put = store.put(&src, data.clone(), put_opts()).await.unwrap();
        let key = format!("{p}assembled");
        let id = store.create_multipart(&key, put_opts()).await.unwrap();
        let start = 1024 * 1024 + 17;
        let end = start + MIN_PART_SIZE;
        let copied = store
            .upload_part_copy(
                &key,
                &id,
                1,
                CopySource {
                    key: src.clone(),
                    range: start..end,
                    if_match: Some(src_put.etag.clone()),
                },
            )
            .await
            .unwrap();
        let tail = pattern(777, 4);
        let last = store.upload_part(&key, &id, 2, tail.clone()).await.unwrap();
        // A copy pinned to a stale source version is refused.
        let stale = store
            .upload_part_copy(
                &key,
                &id,
                3,
                CopySource {
                    key: src.clone(),
                    range: 0..100,
                    if_match: Some("\"0000000000\"".to_owned()),
                },
            )
            .await
            .unwrap_err();
        assert!(stale.is_precondition_failed(), "{stale}");
        store
            .complete_multipart(&key, &id, &[copied, last], Precondition::None)
            .await
            .unwrap();
        let got = body(&store, &key).await;
        assert_eq!(got.len() as u64, MIN_PART_SIZE + 777);
        assert_eq!(
            got.slice(..MIN_PART_SIZE as usize),
            data.slice(start as usize..end as usize)
        );
        assert_eq!(got.slice(MIN_PART_SIZE as usize..), tail);
    }

    pub async fn multipart_abort(store: Store, p: String) {
        let key = format!("{p}aborted");
        let id = store.create_multipart(&key, put_opts()).await.unwrap();
        let part = store
            .upload_part(&key, &id, 1, Bytes::from_static(b"x"))
            .await
            .unwrap();
        store.abort_multipart(&key, &id).await.unwrap();
        let err = store
            .complete_multipart(&key, &id, &[part], Precondition::None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UploadNotFound { .. } | StoreError::InvalidPart { .. }
            ),
            "{err}"
        );
        assert!(store.head(&key).await.unwrap_err().is_not_found());
    }

    pub async fn multipart_rules(store: Store, p: String) {
        let key = format!("{p}rules");
        store
            .put(&key, Bytes::from_static(b"old"), put_opts())
            .await
            .unwrap();
        let id = store.create_multipart(&key, put_opts()).await.unwrap();
        let small = store
            .upload_part(&key, &id, 1, Bytes::from_static(b"small"))
            .await
            .unwrap();
        let last = store
            .upload_part(&key, &id, 2, Bytes::from_static(b"last"))
            .await
            .unwrap();
        // A part other than the last under the minimum size.
        let err = store
            .complete_multipart(
                &key,
                &id,
                &[small.clone(), last.clone()],
                Precondition::None,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidPart { .. }), "{err}");
        // No parts, or parts out of order.
        let err = store
            .complete_multipart(&key, &id, &[], Precondition::None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidPart { .. }), "{err}");
        let err = store
            .complete_multipart(
                &key,
                &id,
                &[last.clone(), small.clone()],
                Precondition::None,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidPart { .. }), "{err}");
        // Conditional completion: the key exists, so If-None-Match fails, as does a stale If-Match.
        let err = store
            .complete_multipart(
                &key,
                &id,
                std::slice::from_ref(&last),
                Precondition::IfNoneMatch,
            )
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        let err = store
            .complete_multipart(
                &key,
                &id,
                std::slice::from_ref(&last),
                Precondition::IfMatch("\"stale\"".to_owned()),
            )
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert_eq!(body(&store, &key).await, &b"old"[..]);
        let current = store.head(&key).await.unwrap().etag;
        let last = CompletedPart {
            part_number: 2,
            etag: last.etag,
        };
        store
            .complete_multipart(&key, &id, &[last], Precondition::IfMatch(current))
            .await
            .unwrap();
        assert_eq!(body(&store, &key).await, &b"last"[..]);
    }

    pub async fn streaming_a_large_object(store: Store, p: String) {
        let key = format!("{p}large");
        let data = pattern(3 * 1024 * 1024 + 5, 11);
        store.put(&key, data.clone(), put_opts()).await.unwrap();
        let stream = store.get_stream(&key, GetOptions::default()).await.unwrap();
        assert_eq!(stream.meta.size, data.len() as u64);
        let chunks: Vec<Bytes> = stream.body.try_collect().await.unwrap();
        assert!(chunks.len() > 1, "streamed in more than one chunk");
        assert_eq!(chunks.concat(), data);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let (_dir, store) = sessionfs_tests::local_store();
                    super::cases::$case(store, sessionfs_tests::unique_prefix(stringify!($case))).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = sessionfs_tests::s3_store().await;
                    let prefix = sessionfs_tests::unique_prefix(stringify!($case));
                    super::cases::$case(store.clone(), prefix.clone()).await;
                    // Leave the shared bucket as we found it.
                    let keys: Vec<String> = store
                        .list_all(&prefix, None)
                        .await
                        .unwrap()
                        .objects
                        .into_iter()
                        .map(|o| o.key)
                        .collect();
                    store.delete_many(&keys).await.unwrap();
                }
            )*
        }
    };
}

conformance!(
    missing_key,
    empty_object,
    metadata_round_trip,
    byte_ranges,
    suffix_range,
    keys_with_spaces_and_utf8,
    stale_if_match_is_refused,
    if_none_match_on_existing_key,
    racing_conditional_puts,
    delete_and_delete_many,
    list_pages_and_delimiters,
    multipart_upload,
    part_copy_of_a_range,
    multipart_abort,
    multipart_rules,
    streaming_a_large_object,
);
