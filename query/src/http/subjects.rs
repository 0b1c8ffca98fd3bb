//! The data subjects: `GET /v1/subjects/{id}` (the subject), `GET /v1/subjects/{id}/totals`
//! (accounts and money per currency, what owner totals were) and, under the `export`
//! scope, `GET /v1/subjects/{id}/export` (everything the read models hold about the
//! subject, as one document).
//!
//! Read-your-writes on totals needs the account the write went to (`account` with
//! `position`): the read waits until the `subject_totals` projection has handled that
//! account up to the position.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use ledger_platform::http::Path;
use ledger_platform::openapi::ProblemDetails;
use ledger_readmodels::export::{self, SubjectExport};
use ledger_readmodels::subject_totals::{self, SubjectTotal};
use ledger_readmodels::subjects::{self, Subject};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::consistency::{requested, wait_for, Model};
use super::error::ApiError;
use super::AppState;

/// The subject routes readers may use (scope `read`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subjects/{subject_id}", get(subject))
        .route("/subjects/{subject_id}/totals", get(totals))
}

/// The export route (scope `export`).
pub fn export_router() -> Router<AppState> {
    Router::new().route("/subjects/{subject_id}/export", get(export))
}

fn subject_id(text: &str) -> Result<Uuid, ApiError> {
    text.parse().map_err(|_| ApiError::InvalidParameter {
        field: "subject_id",
        message: "not a subject id (a UUID)".into(),
    })
}

/// A data subject: the name (or `[erased]`), and when it was registered and erased.
#[utoipa::path(get, path = "/v1/subjects/{subject_id}", tag = "subjects",
    params(("subject_id" = Uuid, Path, description = "The data subject")),
    responses(
        (status = 200, description = "The subject", body = Subject),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn subject(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Subject>, ApiError> {
    let id = subject_id(&id)?;
    subjects::find(&state.pool, id)
        .await?
        .map(Json)
        .ok_or(ApiError::SubjectNotFound(id))
}

/// Query of the totals.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TotalsQuery {
    /// Read-your-writes token…
    position: Option<String>,
    /// …for this account (required with `position`).
    account: Option<String>,
}

/// A subject's totals.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Totals {
    /// The data subject.
    pub subject_id: Uuid,
    /// One row per currency.
    pub totals: Vec<SubjectTotal>,
}

/// A subject's accounts and money per currency.
#[utoipa::path(get, path = "/v1/subjects/{subject_id}/totals", tag = "subjects",
    params(("subject_id" = Uuid, Path, description = "The data subject"), TotalsQuery),
    responses(
        (status = 200, description = "The totals", body = Totals),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn totals(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<TotalsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Totals>, ApiError> {
    let id = subject_id(&id)?;
    let Query(query) = query.map_err(|err| ApiError::InvalidParameter {
        field: "query",
        message: err.body_text(),
    })?;
    let position = requested(query.position.as_deref(), &headers)?;
    match (position, query.account.as_deref()) {
        (Some(_), None) => {
            return Err(ApiError::InvalidParameter {
                field: "account",
                message: "a position on a cross-account read needs the account it came from".into(),
            })
        }
        (position, Some(account)) => {
            wait_for(&state, Model::SubjectTotals, account, position).await?
        }
        (None, None) => {}
    }
    let totals = subject_totals::for_subject(&state.pool, id).await?;
    if totals.is_empty() && subjects::find(&state.pool, id).await?.is_none() {
        return Err(ApiError::SubjectNotFound(id));
    }
    Ok(Json(Totals {
        subject_id: id,
        totals,
    }))
}

/// Everything the ledger's read models hold about a data subject, as one document: the
/// subject, each account with its whole statement, every transfer touching them. For an
/// erased subject the name and references are `[erased]` and the money is all there.
/// Needs the `export` scope.
#[utoipa::path(get, path = "/v1/subjects/{subject_id}/export", tag = "subjects",
    params(("subject_id" = Uuid, Path, description = "The data subject")),
    responses(
        (status = 200, description = "The export", body = SubjectExport),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn export(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SubjectExport>, ApiError> {
    let id = subject_id(&id)?;
    export::of_subject(&state.pool, id)
        .await?
        .map(Json)
        .ok_or(ApiError::SubjectNotFound(id))
}
