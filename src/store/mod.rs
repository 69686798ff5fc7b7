//! Object stores: the one seam where sessionfs touches durable storage.
//!
//! Everything above this module (the tarball reader and writer, the block cache,
//! the mounts, the API) talks to an [`ObjectStore`]: a bucket of immutable objects
//! addressed by key, read whole or by byte range, written whole or in multipart
//! uploads, with conditional writes as the only concurrency primitive. Two real
//! implementations share the trait and one conformance suite:
//!
//! - [`s3::S3Store`] on `aws-sdk-s3`, for AWS S3, MinIO, R2 and the like;
//! - [`local::LocalStore`], a plain directory, the embedded default.
//!
//! The semantics are S3's, made exact where S3 is loose, so that code tested
//! against the local store behaves the same on S3:
//! - ETags are opaque strings, quoted as the store returns them; pass them back
//!   verbatim. A multipart ETag (`"…-N"`) is not an MD5 of anything.
//! - Any byte range of an empty object, a range starting at or past the end, an
//!   empty bounded range and a zero suffix are [`StoreError::InvalidRange`]; a
//!   range running past the end is clipped; a suffix longer than the object
//!   returns the whole object.
//! - User metadata keys are lower-cased ASCII (`[a-z0-9_-]`), values printable
//!   ASCII, as S3 transports them in headers.
//! - Multipart parts other than the last are at least [`MIN_PART_SIZE`]; part
//!   numbers run from 1 to [`MAX_PARTS`].
//! - Deleting a missing key succeeds.

pub mod cached;
pub mod config;
pub mod deadline;
pub mod error;
pub mod local;
pub mod metered;
pub mod s3;
pub mod upload;

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use config::{StoreConfig, StoreKind};
pub use error::{Result, StoreError};

/// Smallest size of a multipart part that is not the last (S3's rule).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest number of parts in one multipart upload (S3's rule).
pub const MAX_PARTS: u32 = 10_000;
/// Most keys one `list` call returns (S3's page size).
pub const MAX_LIST_KEYS: usize = 1000;
/// Most keys one `delete_many` request carries (S3's limit); larger calls are split.
pub const MAX_DELETE_KEYS: usize = 1000;

/// A byte range of an object, as a reader asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..end` (end exclusive).
    Bounded { start: u64, end: u64 },
    /// Bytes from `start` to the end of the object.
    From(u64),
    /// The last `n` bytes (`Range: bytes=-n`).
    Suffix(u64),
}

impl ByteRange {
    /// The bytes this range selects in an object of `size` bytes, or `None` when
    /// the range is not satisfiable (see the module documentation).
    pub fn resolve(&self, size: u64) -> Option<Range<u64>> {
        if size == 0 {
            return None;
        }
        match *self {
            ByteRange::Bounded { start, end } => {
                (end > start && start < size).then(|| start..end.min(size))
            }
            ByteRange::From(start) => (start < size).then_some(start..size),
            ByteRange::Suffix(n) => (n > 0).then(|| size.saturating_sub(n)..size),
        }
    }

    /// The HTTP `Range` header value, e.g. `bytes=0-99`.
    pub fn to_header(&self) -> String {
        match *self {
            ByteRange::Bounded { start, end } => {
                format!("bytes={}-{}", start, end.saturating_sub(1))
            }
            ByteRange::From(start) => format!("bytes={start}-"),
            ByteRange::Suffix(n) => format!("bytes=-{n}"),
        }
    }

    /// An empty bounded range or a zero suffix can never be satisfied, whatever
    /// the object; S3 would not even express them, so they are refused up front.
    pub(crate) fn is_degenerate(&self) -> bool {
        match *self {
            ByteRange::Bounded { start, end } => end <= start,
            ByteRange::From(_) => false,
            ByteRange::Suffix(n) => n == 0,
        }
    }
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_header())
    }
}

/// What a HEAD (or the head of a GET) says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    /// Size of the whole object, whatever range was read.
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    pub content_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// A version known from its TOC rather than from the store (the local
    /// index, a cache): key, ETag and size, nothing else.
    pub fn known(key: &str, etag: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.to_owned(),
            size,
            etag: etag.to_owned(),
            last_modified: std::time::UNIX_EPOCH,
            content_type: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// One object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectSummary {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
}

/// How to read an object.
#[derive(Clone, Debug, Default)]
pub struct GetOptions {
    /// `None` reads the whole object.
    pub range: Option<ByteRange>,
    /// Fail with [`StoreError::PreconditionFailed`] unless the object still has this
    /// ETag: a reader that pinned a version never mixes bytes of two versions.
    pub if_match: Option<String>,
    /// The size of the `if_match` version, when the caller knows it (its TOC
    /// says so): a cache in front of the store can then answer from its
    /// blocks without asking the store, also for a version the store no
    /// longer holds or while the store is unreachable. Stores ignore it.
    pub size: Option<u64>,
    /// Bytes the caller keeps elsewhere once read (a TOC goes to the local
    /// index): a cache in front of the store passes the read through
    /// instead of keeping the blocks around them. Stores ignore it.
    pub once: bool,
}

impl GetOptions {
    pub fn range(range: ByteRange) -> Self {
        GetOptions {
            range: Some(range),
            ..GetOptions::default()
        }
    }

    pub fn once(mut self) -> Self {
        self.once = true;
        self
    }

    pub fn if_match(mut self, etag: impl Into<String>) -> Self {
        self.if_match = Some(etag.into());
        self
    }

    pub fn of_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }
}

/// A read, buffered.
#[derive(Clone, Debug)]
pub struct GetResult {
    pub meta: ObjectMeta,
    /// The bytes of the object that `body` holds.
    pub range: Range<u64>,
    pub body: Bytes,
}

/// A read, streamed: `body` yields the bytes of `range` in order.
pub struct GetStream {
    pub meta: ObjectMeta,
    pub range: Range<u64>,
    pub body: BoxStream<'static, Result<Bytes>>,
}

impl std::fmt::Debug for GetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetStream")
            .field("meta", &self.meta)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// The condition a write is made under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Precondition {
    #[default]
    None,
    /// Only replace the object if it still has this ETag.
    IfMatch(String),
    /// Only create the object if no object has this key (`If-None-Match: *`).
    IfNoneMatch,
}

/// How to write an object (also used to create a multipart upload, whose
/// precondition is given again when it is completed).
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    pub precondition: Precondition,
    pub content_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// What a completed write left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    pub etag: String,
}

/// One request of a listing.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub prefix: String,
    /// Keys containing the delimiter after the prefix are rolled up into common prefixes.
    pub delimiter: Option<String>,
    /// The `next` token of the previous page.
    pub continuation: Option<String>,
    /// At most this many keys and common prefixes together; 0 or more than
    /// [`MAX_LIST_KEYS`] means [`MAX_LIST_KEYS`].
    pub max_keys: usize,
}

/// One page of a listing, keys in UTF-8 byte order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectSummary>,
    pub common_prefixes: Vec<String>,
    /// Pass as `continuation` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// The result of deleting one key in a `delete_many`.
#[derive(Debug)]
pub struct DeleteOutcome {
    pub key: String,
    pub error: Option<StoreError>,
}

/// A part of a multipart upload, as `complete_multipart` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    pub part_number: u32,
    pub etag: String,
}

/// A multipart upload started and neither completed nor aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: SystemTime,
}

/// Where an `upload_part_copy` takes its bytes from.
#[derive(Clone, Debug)]
pub struct CopySource {
    pub key: String,
    /// Bytes `start..end` of the source (end exclusive).
    pub range: Range<u64>,
    /// Fail with [`StoreError::PreconditionFailed`] unless the source still has this ETag.
    pub if_match: Option<String>,
}

/// A bucket of objects. See the module documentation for the exact semantics
/// every implementation keeps.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// A short description for logs and error messages, e.g. `s3://sessions` or `local:/var/lib/…`.
    fn describe(&self) -> String;

    async fn head(&self, key: &str) -> Result<ObjectMeta>;

    /// Reads the object (or a range of it) into memory.
    async fn get(&self, key: &str, opts: GetOptions) -> Result<GetResult>;

    /// Reads the object (or a range of it) as a stream of chunks.
    async fn get_stream(&self, key: &str, opts: GetOptions) -> Result<GetStream>;

    async fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> Result<PutResult>;

    /// Deletes the object; deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Deletes many objects, reporting each key's outcome. Fails as a whole only
    /// when no key could be attempted (bad credentials, store unreachable).
    async fn delete_many(&self, keys: &[String]) -> Result<Vec<DeleteOutcome>>;

    async fn list(&self, req: ListRequest) -> Result<ListPage>;

    /// Starts a multipart upload; returns its upload id.
    async fn create_multipart(&self, key: &str, opts: PutOptions) -> Result<String>;

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart>;

    /// Makes a part of bytes of an existing object, without moving them through this host.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource,
    ) -> Result<CompletedPart>;

    /// Assembles the parts (in ascending part number) into the object, under `precondition`.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        precondition: Precondition,
    ) -> Result<PutResult>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()>;

    /// The multipart uploads of `key` in progress (started, neither
    /// completed nor aborted): what a crash may have left behind.
    async fn list_multipart(&self, key: &str) -> Result<Vec<PendingUpload>>;

    /// Every key under `prefix` (and, with a delimiter, every common prefix),
    /// following continuation tokens to the end.
    async fn list_all(&self, prefix: &str, delimiter: Option<&str>) -> Result<ListPage> {
        let mut all = ListPage::default();
        let mut continuation = None;
        loop {
            let page = self
                .list(ListRequest {
                    prefix: prefix.to_owned(),
                    delimiter: delimiter.map(str::to_owned),
                    continuation,
                    max_keys: MAX_LIST_KEYS,
                })
                .await?;
            all.objects.extend(page.objects);
            all.common_prefixes.extend(page.common_prefixes);
            match page.next {
                Some(next) => continuation = Some(next),
                None => return Ok(all),
            }
        }
    }
}

/// Checks user metadata the way S3 transports it (HTTP headers), so the local
/// store refuses what S3 would mangle and both stores return the same map.
pub(crate) fn validate_metadata(key: &str, metadata: &BTreeMap<String, String>) -> Result<()> {
    for (name, value) in metadata {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(StoreError::InvalidArgument {
                op: "put",
                key: key.to_owned(),
                message: format!(
                    "metadata name {name:?} must be non-empty lower-case ASCII letters, digits, '-' or '_'"
                ),
            });
        }
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(StoreError::InvalidArgument {
                op: "put",
                key: key.to_owned(),
                message: format!("metadata value of {name:?} must be printable ASCII"),
            });
        }
    }
    Ok(())
}

/// Checks a part number against S3's bounds.
pub(crate) fn validate_part_number(op: &'static str, key: &str, part_number: u32) -> Result<()> {
    if (1..=MAX_PARTS).contains(&part_number) {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument {
            op,
            key: key.to_owned(),
            message: format!("part number {part_number} is outside 1..={MAX_PARTS}"),
        })
    }
}

/// Checks the part list of a completion the same way for both stores.
pub(crate) fn validate_completion(
    op: &'static str,
    key: &str,
    parts: &[CompletedPart],
) -> Result<()> {
    let invalid = |message: &str| StoreError::InvalidPart {
        op,
        key: key.to_owned(),
        message: message.to_owned(),
    };
    if parts.is_empty() {
        return Err(invalid("no parts named"));
    }
    if parts
        .windows(2)
        .any(|w| w[0].part_number >= w[1].part_number)
    {
        return Err(invalid("parts must be named in ascending order"));
    }
    for part in parts {
        validate_part_number(op, key, part.part_number)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_like_s3() {
        let b = |start, end| ByteRange::Bounded { start, end };
        assert_eq!(b(0, 10).resolve(100), Some(0..10));
        assert_eq!(b(90, 200).resolve(100), Some(90..100));
        assert_eq!(b(100, 200).resolve(100), None);
        assert_eq!(b(5, 5).resolve(100), None);
        assert_eq!(ByteRange::From(99).resolve(100), Some(99..100));
        assert_eq!(ByteRange::From(100).resolve(100), None);
        assert_eq!(ByteRange::Suffix(10).resolve(100), Some(90..100));
        assert_eq!(ByteRange::Suffix(1000).resolve(100), Some(0..100));
        assert_eq!(ByteRange::Suffix(0).resolve(100), None);
        assert_eq!(ByteRange::From(0).resolve(0), None);
        assert_eq!(ByteRange::Suffix(5).resolve(0), None);
    }

    #[test]
    fn range_headers() {
        assert_eq!(
            ByteRange::Bounded { start: 0, end: 10 }.to_header(),
            "bytes=0-9"
        );
        assert_eq!(ByteRange::From(7).to_header(), "bytes=7-");
        assert_eq!(ByteRange::Suffix(64).to_header(), "bytes=-64");
    }

    #[test]
    fn metadata_rules() {
        let mut m = BTreeMap::new();
        m.insert("sha256".to_owned(), "abc".to_owned());
        assert!(validate_metadata("k", &m).is_ok());
        m.insert("Upper".to_owned(), "x".to_owned());
        assert!(validate_metadata("k", &m).is_err());
        let mut m = BTreeMap::new();
        m.insert("v".to_owned(), "é".to_owned());
        assert!(validate_metadata("k", &m).is_err());
    }
}
