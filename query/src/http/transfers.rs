//! `GET /v1/transfers/{id}`: where a transfer is (requested, debited, completed, failed with
//! a reason, compensated), with read-your-writes on the request's `position`.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use ledger_platform::http::Path;
use ledger_readmodels::transfers::{self, TransferRow};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::consistency::{requested, wait_for, Model};
use super::error::ApiError;
use super::AppState;
use ledger_platform::openapi::ProblemDetails;

/// The transfer routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/transfers/{transfer_id}", get(transfer))
}

/// `?position=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TransferQuery {
    /// Read your write: the position the transfer request answered with.
    #[param(value_type = Option<i64>, minimum = 0)]
    position: Option<String>,
}

/// Why a transfer failed or was compensated.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Failure {
    /// The refusal's code, e.g. `insufficient_funds`, `account_closed`.
    pub code: String,
    /// The refusal's message.
    pub reason: String,
}

/// A transfer as the query API answers it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TransferView {
    /// The transfer.
    pub transfer_id: String,
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// `requested`, `debited`, `completed`, `failed` or `compensated`.
    pub status: String,
    /// Whether nothing more will happen to it.
    pub terminal: bool,
    /// For `failed` and `compensated`.
    pub failure: Option<Failure>,
    /// Sequence of its last event.
    pub version: i64,
    /// Global position of its last event.
    pub position: i64,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// When its status last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<TransferRow> for TransferView {
    fn from(row: TransferRow) -> Self {
        let failure = match (row.failure_code, row.failure_reason) {
            (Some(code), Some(reason)) => Some(Failure { code, reason }),
            _ => None,
        };
        Self {
            terminal: matches!(row.state.as_str(), "completed" | "failed" | "compensated"),
            transfer_id: row.transfer_id,
            from: row.from_account,
            to: row.to_account,
            amount: row.amount,
            currency: row.currency,
            status: row.state,
            failure,
            version: row.version,
            position: row.last_position,
            requested_at: row.requested_at,
            updated_at: row.updated_at,
        }
    }
}

/// Where a transfer is.
#[utoipa::path(get, path = "/v1/transfers/{transfer_id}", tag = "transfers",
    params(("transfer_id" = uuid::Uuid, Path, description = "The transfer"), TransferQuery),
    responses(
        (status = 200, description = "The transfer", body = TransferView),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn transfer(
    State(state): State<AppState>,
    Path(transfer_id): Path<Uuid>,
    query: Result<Query<TransferQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::InvalidParameter {
        field: "query",
        message: err.body_text(),
    })?;
    let id = transfer_id.to_string();
    let position = requested(query.position.as_deref(), &headers)?;
    wait_for(&state, Model::Transfer, &id, position).await?;
    let row = transfers::get(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::TransferNotFound(id.clone()))?;
    let view = TransferView::from(row);
    let at = view.position;
    let mut response = Json(view).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
        .headers_mut()
        .insert("ledger-position", HeaderValue::from(at));
    Ok(response)
}
