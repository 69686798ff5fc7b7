//! S3 (and MinIO, R2, SeaweedFS…) as an object store, on `aws-sdk-s3`.
//!
//! The SDK does the transport: SigV4, jittered exponential backoff on 5xx,
//! throttling and dropped connections (standard retry mode), connect and read
//! timeouts. This module adds what S3 leaves loose so that both stores behave
//! alike (see the parent module): range results are normalised when a server
//! ignores a `Range` header, a conditional write against a missing key is a
//! precondition failure, metadata names come back lower-cased, and request
//! checksums are only sent when an operation requires them, which keeps
//! S3-compatible servers that do not know the newer checksum headers working.

mod errors;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{CompletedMultipartUpload, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::config::S3Config;
use super::{
    validate_completion, validate_metadata, validate_part_number, ByteRange, CompletedPart,
    CopySource, DeleteOutcome, GetOptions, GetResult, GetStream, ListPage, ListRequest, ObjectMeta,
    ObjectStore, ObjectSummary, Precondition, PutOptions, PutResult, Result, StoreError,
    MAX_DELETE_KEYS, MAX_LIST_KEYS,
};
use errors::{map_sdk_error, missing_credentials, Ctx};

/// The region for a self-hosted endpoint when none is configured: such
/// servers ignore it, and asking the AWS chain would probe EC2's metadata
/// service, which is not there.
const SELF_HOSTED_REGION: &str = "us-east-1";

/// Characters escaped in `x-amz-copy-source`: everything but unreserved ones and `/`.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// One bucket of an S3-compatible server. Cheap to clone.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: String,
    max_attempts: u32,
}

impl S3Store {
    /// Builds the client and resolves credentials; sends no request.
    pub async fn connect(cfg: &S3Config, bucket: &str) -> Result<S3Store> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts.max(1))
                    .with_initial_backoff(std::time::Duration::from_millis(50))
                    .with_max_backoff(std::time::Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .read_timeout(cfg.read_timeout)
                    .build(),
            );
        let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()));
        let region = match (&cfg.region, &cfg.endpoint) {
            (Some(region), _) => Some(region.clone()),
            (None, Some(_)) => Some(env_region.unwrap_or_else(|| SELF_HOSTED_REGION.to_owned())),
            (None, None) => None,
        };
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        match (&cfg.access_key, &cfg.secret_key) {
            (Some(user), Some(password)) => {
                loader = loader.credentials_provider(Credentials::new(
                    user,
                    password,
                    None,
                    None,
                    "MINIO_ROOT_USER",
                ));
            }
            (Some(_), None) => {
                return Err(StoreError::MissingCredentials {
                    hint: "MINIO_ROOT_USER is set but MINIO_ROOT_PASSWORD is not".to_owned(),
                })
            }
            (None, Some(_)) => {
                return Err(StoreError::MissingCredentials {
                    hint: "MINIO_ROOT_PASSWORD is set but MINIO_ROOT_USER is not".to_owned(),
                })
            }
            (None, None) => {}
        }
        let sdk = loader.load().await;

        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| missing_credentials("no credentials provider"))?;
        aws_credential_check(&provider).await?;

        let endpoint = sdk
            .endpoint_url()
            .map(str::to_owned)
            .unwrap_or_else(|| "AWS S3".to_owned());
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if sdk.region().is_none() {
            builder = builder.region(Region::new(SELF_HOSTED_REGION));
        }
        if sdk.endpoint_url().is_some() && cfg.force_path_style {
            builder = builder.force_path_style(true);
        }
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: bucket.to_owned(),
            endpoint,
            max_attempts: cfg.max_attempts.max(1),
        })
    }

    fn ctx<'a>(&'a self, op: &'static str, key: &'a str) -> Ctx<'a> {
        Ctx {
            op,
            key,
            bucket: &self.bucket,
        }
    }

    /// Sends a GET and works out which bytes of the object its body holds.
    async fn get_object(
        &self,
        key: &str,
        opts: &GetOptions,
    ) -> Result<(ObjectMeta, Range<u64>, ByteStream, Option<u64>)> {
        const OP: &str = "get";
        if let Some(range) = opts.range.filter(|r| r.is_degenerate()) {
            return Err(StoreError::invalid_range(OP, key, &range, None));
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(opts.range.map(|r| r.to_header()))
            .set_if_match(opts.if_match.clone())
            .send()
            .await
            .map_err(|e| map_sdk_error(self.ctx(OP, key), e))?;
        let length = non_negative(out.content_length());
        let served = out.content_range().and_then(parse_content_range);
        let (size, range, skip) = match (served, opts.range) {
            (Some((range, total)), _) => (total, range, None),
            // The server sent the whole object: select the range ourselves.
            (None, Some(wanted)) => {
                let range = wanted
                    .resolve(length)
                    .ok_or_else(|| StoreError::invalid_range(OP, key, &wanted, Some(length)))?;
                (length, range.clone(), Some(range.start))
            }
            (None, None) => (length, 0..length, None),
        };
        let meta = ObjectMeta {
            key: key.to_owned(),
            size,
            etag: out.e_tag().unwrap_or_default().to_owned(),
            last_modified: to_system_time(out.last_modified()),
            content_type: out.content_type().map(str::to_owned),
            metadata: lower_case_metadata(out.metadata()),
        };
        Ok((meta, range, out.body, skip))
    }
}

/// Resolves credentials once, so that a host with none fails now with the
/// variables to set instead of at its first request.
async fn aws_credential_check(
    provider: &aws_sdk_s3::config::SharedCredentialsProvider,
) -> Result<()> {
    use aws_sdk_s3::config::ProvideCredentials;
    provider
        .provide_credentials()
        .await
        .map(|_| ())
        .map_err(|e| missing_credentials(&errors::chain(&e)))
}

fn non_negative(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

fn to_system_time(t: Option<&DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn lower_case_metadata(m: Option<&HashMap<String, String>>) -> BTreeMap<String, String> {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// `bytes 10-19/100` → (10..20, 100).
fn parse_content_range(header: &str) -> Option<(Range<u64>, u64)> {
    let rest = header.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let (start, end, total): (u64, u64, u64) =
        (start.parse().ok()?, end.parse().ok()?, total.parse().ok()?);
    (end >= start).then_some((start..end + 1, total))
}

/// A write condition as S3 headers: (If-Match, If-None-Match).
fn condition_headers(p: &Precondition) -> (Option<String>, Option<String>) {
    match p {
        Precondition::None => (None, None),
        Precondition::IfMatch(etag) => (Some(etag.clone()), None),
        Precondition::IfNoneMatch => (None, Some("*".to_owned())),
    }
}

/// S3 answers a conditional write to a missing key with 404; the other store,
/// and the callers, treat every unmet condition alike.
fn conditional_write_error(
    p: &Precondition,
    op: &'static str,
    key: &str,
    e: StoreError,
) -> StoreError {
    match (p, e) {
        (Precondition::IfMatch(_), StoreError::NotFound { .. }) => {
            StoreError::precondition(op, key)
        }
        (_, e) => e,
    }
}

fn byte_stream_error(op: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Transient {
        op,
        key: key.to_owned(),
        message: format!("reading the response body: {e}"),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{} at {}", self.bucket, self.endpoint)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk_error(self.ctx("head", key), e))?;
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: non_negative(out.content_length()),
            etag: out.e_tag().unwrap_or_default().to_owned(),
            last_modified: to_system_time(out.last_modified()),
            content_type: out.content_type().map(str::to_owned),
            metadata: lower_case_metadata(out.metadata()),
        })
    }

    async fn get(&self, key: &str, opts: GetOptions) -> Result<GetResult> {
        // The SDK retries the request, not a body that breaks off midway:
        // read the whole answer again then.
        let mut attempt = 1;
        loop {
            let (meta, range, body, skip) = self.get_object(key, &opts).await?;
            match body.collect().await {
                Ok(data) => {
                    let mut data = data.into_bytes();
                    if let Some(start) = skip {
                        let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
                        let from = usize::try_from(start).unwrap_or(usize::MAX);
                        data = data.slice(from.min(data.len())..(from + len).min(data.len()));
                    }
                    return Ok(GetResult {
                        meta,
                        range,
                        body: data,
                    });
                }
                Err(e) if attempt < self.max_attempts => {
                    tracing::debug!(key, attempt, "GET body broke off, retrying: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(byte_stream_error("get", key, e)),
            }
        }
    }

    async fn get_stream(&self, key: &str, opts: GetOptions) -> Result<GetStream> {
        let (meta, range, body, skip) = self.get_object(key, &opts).await?;
        let err_key = key.to_owned();
        let chunks = futures::stream::try_unfold(body, |mut body| async move {
            Ok(body.try_next().await?.map(|chunk| (chunk, body)))
        })
        .map_err(move |e: aws_sdk_s3::primitives::ByteStreamError| {
            byte_stream_error("get", &err_key, e)
        });
        let body = match skip {
            None => chunks.boxed(),
            Some(start) => window(chunks, start, range.end - range.start).boxed(),
        };
        Ok(GetStream { meta, range, body })
    }

    async fn put(&self, key: &str, body: Bytes, opts: PutOptions) -> Result<PutResult> {
        const OP: &str = "put";
        validate_metadata(key, &opts.metadata)?;
        let (if_match, if_none_match) = condition_headers(&opts.precondition);
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .set_content_type(opts.content_type)
            .set_metadata(Some(opts.metadata.into_iter().collect()))
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .send()
            .await
            .map_err(|e| {
                conditional_write_error(
                    &opts.precondition,
                    OP,
                    key,
                    map_sdk_error(self.ctx(OP, key), e),
                )
            })?;
        Ok(PutResult {
            etag: out.e_tag().unwrap_or_default().to_owned(),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk_error(self.ctx("delete", key), e))
        {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<DeleteOutcome>> {
        const OP: &str = "delete_many";
        let mut outcomes = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_DELETE_KEYS) {
            let objects = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Other {
                    op: OP,
                    key: String::new(),
                    message: e.to_string(),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Other {
                    op: OP,
                    key: String::new(),
                    message: e.to_string(),
                })?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| map_sdk_error(self.ctx(OP, ""), e))?;
            let mut failed: HashMap<&str, StoreError> = HashMap::new();
            for err in out.errors() {
                let Some(key) = err.key() else { continue };
                let code = err.code();
                // A key that was already gone is deleted, as for `delete`.
                if code == Some("NoSuchKey") {
                    continue;
                }
                let status = if code == Some("AccessDenied") {
                    403
                } else {
                    500
                };
                let message = err.message().unwrap_or_default().to_owned();
                if let Some(own) = chunk.iter().find(|k| k.as_str() == key) {
                    failed.insert(
                        own.as_str(),
                        errors::classify(self.ctx(OP, own), status, code, message),
                    );
                }
            }
            for key in chunk {
                outcomes.push(DeleteOutcome {
                    error: failed.remove(key.as_str()),
                    key: key.clone(),
                });
            }
        }
        Ok(outcomes)
    }

    async fn list(&self, req: ListRequest) -> Result<ListPage> {
        let max_keys = match req.max_keys {
            0 => MAX_LIST_KEYS,
            n => n.min(MAX_LIST_KEYS),
        };
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&req.prefix)
            .set_delimiter(req.delimiter.filter(|d| !d.is_empty()))
            .set_continuation_token(req.continuation)
            .max_keys(i32::try_from(max_keys).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| map_sdk_error(self.ctx("list", &req.prefix), e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectSummary {
                    key: o.key()?.to_owned(),
                    size: non_negative(o.size()),
                    etag: o.e_tag().unwrap_or_default().to_owned(),
                    last_modified: to_system_time(o.last_modified()),
                })
            })
            .collect();
        let common_prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_owned))
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            common_prefixes,
            next,
        })
    }

    async fn create_multipart(&self, key: &str, opts: PutOptions) -> Result<String> {
        const OP: &str = "create_multipart";
        validate_metadata(key, &opts.metadata)?;
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_content_type(opts.content_type)
            .set_metadata(Some(opts.metadata.into_iter().collect()))
            .send()
            .await
            .map_err(|e| map_sdk_error(self.ctx(OP, key), e))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Other {
                op: OP,
                key: key.to_owned(),
                message: "the server returned no upload id".to_owned(),
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        const OP: &str = "upload_part";
        validate_part_number(OP, key, part_number)?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number as i32)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| upload_error(map_sdk_error(self.ctx(OP, key), e), upload_id))?;
        Ok(CompletedPart {
            part_number,
            etag: out.e_tag().unwrap_or_default().to_owned(),
        })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource,
    ) -> Result<CompletedPart> {
        const OP: &str = "upload_part_copy";
        validate_part_number(OP, key, part_number)?;
        if source.range.end <= source.range.start {
            let range = ByteRange::Bounded {
                start: source.range.start,
                end: source.range.end,
            };
            return Err(StoreError::invalid_range(OP, &source.key, &range, None));
        }
        let copy_source = format!(
            "{}/{}",
            self.bucket,
            utf8_percent_encode(&source.key, COPY_SOURCE)
        );
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number as i32)
            .copy_source(copy_source)
            .copy_source_range(format!(
                "bytes={}-{}",
                source.range.start,
                source.range.end - 1
            ))
            .set_copy_source_if_match(source.if_match.clone())
            .send()
            .await
            .map_err(|e| match map_sdk_error(self.ctx(OP, key), e) {
                // The source is what is missing (an unknown upload says NoSuchUpload).
                StoreError::NotFound { .. } => StoreError::not_found(OP, &source.key),
                StoreError::PreconditionFailed { .. } => StoreError::precondition(OP, &source.key),
                other => upload_error(other, upload_id),
            })?;
        let etag = out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .unwrap_or_default()
            .to_owned();
        Ok(CompletedPart { part_number, etag })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        precondition: Precondition,
    ) -> Result<PutResult> {
        const OP: &str = "complete_multipart";
        validate_completion(OP, key, parts)?;
        let (if_match, if_none_match) = condition_headers(&precondition);
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        aws_sdk_s3::types::CompletedPart::builder()
                            .part_number(p.part_number as i32)
                            .e_tag(&p.etag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .send()
            .await
            .map_err(|e| {
                let e = upload_error(map_sdk_error(self.ctx(OP, key), e), upload_id);
                conditional_write_error(&precondition, OP, key, e)
            })?;
        Ok(PutResult {
            etag: out.e_tag().unwrap_or_default().to_owned(),
        })
    }

    async fn list_multipart(&self, key: &str) -> Result<Vec<crate::store::PendingUpload>> {
        const OP: &str = "list_multipart";
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(key)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| map_sdk_error(self.ctx(OP, key), e))?;
            for u in page.uploads() {
                if u.key() == Some(key) {
                    out.push(crate::store::PendingUpload {
                        key: key.to_owned(),
                        upload_id: u.upload_id().unwrap_or_default().to_owned(),
                        initiated: to_system_time(u.initiated()),
                    });
                }
            }
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            if page.is_truncated() != Some(true) || next == (key_marker.clone(), id_marker.clone())
            {
                return Ok(out);
            }
            (key_marker, id_marker) = next;
        }
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        const OP: &str = "abort_multipart";
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| upload_error(map_sdk_error(self.ctx(OP, key), e), upload_id))?;
        Ok(())
    }
}

/// Fills in the upload id, which S3's error does not carry.
fn upload_error(e: StoreError, upload_id: &str) -> StoreError {
    match e {
        StoreError::UploadNotFound { op, key, .. } => StoreError::UploadNotFound {
            op,
            key,
            upload_id: upload_id.to_owned(),
        },
        e => e,
    }
}

/// Bytes `start..start + len` of a stream of chunks.
fn window(
    chunks: impl futures::Stream<Item = Result<Bytes>> + Send + 'static,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = Result<Bytes>> + Send + 'static {
    let mut pos = 0u64;
    let end = start + len;
    chunks.try_filter_map(move |chunk: Bytes| {
        let chunk_start = pos;
        pos += chunk.len() as u64;
        let from = start.saturating_sub(chunk_start).min(chunk.len() as u64);
        let to = end.saturating_sub(chunk_start).min(chunk.len() as u64);
        let piece = (to > from).then(|| chunk.slice(from as usize..to as usize));
        futures::future::ready(Ok(piece))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10..20, 100)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("garbage"), None);
    }

    #[tokio::test]
    async fn window_selects_bytes_across_chunks() {
        let chunks = futures::stream::iter(
            ["abc", "defg", "hij"].map(|s| Ok(Bytes::from_static(s.as_bytes()))),
        );
        let got: Vec<Bytes> = window(chunks, 2, 6).try_collect().await.unwrap();
        assert_eq!(got.concat(), b"cdefgh");
    }

    #[test]
    fn copy_sources_are_escaped() {
        assert_eq!(
            utf8_percent_encode("a b/ü+x", COPY_SOURCE).to_string(),
            "a%20b/%C3%BC%2Bx"
        );
    }
}
