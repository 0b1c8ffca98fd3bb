//! `/v1/subjects`: register a data subject (scope `write`) and erase one (scope `admin`),
//! ADR 0019. Both honour `Idempotency-Key` like the account routes: the key is claimed by
//! the subject's event (the trigger on `events`), the answer is stored, a replay gets it
//! back and a different request under the key is a 422. Answers hold ids, positions and
//! times, never the name.

use axum::extract::OriginalUri;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{extract::State, Router};
use chrono::{DateTime, Utc};
use ledger_events::Metadata;
use ledger_platform::http::{Json, Path};
use ledger_platform::openapi::ProblemDetails;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::future::Future;
use uuid::Uuid;

use super::accounts::{check_text, MAX_NAME_CHARS};
use super::error::ApiError;
use super::headers::CommandHeaders;
use super::intents::{under_key, Attempt, CommandRequest};
use super::AppState;
use crate::idempotency::Appended;
use crate::subjects::SubjectError;

/// The routes a `write` key may use.
pub fn write_router() -> Router<AppState> {
    Router::new().route("/subjects", post(register))
}

/// The routes that need an `admin` key.
pub fn admin_router() -> Router<AppState> {
    Router::new().route("/subjects/{subject_id}/erasure", post(erase))
}

/// Body of `POST /v1/subjects`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterSubjectRequest {
    /// The person's name: 1 to 200 characters, no control characters. Stored only
    /// encrypted under the subject's own key, and never answered back.
    pub name: String,
}

/// The answer to a registration (201).
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SubjectResponse {
    /// The subject's id (chosen by the server): open accounts with it.
    pub subject_id: Uuid,
    /// Global position of the registration; pass it to the query API to read your write.
    pub position: i64,
}

/// The answer to an erasure (200), the same however often it is asked for.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErasureResponse {
    /// The subject.
    pub subject_id: Uuid,
    /// When its keys were destroyed (the first erasure).
    pub erased_at: DateTime<Utc>,
    /// Global position of its `SubjectErased` event.
    pub position: i64,
}

/// Register a data subject (an account holder).
#[utoipa::path(post, path = "/v1/subjects", tag = "subjects",
    params(super::openapi::IdempotencyKeyHeader),
    request_body = RegisterSubjectRequest,
    responses(
        (status = 201, description = "Registered", body = SubjectResponse),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
#[tracing::instrument(skip_all)]
pub async fn register(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Json(body): Json<RegisterSubjectRequest>,
) -> Result<Response, ApiError> {
    let name = check_text("name", &body.name, MAX_NAME_CHARS)?;
    let request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &json!(body),
        headers,
        StatusCode::CREATED,
    );
    let subjects = &state.subjects;
    run_keyed(
        &state,
        request,
        |metadata| {
            let name = name.clone();
            async move {
                let registered = subjects.register(&name, metadata).await?;
                Ok(json!(SubjectResponse {
                    subject_id: registered.subject_id,
                    position: registered.position,
                }))
            }
        },
        |appended| async move {
            Ok(json!(SubjectResponse {
                subject_id: parse_id(&appended.aggregate_id)?,
                position: appended.last_position,
            }))
        },
    )
    .await
}

/// Erase a data subject: destroy its keys, so that every copy of its personal data
/// (events, snapshots, Kafka, read models) becomes unreadable; money stays.
#[utoipa::path(post, path = "/v1/subjects/{subject_id}/erasure", tag = "subjects",
    params(("subject_id" = Uuid, Path, description = "The subject"), super::openapi::IdempotencyKeyHeader),
    responses(
        (status = 200, description = "Erased (now or before: the same answer)", body = ErasureResponse),
        (status = 404, description = "No such subject (`subject_not_found`); a legacy owner known only by name is not a registered subject", body = ProblemDetails, content_type = "application/problem+json"),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
#[tracing::instrument(skip_all, fields(%subject_id))]
pub async fn erase(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: CommandHeaders,
    Path(subject_id): Path<Uuid>,
) -> Result<Response, ApiError> {
    let request = CommandRequest::new(
        state.subjects.keys().keyring(),
        &method,
        &uri,
        &Value::Null,
        headers,
        StatusCode::OK,
    );
    let subjects = &state.subjects;
    let render_erasure = |erased: crate::subjects::Erased| {
        json!(ErasureResponse {
            subject_id: erased.subject_id,
            erased_at: erased.erased_at,
            position: erased.position,
        })
    };
    run_keyed(
        &state,
        request,
        |metadata| async move { Ok(render_erasure(subjects.erase(subject_id, metadata).await?)) },
        |_| async move { Ok(render_erasure(subjects.erased_before(subject_id).await?)) },
    )
    .await
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|err| ApiError::Internal(format!("stored subject id: {err}")))
}

/// Runs a subject write (`execute`, given the request's metadata) under the request's
/// idempotency key, through the same loop as the account commands
/// ([`super::intents::under_key`]). Refusals (404, 422) are not stored under the key: they
/// answer the same on a retry.
async fn run_keyed<Execute, ExecuteFut, Derive, DeriveFut>(
    state: &AppState,
    request: CommandRequest,
    execute: Execute,
    derive: Derive,
) -> Result<Response, ApiError>
where
    Execute: Fn(Metadata) -> ExecuteFut,
    ExecuteFut: Future<Output = Result<Value, ApiError>>,
    Derive: Fn(Appended) -> DeriveFut,
    DeriveFut: Future<Output = Result<Value, ApiError>>,
{
    let execute = &execute;
    under_key(
        state.ledger.pool(),
        &request,
        |metadata| async move {
            match execute(metadata).await {
                Ok(body) => Ok(Attempt::Done(body)),
                Err(ApiError::Subject(SubjectError::KeyTaken)) => Ok(Attempt::KeyTaken),
                Err(other) => Err(other),
            }
        },
        derive,
    )
    .await
}
