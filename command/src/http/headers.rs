//! Request headers the command API reads: `Idempotency-Key` and `X-Correlation-Id`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode};
use ledger_platform::http::Problem;

/// The header carrying the client's idempotency key.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header carrying a client-chosen correlation id.
pub static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

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
