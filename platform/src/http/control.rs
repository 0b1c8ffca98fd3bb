//! Control characters in a request's path or query: refused before any handler runs.
//!
//! A percent-encoded control character (`%00`, `%0A`, `%7F`, `%C2%85`…) decodes into a path
//! segment or a query parameter that no identifier, owner, cursor or number of this API
//! contains, and that PostgreSQL may refuse outright (a NUL byte in `text` is an error, not a
//! miss). So every such request gets a 400 problem here, on both APIs, whatever the route:
//! `invalid_path_parameter` for the path, `invalid_parameter` for the query.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;

use super::problem::Problem;

/// Middleware (`from_fn(layer)`): refuses a path or query holding a control character.
pub async fn layer(request: Request, next: Next) -> Response {
    if let Some(problem) = refusal(request.uri()) {
        return problem.into_response();
    }
    next.run(request).await
}

/// The problem with `uri`, if its decoded path or query holds a control character.
pub fn refusal(uri: &axum::http::Uri) -> Option<Problem> {
    for (index, segment) in uri.path().split('/').enumerate().skip(1) {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if decoded.chars().any(char::is_control) {
            return Some(
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_path_parameter",
                    "Invalid path parameter",
                    format!("path segment {index} contains a control character"),
                )
                .with("segment", index),
            );
        }
    }
    let query = uri.query().unwrap_or_default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name.chars().chain(value.chars()).any(char::is_control) {
            let field = if name.chars().any(char::is_control) {
                "query".to_owned()
            } else {
                name.into_owned()
            };
            return Some(
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    "Invalid parameter",
                    format!("{field}: contains a control character"),
                )
                .with("field", field),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(uri: &str) -> Option<String> {
        refusal(&uri.parse().unwrap()).map(|problem| problem.code)
    }

    #[test]
    fn every_control_character_in_a_path_segment_or_query_parameter_is_refused() {
        let controls = (0u8..0x20)
            .chain([0x7f])
            .map(|b| format!("%{b:02X}"))
            .chain(["%C2%80".to_owned(), "%C2%9F".to_owned()]);
        for control in controls {
            for uri in [
                format!("/v1/accounts/{control}"),
                format!("/v1/accounts/a{control}b/statement"),
                format!("/v1/owners/{control}/totals"),
            ] {
                assert_eq!(
                    refused(&uri).as_deref(),
                    Some("invalid_path_parameter"),
                    "{uri}"
                );
            }
            for uri in [
                format!("/v1/accounts/x?position={control}"),
                format!("/v1/owners/o/totals?position=1&account={control}"),
                format!("/v1/accounts/x/statement?after=s1{control}"),
                format!("/v1/accounts/x?{control}=1"),
            ] {
                assert_eq!(refused(&uri).as_deref(), Some("invalid_parameter"), "{uri}");
            }
        }
    }

    #[test]
    fn ordinary_paths_and_queries_pass() {
        for uri in [
            "/v1/accounts/0193a1b2-0000-7000-8000-000000000000",
            "/v1/owners/Alice%20Smith/totals?position=3&account=x",
            "/v1/owners/%C3%89lodie/totals",
            "/v1/accounts/x/statement?after=s10&limit=5",
            "/v1/owners/a+b/totals?account=a+b",
            "/healthz",
            "/",
        ] {
            assert_eq!(refused(uri), None, "{uri}");
        }
    }
}
