//! Errors of the object stores.
//!
//! Each variant is one thing a caller can act on: retry (`Transient`, `Conflict`),
//! rebase and retry (`PreconditionFailed`), treat as absent (`NotFound`), fix the
//! configuration (`CredentialsRejected`, `MissingCredentials`, `BucketNotFound`,
//! `PermissionDenied`), or fix the request (`InvalidKey`, `InvalidRange`,
//! `InvalidArgument`, `InvalidPart`). Messages name the operation and the key.

use std::io;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {key:?}: no such object")]
    NotFound { op: &'static str, key: String },

    #[error(
        "{op} {key:?}: precondition failed (the object changed, or exists, since it was read)"
    )]
    PreconditionFailed { op: &'static str, key: String },

    /// A concurrent conditional write to the same key is in progress (S3's 409
    /// `ConditionalRequestConflict`); retry.
    #[error("{op} {key:?}: conflicting concurrent write, retry")]
    Conflict { op: &'static str, key: String },

    #[error("{op} {key:?}: range {range} is not satisfiable (object size {size:?})")]
    InvalidRange {
        op: &'static str,
        key: String,
        range: String,
        size: Option<u64>,
    },

    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    #[error("{op} {key:?}: {message}")]
    InvalidArgument {
        op: &'static str,
        key: String,
        message: String,
    },

    /// A multipart completion named a part that is missing, out of order, has
    /// another ETag, or is smaller than the minimum part size.
    #[error("{op} {key:?}: invalid part: {message}")]
    InvalidPart {
        op: &'static str,
        key: String,
        message: String,
    },

    #[error(
        "{op} {key:?}: no multipart upload {upload_id:?} (completed, aborted or never created)"
    )]
    UploadNotFound {
        op: &'static str,
        key: String,
        upload_id: String,
    },

    #[error("bucket {bucket:?} does not exist ({op})")]
    BucketNotFound { op: &'static str, bucket: String },

    /// The store knows who we are and refuses this operation.
    #[error("{op} {key:?}: permission denied: {message}")]
    PermissionDenied {
        op: &'static str,
        key: String,
        message: String,
    },

    /// The store does not accept our credentials (unknown access key, wrong
    /// secret, expired token).
    #[error("{op}: the store rejected the credentials ({message}); check MINIO_ROOT_USER/MINIO_ROOT_PASSWORD or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (`sessionfs store check` tests them)")]
    CredentialsRejected { op: &'static str, message: String },

    #[error("no S3 credentials: {hint}")]
    MissingCredentials { hint: String },

    /// The configuration cannot describe a store (bad endpoint, bad bucket name,
    /// a store directory that cannot be used).
    #[error("store configuration: {0}")]
    Config(String),

    /// Timeouts, dropped connections, 5xx and throttling that outlasted the retries.
    #[error("{op} {key:?}: store unavailable after retries: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },

    #[error("{op} {key:?}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },

    /// An answer from the store that fits none of the above.
    #[error("{op} {key:?}: unexpected store error: {message}")]
    Other {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    /// True when the same request may succeed if simply sent again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Transient { .. } | StoreError::Conflict { .. }
        )
    }

    /// The store did not answer usefully (down, stalling, 5xx, throttling
    /// beyond the retries): the same request may work once it is back.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, StoreError::PreconditionFailed { .. })
    }

    pub(crate) fn io(op: &'static str, key: &str, source: io::Error) -> Self {
        StoreError::Io {
            op,
            key: key.to_owned(),
            source,
        }
    }

    pub(crate) fn not_found(op: &'static str, key: &str) -> Self {
        StoreError::NotFound {
            op,
            key: key.to_owned(),
        }
    }

    pub(crate) fn precondition(op: &'static str, key: &str) -> Self {
        StoreError::PreconditionFailed {
            op,
            key: key.to_owned(),
        }
    }

    pub(crate) fn invalid_range(
        op: &'static str,
        key: &str,
        range: &crate::store::ByteRange,
        size: Option<u64>,
    ) -> Self {
        StoreError::InvalidRange {
            op,
            key: key.to_owned(),
            range: range.to_string(),
            size,
        }
    }
}
