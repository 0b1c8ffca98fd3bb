//! OpenAPI 3.1 documents, generated from the code with utoipa: the problem schema every
//! error shares, the API-key security scheme, and the `/openapi.json` route.

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::{Modify, ToSchema};

/// An RFC 9457 problem, as every 4xx and 5xx answer carries it
/// (`application/problem+json`). Problems may carry more members (e.g. `balance`,
/// `current_position`, `field`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemDetails {
    /// `urn:ledger:problem:<code>`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, for people.
    pub detail: String,
    /// Stable machine-readable code, e.g. `insufficient_funds`.
    pub code: String,
}

/// Adds the bearer API-key scheme (`api_key`) the `/v1` routes require.
#[derive(Debug)]
pub struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from `ledger-admin keys create` (scope `write` for the command API, `read` for the query API)",
                    ))
                    .build(),
            ),
        );
    }
}

/// `GET /openapi.json`: the document.
pub fn router(document: OpenApi) -> Router {
    let document = std::sync::Arc::new(document);
    Router::new().route(
        "/openapi.json",
        get(move || {
            let document = document.clone();
            async move { Json(serde_json::to_value(&*document).unwrap_or_default()) }
        }),
    )
}
