//! A local directory as an object store: the embedded default, for hosts and
//! tests with no S3, and the second implementation that keeps the
//! [`ObjectStore`] seam honest.
//!
//! Layout under the store directory `DIR`:
//! - `DIR/{bucket}/{key}`: each object as a plain file (see [`keys`]), its ETag,
//!   content type and user metadata in the extended attribute
//!   `user.sessionfs.object`, so data and metadata change in one atomic rename.
//!   A file put there by hand (no attribute) is served with an ETag made from
//!   its inode, size and mtime.
//! - `DIR/.sessionfs/{bucket}/tmp`: writes in progress (same filesystem, so the
//!   final rename is atomic); leftovers of a crash are swept at open.
//! - `DIR/.sessionfs/{bucket}/uploads/{id}`: multipart uploads and their parts.
//! - `DIR/.sessionfs/{bucket}/locks`: striped `flock` files. A conditional write
//!   checks the current ETag and renames while holding its key's lock, so of two
//!   processes racing with the same `If-Match` exactly one wins.
//!
//! All file I/O runs on tokio's blocking pool.

mod durable;
mod keys;
mod list;
mod multipart;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use xattr::FileExt as _;

use super::{
    validate_metadata, CompletedPart, CopySource, DeleteOutcome, GetOptions, GetResult, GetStream,
    ListPage, ListRequest, ObjectMeta, ObjectStore, Precondition, PutOptions, PutResult, Result,
    StoreError,
};
use durable::{create_dirs_durably, prune_empty_dirs, TempFile};
use keys::key_path;

const XATTR_NAME: &str = "user.sessionfs.object";
/// Lock stripes: enough that unrelated keys rarely wait on each other, few
/// enough that the lock files never need cleaning up.
const LOCK_STRIPES: u64 = 64;
/// Temporary files older than this are leftovers of a crashed writer.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);
/// Chunk size of streamed reads.
const STREAM_CHUNK: usize = 256 * 1024;

/// What the extended attribute of an object holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ObjectRecord {
    etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

/// The local-directory object store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `DIR/{bucket}`: where objects live.
    root: PathBuf,
    tmp: PathBuf,
    uploads: PathBuf,
    locks: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) bucket `bucket` in the store directory `dir`.
    pub fn open(dir: impl AsRef<Path>, bucket: &str) -> Result<LocalStore> {
        super::config::validate_bucket(bucket)?;
        let dir = dir.as_ref();
        let internal = dir.join(".sessionfs").join(bucket);
        let inner = Inner {
            root: dir.join(bucket),
            tmp: internal.join("tmp"),
            uploads: internal.join("uploads"),
            locks: internal.join("locks"),
        };
        let cfg_err = |what: &str, path: &Path, e: io::Error| {
            StoreError::Config(format!(
                "store directory {}: cannot {what} {}: {e}",
                dir.display(),
                path.display()
            ))
        };
        for d in [&inner.root, &inner.tmp, &inner.uploads, &inner.locks] {
            fs::create_dir_all(d).map_err(|e| cfg_err("create", d, e))?;
        }
        // Refuse a filesystem without user xattrs now, not at the first write.
        let probe = TempFile::create(&inner.tmp).map_err(|e| cfg_err("write in", &inner.tmp, e))?;
        probe.file().set_xattr(XATTR_NAME, b"{}").map_err(|e| {
            StoreError::Config(format!(
                "store directory {} does not support user extended attributes, which hold ETags and metadata: {e}",
                dir.display()
            ))
        })?;
        drop(probe);
        inner.sweep_stale_temps();
        Ok(LocalStore {
            inner: Arc::new(inner),
        })
    }

    /// The directory holding this bucket's objects.
    pub fn bucket_dir(&self) -> &Path {
        &self.inner.root
    }

    /// Runs blocking file work off the async runtime.
    async fn blocking<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Other {
                op,
                key: key.to_owned(),
                message: format!("local store worker failed: {e}"),
            })?
    }
}

impl Inner {
    /// Removes what crashed writers left: temporary files, and multipart
    /// uploads nobody touched for [`STALE_TEMP_AGE`] (as an S3 lifecycle
    /// rule aborts incomplete uploads).
    fn sweep_stale_temps(&self) {
        let stale = |path: &Path| {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP_AGE)
        };
        for entry in fs::read_dir(&self.tmp).into_iter().flatten().flatten() {
            if stale(&entry.path()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        for entry in fs::read_dir(&self.uploads).into_iter().flatten().flatten() {
            // An upload is touched with each part it receives.
            let dir = entry.path();
            let parts = fs::read_dir(&dir).into_iter().flatten().flatten();
            if stale(&dir) && parts.map(|p| p.path()).all(|p| stale(&p)) {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }

    /// Takes the lock stripe of `key`; released when the returned file is dropped.
    fn lock_key(&self, key: &str) -> io::Result<File> {
        // FNV-1a: stable across processes, unlike std's randomly seeded hasher.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let path = self.locks.join(format!("{:02x}.lock", hash % LOCK_STRIPES));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        file.lock()?;
        Ok(file)
    }

    /// Opens the object file of `key` and reads its metadata, as one snapshot:
    /// later renames over the key do not affect the open file.
    fn open_object(&self, op: &'static str, key: &str) -> Result<(File, ObjectMeta)> {
        let path = key_path(&self.root, key)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if is_absent(&e) => return Err(StoreError::not_found(op, key)),
            Err(e) => return Err(StoreError::io(op, key, e)),
        };
        let md = file.metadata().map_err(|e| StoreError::io(op, key, e))?;
        if !md.is_file() {
            return Err(StoreError::not_found(op, key));
        }
        let record = read_record(&file, &md);
        let meta = ObjectMeta {
            key: key.to_owned(),
            size: md.len(),
            etag: record.etag,
            last_modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            content_type: record.content_type,
            metadata: record.metadata,
        };
        Ok((file, meta))
    }

    /// The ETag now stored at `path`, `None` when there is no object.
    fn current_etag(&self, op: &'static str, key: &str, path: &Path) -> Result<Option<String>> {
        match File::open(path) {
            Ok(file) => {
                let md = file.metadata().map_err(|e| StoreError::io(op, key, e))?;
                Ok(md.is_file().then(|| read_record(&file, &md).etag))
            }
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(StoreError::io(op, key, e)),
        }
    }

    /// Writes `record` onto a finished temporary file and moves it to `key`
    /// if `precondition` holds at that instant. Returns the new ETag.
    fn commit(
        &self,
        op: &'static str,
        key: &str,
        temp: TempFile,
        record: &ObjectRecord,
        precondition: &Precondition,
    ) -> Result<String> {
        let path = key_path(&self.root, key)?;
        let io_err = |e| StoreError::io(op, key, e);
        // The slow part, flushing the data, happens before the lock is taken.
        stamp(op, key, &temp, record)?;

        let _lock = self.lock_key(key).map_err(io_err)?;
        let current = self.current_etag(op, key, &path)?;
        let holds = match precondition {
            Precondition::None => true,
            Precondition::IfMatch(expected) => current.as_deref() == Some(expected.as_str()),
            Precondition::IfNoneMatch => current.is_none(),
        };
        if !holds {
            return Err(StoreError::precondition(op, key));
        }
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        // A concurrent delete may prune the directory between its creation and
        // the rename; create it again then.
        let mut temp = temp;
        let mut attempts = 0;
        loop {
            create_dirs_durably(&self.root, &parent).map_err(|e| self.path_error(op, key, e))?;
            match temp.rename_into(&path) {
                Ok(()) => return Ok(record.etag.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 8 => attempts += 1,
                Err(e) => return Err(self.path_error(op, key, e)),
            }
        }
    }

    /// Explains the two ways a key can collide with the layout.
    fn path_error(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
        match e.kind() {
            io::ErrorKind::NotADirectory => StoreError::InvalidKey {
                key: key.to_owned(),
                reason: "a prefix of this key is an object (the local store keeps keys as paths)"
                    .to_owned(),
            },
            io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty => {
                StoreError::InvalidKey {
                    key: key.to_owned(),
                    reason: "this key is a prefix of other objects (the local store keeps keys as paths)"
                        .to_owned(),
                }
            }
            _ => StoreError::io(op, key, e),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        const OP: &str = "delete";
        let path = key_path(&self.root, key)?;
        let _lock = self.lock_key(key).map_err(|e| StoreError::io(OP, key, e))?;
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => {}
            Ok(_) => return Ok(()),
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(StoreError::io(OP, key, e)),
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(StoreError::io(OP, key, e)),
        }
        durable::sync_parent(&path).map_err(|e| StoreError::io(OP, key, e))?;
        if let Some(parent) = path.parent() {
            prune_empty_dirs(&self.root, parent);
        }
        Ok(())
    }
}

/// Attaches `record` to a finished temporary file and flushes it to disk.
fn stamp(op: &'static str, key: &str, temp: &TempFile, record: &ObjectRecord) -> Result<()> {
    let encoded = serde_json::to_vec(record).map_err(|e| StoreError::Other {
        op,
        key: key.to_owned(),
        message: e.to_string(),
    })?;
    let io_err = |e| StoreError::io(op, key, e);
    temp.file()
        .set_xattr(XATTR_NAME, &encoded)
        .map_err(io_err)?;
    temp.sync().map_err(io_err)
}

/// Reads the record of an object; a file without one (put there by hand) gets
/// an ETag that changes whenever the file is replaced or modified.
fn read_record(file: &File, md: &fs::Metadata) -> ObjectRecord {
    if let Ok(Some(raw)) = file.get_xattr(XATTR_NAME) {
        match serde_json::from_slice::<ObjectRecord>(&raw) {
            Ok(record) if !record.etag.is_empty() => return record,
            Ok(_) => {}
            Err(e) => tracing::warn!("ignoring unreadable object record: {e}"),
        }
    }
    ObjectRecord {
        etag: format!(
            "\"f{:x}-{:x}-{:x}.{:x}\"",
            md.ino(),
            md.size(),
            md.mtime(),
            md.mtime_nsec()
        ),
        ..ObjectRecord::default()
    }
}

/// A fresh ETag, quoted like S3's.
fn new_etag(parts: Option<usize>) -> String {
    let id = rand::random::<u128>();
    match parts {
        Some(n) => format!("\"{id:032x}-{n}\""),
        None => format!("\"{id:032x}\""),
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn check_if_match(
    op: &'static str,
    key: &str,
    meta: &ObjectMeta,
    if_match: Option<&str>,
) -> Result<()> {
    match if_match {
        Some(etag) if etag != meta.etag => Err(StoreError::precondition(op, key)),
        _ => Ok(()),
    }
}

/// The part of an open object a read asks for.
fn resolve_read(
    op: &'static str,
    key: &str,
    meta: &ObjectMeta,
    opts: &GetOptions,
) -> Result<std::ops::Range<u64>> {
    check_if_match(op, key, meta, opts.if_match.as_deref())?;
    match &opts.range {
        None => Ok(0..meta.size),
        Some(range) => range
            .resolve(meta.size)
            .ok_or_else(|| StoreError::invalid_range(op, key, range, Some(meta.size))),
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.inner.root.display())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let k = key.to_owned();
        self.blocking("head", key, move |s| Ok(s.open_object("head", &k)?.1))
            .await
    }

    async fn get(&self, key: &str, opts: GetOptions) -> Result<GetResult> {
        const OP: &str = "get";
        if let Some(range) = opts.range.filter(|r| r.is_degenerate()) {
            return Err(StoreError::invalid_range(OP, key, &range, None));
        }
        let k = key.to_owned();
        self.blocking(OP, key, move |s| {
            let (file, meta) = s.open_object(OP, &k)?;
            let range = resolve_read(OP, &k, &meta, &opts)?;
            let len = usize::try_from(range.end - range.start).map_err(|_| {
                StoreError::InvalidArgument {
                    op: OP,
                    key: k.clone(),
                    message: "range too large to buffer; use get_stream".to_owned(),
                }
            })?;
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| StoreError::io(OP, &k, e))?;
            Ok(GetResult {
                meta,
                range,
                body: Bytes::from(buf),
            })
        })
        .await
    }

    async fn get_stream(&self, key: &str, opts: GetOptions) -> Result<GetStream> {
        const OP: &str = "get";
        if let Some(range) = opts.range.filter(|r| r.is_degenerate()) {
            return Err(StoreError::invalid_range(OP, key, &range, None));
        }
        let k = key.to_owned();
        let (file, meta, range) = self
            .blocking(OP, key, move |s| {
                let (file, meta) = s.open_object(OP, &k)?;
                let range = resolve_read(OP, &k, &meta, &opts)?;
                Ok((file, meta, range))
            })
            .await?;
        let mut file = tokio::fs::File::from_std(file);
        file.seek(io::SeekFrom::Start(range.start))
            .await
            .map_err(|e| StoreError::io(OP, key, e))?;
        let reader = file.take(range.end - range.start);
        let err_key = key.to_owned();
        let body = tokio_util::io::ReaderStream::with_capacity(reader, STREAM_CHUNK)
            .map(move |chunk| chunk.map_err(|e| StoreError::io(OP, &err_key, e)))
            .boxed();
        Ok(GetStream { meta, range, body })
    }

    async fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> Result<PutResult> {
        const OP: &str = "put";
        validate_metadata(key, &opts.metadata)?;
        let k = key.to_owned();
        self.blocking(OP, key, move |s| {
            key_path(&s.root, &k)?;
            let mut temp = TempFile::create(&s.tmp).map_err(|e| StoreError::io(OP, &k, e))?;
            temp.write_all(&body)
                .map_err(|e| StoreError::io(OP, &k, e))?;
            let record = ObjectRecord {
                etag: new_etag(None),
                content_type: opts.content_type,
                metadata: opts.metadata,
            };
            let etag = s.commit(OP, &k, temp, &record, &opts.precondition)?;
            Ok(PutResult { etag })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let k = key.to_owned();
        self.blocking("delete", key, move |s| s.delete(&k)).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<DeleteOutcome>> {
        let keys = keys.to_vec();
        self.blocking("delete_many", "", move |s| {
            Ok(keys
                .into_iter()
                .map(|key| {
                    let error = s.delete(&key).err();
                    DeleteOutcome { key, error }
                })
                .collect())
        })
        .await
    }

    async fn list(&self, req: ListRequest) -> Result<ListPage> {
        let prefix = req.prefix.clone();
        self.blocking("list", &prefix, move |s| list::list(&s.root, &req))
            .await
    }

    async fn list_all(&self, prefix: &str, delimiter: Option<&str>) -> Result<ListPage> {
        let (p, d) = (prefix.to_owned(), delimiter.map(str::to_owned));
        self.blocking("list", prefix, move |s| {
            list::list_whole(&s.root, &p, d.as_deref())
        })
        .await
    }

    async fn create_multipart(&self, key: &str, opts: PutOptions) -> Result<String> {
        validate_metadata(key, &opts.metadata)?;
        let k = key.to_owned();
        self.blocking("create_multipart", key, move |s| {
            multipart::create(s, &k, opts)
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let (k, id) = (key.to_owned(), upload_id.to_owned());
        self.blocking("upload_part", key, move |s| {
            multipart::upload_part(s, &k, &id, part_number, &body)
        })
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource,
    ) -> Result<CompletedPart> {
        let (k, id) = (key.to_owned(), upload_id.to_owned());
        self.blocking("upload_part_copy", key, move |s| {
            multipart::upload_part_copy(s, &k, &id, part_number, &source)
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        precondition: Precondition,
    ) -> Result<PutResult> {
        let (k, id, parts) = (key.to_owned(), upload_id.to_owned(), parts.to_vec());
        self.blocking("complete_multipart", key, move |s| {
            multipart::complete(s, &k, &id, &parts, &precondition)
        })
        .await
    }

    async fn list_multipart(&self, key: &str) -> Result<Vec<crate::store::PendingUpload>> {
        let k = key.to_owned();
        self.blocking("list_multipart", key, move |s| multipart::list(s, &k))
            .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        let (k, id) = (key.to_owned(), upload_id.to_owned());
        self.blocking("abort_multipart", key, move |s| {
            multipart::abort(s, &k, &id)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_put_by_hand_is_served_with_a_changing_etag() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "sessions").unwrap();
        let path = store.bucket_dir().join("hand/session.tar.gz");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"one").unwrap();
        let first = store.head("hand/session.tar.gz").await.unwrap();
        assert_eq!(first.size, 3);
        let tmp = path.with_extension("new");
        fs::write(&tmp, b"two!").unwrap();
        fs::rename(&tmp, &path).unwrap();
        let second = store.head("hand/session.tar.gz").await.unwrap();
        assert_ne!(first.etag, second.etag);
    }

    #[tokio::test]
    async fn keys_that_collide_with_the_layout_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "sessions").unwrap();
        store
            .put("a", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        let err = store
            .put("a/b", Bytes::from_static(b"y"), PutOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
        store
            .put("c/d", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        let err = store
            .put("c", Bytes::from_static(b"y"), PutOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
        // Nothing half-written is left behind.
        assert_eq!(fs::read_dir(&store.inner.tmp).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn deleting_the_last_key_of_a_prefix_prunes_its_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "sessions").unwrap();
        store
            .put("x/y/z", Bytes::from_static(b"1"), PutOptions::default())
            .await
            .unwrap();
        store.delete("x/y/z").await.unwrap();
        assert!(!store.bucket_dir().join("x").exists());
        // And the key can become an object now that the prefix is gone.
        store
            .put("x", Bytes::from_static(b"2"), PutOptions::default())
            .await
            .unwrap();
    }

    #[test]
    fn bad_bucket_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LocalStore::open(dir.path(), "../evil").is_err());
        assert!(LocalStore::open(dir.path(), "").is_err());
    }
}
