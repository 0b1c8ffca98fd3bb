//! Read your writes: a read may carry the `position` a command answered with (query
//! parameter `position`, or header `Ledger-Position`), and is answered only once the read
//! model it reads has reached it for the account (or transfer): event-driven (change
//! notifications) with a slow poll as a fallback, bounded by `READ_WAIT_TIMEOUT`; then 412
//! with the current position.
//!
//! Each read waits on its own model's watermark (the projection's guard of the aggregate,
//! committed with the model's rows), never on another model's: after a rebuild, replay or
//! dead-letter retry of one projection, the projections are at different positions (ADR
//! 0015).

use std::time::Duration;

use axum::http::HeaderMap;
use ledger_readmodels::{guards, names};
use tokio::time::Instant;

use super::error::ApiError;
use super::AppState;

/// The header form of the token.
pub const POSITION_HEADER: &str = "ledger-position";
/// Re-check at least this often even without a notification.
const RECHECK: Duration = Duration::from_millis(200);

/// The requested position: the `position` parameter, else the header; must be ≥ 0.
pub fn requested(param: Option<&str>, headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let raw = match param {
        Some(value) => Some(value.to_owned()),
        None => headers
            .get(POSITION_HEADER)
            .map(|v| v.to_str().map(str::to_owned).unwrap_or_default()),
    };
    raw.map(|text| {
        text.trim()
            .parse::<i64>()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or(ApiError::InvalidParameter {
                field: "position",
                message: format!(
                    "must be a non-negative integer (a command's `position`), got {text:?}"
                ),
            })
    })
    .transpose()
}

/// Which read model a wait is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// `account_summaries` (`GET /v1/accounts/{id}`).
    Summary,
    /// `account_statements` (`GET /v1/accounts/{id}/statement`).
    Statement,
    /// `subject_totals` (`GET /v1/subjects/{id}/totals`), waited on for one account.
    SubjectTotals,
    /// `transfers` (`GET /v1/transfers/{id}`).
    Transfer,
}

impl Model {
    /// The projection that builds this model.
    pub fn projection(self) -> &'static str {
        match self {
            Self::Summary => names::ACCOUNT_SUMMARY,
            Self::Statement => names::ACCOUNT_STATEMENT,
            Self::SubjectTotals => names::SUBJECT_TOTALS,
            Self::Transfer => names::TRANSFERS,
        }
    }
}

/// Waits until `model` has reached `position` (if any) for aggregate `id` (an account, or a
/// transfer).
pub async fn wait_for(
    state: &AppState,
    model: Model,
    id: &str,
    position: Option<i64>,
) -> Result<(), ApiError> {
    let Some(position) = position else {
        return Ok(());
    };
    let watch = state.changes.watch(id);
    let deadline = Instant::now() + state.read_wait_timeout;
    loop {
        // Registered before the check, so a change between the check and the wait wakes it.
        let wake = watch.next_change();
        let current = guards::position_of(&state.pool, model.projection(), id).await?;
        if current >= position {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NotYetConsistent {
                requested: position,
                current,
            });
        }
        let until = deadline.min(Instant::now() + RECHECK);
        let _ = tokio::time::timeout_at(until, wake).await;
    }
}
