//! The API's errors: each variant is one documented error code with its
//! HTTP status, answered as `{"error", "message", "containerId"}`.

use axum::http::StatusCode;
use sessionfs_core::overlay::open::OpenError;
use sessionfs_core::overlay::registry::RegistryError;
use sessionfs_core::overlay::OverlayError;
use sessionfs_core::store::StoreError;

use crate::schema::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid session path: {0}")]
    InvalidSessionPath(String),
    #[error("invalid file path: {0}")]
    InvalidFilePath(String),
    #[error("session {0} not found")]
    SessionNotFound(String),
    #[error("file {path} not found in session {session}")]
    FileNotFound { session: String, path: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("not a valid tarball: {0}")]
    InvalidTarball(String),
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("the range {0} cannot be satisfied")]
    RangeNotSatisfiable(String, u64),
    #[error("{0}")]
    Conflict(String),
    #[error("this server is read-only")]
    ReadOnly,
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    #[error("{method} is not allowed here (allowed: {allow})")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("upload failed: {0}")]
    UploadFailed(String),
    #[error("download failed: {0}")]
    DownloadFailed(String),
    #[error("no space left for the session's changes on this server: {0}")]
    InsufficientStorage(String),
    /// The object store is down or stalling; retry later.
    #[error("the object store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidSessionPath(_) => ErrorCode::InvalidSessionPath,
            ApiError::InvalidFilePath(_) => ErrorCode::InvalidFilePath,
            ApiError::SessionNotFound(_) => ErrorCode::SessionNotFound,
            ApiError::FileNotFound { .. } => ErrorCode::FileNotFound,
            ApiError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ApiError::InvalidTarball(_) => ErrorCode::InvalidTarball,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::RangeNotSatisfiable(..) => ErrorCode::RangeNotSatisfiable,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::ReadOnly => ErrorCode::ReadOnly,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::NoRoute(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::UploadFailed(_) => ErrorCode::UploadFailed,
            ApiError::DownloadFailed(_) => ErrorCode::DownloadFailed,
            ApiError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            ApiError::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            ApiError::Internal(_) => ErrorCode::InternalError,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidSessionPath(_)
            | ApiError::InvalidFilePath(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidTarball(_) => StatusCode::BAD_REQUEST,
            ApiError::SessionNotFound(_) | ApiError::FileNotFound { .. } | ApiError::NoRoute(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable(..) => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::ReadOnly => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UploadFailed(_) | ApiError::DownloadFailed(_) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A store or overlay failure while serving bytes out.
    pub fn download(e: impl Failure) -> ApiError {
        if e.store_unavailable() {
            return ApiError::StoreUnavailable(e.to_string());
        }
        ApiError::DownloadFailed(e.to_string())
    }

    /// A store or overlay failure while taking bytes in.
    pub fn upload(e: impl Failure) -> ApiError {
        if e.store_unavailable() {
            return ApiError::StoreUnavailable(e.to_string());
        }
        ApiError::UploadFailed(e.to_string())
    }

    /// What an overlay answer means for a file request.
    pub fn from_overlay(
        e: OverlayError,
        session: &str,
        path: &str,
        fail: fn(OverlayError) -> ApiError,
    ) -> ApiError {
        match e {
            OverlayError::NotFound => ApiError::FileNotFound {
                session: session.to_owned(),
                path: path.to_owned(),
            },
            OverlayError::IsDir => ApiError::Conflict(format!("{path} is a directory")),
            OverlayError::NotDir => {
                ApiError::Conflict(format!("a parent of {path} is not a directory"))
            }
            OverlayError::Invalid(why) => ApiError::Conflict(format!("{path}: {why}")),
            OverlayError::NameTooLong | OverlayError::BadName | OverlayError::NotPermitted(_) => {
                ApiError::InvalidFilePath(format!("{path}: {e}"))
            }
            OverlayError::ReadOnly => ApiError::ReadOnly,
            OverlayError::InUse(_) => ApiError::Conflict(e.to_string()),
            e if e.no_space() => ApiError::InsufficientStorage(e.to_string()),
            e if e.store_unavailable() => ApiError::StoreUnavailable(e.to_string()),
            e => fail(e),
        }
    }
}

/// A failure that may be the object store being down (503, retry later)
/// rather than a fault of the request or of this server.
pub trait Failure: std::fmt::Display {
    fn store_unavailable(&self) -> bool;
}

impl Failure for std::io::Error {
    fn store_unavailable(&self) -> bool {
        false
    }
}

impl Failure for StoreError {
    fn store_unavailable(&self) -> bool {
        self.is_unavailable()
    }
}

impl Failure for OverlayError {
    fn store_unavailable(&self) -> bool {
        OverlayError::store_unavailable(self)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(s) => ApiError::SessionNotFound(s),
            RegistryError::Mounted(_) => ApiError::Conflict(e.to_string()),
            RegistryError::Open(OpenError::Diverged { .. }) => ApiError::Conflict(e.to_string()),
            RegistryError::Open(OpenError::Overlay(OverlayError::InUse(_))) => {
                ApiError::Conflict(e.to_string())
            }
            RegistryError::Store(StoreError::NotFound { key, .. }) => {
                ApiError::SessionNotFound(key)
            }
            e if e.store_unavailable() => ApiError::StoreUnavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::StoreUnavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}
