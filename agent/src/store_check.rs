//! `sessionfs store check`: proves the configured store works end to end
//! (credentials, bucket, a conditional put/get/delete round trip) and says
//! plainly which step failed and what to do about it.

use std::time::Instant;

use anyhow::{bail, Result};
use bytes::Bytes;
use sessionfs_core::store::{
    GetOptions, ListRequest, ObjectStore, Precondition, PutOptions, StoreConfig, StoreError,
};

pub async fn run(config: &StoreConfig) -> Result<()> {
    let store = match config.open().await {
        Ok(store) => store,
        Err(e) => bail!("store check failed opening the store: {e}{}", advice(&e)),
    };
    println!("store: {}", store.describe());
    match check(store.as_ref()).await {
        Ok(()) => {
            println!("store check passed");
            Ok(())
        }
        Err((step, e)) => bail!("store check failed at {step}: {e}{}", advice(&e)),
    }
}

async fn check(store: &dyn ObjectStore) -> Result<(), (&'static str, StoreError)> {
    let key = format!(".sessionfs-check/{:016x}", rand::random::<u64>());
    let payload = Bytes::from(format!("sessionfs store check {key}"));
    let step = |name: &'static str, started: Instant| {
        println!("  {name:<28} ok ({} ms)", started.elapsed().as_millis());
    };

    let t = Instant::now();
    store
        .list(ListRequest {
            prefix: ".sessionfs-check/".to_owned(),
            max_keys: 1,
            ..ListRequest::default()
        })
        .await
        .map_err(|e| ("listing the bucket", e))?;
    step("list bucket", t);

    let t = Instant::now();
    let put = store
        .put(
            &key,
            payload.clone(),
            PutOptions {
                precondition: Precondition::IfNoneMatch,
                ..PutOptions::default()
            },
        )
        .await
        .map_err(|e| ("writing a test object", e))?;
    step("put (If-None-Match)", t);

    let outcome = async {
        let t = Instant::now();
        let got = store
            .get(&key, GetOptions::default().if_match(put.etag.clone()))
            .await
            .map_err(|e| ("reading the test object back", e))?;
        if got.body != payload {
            return Err((
                "reading the test object back",
                StoreError::Other {
                    op: "get",
                    key: key.clone(),
                    message: "the bytes read differ from the bytes written".to_owned(),
                },
            ));
        }
        step("get (content matches)", t);

        let t = Instant::now();
        let stale = store
            .put(
                &key,
                payload.clone(),
                PutOptions {
                    precondition: Precondition::IfMatch("\"not-the-etag\"".to_owned()),
                    ..PutOptions::default()
                },
            )
            .await;
        match stale {
            Err(StoreError::PreconditionFailed { .. }) => step("conditional put refused", t),
            Ok(_) => {
                return Err((
                    "checking conditional writes",
                    StoreError::Other {
                        op: "put",
                        key: key.clone(),
                        message: "a put with a stale If-Match succeeded: this store does not enforce conditional writes, so concurrent write-backs could lose updates".to_owned(),
                    },
                ))
            }
            Err(e) => return Err(("checking conditional writes", e)),
        }
        Ok(())
    }
    .await;

    let t = Instant::now();
    let deleted = store
        .delete(&key)
        .await
        .map_err(|e| ("deleting the test object", e));
    outcome?;
    deleted?;
    match store.head(&key).await {
        Err(StoreError::NotFound { .. }) => step("delete", t),
        Ok(_) => {
            return Err((
                "deleting the test object",
                StoreError::Other {
                    op: "delete",
                    key,
                    message: "the object is still there after delete".to_owned(),
                },
            ))
        }
        Err(e) => return Err(("deleting the test object", e)),
    }
    Ok(())
}

/// What to do next, for the errors a person can fix.
fn advice(e: &StoreError) -> &'static str {
    match e {
        StoreError::CredentialsRejected { .. } => {
            "\nhint: the access key or secret is wrong for this endpoint"
        }
        StoreError::BucketNotFound { .. } => {
            "\nhint: create the bucket, or point MINIO_BUCKET / --bucket at an existing one"
        }
        StoreError::Transient { .. } => {
            "\nhint: is the S3 endpoint right and the server up? (MINIO_ENDPOINT, MINIO_PORT, MINIO_USE_SSL or --s3-endpoint)"
        }
        StoreError::PermissionDenied { .. } => {
            "\nhint: the credentials work but may not read, write and delete in this bucket"
        }
        _ => "",
    }
}
