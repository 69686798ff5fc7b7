//! The S3 store against faults injected by a proxy in front of the real S3
//! server: transient errors and dropped connections are retried with backoff
//! until they pass; what outlasts the retries, or a server that never answers,
//! is a `Transient` error naming the operation and key.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sessionfs_core::store::config::S3Config;
use sessionfs_core::store::s3::S3Store;
use sessionfs_core::store::{GetOptions, ObjectStore, PutOptions, StoreError};
use sessionfs_tests::fault_proxy::{Fault, FaultProxy};
use sessionfs_tests::{pattern, s3_bucket, s3_config, unique_prefix};

/// A store whose requests go through a fresh fault proxy.
async fn through_proxy(max_attempts: u32, read_timeout: Duration) -> (FaultProxy, S3Store) {
    let direct = s3_config();
    let upstream: SocketAddr = direct
        .endpoint
        .as_deref()
        .and_then(|e| e.strip_prefix("http://"))
        .expect("the test server speaks http")
        .parse()
        .expect("endpoint is host:port");
    let proxy = FaultProxy::start(upstream).await;
    let cfg = S3Config {
        endpoint: Some(format!("http://{}", proxy.addr)),
        max_attempts,
        read_timeout,
        connect_timeout: Duration::from_secs(2),
        ..direct
    };
    let store = S3Store::connect(&cfg, &s3_bucket()).await.expect("connect");
    (proxy, store)
}

#[tokio::test]
async fn server_errors_and_throttling_are_retried() {
    let (proxy, store) = through_proxy(5, Duration::from_secs(10)).await;
    let key = format!("{}obj", unique_prefix("faults-5xx"));
    let data = pattern(100_000, 5);
    proxy.plan(
        &[Fault::ServiceUnavailable, Fault::SlowDown],
        Fault::Forward,
    );
    store
        .put(&key, data.clone(), PutOptions::default())
        .await
        .unwrap();
    assert!(
        proxy.connections() >= 3,
        "two failures, then the request that passed"
    );
    proxy.plan(
        &[Fault::SlowDown, Fault::ServiceUnavailable],
        Fault::Forward,
    );
    let got = store.get(&key, GetOptions::default()).await.unwrap();
    assert_eq!(got.body, data);
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn dropped_connections_are_retried() {
    let (proxy, store) = through_proxy(5, Duration::from_secs(10)).await;
    let key = format!("{}obj", unique_prefix("faults-drop"));
    store
        .put(&key, Bytes::from_static(b"payload"), PutOptions::default())
        .await
        .unwrap();
    proxy.plan(&[Fault::Drop, Fault::Drop], Fault::Forward);
    let head = store.head(&key).await.unwrap();
    assert_eq!(head.size, 7);
    proxy.plan(&[Fault::Drop], Fault::Forward);
    assert_eq!(
        &store.get(&key, GetOptions::default()).await.unwrap().body[..],
        b"payload"
    );
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn errors_that_outlast_the_retries_are_transient() {
    let (proxy, store) = through_proxy(3, Duration::from_secs(10)).await;
    let key = format!("{}obj", unique_prefix("faults-exhausted"));
    proxy.plan(&[], Fault::ServiceUnavailable);
    let before = proxy.connections();
    let err = store.head(&key).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&key), "{err}");
    assert_eq!(
        proxy.connections() - before,
        3,
        "exactly max_attempts attempts"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let (proxy, store) = through_proxy(2, Duration::from_millis(500)).await;
    let key = format!("{}obj", unique_prefix("faults-hang"));
    proxy.plan(&[], Fault::Hang);
    let started = Instant::now();
    let err = store.get(&key, GetOptions::default()).await.unwrap_err();
    assert!(matches!(err, StoreError::Transient { .. }), "{err}");
    // Two attempts of half a second each and a backoff, not an hour.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
