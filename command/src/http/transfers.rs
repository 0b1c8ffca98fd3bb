//! `/v1/transfers`: ask for money to move between two accounts.
//!
//! The request is recorded (`TransferRequested`) and answered 202 with the transfer id and
//! the position token; the transfer process manager (in the projector) then debits the
//! source, credits the destination and completes it, or fails/compensates it. Its state is
//! read from the query API (`GET /v1/transfers/{id}`). An `Idempotency-Key` is required:
//! a blind retry of a transfer is the one request that would move a customer's money twice.

use axum::extract::OriginalUri;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{extract::State, Router};
use ledger_events::Amount;
use ledger_platform::http::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::accounts::parse_currency;
use super::error::ApiError;
use super::headers::CommandHeaders;
use super::intents::{self, CommandRequest};
use super::AppState;
use crate::domain::{Transfer, TransferCommand, TransferStatus};
use crate::ledger::Outcome;
use ledger_platform::openapi::ProblemDetails;

/// The transfer routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/transfers", post(request))
}

/// Body of `POST /v1/transfers`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The account debited.
    pub from: Uuid,
    /// The account credited; must differ from `from`.
    pub to: Uuid,
    /// Positive integer minor units.
    #[schema(value_type = i64, minimum = 1)]
    pub amount: serde_json::Number,
    /// ISO 4217 code; both accounts must hold it.
    pub currency: String,
}

/// The answer to an accepted transfer (202).
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TransferResponse {
    /// The transfer's id: read its progress at `/v1/transfers/{transfer_id}`.
    pub transfer_id: Uuid,
    /// `requested`: the money has not moved yet.
    #[schema(value_type = String, example = "requested")]
    pub status: TransferStatus,
    /// The account debited.
    pub from: Option<Uuid>,
    /// The account credited.
    pub to: Option<Uuid>,
    /// Minor units.
    pub amount: Option<i64>,
    /// ISO 4217 code.
    pub currency: Option<String>,
    /// Global position of `TransferRequested`: pass it to the query API to read the
    /// transfer (and, once it is completed, both legs) as of at least this request.
    pub position: i64,
}

impl From<&Outcome<Transfer>> for TransferResponse {
    fn from(outcome: &Outcome<Transfer>) -> Self {
        let transfer = &outcome.state;
        Self {
            transfer_id: outcome.aggregate_id,
            status: transfer.status,
            from: transfer.from,
            to: transfer.to,
            amount: transfer.amount.map(|a| a.minor_units()),
            currency: transfer.currency.map(|c| c.code().to_owned()),
            position: outcome.position,
        }
    }
}

/// Ask for money to move between two accounts; read the outcome from the query API.
#[utoipa::path(post, path = "/v1/transfers", tag = "transfers",
    params(super::openapi::IdempotencyKeyHeader),
    request_body = TransferRequest,
    responses(
        (status = 202, description = "Accepted: recorded as requested", body = TransferResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
#[tracing::instrument(skip_all)]
pub async fn request(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Json(body): Json<TransferRequest>,
) -> Result<Response, ApiError> {
    let amount = Amount::from_json_number(&body.amount)?;
    let currency = parse_currency(&body.currency)?;
    if headers.idempotency_key.is_none() {
        return Err(ApiError::IdempotencyKeyRequired);
    }
    let request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &json!(body),
        headers,
        StatusCode::ACCEPTED,
    );
    let command = TransferCommand::Request {
        from: body.from,
        to: body.to,
        amount,
        currency,
    };
    intents::run(
        &state.transfers,
        request,
        Uuid::now_v7(),
        command,
        |outcome| json!(TransferResponse::from(outcome)),
    )
    .await
}
