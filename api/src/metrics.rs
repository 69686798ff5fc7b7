//! `GET /metrics`, in Prometheus' text format: requests by route, method and
//! status; latency histograms by route; the block cache; the requests and
//! bytes that reached the object store; open sessions and pending changes.
//!
//! Counters live in one mutex-held map: a request takes it once, for
//! nanoseconds, which is far below what serving it costs.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
}

/// Figures taken from the rest of the process when `/metrics` is read.
pub struct Gauges {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_evicted: u64,
    pub cache_bytes: u64,
    pub store_requests: u64,
    pub store_bytes_in: u64,
    pub store_bytes_out: u64,
    pub open_sessions: u64,
    pub sessions_with_pending_changes: u64,
}

impl Gauges {
    /// The cache's and the store's figures, and the sessions'.
    pub fn of(
        cache: sessionfs_core::cache::blocks::CacheStats,
        store: sessionfs_core::store::metered::Snapshot,
        open_sessions: u64,
        sessions_with_pending_changes: u64,
    ) -> Gauges {
        Gauges {
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_evicted: cache.evicted,
            cache_bytes: cache.bytes,
            store_requests: store.requests,
            store_bytes_in: store.bytes_in,
            store_bytes_out: store.bytes_out,
            open_sessions,
            sessions_with_pending_changes,
        }
    }
}

impl Metrics {
    pub fn record(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .entry((route, method.to_owned(), status))
            .or_default() += 1;
        let secs = took.as_secs_f64();
        let mut latency = self.latency.lock();
        let h = latency.entry(route).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP sessionfs_http_requests_total HTTP requests answered.\n");
        out.push_str("# TYPE sessionfs_http_requests_total counter\n");
        for ((route, method, status), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "sessionfs_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP sessionfs_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE sessionfs_http_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().iter() {
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sessionfs_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "sessionfs_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "sessionfs_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sessionfs_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let mut gauge = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            "sessionfs_cache_hits_total",
            "counter",
            "Block cache hits.",
            g.cache_hits,
        );
        gauge(
            "sessionfs_cache_misses_total",
            "counter",
            "Block cache misses.",
            g.cache_misses,
        );
        gauge(
            "sessionfs_cache_evictions_total",
            "counter",
            "Blocks evicted.",
            g.cache_evicted,
        );
        gauge(
            "sessionfs_cache_bytes",
            "gauge",
            "Bytes held by the block cache.",
            g.cache_bytes,
        );
        gauge(
            "sessionfs_store_requests_total",
            "counter",
            "Requests sent to the object store.",
            g.store_requests,
        );
        gauge(
            "sessionfs_store_received_bytes_total",
            "counter",
            "Bytes read from the object store.",
            g.store_bytes_in,
        );
        gauge(
            "sessionfs_store_sent_bytes_total",
            "counter",
            "Bytes written to the object store.",
            g.store_bytes_out,
        );
        gauge(
            "sessionfs_open_sessions",
            "gauge",
            "Sessions open in this process, those being closed included until their journals are.",
            g.open_sessions,
        );
        gauge(
            "sessionfs_sessions_with_pending_changes",
            "gauge",
            "Open sessions holding changes not yet written back.",
            g.sessions_with_pending_changes,
        );
        let wb = &sessionfs_core::overlay::writeback::COUNTERS;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, value) in [
            (
                "sessionfs_writebacks_total",
                "Write-backs completed.",
                load(&wb.writebacks),
            ),
            (
                "sessionfs_writeback_failures_total",
                "Write-backs that failed (retried).",
                load(&wb.failures),
            ),
            (
                "sessionfs_writeback_conflicts_total",
                "Write-backs refused because another writer replaced the object.",
                load(&wb.conflicts),
            ),
            (
                "sessionfs_writeback_uploaded_bytes_total",
                "Bytes write-backs sent to the store.",
                load(&wb.uploaded_bytes),
            ),
            (
                "sessionfs_writeback_copied_bytes_total",
                "Bytes write-backs copied server-side from the old object.",
                load(&wb.copied_bytes),
            ),
        ] {
            gauge(name, "counter", help, value);
        }
        out
    }
}

/// `/metrics` alone, for a process that serves no API (a standalone
/// mount's `--metrics-addr`): the same families, the HTTP ones empty.
pub async fn serve_alone(
    listener: tokio::net::TcpListener,
    gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
) -> std::io::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&gauges());
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
