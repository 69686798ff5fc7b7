//! One contender in a cross-process race on the local store: waits until an
//! agreed instant, then puts its payload under `If-Match`, and prints `won` or
//! `lost`. Spawned several at a time by `tests/local_store_processes.rs`.
//!
//! usage: store-racer STORE_DIR KEY ETAG PAYLOAD START_AT_UNIX_MS

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sessionfs_core::store::local::LocalStore;
use sessionfs_core::store::{ObjectStore, Precondition, PutOptions, StoreError};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, key, etag, payload, start_at] = args.as_slice() else {
        eprintln!("usage: store-racer STORE_DIR KEY ETAG PAYLOAD START_AT_UNIX_MS");
        std::process::exit(2);
    };
    let store = LocalStore::open(dir, "sessions").expect("open store");
    let start_at = Duration::from_millis(start_at.parse().expect("start time"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    if let Some(wait) = start_at.checked_sub(now) {
        std::thread::sleep(wait);
    }
    let opts = PutOptions {
        precondition: Precondition::IfMatch(etag.clone()),
        ..PutOptions::default()
    };
    match store.put(key, Bytes::from(payload.clone()), opts).await {
        Ok(put) => println!("won {}", put.etag),
        Err(StoreError::PreconditionFailed { .. }) => println!("lost"),
        Err(e) => {
            eprintln!("racer failed: {e}");
            std::process::exit(1);
        }
    }
}
