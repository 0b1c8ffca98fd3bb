//! `GET /v1/owners/{owner}/totals`: gone. Totals are addressed by data subject id, never by
//! a name (a name in a URL ends up in access logs): `410 gone` names the new route. The
//! owner in the path is neither answered back nor logged (the request-id layer logs this
//! route by its template).

use axum::routing::get;
use axum::Router;
use ledger_platform::openapi::ProblemDetails;

use super::error::ApiError;
use super::AppState;

/// The owner routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/owners/{owner}/totals", get(totals))
}

/// Gone: use `GET /v1/subjects/{subject_id}/totals`.
#[utoipa::path(get, path = "/v1/owners/{owner}/totals", tag = "owners",
    params(("owner" = String, Path, description = "An owner's name (no longer accepted)")),
    responses(
        (status = 410, description = "Gone: totals are by subject id", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn totals() -> ApiError {
    ApiError::Gone {
        detail: "totals by owner name are gone: a name does not belong in a URL. Use \
                 GET /v1/subjects/{subject_id}/totals with the account's subject_id \
                 (GET /v1/accounts/{account_id} answers it)",
    }
}
