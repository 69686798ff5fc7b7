//! The JSON bodies of the API as types: the handlers answer with them, and
//! the OpenAPI document derives its schemas from them (`openapi.rs`), so a
//! field cannot change in one place and not the other.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error answer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
    pub container_id: String,
}

/// The documented error codes; see `ApiError::code` for when each is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidSessionPath,
    InvalidFilePath,
    InvalidRequest,
    InvalidTarball,
    SessionNotFound,
    FileNotFound,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RangeNotSatisfiable,
    Conflict,
    ReadOnly,
    Unauthorized,
    UploadFailed,
    DownloadFailed,
    InsufficientStorage,
    StoreUnavailable,
    InternalError,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: String,
    pub service: String,
    pub implementation: String,
    pub version: String,
    pub build: Build,
    pub container_id: String,
    pub timestamp: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub commit_sha: String,
    pub timestamp: String,
    pub version: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// Always `ready`.
    pub status: String,
    /// Which store answered.
    pub store: String,
    pub container_id: String,
}

/// What the API reports of a session.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_path: String,
    pub created_at: Option<String>,
    pub last_modified: Option<String>,
    /// The stored object's size (0 while the session has none).
    pub size: u64,
    pub etag: Option<String>,
    /// Changes here not yet written back to the object.
    pub pending_changes: bool,
    pub last_write_back: Option<WriteBack>,
    pub last_write_back_error: Option<String>,
    pub write_back_conflicts: u64,
    /// Only on the answer about one session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// The figures of a write-back.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WriteBack {
    pub at: String,
    pub etag: String,
    /// A full repack rather than an incremental one.
    pub full: bool,
    pub changes: u64,
    pub object_size: u64,
    pub uploaded_bytes: u64,
    pub copied_bytes: u64,
    pub requests: u64,
    pub seconds: f64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionList {
    pub count: usize,
    pub sessions: Vec<Session>,
    pub container_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    pub session_path: String,
    pub deleted: bool,
    pub container_id: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkDeleteRequest {
    /// At most 1,000.
    pub session_paths: Vec<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkDeleted {
    pub deleted_count: usize,
    pub session_paths: Vec<String>,
    pub results: Vec<BulkResult>,
    pub container_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkResult {
    pub session_path: String,
    pub deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Uploaded {
    pub session_path: String,
    pub uploaded: bool,
    /// Bytes of the upload as stored.
    pub size: u64,
    pub etag: String,
    pub entries: usize,
    pub format: UploadFormat,
    pub container_id: String,
}

/// Whether sessionfs wrote the uploaded tarball (seekable) or another tool did.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UploadFormat {
    Sessionfs,
    Foreign,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileList {
    pub session_path: String,
    pub count: usize,
    pub files: Vec<FileEntry>,
    pub container_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileWritten {
    pub success: bool,
    pub session_path: String,
    pub file_path: String,
    pub size: u64,
    pub container_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileDeleted {
    pub success: bool,
    pub session_path: String,
    pub file_path: String,
    pub container_id: String,
}
