//! Where a request goes, read from the raw request path.
//!
//! The storage-worker routes are parsed here rather than by the router:
//! session and file paths arrive percent-encoded, and what they decode to
//! (a `/` from `%2f`, a `..` from `%2e%2e`, a NUL) must be refused, never
//! resolved. Each segment is decoded on its own and checked; nothing is
//! ever joined onto a filesystem path before it has passed.
//!
//! As the original service does, `/sessions/...` without the
//! `/api/storage-worker` prefix (a reverse proxy that strips it) routes the
//! same.

use percent_encoding::percent_decode_str;
use sessionfs_core::overlay::live::components;
use sessionfs_core::session::SessionPath;

use crate::error::ApiError;

/// Longest file path accepted, in bytes, as Linux's PATH_MAX.
pub const MAX_FILE_PATH: usize = 4096;

/// One storage-worker route, with its parameters checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Sessions,
    BulkDelete,
    Session(SessionPath),
    Upload(SessionPath),
    Download(SessionPath),
    Files(SessionPath),
    File(SessionPath, String),
}

impl Route {
    /// The methods the route answers (the `Allow` of a 405); the OpenAPI
    /// document lists exactly these (a unit test in `openapi.rs` checks).
    pub fn allowed(&self) -> &'static str {
        match self {
            Route::Sessions | Route::Files(_) => "GET",
            Route::BulkDelete => "POST",
            Route::Upload(_) => "POST, PUT",
            Route::Session(_) => "GET, HEAD, DELETE",
            Route::Download(_) => "GET, HEAD",
            Route::File(..) => "GET, HEAD, PUT, DELETE",
        }
    }

    /// One route of each kind.
    #[cfg(test)]
    pub fn one_of_each() -> Vec<Route> {
        let s = || SessionPath::parse("o__r__b").unwrap();
        vec![
            Route::Sessions,
            Route::BulkDelete,
            Route::Session(s()),
            Route::Upload(s()),
            Route::Download(s()),
            Route::Files(s()),
            Route::File(s(), "workspace/a".into()),
        ]
    }

    /// The route's template, the label of its metrics.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Sessions => "/api/storage-worker/sessions",
            Route::BulkDelete => "/api/storage-worker/sessions/bulk-delete",
            Route::Session(_) => "/api/storage-worker/sessions/{sessionPath}",
            Route::Upload(_) => "/api/storage-worker/sessions/{sessionPath}/upload",
            Route::Download(_) => "/api/storage-worker/sessions/{sessionPath}/download",
            Route::Files(_) => "/api/storage-worker/sessions/{sessionPath}/files",
            Route::File(..) => "/api/storage-worker/sessions/{sessionPath}/files/{filePath}",
        }
    }
}

/// Parses a request path; `Ok(None)` when it is not a storage-worker route.
pub fn parse(raw: &str) -> Result<Option<Route>, ApiError> {
    let rest = raw.strip_prefix("/api/storage-worker").unwrap_or(raw);
    let Some(rest) = rest.strip_prefix("/sessions") else {
        return Ok(None);
    };
    if rest.is_empty() || rest == "/" {
        return Ok(Some(Route::Sessions));
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Ok(None);
    };
    let (seg, tail) = rest
        .split_once('/')
        .map_or((rest, None), |(s, t)| (s, Some(t)));
    if seg == "bulk-delete" && tail.is_none() {
        return Ok(Some(Route::BulkDelete));
    }
    let session = session_path(seg)?;
    Ok(Some(match tail {
        None | Some("") => Route::Session(session),
        Some("upload") => Route::Upload(session),
        Some("download") => Route::Download(session),
        Some("files") | Some("files/") => Route::Files(session),
        Some(t) => match t.strip_prefix("files/") {
            Some(file) => Route::File(session, file_path(file)?),
            // `sessions/own/repo/br/files`: a session path holding a raw `/`.
            None => {
                return Err(ApiError::InvalidSessionPath(format!(
                    "{:?}: contains '/' (session paths are one segment, e.g. owner__repo__branch)",
                    format!("{seg}/{t}").chars().take(80).collect::<String>()
                )))
            }
        },
    }))
}

fn session_path(seg: &str) -> Result<SessionPath, ApiError> {
    let decoded = percent_decode_str(seg)
        .decode_utf8()
        .map_err(|_| ApiError::InvalidSessionPath("not UTF-8 once decoded".into()))?;
    SessionPath::parse(&decoded).map_err(|e| {
        let mut shown: String = e.path.chars().take(80).collect();
        if shown.len() < e.path.len() {
            shown.push('…');
        }
        ApiError::InvalidSessionPath(format!("{shown:?}: {}", e.reason))
    })
}

/// A file path inside a session: segments decoded one by one. An encoded
/// `/` (`%2F`) separates names as a raw one does (Express decodes route
/// parameters, so the seed's clients send `workspace%2Fa.txt`); every name
/// is then checked as a plain name (no `\\`, `.`, `..`, empty, control
/// characters).
pub fn file_path(raw: &str) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::InvalidFilePath(why.to_owned());
    let mut out = Vec::new();
    for seg in raw.split('/') {
        let name = percent_decode_str(seg)
            .decode_utf8()
            .map_err(|_| bad("not UTF-8 once decoded"))?;
        if name.contains('\\') {
            return Err(bad("a name contains '\\'"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("contains a control character"));
        }
        out.push(name.into_owned());
    }
    let path = out.join("/");
    if path.len() > MAX_FILE_PATH {
        return Err(bad("longer than 4096 bytes"));
    }
    components(&path).map_err(|e| match e {
        sessionfs_core::overlay::OverlayError::NameTooLong => {
            bad("a name is longer than 255 bytes")
        }
        _ => bad("empty, '.' or '..' segments, or a leading or trailing '/'"),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &str) -> SessionPath {
        SessionPath::parse(p).unwrap()
    }

    #[test]
    fn routes() {
        let cases = [
            ("/api/storage-worker/sessions", Route::Sessions),
            ("/api/storage-worker/sessions/", Route::Sessions),
            (
                "/api/storage-worker/sessions/bulk-delete",
                Route::BulkDelete,
            ),
            (
                "/api/storage-worker/sessions/a__b",
                Route::Session(s("a__b")),
            ),
            ("/sessions/a__b/upload", Route::Upload(s("a__b"))),
            (
                "/api/storage-worker/sessions/a__b/download",
                Route::Download(s("a__b")),
            ),
            (
                "/api/storage-worker/sessions/a__b/files",
                Route::Files(s("a__b")),
            ),
            (
                "/api/storage-worker/sessions/a%20b/files/workspace/x%20y.ts",
                Route::File(s("a b"), "workspace/x y.ts".into()),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse(raw).unwrap(), Some(want), "{raw}");
        }
        assert_eq!(parse("/health").unwrap(), None);
        assert!(matches!(
            parse("/api/storage-worker/sessions/own/repo/br/files"),
            Err(ApiError::InvalidSessionPath(_))
        ));
    }

    #[test]
    fn bad_session_paths() {
        let long = "x".repeat(1000);
        for seg in [
            "..",
            "%2e%2e",
            "a%2fb",
            "a%2Fb",
            "a%00b",
            "%2e",
            "a%5cb",
            long.as_str(),
            "%ff",
        ] {
            let raw = format!("/api/storage-worker/sessions/{seg}/files");
            assert!(
                matches!(parse(&raw), Err(ApiError::InvalidSessionPath(_))),
                "{seg}"
            );
        }
    }

    #[test]
    fn bad_file_paths() {
        for p in [
            "../etc/passwd",
            "a/../../b",
            "./a",
            "/etc/passwd",
            "a\\b",
            "a%5c..%5cb",
            "%2e%2e/x",
            "a%2f..%2fb",
            "a//b",
            "a/",
            "a%0ab",
            "a%7fb",
            "",
        ] {
            assert!(file_path(p).is_err(), "{p:?}");
        }
        assert_eq!(
            file_path("workspace/src/index.ts").unwrap(),
            "workspace/src/index.ts"
        );
        assert_eq!(
            file_path(".session-metadata.json").unwrap(),
            ".session-metadata.json"
        );
        assert_eq!(file_path("workspace%2Fa.txt").unwrap(), "workspace/a.txt");
        assert_eq!(
            file_path("workspace%2fsrc/b.ts").unwrap(),
            "workspace/src/b.ts"
        );
        for p in ["workspace%2F..%2Fx", "%2Fetc", "a%2F", "a%2F%2Fb"] {
            assert!(file_path(p).is_err(), "{p:?}");
        }
    }
}
