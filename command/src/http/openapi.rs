//! The command API's OpenAPI 3.1 document, generated from the handlers and types.

use ledger_platform::openapi::{ApiKeyScheme, ProblemDetails};
use utoipa::{IntoParams, OpenApi};

/// The `Idempotency-Key` request header.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// 1 to 255 visible ASCII characters; the same key and request give the same answer.
    /// Required on transfers.
    #[param(rename = "Idempotency-Key")]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}

/// The document served at `/openapi.json`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Ledger command API", description = "Post intents: register and erase data subjects; open, deposit, withdraw, close, transfer."),
    paths(
        super::subjects::register,
        super::subjects::erase,
        super::accounts::open,
        super::accounts::deposit,
        super::accounts::withdraw,
        super::accounts::close,
        super::transfers::request,
    ),
    components(schemas(ProblemDetails)),
    modifiers(&ApiKeyScheme)
)]
pub struct CommandApiDoc;
