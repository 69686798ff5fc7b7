//! The HTTP API of sessionfs: the storage-worker contract
//! (`GET/HEAD/DELETE /api/storage-worker/sessions/...`, uploads, downloads,
//! file reads and writes) served over the same sessions as the mounts.
//!
//! Requests work on the process's [`Registry`]: a file written here lands in
//! the session's overlay, exactly as a write in a mount does, and a mount
//! of the session is told to drop what its kernel cached. A download of a
//! session with changes not yet written back writes them back first (or,
//! where it cannot, packs the merged view).
//!
//! - [`paths`]: the storage-worker routes, parsed and checked from the raw path.
//! - [`sessions`]: list, describe, delete, upload, download.
//! - [`files`]: list, read (with ranges), write, delete one file.
//! - [`error`]: error codes and statuses.
//! - [`metrics`], [`openapi`]: `/metrics` and `/openapi.json`.
//! - [`client`]: a client for other Rust services.

pub mod client;
pub mod error;
pub mod files;
pub mod metrics;
pub mod openapi;
pub mod paths;
pub mod schema;
pub mod sessions;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sessionfs_core::cache::blocks::BlockCache;
use sessionfs_core::overlay::registry::Registry;
use sessionfs_core::store::metered::MeteredStore;

use error::ApiError;
use metrics::{Gauges, Metrics};
use paths::Route;

/// What `/health` reports of the build.
#[derive(Clone, Debug)]
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: String,
    pub built_at: String,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `X-Container-ID` and `containerId`.
    pub container_id: String,
    /// When set, every route but `/health` needs `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Largest body of a file PUT.
    pub max_file_bytes: u64,
    /// Largest upload (compressed).
    pub max_upload_bytes: u64,
    /// Largest inflated tar stream an upload may hold (bomb guard).
    pub max_inflated_bytes: u64,
    /// Where uploads and downloads are spooled.
    pub spool_dir: PathBuf,
    pub build: BuildInfo,
}

pub struct AppState {
    pub config: ApiConfig,
    pub registry: Arc<Registry>,
    /// The store as the API sees it, counted (what reached the store).
    pub metered: Option<Arc<MeteredStore>>,
    pub cache: Option<Arc<BlockCache>>,
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(
        config: ApiConfig,
        registry: Arc<Registry>,
        metered: Option<Arc<MeteredStore>>,
        cache: Option<Arc<BlockCache>>,
    ) -> AppState {
        AppState {
            config,
            registry,
            metered,
            cache,
            metrics: Metrics::default(),
        }
    }

    /// The JSON error answer.
    pub fn error(&self, e: ApiError) -> Response {
        if e.status().is_server_error() {
            tracing::error!("{e}");
        }
        let body = schema::ErrorBody {
            error: e.code(),
            message: printable(&e.to_string()),
            container_id: self.container(),
        };
        let mut r = (e.status(), axum::Json(body)).into_response();
        match &e {
            ApiError::StoreUnavailable(_) => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::Unauthorized => {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::RangeNotSatisfiable(_, size) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        r
    }

    /// One of the documented answers (`schema.rs`; each carries its own
    /// `containerId`), encoded straight to bytes: a listing of 200,000
    /// files as a `serde_json::Value` tree would take twenty times the room.
    pub fn reply<T: serde::Serialize>(&self, status: StatusCode, body: &T) -> Response {
        match serde_json::to_vec(body) {
            Ok(bytes) => (
                status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response(),
            Err(e) => self.error(ApiError::Internal(format!("encoding the answer: {e}"))),
        }
    }

    /// This server's `containerId`.
    pub fn container(&self) -> String {
        self.config.container_id.clone()
    }
}

/// An error message fit for JSON and logs: bytes from a bad upload (say)
/// can end up quoted in it, so control characters go and length is bounded.
fn printable(m: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = m
        .chars()
        .filter(|c| !c.is_control() && *c != '\u{fffd}')
        .take(MAX)
        .collect();
    if m.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// The route label a handler leaves on its response, for the metrics.
#[derive(Clone, Copy)]
struct RouteLabel(&'static str);

/// The routes of the router itself (the storage-worker ones are
/// [`paths::Route`]s, dispatched by the fallback); all answer GET, and so
/// (axum) HEAD.
pub const FIXED_ROUTES: [&str; 4] = ["/health", "/ready", "/openapi.json", "/metrics"];

/// The whole API.
pub fn router(state: Arc<AppState>) -> Router {
    let [health_at, ready_at, openapi_at, metrics_at] = FIXED_ROUTES;
    Router::new()
        .route(health_at, get(health))
        .route(ready_at, get(ready))
        .route(openapi_at, get(openapi_doc))
        .route(metrics_at, get(metrics_text))
        .fallback(dispatch)
        .layer(axum::middleware::from_fn_with_state(state.clone(), around))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes
/// the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Every request: the token check, `X-Container-ID`, the metrics.
async fn around(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let open = path == "/health" || path == "/ready";
    let mut resp = if !open && !authorized(&st, &req) {
        with_label(st.error(ApiError::Unauthorized), "unauthorized")
    } else {
        next.run(req).await
    };
    if let Ok(v) = HeaderValue::from_str(&st.config.container_id) {
        resp.headers_mut().insert("x-container-id", v);
    }
    let route = match resp.extensions().get::<RouteLabel>() {
        Some(l) => l.0,
        None => match path.as_str() {
            "/health" => "/health",
            "/ready" => "/ready",
            "/metrics" => "/metrics",
            "/openapi.json" => "/openapi.json",
            _ => "unmatched",
        },
    };
    st.metrics.record(
        route,
        method.as_str(),
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

fn authorized(st: &AppState, req: &Request) -> bool {
    let Some(token) = &st.config.token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in constant time: the answer must not tell how much matched.
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn with_label(mut r: Response, label: &'static str) -> Response {
    r.extensions_mut().insert(RouteLabel(label));
    r
}

#[utoipa::path(method(get, head), path = "/health", summary = "Health and build information", security(()),
    responses((status = 200, description = "the process answers", body = schema::Health)))]
async fn health(State(st): State<Arc<AppState>>) -> Response {
    let b = &st.config.build;
    st.reply(
        StatusCode::OK,
        &schema::Health {
            status: "ok".into(),
            service: "storage-worker".into(),
            implementation: "sessionfs".into(),
            version: b.version.into(),
            build: schema::Build {
                commit_sha: b.commit.clone(),
                timestamp: b.built_at.clone(),
                version: b.version.into(),
            },
            container_id: st.container(),
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        },
    )
}

/// How long `/ready` waits for the store before calling it down.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Ready when the store answers a one-key listing of the bucket: what a load
/// balancer or an orchestrator asks before sending traffic. `/health` says
/// only that the process answers.
#[utoipa::path(method(get, head), path = "/ready", summary = "Whether the object store answers (for load balancers and orchestrators)",
    security(()),
    responses((status = 200, description = "the store answers", body = schema::Ready),
        (status = 503, description = "store_unavailable: the store did not answer a listing within 5 s", body = schema::ErrorBody)))]
async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let probe = st
        .registry
        .store()
        .list(sessionfs_core::store::ListRequest {
            prefix: String::new(),
            delimiter: Some("/".into()),
            continuation: None,
            max_keys: 1,
        });
    let why = match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => {
            return st.reply(
                StatusCode::OK,
                &schema::Ready {
                    status: "ready".into(),
                    store: st.registry.store().describe(),
                    container_id: st.container(),
                },
            )
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    st.error(ApiError::StoreUnavailable(why))
}

#[utoipa::path(method(get, head), path = "/openapi.json", summary = "This document",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object),
        (status = 401, description = "unauthorized", body = schema::ErrorBody)))]
async fn openapi_doc() -> Response {
    axum::Json(openapi::document()).into_response()
}

#[utoipa::path(method(get, head), path = "/metrics", summary = "Prometheus metrics",
    responses((status = 200, description = "text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "unauthorized", body = schema::ErrorBody)))]
async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let cache = st.cache.as_ref().map(|c| c.stats()).unwrap_or_default();
    let store = st
        .metered
        .as_ref()
        .map(|m| m.snapshot())
        .unwrap_or_default();
    let open = st.registry.open_sessions();
    let pending = open
        .iter()
        .filter(|s| s.has_pending_changes().unwrap_or(false))
        .count();
    let g = Gauges::of(cache, store, st.registry.holding() as u64, pending as u64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&g),
    )
        .into_response()
}

/// The storage-worker routes.
async fn dispatch(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let route = match paths::parse(&path) {
        Ok(Some(route)) => route,
        Ok(None) => return st.error(ApiError::NoRoute(format!("{} {path}", req.method()))),
        Err(e) => return with_label(st.error(e), "invalid"),
    };
    let label = route.template();
    let method = req.method().clone();
    let result = match (route, &method) {
        (Route::Sessions, &Method::GET) => sessions::list(&st).await,
        (Route::BulkDelete, &Method::POST) => sessions::bulk_delete(&st, req).await,
        (Route::Session(s), &Method::GET) => sessions::describe(&st, &s).await,
        (Route::Session(s), &Method::HEAD) => sessions::exists(&st, &s).await,
        (Route::Session(s), &Method::DELETE) => sessions::delete(&st, &s).await,
        (Route::Upload(s), &Method::POST | &Method::PUT) => sessions::upload(&st, &s, req).await,
        (Route::Download(s), &Method::GET | &Method::HEAD) => {
            sessions::download(&st, &s, &method).await
        }
        (Route::Files(s), &Method::GET) => files::list(&st, &s).await,
        (Route::File(s, p), &Method::GET | &Method::HEAD) => {
            files::read(&st, &s, &p, &method, req.headers()).await
        }
        (Route::File(s, p), &Method::PUT) => files::write(&st, &s, &p, req).await,
        (Route::File(s, p), &Method::DELETE) => files::delete(&st, &s, &p).await,
        (route, _) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: route.allowed(),
        }),
    };
    let resp = match result {
        Ok(r) => r,
        // HEAD answers carry no body: the status says it.
        Err(e) if method == Method::HEAD => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = e.status();
            r
        }
        Err(e) => st.error(e),
    };
    with_label(resp, label)
}

/// How much of a refused body is still read (and dropped) before the answer,
/// so an ordinary client, still sending, sees the 413 instead of a reset
/// connection. Beyond this the connection is simply closed.
pub(crate) const DRAIN_MAX: u64 = 64 << 20;

/// Reads a request body into memory, refusing it past `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: u64) -> Result<bytes::Bytes, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::UploadFailed(format!("reading the body: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            drain(stream, DRAIN_MAX).await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// Reads and drops up to `max` more bytes of a refused body.
pub(crate) async fn drain<S, E>(mut stream: S, max: u64)
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    use futures::StreamExt;
    let mut n = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        n += chunk.len() as u64;
        if n > max {
            break;
        }
    }
}

/// Runs blocking work (overlay and journal calls, packing) off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a worker thread failed: {e}")))?
}
