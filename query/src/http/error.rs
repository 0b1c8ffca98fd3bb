//! The query API's errors, each with its status on purpose, answered as problem+json.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ledger_platform::http::Problem;

/// Everything a read can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such account (in the read model).
    #[error("no account {0}")]
    AccountNotFound(String),
    /// No such transfer (in the read model).
    #[error("no transfer {0}")]
    TransferNotFound(String),
    /// No such data subject (in the read models).
    #[error("no data subject {0}")]
    SubjectNotFound(uuid::Uuid),
    /// A route that no longer exists: 410, the detail says what replaced it.
    #[error("{detail}")]
    Gone { detail: &'static str },
    /// A query parameter or header the API does not accept: 400.
    #[error("{field}: {message}")]
    InvalidParameter {
        field: &'static str,
        message: String,
    },
    /// The read model has not reached the position the client asked for within the wait:
    /// 412, with the current position, so the client can retry or decide.
    #[error("the read model is at position {current}, behind the requested {requested}")]
    NotYetConsistent { requested: i64, current: i64 },
    /// PostgreSQL is unavailable: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A bug: 500.
    #[error("{0}")]
    Internal(String),
    /// An answer already shaped (extractor rejections).
    #[error("{}", .0.detail)]
    Problem(Problem),
}

impl ApiError {
    /// The problem answer.
    pub fn problem(&self) -> Problem {
        match self {
            Self::AccountNotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "account_not_found",
                "Account not found",
                format!("no account {id} in the read model (pass the position of your last command to wait for it)"),
            ),
            Self::TransferNotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "transfer_not_found",
                "Transfer not found",
                format!("no transfer {id} in the read model (pass the position the transfer request answered with to wait for it)"),
            ),
            Self::SubjectNotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "subject_not_found",
                "Subject not found",
                format!("no data subject {id} in the read models"),
            ),
            Self::Gone { detail } => Problem::new(StatusCode::GONE, "gone", "Gone", *detail),
            Self::InvalidParameter { field, message } => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                "Invalid parameter",
                format!("{field}: {message}"),
            )
            .with("field", *field),
            Self::NotYetConsistent { requested, current } => Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "read_model_behind",
                "Read model behind",
                format!("the read model has reached position {current}, not yet the requested {requested}; retry shortly"),
            )
            .with("requested_position", *requested)
            .with("current_position", *current),
            Self::Unavailable(cause) => {
                tracing::error!(%cause, "database unavailable");
                Problem::unavailable("the read models are unavailable; retry later")
            }
            Self::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Problem::internal()
            }
            Self::Problem(problem) => problem.clone(),
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

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self::Problem(problem)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(self, Self::NotYetConsistent { .. });
        let mut response = self.problem().into_response();
        if retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
