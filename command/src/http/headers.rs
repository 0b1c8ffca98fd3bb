//! Request headers the command API reads: `Idempotency-Key`, `X-Correlation-Id` and the W3C
//! `traceparent`, gathered with the request id and the client (the API key the auth guard
//! verified) into [`CommandHeaders`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode};
use ledger_events::metadata::{is_valid_traceparent, new_traceparent};
use ledger_platform::auth::ApiKey;
use ledger_platform::http::{Problem, RequestId};

use crate::idempotency;

/// The header carrying the client's idempotency key.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header carrying a client-chosen correlation id.
pub static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// The W3C trace context header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Everything a command takes from its request's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHeaders {
    /// The request id (the client's or a new one).
    pub request_id: String,
    /// The client's correlation id, if sensible.
    pub correlation_id: Option<String>,
    /// The client's idempotency key, if sent.
    pub idempotency_key: Option<String>,
    /// Whose idempotency keys the request's key is among: its API key, or the one anonymous
    /// scope when authentication is disabled (ADR 0012).
    pub client_scope: String,
    /// The client's `traceparent` if valid, else a new trace.
    pub traceparent: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(RequestId(request_id)) = RequestId::from_request_parts(parts, state).await;
        let Ok(CorrelationId(correlation_id)) =
            CorrelationId::from_request_parts(parts, state).await;
        let IdempotencyKey(idempotency_key) =
            IdempotencyKey::from_request_parts(parts, state).await?;
        let traceparent = parts
            .headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid_traceparent(v))
            .map_or_else(new_traceparent, str::to_owned);
        // Set by the auth guard on every `/v1` route when API keys are required.
        let client_scope =
            idempotency::client_scope(parts.extensions.get::<ApiKey>().map(|k| k.id));
        Ok(Self {
            request_id,
            correlation_id,
            idempotency_key,
            client_scope,
            traceparent,
        })
    }
}

/// Longest accepted key.
const MAX_KEY_LEN: usize = 255;

/// The `Idempotency-Key`, if sent: 1..=255 visible ASCII characters, else 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(&IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(Self(None));
        };
        let invalid = |detail: &str| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Invalid Idempotency-Key",
                detail,
            )
        };
        if values.next().is_some() {
            return Err(invalid("send one Idempotency-Key header, not several"));
        }
        let key = value
            .to_str()
            .ok()
            .filter(|key| {
                !key.is_empty()
                    && key.len() <= MAX_KEY_LEN
                    && key.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                invalid("the Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is ideal)")
            })?;
        Ok(Self(Some(key.to_owned())))
    }
}

/// The `X-Correlation-Id`, if sent and sensible (1..=128 visible ASCII characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .headers
                .get(&CORRELATION_ID)
                .and_then(|v| v.to_str().ok())
                .filter(|v| {
                    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
                })
                .map(str::to_owned),
        ))
    }
}
