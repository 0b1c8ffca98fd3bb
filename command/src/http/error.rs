//! The command API's errors: each variant has its status on purpose, and every answer is
//! RFC 9457 problem+json. 500s are logged with their cause and answered without it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ledger_events::AmountError;
use ledger_platform::http::Problem;

use crate::domain::{AccountError, TransferError};
use crate::ledger::LedgerError;
use crate::subjects::SubjectError;

/// Everything a command request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A domain rule: 404 for an unknown account, 422 for the rest.
    #[error(transparent)]
    Domain(#[from] AccountError),
    /// A transfer rule: 422.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A data subject operation: 404 for an unknown subject on its own routes, 422 for a
    /// subject that cannot take the request (erased, not migrated), 503/500 for failures.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// A new account for a subject that is not registered: 422 `subject_not_found` (the
    /// body names it; the route itself exists).
    #[error("no data subject {0} is registered")]
    UnknownHolder(uuid::Uuid),
    /// A transfer sent without an `Idempotency-Key`: 400.
    #[error("an Idempotency-Key header is required")]
    IdempotencyKeyRequired,
    /// A zero, negative or too large amount (422), or one that is not an integer (400).
    #[error(transparent)]
    Amount(#[from] AmountError),
    /// A field with a value the API does not accept: 400.
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    /// The currency is not an ISO 4217 code: 400.
    #[error("{0}")]
    InvalidCurrency(String),
    /// The idempotency key was first used with another request: 422.
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// Concurrent commands on the account kept winning: 409.
    #[error("concurrent updates to the account; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// The writer's queue is full: 503 with `Retry-After`; nothing was queued or written.
    #[error("the command queue is full ({queue_max} commands waiting)")]
    Overloaded { queue_max: usize },
    /// The commit's outcome is unknown (connection lost, store unreadable): 503, never
    /// "nothing was written".
    #[error("the outcome of the commit is unknown")]
    OutcomeUnknown,
    /// PostgreSQL is unavailable: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data: 500.
    #[error("{0}")]
    Internal(String),
    /// An answer already shaped (extractor rejections).
    #[error("{}", .0.detail)]
    Problem(Problem),
}

impl ApiError {
    /// The problem answer for this error.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Domain(rule) => domain_problem(rule),
            Self::Transfer(rule) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                rule.code(),
                "Transfer refused",
                rule.to_string(),
            ),
            Self::Subject(err) => subject_problem(err),
            Self::UnknownHolder(subject) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "subject_not_found",
                "Data subject not found",
                format!("no data subject {subject} is registered; register the account holder with POST /v1/subjects first and open the account with the subject_id it answers"),
            )
            .with("subject_id", subject.to_string()),
            Self::IdempotencyKeyRequired => Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key_required",
                "Idempotency-Key required",
                "a transfer must carry an Idempotency-Key header (1 to 255 visible ASCII characters), so that retrying it can never move the money twice",
            ),
            Self::Amount(err) => {
                let status = match err {
                    AmountError::NotInteger(_) => StatusCode::BAD_REQUEST,
                    AmountError::NotPositive(_) | AmountError::Overflow(_) => {
                        StatusCode::UNPROCESSABLE_ENTITY
                    }
                };
                Problem::new(status, err.code(), "Invalid amount", err.to_string())
            }
            Self::InvalidField { field, message } => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "Invalid field",
                format!("{field}: {message}"),
            )
            .with("field", *field),
            Self::InvalidCurrency(detail) => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_currency",
                "Invalid currency",
                detail.clone(),
            )
            .with("field", "currency"),
            Self::IdempotencyKeyReused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency-Key reused",
                "this Idempotency-Key was first used with a different request (method, path or body); use a new key for a new request",
            ),
            Self::Conflict { attempts } => Problem::new(
                StatusCode::CONFLICT,
                "concurrency_conflict",
                "Concurrent update",
                format!("the account was changed concurrently {attempts} times in a row; nothing was written, retry the request"),
            ),
            Self::Overloaded { queue_max } => {
                tracing::warn!(queue_max, "command queue full; request refused");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "Overloaded",
                    "the service has more commands waiting than it accepts; nothing was queued or written, retry after the Retry-After delay",
                )
            }
            Self::OutcomeUnknown => {
                tracing::error!("answering a command whose commit outcome is unknown");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    "Outcome unknown",
                    "the connection to the event store was lost while this command was being committed, so it may or may not have been carried out; retry with the same Idempotency-Key to learn its outcome (without a key, read the account before deciding to send it again)",
                )
            }
            Self::Unavailable(cause) => {
                tracing::error!(%cause, "database unavailable");
                Problem::unavailable("the event store is unavailable; nothing was written, retry later")
            }
            Self::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Problem::internal()
            }
            Self::Problem(problem) => problem.clone(),
        }
    }
}

fn domain_problem(rule: &AccountError) -> Problem {
    let (status, title) = match rule {
        AccountError::NotFound => (StatusCode::NOT_FOUND, "Account not found"),
        AccountError::AlreadyExists => (StatusCode::UNPROCESSABLE_ENTITY, "Account exists"),
        AccountError::Closed => (StatusCode::UNPROCESSABLE_ENTITY, "Account closed"),
        AccountError::CurrencyMismatch { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "Currency mismatch")
        }
        AccountError::InsufficientFunds { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "Insufficient funds")
        }
        AccountError::BalanceOverflow { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "Balance overflow")
        }
        AccountError::BalanceNotZero { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "Balance not zero")
        }
        AccountError::TransfersInFlight { .. } => (StatusCode::CONFLICT, "Transfers in flight"),
    };
    let problem = Problem::new(status, rule.code(), title, rule.to_string());
    match rule {
        AccountError::CurrencyMismatch { expected, given } => problem
            .with("account_currency", expected.code())
            .with("given_currency", given.code()),
        AccountError::InsufficientFunds { balance, requested }
        | AccountError::BalanceOverflow { balance, requested } => problem
            .with("balance", *balance)
            .with("requested", *requested),
        AccountError::BalanceNotZero { balance } => problem.with("balance", *balance),
        AccountError::TransfersInFlight { count } => problem.with("transfers_in_flight", *count),
        _ => problem,
    }
}

fn subject_problem(err: &SubjectError) -> Problem {
    match err {
        SubjectError::NotFound { subject } => Problem::new(
            StatusCode::NOT_FOUND,
            "subject_not_found",
            "Data subject not found",
            format!("no data subject {subject} is registered (account holders known only by name from before data subjects are not registered subjects)"),
        )
        .with("subject_id", subject.to_string()),
        SubjectError::Erased { subject, erased_at } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "subject_erased",
            "Data subject erased",
            format!("data subject {subject} was erased at {erased_at}: no personal data (a name, a reference) can be recorded for it; money can still move without a reference"),
        )
        .with("subject_id", subject.to_string())
        .with("erased_at", erased_at.to_rfc3339()),
        SubjectError::NotMigrated { subject } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "subject_not_migrated",
            "Data subject not migrated",
            format!("the account belongs to data subject {subject}, known only by the owner name of an account opened before data subjects, which has no key yet: a reference cannot be stored encrypted for it until the operator migrates it; send the request without a reference"),
        )
        .with("subject_id", subject.to_string()),
        SubjectError::AccountNotFound => domain_problem(&AccountError::NotFound),
        SubjectError::KeyTaken => ApiError::Conflict { attempts: 1 }.problem(),
        SubjectError::OutcomeUnknown(cause) => {
            tracing::error!(error = %cause, "subject commit outcome unknown");
            ApiError::OutcomeUnknown.problem()
        }
        SubjectError::Keys(ledger_pii::StoreError::Database(cause))
        | SubjectError::Store(cause) => sql_problem(cause),
        SubjectError::Keys(other) => ApiError::Internal(format!("key store: {other}: {}", source_of(other))).problem(),
        SubjectError::Corrupt(reason) => ApiError::Internal(reason.clone()).problem(),
    }
}

/// The answer to a failed statement: 503 when the database is unavailable, else 500 (the
/// cause is logged, not answered).
fn sql_problem(cause: &sqlx::Error) -> Problem {
    if ledger_platform::db::is_unavailable(cause) {
        ApiError::Unavailable(cause.to_string()).problem()
    } else {
        ApiError::Internal(cause.to_string()).problem()
    }
}

fn source_of(err: &dyn std::error::Error) -> String {
    err.source().map(ToString::to_string).unwrap_or_default()
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self::Problem(problem)
    }
}

impl<E> From<LedgerError<E>> for ApiError
where
    E: std::error::Error,
    ApiError: From<E>,
{
    fn from(err: LedgerError<E>) -> Self {
        match err {
            LedgerError::Rejected(rule) => Self::from(rule),
            LedgerError::Conflict { attempts } => Self::Conflict { attempts },
            LedgerError::KeyTaken => Self::Conflict { attempts: 1 },
            LedgerError::StepTaken(claim) => {
                Self::Internal(format!("an HTTP command met transfer step {}", claim.step))
            }
            LedgerError::Overloaded { queue_max } => Self::Overloaded { queue_max },
            LedgerError::OutcomeUnknown => Self::OutcomeUnknown,
            LedgerError::Unavailable(cause) => Self::Unavailable(cause),
            LedgerError::Internal(cause) => Self::Internal(cause),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if ledger_platform::db::is_unavailable(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}
