//! Whole-session routes: list, describe, exists, delete (one or many),
//! upload a tarball, download the session.
//!
//! An upload is spooled to local disk (the size limit enforced as it
//! streams in), checked from end to end — gzip members and CRCs, every tar
//! header, safe member names, the inflated size against the bomb limit —
//! and only then put in the store, in one PUT or a multipart upload. A bad
//! upload leaves the store as it was. Any standard tar.gz is accepted;
//! one sessionfs did not write is indexed when first read.
//!
//! A download streams the stored object as is. Changes here not yet
//! written back are written back first (the session's write-back loop,
//! asked through its control hook), and the object that makes is streamed.
//! Where that cannot be done (write-back off, the store unreachable, a
//! conflict) the merged view is packed into a spool file, so the answer
//! still has a length and an ETag and a failure is an error status, never
//! a truncated tarball.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures::{Stream, StreamExt, TryStreamExt};
use sessionfs_core::overlay::export::export;
use sessionfs_core::overlay::live::LiveSession;
use sessionfs_core::overlay::registry::SessionInfo;
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::SessionPath;
use sessionfs_core::store::upload::put_file;
use sessionfs_core::store::{GetOptions, PutOptions, StoreError};
use sessionfs_core::tarball::foreign::{self, Format, Limits};
use sessionfs_core::tarball::toc::Kind;
use sessionfs_core::tarball::TarballError;
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;
use crate::openapi::SessionParam;
use crate::{blocking, schema, AppState};

/// Most session paths one bulk delete takes.
const MAX_BULK: usize = 1000;
/// Largest JSON body of a bulk delete.
const MAX_JSON: u64 = 1 << 20;

fn iso(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_millis(t).to_string())
}

fn describe_json(i: &SessionInfo) -> schema::Session {
    let wb = i.writeback.as_ref();
    schema::Session {
        session_path: i.name.clone(),
        created_at: iso(i.created),
        last_modified: iso(i.last_modified),
        size: i.size,
        etag: i.etag.clone(),
        pending_changes: i.pending_changes,
        last_write_back: wb.and_then(|w| w.last.as_ref()).map(|r| schema::WriteBack {
            at: humantime::format_rfc3339_millis(r.at).to_string(),
            etag: r.etag.clone(),
            full: r.full,
            changes: r.changes,
            object_size: r.object_size,
            uploaded_bytes: r.uploaded,
            copied_bytes: r.copied,
            requests: r.requests,
            seconds: r.seconds,
        }),
        last_write_back_error: wb.and_then(|w| w.last_error.clone()),
        write_back_conflicts: wb.map_or(0, |w| w.conflicts),
        container_id: None,
    }
}

#[utoipa::path(get, operation_id = "listSessions", path = "/api/storage-worker/sessions", summary = "List all sessions",
    responses((status = 200, description = "the sessions", body = schema::SessionList),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 500, description = "internal_error", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn list(st: &AppState) -> Result<Response, ApiError> {
    let sessions = st.registry.list().await?;
    let sessions: Vec<_> = sessions.iter().map(describe_json).collect();
    Ok(st.reply(
        StatusCode::OK,
        &schema::SessionList {
            count: sessions.len(),
            sessions,
            container_id: st.container(),
        },
    ))
}

#[utoipa::path(get, operation_id = "getSession", path = "/api/storage-worker/sessions/{sessionPath}", summary = "Session metadata",
    params(SessionParam),
    responses((status = 200, description = "the session", body = schema::Session),
        (status = 400, description = "invalid_session_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 404, description = "session_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: another process on this host holds the session", body = schema::ErrorBody),
        (status = 500, description = "internal_error", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn describe(st: &AppState, s: &SessionPath) -> Result<Response, ApiError> {
    match st.registry.info(s).await? {
        Some(info) => {
            let mut one = describe_json(&info);
            one.container_id = Some(st.container());
            Ok(st.reply(StatusCode::OK, &one))
        }
        None => Err(ApiError::SessionNotFound(s.to_string())),
    }
}

#[utoipa::path(head, operation_id = "sessionExists", path = "/api/storage-worker/sessions/{sessionPath}", summary = "Whether the session exists",
    params(SessionParam),
    responses((status = 200, description = "it exists"), (status = 400, description = "invalid session path"),
        (status = 401, description = "unauthorized"), (status = 404, description = "it does not"),
        (status = 503, description = "the store is unavailable")))]
pub async fn exists(st: &AppState, s: &SessionPath) -> Result<Response, ApiError> {
    if st.registry.exists(s).await? {
        Ok(Response::new(Body::empty()))
    } else {
        Err(ApiError::SessionNotFound(s.to_string()))
    }
}

fn writable(st: &AppState) -> Result<(), ApiError> {
    if st.registry.read_only() {
        Err(ApiError::ReadOnly)
    } else {
        Ok(())
    }
}

#[utoipa::path(delete, operation_id = "deleteSession", path = "/api/storage-worker/sessions/{sessionPath}",
    summary = "Delete the session (object and local changes)",
    params(SessionParam),
    responses((status = 200, description = "deleted", body = schema::Deleted),
        (status = 400, description = "invalid_session_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 403, description = "read_only", body = schema::ErrorBody),
        (status = 404, description = "session_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: the session is mounted here", body = schema::ErrorBody),
        (status = 500, description = "internal_error", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn delete(st: &AppState, s: &SessionPath) -> Result<Response, ApiError> {
    writable(st)?;
    let (registry, name) = (st.registry.clone(), s.clone());
    if !blocking(move || registry.delete(&name).map_err(ApiError::from)).await? {
        return Err(ApiError::SessionNotFound(s.to_string()));
    }
    Ok(st.reply(
        StatusCode::OK,
        &schema::Deleted {
            session_path: s.to_string(),
            deleted: true,
            container_id: st.container(),
        },
    ))
}

/// `{"sessionPaths": [...]}` → one result per path, in order.
#[utoipa::path(post, operation_id = "bulkDeleteSessions", path = "/api/storage-worker/sessions/bulk-delete", summary = "Delete several sessions",
    request_body = schema::BulkDeleteRequest,
    responses((status = 200, description = "one result per path", body = schema::BulkDeleted),
        (status = 400, description = "invalid_request", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 403, description = "read_only", body = schema::ErrorBody),
        (status = 413, description = "payload_too_large", body = schema::ErrorBody),
        (status = 500, description = "internal_error", body = schema::ErrorBody)))]
pub async fn bulk_delete(st: &AppState, req: Request) -> Result<Response, ApiError> {
    writable(st)?;
    let body = crate::read_body(req.into_body(), MAX_JSON).await?;
    let asked: schema::BulkDeleteRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "the body is not {{\"sessionPaths\": [strings]}}: {e}"
        ))
    })?;
    let paths = asked.session_paths;
    if paths.len() > MAX_BULK {
        return Err(ApiError::InvalidRequest(format!(
            "at most {MAX_BULK} session paths per request"
        )));
    }
    let mut results = Vec::with_capacity(paths.len());
    let mut deleted = 0;
    for raw in &paths {
        let raw = raw.as_str();
        let outcome = match SessionPath::parse(raw) {
            Err(e) => Err(ApiError::InvalidSessionPath(e.reason.to_string())),
            Ok(s) => {
                let registry = st.registry.clone();
                match blocking(move || registry.delete(&s).map_err(ApiError::from)).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ApiError::SessionNotFound(raw.to_owned())),
                    Err(e) => Err(e),
                }
            }
        };
        results.push(match outcome {
            Ok(()) => {
                deleted += 1;
                schema::BulkResult {
                    session_path: raw.to_owned(),
                    deleted: true,
                    error: None,
                    message: None,
                }
            }
            Err(e) => schema::BulkResult {
                session_path: raw.to_owned(),
                deleted: false,
                error: Some(e.code()),
                message: Some(e.to_string()),
            },
        });
    }
    Ok(st.reply(
        StatusCode::OK,
        &schema::BulkDeleted {
            deleted_count: deleted,
            session_paths: paths,
            results,
            container_id: st.container(),
        },
    ))
}

/// Copies `body` into `file`, failing once more than `limit` bytes came.
async fn spool<S, E>(mut body: S, file: &mut tokio::fs::File, limit: u64) -> Result<u64, ApiError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::UploadFailed(format!("reading the body: {e}")))?;
        n += chunk.len() as u64;
        if n > limit {
            crate::drain(body, crate::DRAIN_MAX).await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        file.write_all(&chunk).await.map_err(ApiError::upload)?;
    }
    file.flush().await.map_err(ApiError::upload)?;
    Ok(n)
}

#[utoipa::path(method(post, put), operation_id = "uploadSession", path = "/api/storage-worker/sessions/{sessionPath}/upload",
    summary = "Replace the session with a tar.gz (raw body or multipart field `tarball`)",
    params(SessionParam),
    request_body(description = "a tar.gz", content(
        (Vec<u8> = "application/gzip"), (Vec<u8> = "application/octet-stream"),
        (UploadForm = "multipart/form-data"))),
    responses((status = 200, description = "stored", body = schema::Uploaded),
        (status = 400, description = "invalid_session_path, invalid_request or invalid_tarball", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 403, description = "read_only", body = schema::ErrorBody),
        (status = 409, description = "conflict: the session is mounted here", body = schema::ErrorBody),
        (status = 413, description = "payload_too_large: the body or its inflated size is over the limit", body = schema::ErrorBody),
        (status = 500, description = "upload_failed", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody),
        (status = 507, description = "insufficient_storage", body = schema::ErrorBody)))]
pub async fn upload(st: &AppState, s: &SessionPath, req: Request) -> Result<Response, ApiError> {
    writable(st)?;
    if st.registry.get(s).is_some_and(|l| l.is_watched()) {
        return Err(ApiError::Conflict(format!(
            "session {s} is mounted here; it cannot be replaced from outside the mount"
        )));
    }
    let limit = st.config.max_upload_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        crate::drain(req.into_body().into_data_stream(), crate::DRAIN_MAX).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let tmp = tempfile::NamedTempFile::new_in(&st.config.spool_dir).map_err(ApiError::upload)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(ApiError::upload)?);
    let size = if multipart {
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("multipart body: {e}")))?;
        let mut got = None;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("multipart body: {e}")))?
        {
            // The original service's field is `tarball`; any file field will do.
            if field.name() == Some("tarball") || field.file_name().is_some() {
                got = Some(spool(field, &mut file, limit).await?);
                break;
            }
        }
        got.ok_or_else(|| ApiError::InvalidRequest("the form has no `tarball` file field".into()))?
    } else {
        spool(req.into_body().into_data_stream(), &mut file, limit).await?
    };
    drop(file);
    if size == 0 {
        return Err(ApiError::InvalidTarball("the body is empty".into()));
    }
    let path = tmp.path().to_owned();
    let max_tar_size = st.config.max_inflated_bytes;
    let (entries, format) = blocking(move || check_tarball(&path, max_tar_size)).await?;
    let opts = PutOptions {
        content_type: Some("application/gzip".into()),
        ..PutOptions::default()
    };
    // The upload is the session now: what was pending here is replaced,
    // with no request on the old session left half done.
    let (registry, name, path) = (st.registry.clone(), s.clone(), tmp.path().to_owned());
    let etag = blocking(move || {
        let rt = tokio::runtime::Handle::current();
        let store = registry.store().clone();
        let key = name.object_key();
        registry
            .replace(&name, || {
                rt.block_on(put_file(store.as_ref(), &key, &path, opts, &|_| {}))
            })
            .map_err(ApiError::from)?
            .map_err(ApiError::upload)
    })
    .await?;
    Ok(st.reply(
        StatusCode::OK,
        &schema::Uploaded {
            session_path: s.to_string(),
            uploaded: true,
            size,
            etag,
            entries,
            format,
            container_id: st.container(),
        },
    ))
}

/// Reads the whole upload as `tar x` would; returns its entry count and
/// whether sessionfs wrote it.
fn check_tarball(
    path: &std::path::Path,
    max_tar_size: u64,
) -> Result<(usize, schema::UploadFormat), ApiError> {
    let file = std::fs::File::open(path).map_err(ApiError::upload)?;
    let limits = Limits {
        max_tar_size,
        ..Limits::default()
    };
    let index = foreign::index(file, limits).map_err(|e| {
        if e.to_string().contains("decompression bomb") {
            ApiError::PayloadTooLarge {
                limit: max_tar_size,
            }
        } else {
            ApiError::InvalidTarball(e.to_string())
        }
    })?;
    if index.format != Format::Gzip {
        return Err(ApiError::InvalidTarball(
            "an uncompressed tar; sessions are stored gzip-compressed".into(),
        ));
    }
    if !index.skipped.is_empty() {
        let shown: Vec<_> = index.skipped.iter().take(3).cloned().collect();
        return Err(ApiError::InvalidTarball(format!(
            "{} member(s) cannot be extracted safely: {}",
            index.skipped.len(),
            shown.join("; ")
        )));
    }
    // A member through a symlink (`y -> /tmp/x`, then `y/f`) would be
    // written outside the tree by extractors that follow the link.
    let links: std::collections::HashSet<&str> = index
        .entries
        .iter()
        .filter(|e| matches!(e.t, Kind::Symlink | Kind::HardLink))
        .map(|e| &*e.p)
        .collect();
    if let Some(e) = index.entries.iter().find(|e| {
        e.p.match_indices('/')
            .any(|(at, _)| links.contains(&e.p[..at]))
    }) {
        return Err(ApiError::InvalidTarball(format!(
            "member {:?} lies through a link; it cannot be extracted safely",
            e.p
        )));
    }
    let native = index
        .entries
        .iter()
        .any(|e| e.p.starts_with(sessionfs_core::tarball::toc::RESERVED_DIR));
    Ok((
        index.entries.len(),
        if native {
            schema::UploadFormat::Sessionfs
        } else {
            schema::UploadFormat::Foreign
        },
    ))
}

#[utoipa::path(method(get, head), operation_id = "downloadSession", path = "/api/storage-worker/sessions/{sessionPath}/download",
    summary = "The session as tar.gz, with changes not yet written back; HEAD: its headers only",
    params(SessionParam),
    responses((status = 200, description = "the tarball", content_type = "application/gzip", body = Vec<u8>,
            headers(("ETag" = String), ("Content-Length" = u64), ("Content-Disposition" = String))),
        (status = 400, description = "invalid_session_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 404, description = "session_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: another process on this host holds the session", body = schema::ErrorBody),
        (status = 500, description = "download_failed", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn download(
    st: &AppState,
    s: &SessionPath,
    method: &Method,
) -> Result<Response, ApiError> {
    let registry = st.registry.clone();
    let name = s.clone();
    // Changes here may not be written back yet: the session, if held here.
    let live = if registry.is_local(s) {
        Some(blocking(move || registry.open(&name, false).map_err(ApiError::from)).await?)
    } else {
        None
    };
    let mut pending = match &live {
        Some(l) => l.has_pending_changes().map_err(ApiError::download)?,
        None => false,
    };
    if let (true, Some(l)) = (pending, &live) {
        // Write the changes back now and send the object they make: one
        // incremental pack instead of a second whole one here (and two
        // trees in memory at once), and the answer is the stored object,
        // ETag and all (a HEAD too, so that it tells the ETag the GET
        // after it answers). Where that cannot be done (write-back off,
        // store unreachable, a conflict), the merged view is packed below.
        let l = l.clone();
        pending = blocking(move || {
            let flushed = matches!(l.control("flush"), Some(Ok(_)));
            Ok(!flushed || l.has_pending_changes().unwrap_or(true))
        })
        .await?;
    }
    if !pending {
        match st
            .registry
            .store()
            .get_stream(&s.object_key(), GetOptions::default())
            .await
        {
            Ok(got) => {
                let body = if method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from_stream(got.body.map_err(std::io::Error::other))
                };
                return Ok(tarball_response(s, got.meta.size, &got.meta.etag, body));
            }
            Err(StoreError::NotFound { .. }) if live.is_some() => {}
            Err(StoreError::NotFound { .. }) => {
                return Err(ApiError::SessionNotFound(s.to_string()))
            }
            Err(e) => return Err(ApiError::download(e)),
        }
    }
    let Some(live) = live else {
        return Err(ApiError::SessionNotFound(s.to_string()));
    };
    let tmp = tempfile::NamedTempFile::new_in(&st.config.spool_dir).map_err(ApiError::download)?;
    let path = tmp.path().to_owned();
    let (size, etag) = blocking(move || pack_merged(&live, &path)).await?;
    let file = tokio::fs::File::from_std(tmp.reopen().map_err(ApiError::download)?);
    // The open handle keeps the bytes; the name can go now.
    drop(tmp);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ))
    };
    Ok(tarball_response(s, size, &etag, body))
}

/// Packs the merged view into the file at `path`; a file changed under the
/// pack makes it start again (three tries).
fn pack_merged(live: &LiveSession, path: &Path) -> Result<(u64, String), ApiError> {
    let mut last = None;
    for _ in 0..3 {
        let mut writer = HashingWriter {
            inner: BufWriter::new(std::fs::File::create(path).map_err(ApiError::download)?),
            hash: blake3::Hasher::new(),
            n: 0,
        };
        match export(live, &mut writer) {
            Ok(_) => {
                writer.inner.flush().map_err(ApiError::download)?;
                let hex = writer.hash.finalize().to_hex();
                return Ok((writer.n, format!("\"b3-{}\"", &hex[..32])));
            }
            Err(OverlayError::Tarball(TarballError::Changed(p))) => last = Some(p),
            Err(e) => return Err(ApiError::download(e)),
        }
    }
    Err(ApiError::Conflict(format!(
        "{} kept changing while the session was packed; try again",
        last.unwrap_or_default()
    )))
}

struct HashingWriter<W> {
    inner: W,
    hash: blake3::Hasher,
    n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn tarball_response(s: &SessionPath, size: u64, etag: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    let ascii: String = s
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded =
        percent_encoding::utf8_percent_encode(s.as_str(), percent_encoding::NON_ALPHANUMERIC);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}.tar.gz\"; filename*=UTF-8''{encoded}.tar.gz"
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// The multipart form of an upload.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    #[schema(format = Binary, value_type = String)]
    tarball: Vec<u8>,
}
