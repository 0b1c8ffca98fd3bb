//! Request ids: every request gets one (the client's `X-Request-Id` if it is sensible, a new
//! UUID otherwise). It is on the request's log span, in the response header, and handlers
//! read it (to store it in event metadata) through the [`RequestId`] extension.
//!
//! The span names the request's path, except where the path carries personal data: a path
//! parameter listed in [`PERSONAL_PARAMETERS`] (an owner's name) is logged as its route
//! template instead, so names never reach logs or exported traces.

use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header that carries the id both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied id kept; longer ones are replaced.
const MAX_LEN: usize = 128;

/// Path parameters whose values are personal data: a path matching a route with one of
/// them is logged as the route's template (`/v1/owners/{owner}/totals`).
pub const PERSONAL_PARAMETERS: &[&str] = &["{owner}"];

/// What the logs may say of a request's path: the path itself, or the route's template when
/// the route has a personal parameter.
pub fn loggable_path<'a>(path: &'a str, route: Option<&'a str>) -> &'a str {
    match route {
        Some(route) if PERSONAL_PARAMETERS.iter().any(|p| route.contains(p)) => route,
        _ => path,
    }
}

/// The id of the request being handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The client's id when it is 1..=128 visible ASCII characters, else a fresh one.
    fn from_header(value: Option<&HeaderValue>) -> Self {
        let given = value.and_then(|v| v.to_str().ok()).filter(|v| {
            !v.is_empty() && v.len() <= MAX_LEN && v.bytes().all(|b| b.is_ascii_graphic())
        });
        Self(given.map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self::from_header(parts.headers.get(&X_REQUEST_ID))))
    }
}

/// Middleware: assigns the id, opens the request's span, logs the outcome, echoes the id.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = RequestId::from_header(request.headers().get(&X_REQUEST_ID));
    request.extensions_mut().insert(id.clone());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        request_id = %id.0,
        method = %request.method(),
        path = %loggable_path(request.uri().path(), route),
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 {
            tracing::error!(status, latency_ms, "request failed");
        } else {
            tracing::info!(status, latency_ms, "request handled");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An owner's name in the path never reaches the log: the span and its events name the
    /// route's template. Other paths are logged as they are.
    #[tokio::test]
    async fn a_personal_path_parameter_is_logged_as_its_template() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route("/v1/owners/{owner}/totals", get(|| async { "ok" }))
            .route("/v1/accounts/{account_id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(layer));
        for uri in [
            "/v1/owners/Zelda%20Quixote-Umbridge/totals",
            "/v1/accounts/4b7e6a4e-2f7c-4b7e-9a53-7d1f6f0c2a11",
        ] {
            let response = app
                .clone()
                .oneshot(Request::get(uri).body(axum::body::Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("request handled"), "{log}");
        assert!(!log.contains("Zelda"), "an owner's name was logged: {log}");
        assert!(log.contains("/v1/owners/{owner}/totals"), "{log}");
        assert!(
            log.contains("/v1/accounts/4b7e6a4e-2f7c-4b7e-9a53-7d1f6f0c2a11"),
            "{log}"
        );
    }

    #[test]
    fn sensible_client_ids_are_kept_and_others_replaced() {
        let kept = RequestId::from_header(Some(&HeaderValue::from_static("abc-123")));
        assert_eq!(kept.0, "abc-123");
        for bad in ["", "has space", &"x".repeat(129)] {
            let replaced = RequestId::from_header(Some(&HeaderValue::from_str(bad).unwrap()));
            assert_ne!(replaced.0, bad);
            assert!(uuid::Uuid::parse_str(&replaced.0).is_ok());
        }
    }
}
