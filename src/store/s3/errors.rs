//! Turning the AWS SDK's errors into [`StoreError`]s a caller can act on.
//!
//! The SDK has already retried what is worth retrying (5xx, throttling,
//! dropped connections, timeouts) by the time an error reaches us, so those
//! become `Transient`. Everything else is classified by S3 error code first
//! and HTTP status second, because HEAD responses carry no body and so no code.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::store::StoreError;

/// Which request failed, for the error message.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub op: &'static str,
    pub key: &'a str,
    pub bucket: &'a str,
}

pub(super) fn map_sdk_error<E>(ctx: Ctx<'_>, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = chain(&err);
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            let message = service
                .err()
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}"));
            classify(ctx, status, code, message)
        }
        SdkError::ResponseError(response) => {
            let status = response.raw().status().as_u16();
            classify(ctx, status, None, detail)
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            if mentions_missing_credentials(&detail) {
                missing_credentials(&detail)
            } else {
                // The SDK's wrappers ("dispatch failure: io error: client
                // error (Connect): …") say nothing an operator can act on;
                // the innermost cause does.
                let message = match &err {
                    SdkError::DispatchFailure(_) => {
                        format!("cannot connect to the store: {}", innermost(&err))
                    }
                    _ => detail,
                };
                StoreError::Transient {
                    op: ctx.op,
                    key: ctx.key.to_owned(),
                    message,
                }
            }
        }
        _ => {
            if mentions_missing_credentials(&detail) {
                missing_credentials(&detail)
            } else {
                StoreError::Other {
                    op: ctx.op,
                    key: ctx.key.to_owned(),
                    message: detail,
                }
            }
        }
    }
}

/// The last source of an error: the cause itself.
fn innermost(err: &dyn std::error::Error) -> String {
    let mut last = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// An error and its sources, as one line of plain text.
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Wrappers often repeat their source's text; say each thing once.
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn mentions_missing_credentials(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("credentialsnotloaded")
        || d.contains("no credentials")
        || d.contains("failed to load credentials")
}

pub(super) fn missing_credentials(detail: &str) -> StoreError {
    StoreError::MissingCredentials {
        hint: format!(
            "set MINIO_ROOT_USER and MINIO_ROOT_PASSWORD (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile): {detail}"
        ),
    }
}

/// Classifies an S3 error answer by its code and HTTP status.
pub(super) fn classify(
    ctx: Ctx<'_>,
    status: u16,
    code: Option<&str>,
    message: String,
) -> StoreError {
    let key = ctx.key.to_owned();
    let op = ctx.op;
    match (status, code) {
        (_, Some("NoSuchBucket")) => StoreError::BucketNotFound {
            op,
            bucket: ctx.bucket.to_owned(),
        },
        (_, Some("NoSuchUpload")) => StoreError::UploadNotFound {
            op,
            key,
            upload_id: String::new(),
        },
        (_, Some("NoSuchKey")) | (404, _) => StoreError::NotFound { op, key },
        (412, _) | (_, Some("PreconditionFailed")) => StoreError::PreconditionFailed { op, key },
        (409, _) => StoreError::Conflict { op, key },
        (416, _) | (_, Some("InvalidRange")) => StoreError::InvalidRange {
            op,
            key,
            range: message,
            size: None,
        },
        (
            _,
            Some(
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken"
                | "InvalidSecurity"
                | "AuthorizationHeaderMalformed",
            ),
        ) => StoreError::CredentialsRejected {
            op,
            message: format!("{}: {message}", code.unwrap_or_default()),
        },
        // A HEAD answers no error code: wrong credentials and a missing
        // permission look the same.
        (401 | 403, None) => StoreError::PermissionDenied {
            op,
            key,
            message: format!(
                "{message} (no reason given: the credentials may be wrong, or lack access to \
                 the bucket; `sessionfs store check` says which)"
            ),
        },
        (401 | 403, _) => StoreError::PermissionDenied { op, key, message },
        (_, Some("EntityTooSmall" | "InvalidPart" | "InvalidPartOrder")) => {
            StoreError::InvalidPart { op, key, message }
        }
        (429 | 500..=599, _) | (_, Some("SlowDown" | "RequestTimeout" | "InternalError")) => {
            StoreError::Transient { op, key, message }
        }
        (400, _) => StoreError::InvalidArgument {
            op,
            key,
            message: format!("{}: {message}", code.unwrap_or("BadRequest")),
        },
        _ => StoreError::Other {
            op,
            key,
            message: format!("HTTP {status} {}: {message}", code.unwrap_or("")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx {
            op: "get",
            key: "k",
            bucket: "b",
        }
    }

    #[test]
    fn codes_win_over_statuses() {
        assert!(matches!(
            classify(ctx(), 404, Some("NoSuchBucket"), String::new()),
            StoreError::BucketNotFound { .. }
        ));
        assert!(matches!(
            classify(ctx(), 403, Some("SignatureDoesNotMatch"), String::new()),
            StoreError::CredentialsRejected { .. }
        ));
        assert!(matches!(
            classify(ctx(), 403, None, String::new()),
            StoreError::PermissionDenied { .. }
        ));
        assert!(matches!(
            classify(ctx(), 404, None, String::new()),
            StoreError::NotFound { .. }
        ));
        assert!(matches!(
            classify(ctx(), 503, Some("SlowDown"), String::new()),
            StoreError::Transient { .. }
        ));
        assert!(matches!(
            classify(ctx(), 400, Some("EntityTooSmall"), String::new()),
            StoreError::InvalidPart { .. }
        ));
    }
}
