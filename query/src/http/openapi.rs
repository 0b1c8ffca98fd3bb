//! The query API's OpenAPI 3.1 document, generated from the handlers and types.

use ledger_platform::openapi::{ApiKeyScheme, ProblemDetails};
use utoipa::OpenApi;

/// The document served at `/openapi.json`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Ledger query API", description = "Balances, statements, data subjects with their totals and exports, and transfers, from the read models, with read-your-writes."),
    paths(
        super::accounts::summary,
        super::accounts::statement,
        super::owners::totals,
        super::subjects::subject,
        super::subjects::totals,
        super::subjects::export,
        super::transfers::transfer,
    ),
    components(schemas(ProblemDetails)),
    modifiers(&ApiKeyScheme)
)]
pub struct QueryApiDoc;
