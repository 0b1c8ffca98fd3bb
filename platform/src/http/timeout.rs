//! A request-time limit whose answer is a problem, not an empty 408.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;

/// Middleware (`from_fn_with_state(timeout, layer)`): a request still running after
/// `timeout` is answered 503 `request_timeout`. A command may still commit after that; a
/// client learns its outcome by retrying with the same Idempotency-Key.
pub async fn layer(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            "Request timed out",
            format!(
                "the request did not finish within {} ms; a command may still complete: retry it with the same Idempotency-Key to learn its outcome",
                timeout.as_millis()
            ),
        )
        .with("timeout_ms", u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
        .into_response(),
    }
}
