//! The HTTP API of sessionfs (issue "HTTP API: the storage-worker contract").
//!
//! This crate will own the axum router serving the storage-worker endpoints
//! (`/health`, `/api/storage-worker/sessions/...`), their exact JSON shapes and
//! error codes, `X-Container-ID`, the optional bearer token, `/openapi.json`,
//! `/metrics`, and a small Rust client for other services. It serves from the
//! same session manager and block cache as the FUSE mounts, so both stay coherent.
//!
//! It is empty until that issue lands: the crate exists so the workspace layout,
//! and the dependency direction (api → core, never core → api), are fixed now.
