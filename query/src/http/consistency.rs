//! Read your writes: a read may carry the `position` a command answered with (query
//! parameter `position`, or header `Ledger-Position`), and is answered only once the read
//! model of the account (or transfer) has reached it: event-driven (change notifications) with a slow
//! poll as a fallback, bounded by `READ_WAIT_TIMEOUT`; then 412 with the current position.

use std::time::Duration;

use axum::http::HeaderMap;
use ledger_readmodels::{summaries, transfers};
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
    /// An account's summary (statements and totals are written in the same transaction).
    Account,
    /// A transfer's row.
    Transfer,
}

/// Waits until `account_id`'s read model has reached `position` (if any).
pub async fn wait_for(
    state: &AppState,
    account_id: &str,
    position: Option<i64>,
) -> Result<(), ApiError> {
    wait_for_model(state, Model::Account, account_id, position).await
}

/// Waits until the read model of aggregate `id` has reached `position` (if any).
pub async fn wait_for_model(
    state: &AppState,
    model: Model,
    account_id: &str,
    position: Option<i64>,
) -> Result<(), ApiError> {
    let Some(position) = position else {
        return Ok(());
    };
    // Subscribe before the first check, so a change between the check and the wait is seen.
    let mut changes = state.changes.subscribe();
    let deadline = Instant::now() + state.read_wait_timeout;
    loop {
        let current = match model {
            Model::Account => summaries::position_of(&state.pool, account_id).await?,
            Model::Transfer => transfers::position_of(&state.pool, account_id).await?,
        };
        if current >= position {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NotYetConsistent {
                requested: position,
                current,
            });
        }
        let wake = async {
            loop {
                match changes.recv().await {
                    Ok(id) if &*id == account_id => return,
                    Ok(_) => {}
                    // Missed some: check again.
                    Err(_) => return,
                }
            }
        };
        let until = deadline.min(Instant::now() + RECHECK);
        let _ = tokio::time::timeout_at(until, wake).await;
    }
}
