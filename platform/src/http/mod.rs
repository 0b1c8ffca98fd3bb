//! HTTP building blocks shared by the command and query APIs.
//!
//! - [`problem`]: [`Problem`], an RFC 9457 `application/problem+json` answer.
//! - [`extract`]: [`Json`] and [`Path`], extractors whose rejections are problems.
//! - [`request_id`]: accepts or makes a request id, puts it on the log span and the response.
//! - [`health`]: `/healthz` and `/readyz`.
//! - [`fallback`]: problem answers for unknown routes, wrong methods and panics.
//! - [`timeout`]: a request-time limit answered as a problem.
//! - [`control`]: control characters in the path or query refused with a problem.
//! - [`limits`]: URI and header sizes refused with a problem (and what hyper refuses
//!   itself, without one).

pub mod control;
pub mod extract;
pub mod fallback;
pub mod health;
pub mod limits;
pub mod problem;
pub mod request_id;
pub mod timeout;

pub use extract::{Json, Path};
pub use problem::Problem;
pub use request_id::RequestId;
