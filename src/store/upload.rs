//! Putting a local file into the store as one object: one PUT up to
//! [`MULTIPART_THRESHOLD`], a multipart upload above it (aborted if any part
//! fails, so no half object is ever visible). Used by `push` and by the
//! API's upload.

use std::path::Path;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{CompletedPart, ObjectStore, Precondition, PutOptions, Result, StoreError};

/// Objects up to this size go up in one PUT.
pub const MULTIPART_THRESHOLD: u64 = 64 << 20;
const PART_SIZE: u64 = 32 << 20;

/// Uploads the file at `path` as `key`; `progress` is told the bytes sent so
/// far. Returns the new object's ETag.
pub async fn put_file(
    store: &dyn ObjectStore,
    key: &str,
    path: &Path,
    opts: PutOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<String> {
    let io = |e: std::io::Error| StoreError::Io {
        op: "upload",
        key: key.to_owned(),
        source: e,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let size = file.metadata().await.map_err(io)?.len();
    if size <= MULTIPART_THRESHOLD {
        let mut body = Vec::with_capacity(size as usize);
        file.read_to_end(&mut body).await.map_err(io)?;
        let put = store.put(key, Bytes::from(body), opts).await?;
        progress(size);
        return Ok(put.etag);
    }
    let id = store.create_multipart(key, opts).await?;
    let mut parts: Vec<CompletedPart> = Vec::new();
    let mut offset = 0;
    let result = async {
        while offset < size {
            let len = PART_SIZE.min(size - offset);
            let mut buf = vec![0u8; len as usize];
            file.read_exact(&mut buf).await.map_err(io)?;
            let number = parts.len() as u32 + 1;
            parts.push(
                store
                    .upload_part(key, &id, number, Bytes::from(buf))
                    .await?,
            );
            offset += len;
            progress(offset);
        }
        store
            .complete_multipart(key, &id, &parts, Precondition::None)
            .await
    }
    .await;
    match result {
        Ok(done) => Ok(done.etag),
        Err(e) => {
            let _ = store.abort_multipart(key, &id).await;
            Err(e)
        }
    }
}
