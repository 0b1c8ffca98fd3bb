//! Prometheus metrics: one recorder per process, `GET /metrics` in the text format, and a
//! middleware that counts every request and times it per route.
//!
//! Metric names (every process):
//! - `http_requests_total{method, route, status}`: requests answered;
//! - `http_request_duration_seconds{method, route}`: latency histogram;
//!
//! plus each process's own (events appended, relay lag, projector lag per partition, dead
//! letters, cache hits and misses), refreshed when `/metrics` is scraped.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (tests start several apps in one process:
/// they share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (cannot happen in our binaries): render an
            // empty one rather than fail the process.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Middleware: counts and times every request by method, matched route and status.
pub async fn layer(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: runs `refresh` (which sets the gauges read at scrape time), then renders
/// every metric of the process in the Prometheus text format.
pub fn router<F, Fut>(refresh: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = handle();
    Router::new().route(
        "/metrics",
        get(move || {
            let refresh = refresh.clone();
            async move {
                refresh().await;
                let mut response = handle.render().into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
        }),
    )
}

/// A `/metrics` route with nothing to refresh.
pub fn static_router() -> Router {
    router(|| async {})
}
