//! A client of the storage-worker API for other Rust services, as the
//! original service's `client.ts` is for Node: sessions up and down, files
//! read and written, errors as the server's codes.
//!
//! Session and file paths are percent-encoded segment by segment, so a name
//! with spaces or `#` reaches the server as itself.

use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::Deserialize;

/// What is encoded inside one path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error code (`session_not_found`, …).
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    pub session_path: String,
    pub size: u64,
    pub created_at: Option<String>,
    pub last_modified: Option<String>,
    pub etag: Option<String>,
    pub pending_changes: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
}

#[derive(Deserialize)]
struct SessionList {
    sessions: Vec<SessionSummary>,
}

#[derive(Deserialize)]
struct FileList {
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `base` is the server's root, e.g. `http://storage-worker:3000`.
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http: reqwest::Client::new(),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    fn session_url(&self, session: &str, tail: &str) -> String {
        format!(
            "{}/api/storage-worker/sessions/{}{tail}",
            self.base,
            utf8_percent_encode(session, SEGMENT)
        )
    }

    fn file_url(&self, session: &str, path: &str) -> String {
        let encoded: Vec<String> = path
            .split('/')
            .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
            .collect();
        self.session_url(session, &format!("/files/{}", encoded.join("/")))
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = r.send().await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api {
                status,
                code: e.error,
                message: e.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http_error".into(),
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        })
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}/health", self.base);
        Ok(self
            .send(self.request(reqwest::Method::GET, &url))
            .await?
            .json()
            .await?)
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionSummary>, ClientError> {
        let url = format!("{}/api/storage-worker/sessions", self.base);
        let list: SessionList = self
            .send(self.request(reqwest::Method::GET, &url))
            .await?
            .json()
            .await?;
        Ok(list.sessions)
    }

    pub async fn session_exists(&self, session: &str) -> Result<bool, ClientError> {
        let url = self.session_url(session, "");
        let resp = self.request(reqwest::Method::HEAD, &url).send().await?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(ClientError::Api {
                status,
                code: "http_error".into(),
                message: format!("HEAD {url}"),
            }),
        }
    }

    pub async fn delete_session(&self, session: &str) -> Result<(), ClientError> {
        let url = self.session_url(session, "");
        self.send(self.request(reqwest::Method::DELETE, &url))
            .await?;
        Ok(())
    }

    /// The server's answer: `deletedCount` and one result per path.
    pub async fn bulk_delete(&self, sessions: &[&str]) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}/api/storage-worker/sessions/bulk-delete", self.base);
        let body = serde_json::json!({ "sessionPaths": sessions });
        Ok(self
            .send(self.request(reqwest::Method::POST, &url).json(&body))
            .await?
            .json()
            .await?)
    }

    /// Replaces the session with a tar.gz.
    pub async fn upload(
        &self,
        session: &str,
        tarball: impl Into<reqwest::Body>,
    ) -> Result<serde_json::Value, ClientError> {
        let url = self.session_url(session, "/upload");
        let r = self
            .request(reqwest::Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(tarball);
        Ok(self.send(r).await?.json().await?)
    }

    /// The session as tar.gz, streamed: the response whose body to read.
    pub async fn download(&self, session: &str) -> Result<reqwest::Response, ClientError> {
        let url = self.session_url(session, "/download");
        self.send(self.request(reqwest::Method::GET, &url)).await
    }

    pub async fn list_files(&self, session: &str) -> Result<Vec<FileEntry>, ClientError> {
        let url = self.session_url(session, "/files");
        let list: FileList = self
            .send(self.request(reqwest::Method::GET, &url))
            .await?
            .json()
            .await?;
        Ok(list.files)
    }

    /// A file's bytes; `None` when the session or the file does not exist.
    pub async fn read_file(&self, session: &str, path: &str) -> Result<Option<Bytes>, ClientError> {
        let url = self.file_url(session, path);
        match self.send(self.request(reqwest::Method::GET, &url)).await {
            Ok(resp) => Ok(Some(resp.bytes().await?)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a file (creating the session if needed); returns its size.
    pub async fn write_file(
        &self,
        session: &str,
        path: &str,
        bytes: impl Into<reqwest::Body>,
    ) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Written {
            size: u64,
        }
        let url = self.file_url(session, path);
        let w: Written = self
            .send(self.request(reqwest::Method::PUT, &url).body(bytes))
            .await?
            .json()
            .await?;
        Ok(w.size)
    }

    /// Deletes a file; `false` when it was not there.
    pub async fn delete_file(&self, session: &str, path: &str) -> Result<bool, ClientError> {
        let url = self.file_url(session, path);
        match self.send(self.request(reqwest::Method::DELETE, &url)).await {
            Ok(_) => Ok(true),
            Err(ClientError::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
