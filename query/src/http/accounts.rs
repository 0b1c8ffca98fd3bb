//! `GET /v1/accounts/{id}` (cached, with ETag) and `GET /v1/accounts/{id}/statement`
//! (cursor pagination).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ledger_platform::http::Path;
use ledger_readmodels::statements::{self, StatementEntry};
use ledger_readmodels::summaries::{self, AccountSummary};
use serde::{Deserialize, Serialize};

use super::consistency::{requested, wait_for, Model};
use super::error::ApiError;
use super::AppState;
use ledger_platform::openapi::ProblemDetails;

/// Default and largest statement page.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 500;

/// The account routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/accounts/{account_id}", get(summary))
        .route("/accounts/{account_id}/statement", get(statement))
}

/// `?position=` on every read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    /// Read your write: answer once the read model has reached this position (a command's
    /// `position`), else 412.
    #[param(value_type = Option<i64>, minimum = 0)]
    position: Option<String>,
}

/// Query of a statement page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatementQuery {
    /// Opaque cursor from a previous page's `next_cursor`.
    after: Option<String>,
    /// Entries per page, 1..=500 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// Read-your-writes token.
    #[param(value_type = Option<i64>, minimum = 0)]
    position: Option<String>,
}

/// A statement page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatementPage {
    /// The account.
    pub account_id: String,
    /// Oldest first.
    pub entries: Vec<StatementEntry>,
    /// Pass as `after` for the next page; entries appended later appear after it.
    pub next_cursor: String,
    /// Whether the page was full (more entries are there now).
    pub has_more: bool,
}

fn query_problem(err: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::InvalidParameter {
        field: "query",
        message: err.body_text(),
    }
}

/// The summary's entity tag: its id and version, and a digest of `body`, the JSON answered,
/// so a row whose content changes without a new event (a rebuild after a projection fix)
/// gets a new tag and a client's cached copy is not confirmed by a 304 (ADR 0015).
fn etag(summary: &AccountSummary, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    format!(
        "\"{}-{}-{}\"",
        summary.account_id,
        summary.version,
        hex::encode(&digest[..8])
    )
}

/// An account's balance and state.
#[utoipa::path(get, path = "/v1/accounts/{account_id}", tag = "accounts",
    params(("account_id" = String, Path, description = "The account"), SummaryQuery),
    responses(
        (status = 200, description = "The account", body = AccountSummary),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn summary(
    State(state): State<AppState>,
    Path(account_id): Path<String>,
    query: Result<Query<SummaryQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_problem)?;
    let position = requested(query.position.as_deref(), &headers)?;
    wait_for(&state, Model::Summary, &account_id, position).await?;
    let summary = load(&state, &account_id, position.unwrap_or(0)).await?;
    // Serialized once: the digest in the tag and the answer are the same bytes.
    let body = serde_json::to_vec(summary.as_ref())
        .map_err(|err| ApiError::Internal(format!("summary: {err}")))?;
    let tag = etag(&summary, &body);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
        .headers_mut()
        .insert("ledger-position", HeaderValue::from(summary.last_position));
    Ok(response)
}

/// The summary from the cache when it is at least at `position`, else from the database.
async fn load(
    state: &AppState,
    account_id: &str,
    position: i64,
) -> Result<Arc<AccountSummary>, ApiError> {
    if let Some(cached) = state.changes.cache.get(account_id).await {
        if cached.last_position >= position {
            state.changes.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached);
        }
    }
    state.changes.misses.fetch_add(1, Ordering::Relaxed);
    let generation = state.changes.generation();
    let summary = summaries::find(&state.pool, account_id)
        .await?
        .map(Arc::new)
        .ok_or_else(|| ApiError::AccountNotFound(account_id.to_owned()))?;
    state.changes.fill(generation, summary.clone()).await;
    Ok(summary)
}

fn parse_cursor(cursor: Option<&str>) -> Result<i64, ApiError> {
    let Some(cursor) = cursor else { return Ok(0) };
    cursor
        .strip_prefix("s")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::InvalidParameter {
            field: "after",
            message: "not a cursor this API gave out (use a page's next_cursor)".into(),
        })
}

fn parse_limit(limit: Option<&str>) -> Result<i64, ApiError> {
    let Some(limit) = limit else {
        return Ok(DEFAULT_PAGE);
    };
    limit
        .parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| ApiError::InvalidParameter {
            field: "limit",
            message: format!("must be an integer from 1 to {MAX_PAGE}"),
        })
}

/// A page of an account's statement, oldest first.
#[utoipa::path(get, path = "/v1/accounts/{account_id}/statement", tag = "accounts",
    params(("account_id" = String, Path, description = "The account"), StatementQuery),
    responses(
        (status = 200, description = "A page", body = StatementPage),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn statement(
    State(state): State<AppState>,
    Path(account_id): Path<String>,
    query: Result<Query<StatementQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<StatementPage>, ApiError> {
    let Query(query) = query.map_err(query_problem)?;
    let after = parse_cursor(query.after.as_deref())?;
    let limit = parse_limit(query.limit.as_deref())?;
    let position = requested(query.position.as_deref(), &headers)?;
    wait_for(&state, Model::Statement, &account_id, position).await?;
    let entries = statements::page(&state.pool, &account_id, after, limit).await?;
    if entries.is_empty() && after == 0 {
        return Err(ApiError::AccountNotFound(account_id));
    }
    let last = entries.last().map_or(after, |e| e.sequence);
    Ok(Json(StatementPage {
        account_id,
        has_more: i64::try_from(entries.len()).unwrap_or(0) == limit,
        entries,
        next_cursor: format!("s{last}"),
    }))
}
