//! `/v1/accounts`: open, deposit, withdraw, close. Every POST honours `Idempotency-Key`
//! (see [`super::intents`]).
//!
//! Personal data (ADR 0019): an account belongs to a data subject (`subject_id`); answers
//! carry the id, never a name. A reference on a deposit or withdrawal is sealed here, under
//! the current key of the account's subject and bound to the event's id (chosen here), so
//! the events, snapshots and stored answers hold ciphertext only.

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
use crate::subjects::SubjectError;
use ledger_platform::openapi::ProblemDetails;

/// Longest name of a data subject (or deprecated `owner`), in characters.
pub(super) const MAX_NAME_CHARS: usize = 200;
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

/// Body of `POST /v1/accounts`: exactly one of `subject_id` and (deprecated) `owner`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// The data subject who holds the account (`POST /v1/subjects` answers it): registered
    /// and not erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_id: Option<Uuid>,
    /// **Deprecated**, for clients written before data subjects: the holder's name (1 to
    /// 200 characters, no control characters). A new data subject is registered for it
    /// (as `POST /v1/subjects` would) and the account opened for that subject; the answer
    /// carries its `subject_id`. Every such request registers another subject, so a
    /// person's accounts opened this way do not share one: register the subject once and
    /// send `subject_id` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(deprecated)]
    pub owner: Option<String>,
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
    /// Optional free text, up to 140 characters. Personal data: stored encrypted under the
    /// key of the account's data subject; refused (422 `subject_erased`) once the subject
    /// is erased, and (422 `subject_not_migrated`) for an account of a legacy owner not yet
    /// migrated to a data subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The answer to a successful command.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AccountResponse {
    /// The account.
    pub account_id: Uuid,
    /// The data subject who holds it.
    pub subject_id: Uuid,
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
            subject_id: outcome.state.subject_id,
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
    let owner = match (&body.subject_id, &body.owner) {
        (Some(_), None) => None,
        (None, Some(owner)) => Some(check_text("owner", owner, MAX_NAME_CHARS)?),
        _ => {
            return Err(ApiError::InvalidField {
                field: "subject_id",
                message: "give exactly one of `subject_id` and (deprecated) `owner`".into(),
            })
        }
    };
    let request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &json!(body),
        headers,
        StatusCode::CREATED,
    );
    // A replay answers what the first request got, whatever became of the subject since.
    if let Some(replayed) = intents::replay(&state.ledger, &request, render_account).await? {
        return Ok(replayed);
    }
    let subject_id = match (body.subject_id, owner) {
        (Some(subject_id), _) => {
            state
                .subjects
                .check_holder(subject_id)
                .await
                .map_err(|err| match err {
                    SubjectError::NotFound { subject } => ApiError::UnknownHolder(subject),
                    other => ApiError::Subject(other),
                })?;
            subject_id
        }
        (None, Some(owner)) => {
            // Deprecated path: a new subject for the name. Its event does not carry the
            // idempotency key (the account's event claims it); a request that then loses
            // the key to a concurrent duplicate leaves that subject without an account.
            state
                .subjects
                .register(&owner, request.metadata_unkeyed())
                .await?
                .subject_id
        }
        (None, None) => return Err(ApiError::Internal("no account holder".into())),
    };
    let command = AccountCommand::Open {
        subject_id,
        currency,
    };
    run(&state, request, Uuid::now_v7(), command).await
}

fn render_account(outcome: &Outcome) -> Value {
    json!(AccountResponse::from(outcome))
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
    let mut request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &json!(body),
        headers,
        StatusCode::OK,
    );
    let reference = match reference {
        None => None,
        Some(text) => {
            // Sealing needs the subject's live key: a replay must not (erased since).
            if let Some(replayed) = intents::replay(&state.ledger, &request, render_account).await?
            {
                return Ok(replayed);
            }
            let sealed = state.subjects.seal_reference(account_id, &text).await?;
            request = request.sealed(sealed.event_id, sealed.subject_id);
            Some(sealed.ciphertext)
        }
    };
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
    let request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &Value::Null,
        headers,
        StatusCode::OK,
    );
    run(&state, request, account_id, AccountCommand::Close).await
}

/// Executes an account command under its idempotency key (if any) and renders the answer.
async fn run(
    state: &AppState,
    request: CommandRequest,
    account_id: Uuid,
    command: AccountCommand,
) -> Result<Response, ApiError> {
    intents::run(&state.ledger, request, account_id, command, render_account).await
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
