//! `/v1/accounts`: open, deposit, withdraw, close. Every POST honours `Idempotency-Key`
//! (see [`super::intents`]).

use axum::extract::OriginalUri;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{extract::State, Router};
use ledger_events::{Amount, Currency};
use ledger_platform::http::{Json, Path};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::ApiError;
use super::headers::CommandHeaders;
use super::intents::{self, CommandRequest};
use super::AppState;
use crate::domain::{AccountCommand, AccountStatus};
use crate::ledger::Outcome;
use ledger_platform::openapi::ProblemDetails;

/// Longest owner name, in characters.
const MAX_OWNER_CHARS: usize = 200;
/// Longest payment reference, in characters.
const MAX_REFERENCE_CHARS: usize = 140;

/// The account routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/accounts", post(open))
        .route("/accounts/{account_id}/deposits", post(deposit))
        .route("/accounts/{account_id}/withdrawals", post(withdraw))
        .route("/accounts/{account_id}/close", post(close))
}

/// Body of `POST /v1/accounts`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// Who owns the account: 1 to 200 characters, no control characters.
    pub owner: String,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

/// Body of deposits and withdrawals.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyRequest {
    /// Positive integer minor units (cents for EUR).
    #[schema(value_type = i64, minimum = 1)]
    pub amount: serde_json::Number,
    /// Must be the account's currency.
    pub currency: String,
    /// Optional free text, up to 140 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The answer to a successful command.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AccountResponse {
    /// The account.
    pub account_id: Uuid,
    /// Its owner.
    pub owner: String,
    /// Its currency.
    pub currency: Option<String>,
    /// Balance in minor units after the command.
    pub balance: i64,
    /// `open` or `closed`.
    #[schema(value_type = String, example = "open")]
    pub status: AccountStatus,
    /// The account's version (sequence of its last event).
    pub version: i64,
    /// Global position of the command's last event; pass it to the query API to read your
    /// own write.
    pub position: i64,
}

impl From<&Outcome> for AccountResponse {
    fn from(outcome: &Outcome) -> Self {
        Self {
            account_id: outcome.aggregate_id,
            owner: outcome.state.owner.clone(),
            currency: outcome.state.currency.map(|c| c.code().to_owned()),
            balance: outcome.state.balance,
            status: outcome.state.status,
            version: outcome.version,
            position: outcome.position,
        }
    }
}

/// Open an account.
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts",
    params(super::openapi::IdempotencyKeyHeader),
    request_body = OpenAccountRequest,
    responses(
        (status = 201, description = "Opened", body = AccountResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
#[tracing::instrument(skip_all)]
pub async fn open(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Json(body): Json<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let currency = parse_currency(&body.currency)?;
    let owner = check_text("owner", &body.owner, MAX_OWNER_CHARS)?;
    let request = CommandRequest::new(&method, &uri, &json!(body), headers, StatusCode::CREATED);
    let command = AccountCommand::Open { owner, currency };
    run(&state, request, Uuid::now_v7(), command).await
}

/// Deposits and withdrawals differ only in the command they make.
#[derive(Debug, Clone, Copy)]
enum Movement {
    Deposit,
    Withdrawal,
}

/// Deposit money into an account.
#[utoipa::path(post, path = "/v1/accounts/{account_id}/deposits", tag = "accounts",
    params(("account_id" = Uuid, Path, description = "The account"), super::openapi::IdempotencyKeyHeader),
    request_body = MoneyRequest,
    responses(
        (status = 200, description = "Deposited", body = AccountResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn deposit(
    state: State<AppState>,
    method: Method,
    uri: OriginalUri,
    headers: CommandHeaders,
    account_id: Path<Uuid>,
    body: Json<MoneyRequest>,
) -> Result<Response, ApiError> {
    move_money(
        Movement::Deposit,
        state,
        method,
        uri,
        headers,
        account_id,
        body,
    )
    .await
}

/// Withdraw money from an account (never below zero).
#[utoipa::path(post, path = "/v1/accounts/{account_id}/withdrawals", tag = "accounts",
    params(("account_id" = Uuid, Path, description = "The account"), super::openapi::IdempotencyKeyHeader),
    request_body = MoneyRequest,
    responses(
        (status = 200, description = "Withdrawn", body = AccountResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn withdraw(
    state: State<AppState>,
    method: Method,
    uri: OriginalUri,
    headers: CommandHeaders,
    account_id: Path<Uuid>,
    body: Json<MoneyRequest>,
) -> Result<Response, ApiError> {
    move_money(
        Movement::Withdrawal,
        state,
        method,
        uri,
        headers,
        account_id,
        body,
    )
    .await
}

#[tracing::instrument(skip_all, fields(?movement, %account_id))]
async fn move_money(
    movement: Movement,
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Path(account_id): Path<Uuid>,
    Json(body): Json<MoneyRequest>,
) -> Result<Response, ApiError> {
    let (amount, currency, reference) = parse_money(&body)?;
    let request = CommandRequest::new(&method, &uri, &json!(body), headers, StatusCode::OK);
    let command = match movement {
        Movement::Deposit => AccountCommand::Deposit {
            amount,
            currency,
            reference,
        },
        Movement::Withdrawal => AccountCommand::Withdraw {
            amount,
            currency,
            reference,
        },
    };
    run(&state, request, account_id, command).await
}

/// Close an account (zero balance, no transfer in flight). Takes no body; any body sent is
/// ignored (and not part of the fingerprint).
#[utoipa::path(post, path = "/v1/accounts/{account_id}/close", tag = "accounts",
    params(("account_id" = Uuid, Path, description = "The account"), super::openapi::IdempotencyKeyHeader),
    responses(
        (status = 200, description = "Closed", body = AccountResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
#[tracing::instrument(skip_all, fields(%account_id))]
pub async fn close(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Path(account_id): Path<Uuid>,
) -> Result<Response, ApiError> {
    let request = CommandRequest::new(&method, &uri, &Value::Null, headers, StatusCode::OK);
    run(&state, request, account_id, AccountCommand::Close).await
}

/// Executes an account command under its idempotency key (if any) and renders the answer.
async fn run(
    state: &AppState,
    request: CommandRequest,
    account_id: Uuid,
    command: AccountCommand,
) -> Result<Response, ApiError> {
    intents::run(&state.ledger, request, account_id, command, |outcome| {
        json!(AccountResponse::from(outcome))
    })
    .await
}

pub(super) fn parse_currency(code: &str) -> Result<Currency, ApiError> {
    code.parse::<Currency>()
        .map_err(|err| ApiError::InvalidCurrency(err.to_string()))
}

pub(super) fn parse_money(
    body: &MoneyRequest,
) -> Result<(Amount, Currency, Option<String>), ApiError> {
    let amount = Amount::from_json_number(&body.amount)?;
    let currency = parse_currency(&body.currency)?;
    let reference = body
        .reference
        .as_deref()
        .map(|text| check_text("reference", text, MAX_REFERENCE_CHARS))
        .transpose()?;
    Ok((amount, currency, reference))
}

/// Non-blank text of at most `max` characters without control characters.
pub(super) fn check_text(field: &'static str, text: &str, max: usize) -> Result<String, ApiError> {
    let invalid = |message: String| ApiError::InvalidField { field, message };
    if text.trim().is_empty() {
        return Err(invalid("must not be blank".into()));
    }
    if text.chars().count() > max {
        return Err(invalid(format!("must be at most {max} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters".into()));
    }
    Ok(text.to_owned())
}
