//! One session's files: the listing, and read / write / delete of one file
//! by path.
//!
//! A write creates the session (and the directories above the file) when
//! they do not exist, and replaces the file's bytes in one step: readers,
//! here or in a mount, see the old bytes or the new ones. Reads stream in
//! chunks, so a large file never sits whole in memory, and honour a single
//! byte range. Answers carry a validator (`ETag` from inode, size and
//! mtime) and `Cache-Control: no-cache`: a client may keep a copy but asks
//! again, since the file can change through a mount at any time.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use sessionfs_core::overlay::content::read_object_within;
use sessionfs_core::overlay::live::{components, FileVersion, LiveSession};
use sessionfs_core::overlay::node::{Node, NodeKind, Time};
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::session::SessionPath;
use sessionfs_core::tarball::reader::{Pace, SessionReader};
use sessionfs_core::tarball::toc::{Entry, Kind};

use crate::error::ApiError;
use crate::openapi::{FileParam, SessionParam};
use crate::{blocking, schema, AppState};

/// Bytes read per step of a streamed answer.
const CHUNK: u64 = 1 << 20;

/// An existing session, opened off the runtime.
async fn open(st: &AppState, s: &SessionPath) -> Result<Arc<LiveSession>, ApiError> {
    let registry = st.registry.clone();
    let name = s.clone();
    blocking(move || registry.open(&name, false).map_err(ApiError::from)).await
}

/// Runs `op` on the session (opened, or with `create` created, here on a
/// blocking thread). A session retired under the operation (deleted or
/// replaced meanwhile) is opened again, so the operation answers as if it
/// came after the deletion, never with the deletion's debris.
fn on_session<T>(
    registry: &sessionfs_core::overlay::registry::Registry,
    name: &SessionPath,
    create: bool,
    op: impl Fn(&Arc<LiveSession>) -> Result<T, (OverlayError, Arc<LiveSession>)>,
    fail: impl Fn(OverlayError, &LiveSession) -> ApiError,
) -> Result<T, ApiError> {
    // Each retry follows a deletion that completed meanwhile; the claim is
    // taken as soon as the session is open, so only a deletion that got
    // there first can make this operation try again.
    let mut tries = 0;
    loop {
        let live = registry.open(name, create).map_err(ApiError::from)?;
        let claimed = live.enter().map(|_claim| op(&live));
        match claimed {
            Ok(Ok(v)) => return Ok(v),
            Err(OverlayError::Retired) | Ok(Err((OverlayError::Retired, _))) if tries < 100 => {
                tries += 1
            }
            Err(e) => return Err(fail(e, &live)),
            Ok(Err((e, live))) => return Err(fail(e, &live)),
        }
    }
}

#[utoipa::path(get, operation_id = "listFiles", path = "/api/storage-worker/sessions/{sessionPath}/files",
    summary = "List the session's regular files",
    params(SessionParam),
    responses((status = 200, description = "the files", body = schema::FileList),
        (status = 400, description = "invalid_session_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 404, description = "session_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: another process on this host holds the session", body = schema::ErrorBody),
        (status = 500, description = "internal_error", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn list(st: &AppState, s: &SessionPath) -> Result<Response, ApiError> {
    let files = match st.registry.object_view(s).await? {
        Some(reader) => {
            blocking(move || {
                Ok(reader
                    .plain_files()
                    .into_iter()
                    .map(|(path, e)| schema::FileEntry {
                        path: path.to_owned(),
                        size: e.s,
                    })
                    .collect::<Vec<_>>())
            })
            .await?
        }
        None => {
            let live = open(st, s).await?;
            blocking(move || Ok(live.list_files()))
                .await?
                .into_iter()
                .map(|f| schema::FileEntry {
                    path: f.path,
                    size: f.size,
                })
                .collect()
        }
    };
    Ok(st.reply(
        StatusCode::OK,
        &schema::FileList {
            session_path: s.to_string(),
            count: files.len(),
            files,
            container_id: st.container(),
        },
    ))
}

/// For reads and deletes, a path through something that is not a
/// directory (a file, a symlink: never followed) names nothing.
fn not_found(e: OverlayError) -> OverlayError {
    match e {
        OverlayError::NotDir => OverlayError::NotFound,
        e => e,
    }
}

/// The Content-Type of a file, from its name. Source files an editor opens
/// get text types (mime tables call `.ts` an MPEG stream).
pub fn content_type(path: &str) -> String {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let known = match ext.as_deref() {
        Some("ts" | "tsx" | "mts" | "cts") => Some("text/typescript; charset=utf-8"),
        Some("js" | "mjs" | "cjs" | "jsx") => Some("text/javascript; charset=utf-8"),
        Some("json" | "map") => Some("application/json"),
        Some("jsonl" | "ndjson") => Some("application/x-ndjson"),
        Some("md" | "markdown") => Some("text/markdown; charset=utf-8"),
        Some(
            "rs" | "py" | "go" | "java" | "c" | "h" | "cpp" | "hpp" | "rb" | "sh" | "toml" | "yaml"
            | "yml" | "txt" | "lock" | "cfg" | "ini" | "sql",
        ) => Some("text/plain; charset=utf-8"),
        _ => None,
    };
    if let Some(k) = known {
        return k.to_owned();
    }
    match mime_guess::from_path(path).first() {
        Some(m) if m.type_() == "text" => format!("{m}; charset=utf-8"),
        Some(m) => m.to_string(),
        None => "application/octet-stream".to_owned(),
    }
}

fn etag(ino: u64, size: u64, mtime: Time) -> String {
    format!("\"{ino:x}-{size:x}-{:x}.{:x}\"", { mtime.s }, { mtime.ns })
}

/// Where the bytes of a file being answered come from.
enum Source {
    /// The open session: one pinned version of the file.
    Live(Arc<LiveSession>, Arc<FileVersion>),
    /// The session's object, read as it is ([`Registry::object_view`]),
    /// and the path of the file entry there.
    ///
    /// [`Registry::object_view`]: sessionfs_core::overlay::registry::Registry::object_view
    Object(Arc<SessionReader>, String),
}

impl Source {
    /// Up to `n` bytes from `at` (fewer only at the file's end).
    async fn read(&self, at: u64, n: u64) -> Result<bytes::Bytes, OverlayError> {
        match self {
            Source::Live(live, version) => match &**version {
                // Awaited here: decoded segments answer at once, and a
                // fetch waits without holding a thread.
                FileVersion::Base(reader, path) => {
                    read_object_within(reader, path, at, n, Pace::Ahead).await
                }
                _ => {
                    let (live, version) = (live.clone(), version.clone());
                    tokio::task::spawn_blocking(move || live.read_version(&version, at, n))
                        .await
                        .map_err(|e| OverlayError::Io(std::io::Error::other(e)))?
                        .map(bytes::Bytes::from)
                }
            },
            Source::Object(reader, path) => Ok(reader.read(path, at, n).await?),
        }
    }
}

/// A file found for a read: what the headers say, the first chunk of the
/// bytes asked for (from the start of the range), and where the rest is.
struct Found {
    kind: NodeKind,
    size: u64,
    mtime: Time,
    tag: String,
    first: bytes::Bytes,
    source: Source,
}

impl Found {
    /// A file of the open session: `node`, its bytes read from `source`.
    fn live(node: &Node, first: bytes::Bytes, source: Source) -> Found {
        Found {
            kind: node.kind,
            size: node.size,
            mtime: node.mtime,
            tag: etag(node.ino, node.size, node.mtime),
            first,
            source,
        }
    }
}

/// The first byte a read answers: the start of its range, if it has one.
fn first_byte(headers: &HeaderMap, size: u64) -> u64 {
    match range(headers, size) {
        Ok(Some((a, _))) => a,
        _ => 0,
    }
}

/// A file of a session open here, found and read on the runtime's thread
/// when nothing on the way would block it: no store check due, no lock held
/// elsewhere, and its first chunk in the overlay file's page cache, or in
/// the object (awaited: decoded segments answer at once, a fetch waits
/// without holding the thread), or no bytes wanted. `None`:
/// [`find_live`]'s way, which also answers every error of the lookup.
async fn find_hot(
    st: &AppState,
    s: &SessionPath,
    path: &str,
    want_bytes: bool,
    headers: &HeaderMap,
) -> Option<Result<Found, ApiError>> {
    let live = st.registry.get_fresh(s)?;
    let (node, version) = {
        let _in = live.enter().ok()?;
        live.try_open_version(path)?.ok()?
    };
    let from = first_byte(headers, node.size);
    let version = Arc::new(version);
    let source = Source::Live(live, version.clone());
    let first = if want_bytes && node.kind == NodeKind::File && from < node.size {
        let n = CHUNK.min(node.size - from);
        match &*version {
            FileVersion::Base(..) => match source.read(from, n).await {
                Ok(b) => b,
                Err(e) => {
                    let e = ApiError::from_overlay(e, s.as_str(), path, ApiError::download);
                    return Some(Err(e));
                }
            },
            v => v.read_cached(from, n)?.into(),
        }
    } else {
        bytes::Bytes::new()
    };
    Some(Ok(Found::live(&node, first, source)))
}

/// The file at `path` in the open session, with its first chunk; one trip
/// off the runtime.
async fn find_live(
    st: &AppState,
    s: &SessionPath,
    path: &str,
    want_bytes: bool,
    headers: &HeaderMap,
) -> Result<Found, ApiError> {
    if let Some(found) = find_hot(st, s, path, want_bytes, headers).await {
        return found;
    }
    let (registry, name, p) = (st.registry.clone(), s.clone(), path.to_owned());
    let asked = headers.clone();
    blocking(move || {
        on_session(
            &registry,
            &name,
            false,
            |live| {
                let fail = |e| (e, live.clone());
                let _in = live.enter().map_err(fail)?;
                let (node, version) = live.open_version(&p).map_err(|e| fail(not_found(e)))?;
                let from = first_byte(&asked, node.size);
                let first = if want_bytes && node.kind == NodeKind::File && from < node.size {
                    // No more than the file holds: a buffer is zeroed first.
                    let n = CHUNK.min(node.size - from);
                    live.read_version(&version, from, n).map_err(fail)?.into()
                } else {
                    bytes::Bytes::new()
                };
                let source = Source::Live(live.clone(), Arc::new(version));
                Ok(Found::live(&node, first, source))
            },
            |e, live| ApiError::from_overlay(e, live.name.as_str(), &p, ApiError::download),
        )
    })
    .await
}

/// The file at `path` of a session read as its object is: resolved as the
/// open session would (the same checks, the same answers; a plain tree
/// shows every entry with its recorded inode number), the first chunk read
/// on the runtime without a trip to the blocking pool.
async fn find_in_object(
    reader: Arc<SessionReader>,
    s: &SessionPath,
    path: &str,
    want_bytes: bool,
    headers: &HeaderMap,
) -> Result<Found, ApiError> {
    let fail = |e: OverlayError| ApiError::from_overlay(e, s.as_str(), path, ApiError::download);
    let entry = object_entry(&reader, path).map_err(|e| fail(not_found(e)))?;
    if entry.t != Kind::File {
        return Err(ApiError::FileNotFound {
            session: s.to_string(),
            path: path.to_owned(),
        });
    }
    let size = entry.s;
    let mtime = Time {
        s: entry.mt,
        ns: entry.mn,
    };
    let ino = entry.sd.get().map_or(0, |sd| sd.i);
    let from = first_byte(headers, size);
    let source = Source::Object(reader.clone(), path.to_owned());
    let first = if want_bytes && from < size {
        source
            .read(from, CHUNK.min(size - from))
            .await
            .map_err(fail)?
    } else {
        bytes::Bytes::new()
    };
    Ok(Found {
        kind: NodeKind::File,
        size,
        mtime,
        tag: etag(ino, size, mtime),
        first,
        source,
    })
}

/// The entry a path names in a plain-tree object, hard links followed.
fn object_entry<'r>(reader: &'r SessionReader, path: &str) -> Result<&'r Entry, OverlayError> {
    let parts = components(path)?;
    let mut end = 0;
    for part in &parts[..parts.len() - 1] {
        end += part.len();
        match reader.stat(&path[..end]) {
            Some(e) if e.t == Kind::Dir => {}
            Some(_) => return Err(OverlayError::NotDir),
            None => return Err(OverlayError::NotFound),
        }
        end += 1;
    }
    let entry = reader.stat(path).ok_or(OverlayError::NotFound)?;
    match (entry.t, entry.lt()) {
        (Kind::HardLink, Some(target)) => reader.stat(target).ok_or(OverlayError::NotFound),
        (Kind::HardLink, None) => Err(OverlayError::NotFound),
        _ => Ok(entry),
    }
}

/// A single `bytes=` range of a file of `size` bytes; `None` means the
/// whole file (no header, or one this server does not take: several ranges).
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let bad = || ApiError::RangeNotSatisfiable(v.to_owned(), size);
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Err(bad());
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| bad())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

#[utoipa::path(method(get, head), operation_id = "readFile", path = "/api/storage-worker/sessions/{sessionPath}/files/{filePath}",
    summary = "Read a file (a single Range is honoured); HEAD: its headers only",
    params(SessionParam, FileParam,
        ("Range" = Option<String>, Header, description = "one range, e.g. bytes=0-99"),
        ("If-None-Match" = Option<String>, Header, description = "an ETag from an earlier answer")),
    responses((status = 200, description = "the bytes, Content-Type from the name", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the range asked for"),
        (status = 304, description = "If-None-Match matched"),
        (status = 400, description = "invalid_session_path or invalid_file_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 404, description = "session_not_found or file_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: a directory at the path, or the session held elsewhere", body = schema::ErrorBody),
        (status = 416, description = "range_not_satisfiable", body = schema::ErrorBody),
        (status = 500, description = "download_failed", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn read(
    st: &AppState,
    s: &SessionPath,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // One step resolves the path to one version of the file and reads its
    // first chunk: the common case of an editor fetching a source file is
    // answered from it, and a store that fails is a 5xx before any header
    // went out. A session not open here whose object is a plain tree is
    // read from the object as it is; any other through the open session.
    let want_bytes = method == Method::GET;
    let found = match st.registry.object_view(s).await? {
        Some(reader) => find_in_object(reader, s, path, want_bytes, headers).await?,
        None => find_live(st, s, path, want_bytes, headers).await?,
    };
    let Found {
        kind,
        size,
        mtime,
        tag,
        first,
        source,
    } = found;
    if kind != NodeKind::File {
        return Err(ApiError::FileNotFound {
            session: s.to_string(),
            path: path.to_owned(),
        });
    }

    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type(path)) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(mtime.system())) {
        h.insert(header::LAST_MODIFIED, v);
    }
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    if unchanged {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(r);
    }
    let (start, end) = match range(headers, size)? {
        Some((a, b)) => {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{}/{}", b - 1, size)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (a, b)
        }
        None => (0, size),
    };
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if method == Method::HEAD || start == end {
        return Ok(r);
    }
    // `first` holds the file's bytes from `start` (up to a chunk); the
    // rest streams from the same version. A version that ends early (a file
    // truncated through the mount) aborts the connection: the declared
    // length is never answered with fewer bytes.
    let mut first = first;
    first.truncate((end - start).min(first.len() as u64) as usize);
    let next = start + first.len() as u64;
    if next >= end {
        if (first.len() as u64) < end - start {
            return Err(ApiError::download(OverlayError::Corrupt(
                "the file shrank while it was read".into(),
            )));
        }
        *r.body_mut() = Body::from(first);
        return Ok(r);
    }
    let source = Arc::new(source);
    let head = futures::stream::once(async move { Ok(first) });
    let rest = futures::stream::try_unfold(next, move |at| {
        let source = source.clone();
        async move {
            if at >= end {
                return Ok(None);
            }
            let bytes = source
                .read(at, CHUNK.min(end - at))
                .await
                .map_err(std::io::Error::other)?;
            if bytes.is_empty() {
                return Err(std::io::Error::other("the file shrank while it was read"));
            }
            let next = at + bytes.len() as u64;
            Ok(Some((bytes, next)))
        }
    });
    *r.body_mut() = Body::from_stream(futures::StreamExt::chain(head, rest));
    Ok(r)
}

#[utoipa::path(put, operation_id = "writeFile", path = "/api/storage-worker/sessions/{sessionPath}/files/{filePath}",
    summary = "Create or replace a file (creates the session and directories)",
    params(SessionParam, FileParam),
    request_body(description = "the file's bytes", content((Vec<u8> = "*/*"))),
    responses((status = 200, description = "written", body = schema::FileWritten),
        (status = 400, description = "invalid_session_path or invalid_file_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 403, description = "read_only", body = schema::ErrorBody),
        (status = 409, description = "conflict: a directory is in the way", body = schema::ErrorBody),
        (status = 413, description = "payload_too_large", body = schema::ErrorBody),
        (status = 500, description = "upload_failed", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody),
        (status = 507, description = "insufficient_storage", body = schema::ErrorBody)))]
pub async fn write(
    st: &AppState,
    s: &SessionPath,
    path: &str,
    req: Request,
) -> Result<Response, ApiError> {
    if st.registry.read_only() {
        return Err(ApiError::ReadOnly);
    }
    let limit = st.config.max_file_bytes;
    let body = crate::read_body(req.into_body(), limit).await?;
    let (registry, name, p) = (st.registry.clone(), s.clone(), path.to_owned());
    let size = blocking(move || {
        on_session(
            &registry,
            &name,
            true,
            |live| live.put_file(&p, &body).map_err(|e| (e, live.clone())),
            |e, live| ApiError::from_overlay(e, live.name.as_str(), &p, ApiError::upload),
        )
    })
    .await?;
    Ok(st.reply(
        StatusCode::OK,
        &schema::FileWritten {
            success: true,
            session_path: s.to_string(),
            file_path: path.to_owned(),
            size,
            container_id: st.container(),
        },
    ))
}

#[utoipa::path(delete, operation_id = "deleteFile", path = "/api/storage-worker/sessions/{sessionPath}/files/{filePath}",
    summary = "Delete a file",
    params(SessionParam, FileParam),
    responses((status = 200, description = "deleted", body = schema::FileDeleted),
        (status = 400, description = "invalid_session_path or invalid_file_path", body = schema::ErrorBody),
        (status = 401, description = "unauthorized", body = schema::ErrorBody),
        (status = 403, description = "read_only", body = schema::ErrorBody),
        (status = 404, description = "session_not_found or file_not_found", body = schema::ErrorBody),
        (status = 409, description = "conflict: a directory at the path, or the session held elsewhere", body = schema::ErrorBody),
        (status = 500, description = "upload_failed", body = schema::ErrorBody),
        (status = 503, description = "store_unavailable", body = schema::ErrorBody)))]
pub async fn delete(st: &AppState, s: &SessionPath, path: &str) -> Result<Response, ApiError> {
    if st.registry.read_only() {
        return Err(ApiError::ReadOnly);
    }
    let (registry, name, p) = (st.registry.clone(), s.clone(), path.to_owned());
    blocking(move || {
        on_session(
            &registry,
            &name,
            false,
            |live| {
                live.delete_file(&p)
                    .map_err(|e| (not_found(e), live.clone()))
            },
            |e, live| ApiError::from_overlay(e, live.name.as_str(), &p, ApiError::upload),
        )
    })
    .await?;
    Ok(st.reply(
        StatusCode::OK,
        &schema::FileDeleted {
            success: true,
            session_path: s.to_string(),
            file_path: path.to_owned(),
            container_id: st.container(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(range(&HeaderMap::new(), 10).unwrap(), None);
        assert_eq!(range(&h("bytes=0-3"), 10).unwrap(), Some((0, 4)));
        assert_eq!(range(&h("bytes=5-"), 10).unwrap(), Some((5, 10)));
        assert_eq!(range(&h("bytes=-3"), 10).unwrap(), Some((7, 10)));
        assert_eq!(range(&h("bytes=2-100"), 10).unwrap(), Some((2, 10)));
        assert_eq!(range(&h("bytes=0-1,4-5"), 10).unwrap(), None);
        for bad in [
            "bytes=10-",
            "bytes=5-2",
            "items=0-1",
            "bytes=x-1",
            "bytes=-0",
        ] {
            assert!(range(&h(bad), 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_types() {
        assert!(content_type("src/index.ts").starts_with("text/typescript"));
        assert_eq!(content_type("a.png"), "image/png");
        assert_eq!(content_type("Makefile"), "application/octet-stream");
    }
}
