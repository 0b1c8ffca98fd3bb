//! `GET /v1/owners/{owner}/totals`: the cross-aggregate model.
//!
//! Read-your-writes here needs the account the write went to (`account` with `position`):
//! the read waits until the `owner_totals` projection has handled that account up to the
//! position (its guard, committed with the totals), whatever the other models have reached.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use ledger_platform::http::Path;
use ledger_readmodels::owner_totals::{self, OwnerTotal};
use serde::{Deserialize, Serialize};

use super::consistency::{requested, wait_for, Model};
use super::error::ApiError;
use super::AppState;
use ledger_platform::openapi::ProblemDetails;

/// The owner routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/owners/{owner}/totals", get(totals))
}

/// Query of the totals.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TotalsQuery {
    /// Read-your-writes token…
    position: Option<String>,
    /// …for this account (required with `position`).
    account: Option<String>,
}

/// An owner's totals.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Totals {
    /// The owner.
    pub owner: String,
    /// One row per currency.
    pub totals: Vec<OwnerTotal>,
}

/// An owner's accounts and money per currency.
#[utoipa::path(get, path = "/v1/owners/{owner}/totals", tag = "owners",
    params(("owner" = String, Path, description = "The owner"), TotalsQuery),
    responses(
        (status = 200, description = "The totals", body = Totals),
        (status = "default", description = "A problem", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn totals(
    State(state): State<AppState>,
    Path(owner): Path<String>,
    query: Result<Query<TotalsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Totals>, ApiError> {
    let Query(query) = query.map_err(|err| ApiError::InvalidParameter {
        field: "query",
        message: err.body_text(),
    })?;
    let position = requested(query.position.as_deref(), &headers)?;
    match (position, query.account.as_deref()) {
        (Some(_), None) => {
            return Err(ApiError::InvalidParameter {
                field: "account",
                message: "a position on a cross-account read needs the account it came from".into(),
            })
        }
        (position, Some(account)) => {
            wait_for(&state, Model::OwnerTotals, account, position).await?
        }
        (None, None) => {}
    }
    let totals = owner_totals::for_owner(&state.pool, &owner).await?;
    if totals.is_empty() {
        return Err(ApiError::OwnerNotFound(owner));
    }
    Ok(Json(Totals { owner, totals }))
}
