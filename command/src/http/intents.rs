//! Running one intent under its `Idempotency-Key`, for every command route.
//!
//! The first request's answer (success or domain refusal) is the answer to every later
//! request with the same key and the same method, path and body; a different request under
//! the key is a 422. Answers are rendered from the stored form, so a replay is byte-for-byte
//! the first answer (plus an `Idempotent-Replayed: true` header).

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ledger_events::metadata::TRACEPARENT;
use ledger_events::Metadata;
use ledger_pii::Keyring;
use serde_json::Value;
use sqlx::PgPool;
use std::future::Future;
use uuid::Uuid;

use super::error::ApiError;
use super::headers::CommandHeaders;
use crate::domain::Decider;
use crate::idempotency::{self, Appended, ClientKey, StoredResponse};
use crate::ledger::{Intent, Ledger, LedgerError, Outcome};

/// How many times a request re-reads its key after losing a race for it.
const KEY_RACE_ROUNDS: usize = 3;

/// What every command handler knows about its request.
#[derive(Debug)]
pub struct CommandRequest {
    /// The headers it came with.
    pub headers: CommandHeaders,
    /// Its fingerprints: the first is stored, any matches ([`idempotency::fingerprints`]).
    /// Computed only for a request with an idempotency key: nothing else compares them.
    fingerprints: Vec<String>,
    success: StatusCode,
    /// The id the command's event must be stored under (a ciphertext in it is bound to it).
    event_id: Option<Uuid>,
    /// The data subject whose key sealed the command's personal fields.
    data_subject: Option<Uuid>,
}

impl CommandRequest {
    /// The request's fingerprints (keyed by `keyring`; only when it carries an idempotency
    /// key) and the status of its success.
    pub fn new(
        keyring: &Keyring,
        method: &Method,
        uri: &Uri,
        body: &Value,
        headers: CommandHeaders,
        success: StatusCode,
    ) -> Self {
        let fingerprints = match headers.idempotency_key {
            Some(_) => idempotency::fingerprints(keyring, method.as_str(), uri.path(), body),
            None => Vec::new(),
        };
        Self {
            fingerprints,
            headers,
            success,
            event_id: None,
            data_subject: None,
        }
    }

    /// The command carries a field sealed under `data_subject`'s key and bound to
    /// `event_id`: its event is stored under that id and names the subject in its metadata.
    #[must_use]
    pub fn sealed(mut self, event_id: Uuid, data_subject: Uuid) -> Self {
        self.event_id = Some(event_id);
        self.data_subject = Some(data_subject);
        self
    }

    /// The status of its success.
    pub fn success(&self) -> StatusCode {
        self.success
    }

    /// Its fingerprint as stored (method, path and body as sent, keyed by the current KEK);
    /// empty for a request without an idempotency key.
    pub fn fingerprint(&self) -> &str {
        self.fingerprints.first().map_or("", String::as_str)
    }

    /// Every fingerprint it matches: under each configured KEK, and the unkeyed one of
    /// keys stored before keyed fingerprints.
    pub fn fingerprints(&self) -> &[String] {
        &self.fingerprints
    }

    /// Whether a key's stored fingerprint is this request's.
    pub fn is_same_request(&self, stored: &str) -> bool {
        self.fingerprints.iter().any(|accepted| accepted == stored)
    }

    /// Its idempotency key, in its client's scope.
    pub fn key(&self) -> Option<ClientKey> {
        self.headers
            .idempotency_key
            .as_ref()
            .map(|key| ClientKey::new(self.headers.client_scope.clone(), key.clone()))
    }

    /// The metadata its events carry.
    pub fn metadata(&self) -> Metadata {
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
            idempotency_scope: headers
                .idempotency_key
                .as_ref()
                .map(|_| headers.client_scope.clone()),
            request_hash: headers
                .idempotency_key
                .as_ref()
                .map(|_| self.fingerprint().to_owned()),
            ..Metadata::default()
        };
        metadata.data_subject = self.data_subject.map(|s| s.to_string());
        metadata
            .extra
            .insert(TRACEPARENT.to_owned(), headers.traceparent.clone());
        metadata
    }

    /// The metadata of a write made on the way to the request's own command (the subject
    /// registered for a deprecated `owner`): without the idempotency key, which the command
    /// claims.
    pub fn metadata_unkeyed(&self) -> Metadata {
        Metadata {
            idempotency_key: None,
            idempotency_scope: None,
            request_hash: None,
            data_subject: None,
            ..self.metadata()
        }
    }
}

/// The answer an earlier request with the same key already got (or that its committed
/// events give), if there was one: a replay. A different request under the key is
/// [`ApiError::IdempotencyKeyReused`]. Handlers that must do work before the command
/// (sealing a reference, registering a subject) ask this first, so a replay never depends
/// on that work (a subject erased since, say).
pub async fn replay<A>(
    ledger: &Ledger<A>,
    request: &CommandRequest,
    body: impl Fn(&Outcome<A>) -> Value,
) -> Result<Option<Response>, ApiError>
where
    A: Decider,
    A::Error: std::error::Error,
    ApiError: From<LedgerError<A::Error>> + From<A::Error>,
{
    let Some(key) = request.key() else {
        return Ok(None);
    };
    let pool = ledger.pool();
    let Some(record) = idempotency::find(pool, &key, request.fingerprints()).await? else {
        return Ok(None);
    };
    let body = &body;
    let derive = |appended: Appended| async move { Ok(body(&ledger.outcome_at(&appended).await?)) };
    answer_from_record(pool, request, &record, &derive).await
}

/// The answer `record` holds or its events give (`derive` turns the events appended under
/// the key into the success body, which is then stored); `None` when it has neither yet. A
/// different request under the key is [`ApiError::IdempotencyKeyReused`].
async fn answer_from_record<Derive, DeriveFut>(
    pool: &PgPool,
    request: &CommandRequest,
    record: &idempotency::KeyRecord,
    derive: &Derive,
) -> Result<Option<Response>, ApiError>
where
    Derive: Fn(Appended) -> DeriveFut,
    DeriveFut: Future<Output = Result<Value, ApiError>>,
{
    if !request.is_same_request(&record.request_hash) {
        return Err(ApiError::IdempotencyKeyReused);
    }
    if let Some(stored) = &record.response {
        return Ok(Some(render(stored, true)));
    }
    if let Some(appended) = &record.appended {
        // Committed by an earlier request that never stored its answer (it died, or is
        // about to store it): the answer is derived from the events.
        let stored = StoredResponse {
            status: request.success.as_u16(),
            body: derive(appended.clone()).await?,
        };
        idempotency::save_response(pool, &record.key, &stored).await?;
        return Ok(Some(render(&stored, true)));
    }
    Ok(None)
}

/// What one attempt at a write under an idempotency key gave.
pub(super) enum Attempt {
    /// Carried out: the success body.
    Done(Value),
    /// Refused by a rule: the key's answer for good unless it is a 409 (ADR 0002), stored
    /// if the key is still free.
    Refused(ApiError),
    /// Another request claimed the key first: its record is read again.
    KeyTaken,
}

/// Runs a write under the request's idempotency key (if any) and renders the answer, for
/// every command route: a stored answer is replayed; events committed under the key
/// without a stored answer give it through `derive`; a concurrent request that claims the
/// key first wins, and this one answers what that one got. `execute` makes one attempt
/// with the request's metadata.
pub(super) async fn under_key<Execute, ExecuteFut, Derive, DeriveFut>(
    pool: &PgPool,
    request: &CommandRequest,
    execute: Execute,
    derive: Derive,
) -> Result<Response, ApiError>
where
    Execute: Fn(Metadata) -> ExecuteFut,
    ExecuteFut: Future<Output = Result<Attempt, ApiError>>,
    Derive: Fn(Appended) -> DeriveFut,
    DeriveFut: Future<Output = Result<Value, ApiError>>,
{
    let success = |body| StoredResponse {
        status: request.success.as_u16(),
        body,
    };
    let Some(key) = request.key() else {
        return match execute(request.metadata()).await? {
            Attempt::Done(body) => Ok(render(&success(body), false)),
            Attempt::Refused(refusal) => Err(refusal),
            // Cannot happen without a key; answered as the ledger always answered it.
            Attempt::KeyTaken => Err(ApiError::Conflict { attempts: 1 }),
        };
    };
    for _ in 0..KEY_RACE_ROUNDS {
        if let Some(record) = idempotency::find(pool, &key, request.fingerprints()).await? {
            if let Some(replayed) = answer_from_record(pool, request, &record, &derive).await? {
                return Ok(replayed);
            }
        }
        match execute(request.metadata()).await? {
            Attempt::Done(body) => {
                let stored = success(body);
                if let Err(err) = idempotency::save_response(pool, &key, &stored).await {
                    // The events are committed; a later duplicate derives the same answer.
                    tracing::warn!(error = %err, "could not store the idempotent response");
                }
                return Ok(render(&stored, false));
            }
            Attempt::Refused(refusal) => {
                let problem = refusal.problem();
                if !is_remembered(problem.status) {
                    // A refusal that only says "not now" (409 transfers_in_flight): the
                    // key stays free, so a retry once the conflict is gone is carried out.
                    return Err(ApiError::Problem(problem));
                }
                let stored = StoredResponse {
                    status: problem.status.as_u16(),
                    body: problem.body(),
                };
                if idempotency::record_refusal(pool, &key, request.fingerprint(), &stored).await? {
                    return Ok(render(&stored, false));
                }
                // Another request claimed the key meanwhile: its answer stands.
            }
            Attempt::KeyTaken => {}
        }
    }
    Err(ApiError::Internal(format!(
        "idempotency key still contended after {KEY_RACE_ROUNDS} rounds"
    )))
}

/// Executes `command` on `aggregate_id` under the request's idempotency key (if any) and
/// renders the answer; `body` renders a success.
pub async fn run<A>(
    ledger: &Ledger<A>,
    request: CommandRequest,
    aggregate_id: Uuid,
    command: A::Command,
    body: impl Fn(&Outcome<A>) -> Value,
) -> Result<Response, ApiError>
where
    A: Decider,
    A::Error: std::error::Error,
    ApiError: From<LedgerError<A::Error>> + From<A::Error>,
{
    let intent = Intent {
        aggregate_id,
        command,
        metadata: request.metadata(),
        event_id: request.event_id,
    };
    let body = &body;
    under_key(
        ledger.pool(),
        &request,
        |metadata| {
            let intent = Intent {
                metadata,
                ..intent.clone()
            };
            async move {
                match ledger.execute(intent).await {
                    Ok(outcome) => Ok(Attempt::Done(body(&outcome))),
                    Err(LedgerError::Rejected(rule)) => Ok(Attempt::Refused(ApiError::from(rule))),
                    Err(LedgerError::KeyTaken) => Ok(Attempt::KeyTaken),
                    Err(other) => Err(other.into()),
                }
            }
        },
        |appended| async move { Ok(body(&ledger.outcome_at(&appended).await?)) },
    )
    .await
}

/// Whether a refusal with `status` is the key's answer for good. A 409 is not: it reports a
/// state that passes (a transfer in flight, a concurrent update), and retrying with the same
/// key is how the client gets the real outcome (ADR 0002).
fn is_remembered(status: StatusCode) -> bool {
    status != StatusCode::CONFLICT
}

/// Renders a stored answer. The same function serves first answers and replays.
pub(super) fn render(stored: &StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(stored.body.clone())).into_response();
    let headers = response.headers_mut();
    if status.is_client_error() || status.is_server_error() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(ledger_platform::http::problem::PROBLEM_JSON),
        );
    }
    if let Some(location) = location(status, &stored.body) {
        headers.insert(header::LOCATION, location);
    }
    if let Some(position) = stored.body.get("position").and_then(Value::as_i64) {
        headers.insert("ledger-position", HeaderValue::from(position));
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Where a created account (201) or an accepted transfer (202) can be read.
fn location(status: StatusCode, body: &Value) -> Option<HeaderValue> {
    let path = match status {
        StatusCode::CREATED => format!("/v1/accounts/{}", body.get("account_id")?.as_str()?),
        StatusCode::ACCEPTED => format!("/v1/transfers/{}", body.get("transfer_id")?.as_str()?),
        _ => return None,
    };
    HeaderValue::from_str(&path).ok()
}
