//! `/v1/accounts`: open, deposit, withdraw, close.
//!
//! Every POST honours `Idempotency-Key`: the first request's answer (success or domain
//! refusal) is the answer to every later request with the same key and the same method,
//! path and body; a different request under the key is a 422. Answers are rendered from
//! the stored form, so a replay is byte-for-byte the first answer (plus an
//! `Idempotent-Replayed: true` header).

use axum::extract::OriginalUri;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{extract::State, Router};
use ledger_events::metadata::TRACEPARENT;
use ledger_events::{Amount, Currency, Metadata};
use ledger_platform::http::{Json, Path};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::ApiError;
use super::headers::CommandHeaders;
use super::AppState;
use crate::domain::{AccountCommand, AccountStatus};
use crate::idempotency::{self, StoredResponse};
use crate::ledger::{Intent, LedgerError, Outcome};

/// Longest owner name, in characters.
const MAX_OWNER_CHARS: usize = 200;
/// Longest payment reference, in characters.
const MAX_REFERENCE_CHARS: usize = 140;
/// How many times a request re-reads its key after losing a race for it.
const KEY_RACE_ROUNDS: usize = 3;

/// The account routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/accounts", post(open))
        .route("/accounts/{account_id}/deposits", post(deposit))
        .route("/accounts/{account_id}/withdrawals", post(withdraw))
        .route("/accounts/{account_id}/close", post(close))
}

/// Body of `POST /v1/accounts`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// Who owns the account: 1 to 200 characters, no control characters.
    pub owner: String,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

/// Body of deposits and withdrawals.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MoneyRequest {
    /// Positive integer minor units (cents for EUR).
    pub amount: serde_json::Number,
    /// Must be the account's currency.
    pub currency: String,
    /// Optional free text, up to 140 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The answer to a successful command.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
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
            account_id: outcome.account_id,
            owner: outcome.account.owner.clone(),
            currency: outcome.account.currency.map(|c| c.code().to_owned()),
            balance: outcome.account.balance,
            status: outcome.account.status,
            version: outcome.version,
            position: outcome.position,
        }
    }
}

/// What every command handler knows about its request.
struct CommandRequest {
    headers: CommandHeaders,
    fingerprint: String,
    success: StatusCode,
}

impl CommandRequest {
    fn new(
        method: &Method,
        uri: &Uri,
        body: &Value,
        headers: CommandHeaders,
        success: StatusCode,
    ) -> Self {
        Self {
            fingerprint: idempotency::fingerprint(method.as_str(), uri.path(), body),
            headers,
            success,
        }
    }

    fn key(&self) -> Option<&str> {
        self.headers.idempotency_key.as_deref()
    }

    fn metadata(&self) -> Metadata {
        let headers = &self.headers;
        let mut metadata = Metadata {
            request_id: Some(headers.request_id.clone()),
            correlation_id: Some(
                headers
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| headers.request_id.clone()),
            ),
            idempotency_key: headers.idempotency_key.clone(),
            request_hash: headers
                .idempotency_key
                .as_ref()
                .map(|_| self.fingerprint.clone()),
            ..Metadata::default()
        };
        metadata
            .extra
            .insert(TRACEPARENT.to_owned(), headers.traceparent.clone());
        metadata
    }
}

#[tracing::instrument(skip_all)]
async fn open(
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

async fn deposit(
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

async fn withdraw(
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

/// Close takes no body; any body sent is ignored (and not part of the fingerprint).
#[tracing::instrument(skip_all, fields(%account_id))]
async fn close(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Path(account_id): Path<Uuid>,
) -> Result<Response, ApiError> {
    let request = CommandRequest::new(&method, &uri, &Value::Null, headers, StatusCode::OK);
    run(&state, request, account_id, AccountCommand::Close).await
}

/// Executes a command under its idempotency key (if any) and renders the answer.
async fn run(
    state: &AppState,
    request: CommandRequest,
    account_id: Uuid,
    command: AccountCommand,
) -> Result<Response, ApiError> {
    let intent = Intent {
        account_id,
        command,
        metadata: request.metadata(),
    };
    let Some(key) = request.key() else {
        let outcome = state.ledger.execute(intent).await?;
        return Ok(render(&success(&outcome, request.success), false));
    };
    let pool = state.ledger.pool();
    for _ in 0..KEY_RACE_ROUNDS {
        if let Some(record) = idempotency::find(pool, key).await? {
            if record.request_hash != request.fingerprint {
                return Err(ApiError::IdempotencyKeyReused);
            }
            if let Some(stored) = record.response {
                return Ok(render(&stored, true));
            }
            if let Some(appended) = record.appended {
                // Committed by an earlier request that never stored its answer (it died, or
                // is about to store it): the answer is derived from the events.
                let outcome = state.ledger.outcome_at(&appended).await?;
                let stored = success(&outcome, request.success);
                idempotency::save_response(pool, key, &stored).await?;
                return Ok(render(&stored, true));
            }
        }
        match state.ledger.execute(intent.clone()).await {
            Ok(outcome) => {
                let stored = success(&outcome, request.success);
                if let Err(err) = idempotency::save_response(pool, key, &stored).await {
                    // The events are committed; a later duplicate derives the same answer.
                    tracing::warn!(error = %err, "could not store the idempotent response");
                }
                return Ok(render(&stored, false));
            }
            Err(LedgerError::Rejected(rule)) => {
                let problem = ApiError::Domain(rule).problem();
                let stored = StoredResponse {
                    status: problem.status.as_u16(),
                    body: problem.body(),
                };
                if idempotency::record_refusal(pool, key, &request.fingerprint, &stored).await? {
                    return Ok(render(&stored, false));
                }
                // Another request claimed the key meanwhile: its answer stands.
            }
            Err(LedgerError::KeyTaken) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Err(ApiError::Internal(format!(
        "idempotency key still contended after {KEY_RACE_ROUNDS} rounds"
    )))
}

fn success(outcome: &Outcome, status: StatusCode) -> StoredResponse {
    StoredResponse {
        status: status.as_u16(),
        body: json!(AccountResponse::from(outcome)),
    }
}

/// Renders a stored answer. The same function serves first answers and replays.
fn render(stored: &StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(stored.body.clone())).into_response();
    let headers = response.headers_mut();
    if status.is_client_error() || status.is_server_error() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(ledger_platform::http::problem::PROBLEM_JSON),
        );
    }
    if status == StatusCode::CREATED {
        if let Some(Ok(location)) = stored
            .body
            .get("account_id")
            .and_then(Value::as_str)
            .map(|id| HeaderValue::from_str(&format!("/v1/accounts/{id}")))
        {
            headers.insert(header::LOCATION, location);
        }
    }
    if let Some(position) = stored.body.get("position").and_then(Value::as_i64) {
        headers.insert("ledger-position", HeaderValue::from(position));
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn parse_currency(code: &str) -> Result<Currency, ApiError> {
    code.parse::<Currency>()
        .map_err(|err| ApiError::InvalidCurrency(err.to_string()))
}

fn parse_money(body: &MoneyRequest) -> Result<(Amount, Currency, Option<String>), ApiError> {
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
fn check_text(field: &'static str, text: &str, max: usize) -> Result<String, ApiError> {
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
