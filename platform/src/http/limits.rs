//! Limits on a request's head that the HTTP server (hyper) leaves to the application,
//! answered as problems.
//!
//! hyper itself refuses what it cannot parse before any of this code runs, and answers
//! with an empty body and `connection: close`: a bare CR, a NUL or another forbidden byte
//! in the request line or a header (400), a Content-Length that is not a number or two
//! that differ (400), more than 100 header fields (431), a request target over 65,534
//! bytes (414), a head larger than its read buffer (431). Those answers cannot carry
//! problem+json (hyper offers no hook for them). What it does pass on is limited here,
//! more tightly, so that a long URI or a huge header gets a problem instead of being
//! processed (or echoed back in a 404).

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;

/// The longest request target (path and query) answered: 8 KiB, as common servers allow.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names and values) answered: 32 KiB.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Middleware (`from_fn(layer)`): 414 `uri_too_long`, 431 `request_headers_too_large`.
pub async fn layer(request: Request, next: Next) -> Response {
    if let Some(problem) = refusal(&request) {
        return problem.into_response();
    }
    next.run(request).await
}

fn refusal(request: &Request) -> Option<Problem> {
    let uri = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if uri > MAX_URI_BYTES {
        return Some(
            Problem::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "URI too long",
                format!("the request target has {uri} bytes; at most {MAX_URI_BYTES} are accepted"),
            )
            .with("limit", MAX_URI_BYTES),
        );
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Some(
            Problem::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_headers_too_large",
                "Request header fields too large",
                format!(
                    "the headers have {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"
                ),
            )
            .with("limit", MAX_HEADER_BYTES),
        );
    }
    None
}
