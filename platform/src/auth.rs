//! API keys with scopes, and a token-bucket rate limit per key (ADR 0009).
//!
//! A key looks like `lk_<12 hex>_<32 hex>`: the first part (the prefix) finds the row, the
//! whole key is checked against its SHA-256 (keys are 128-bit random, so a fast hash is
//! enough; the key itself is never stored or logged). Keys are created, listed and revoked
//! with `ledger-admin keys`. A request presents `Authorization: Bearer <key>`:
//! no key or an unknown/revoked one is a 401, a key without the route's scope a 403, a key
//! over its rate a 429 with `Retry-After`. Answers carry `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset`. Verified keys are cached for
//! [`CACHE_TTL`], so a revocation takes effect within that time.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::Problem;

/// How long a verified key is trusted without asking the database again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Commands (the command API).
    Write,
    /// Reads (the query API).
    Read,
    /// Operator actions (the projector's admin API, erasure of data subjects).
    Admin,
    /// Exporting everything held about a data subject (`GET /v1/subjects/{id}/export`):
    /// personal data in clear, so a scope of its own (ADR 0019).
    Export,
}

impl Scope {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
            Self::Admin => "admin",
            Self::Export => "export",
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "write" => Ok(Self::Write),
            "read" => Ok(Self::Read),
            "admin" => Ok(Self::Admin),
            "export" => Ok(Self::Export),
            other => Err(format!(
                "unknown scope `{other}` (write, read, admin, export)"
            )),
        }
    }
}

/// Whether requests must present a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every `/v1` (and `/admin`) request needs a key with the route's scope.
    ApiKeys,
    /// No authentication and no rate limit (development and tests only).
    Disabled,
}

/// A verified key, as handlers see it (request extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// The key's id.
    pub id: Uuid,
    /// Its name (who it was given to).
    pub name: String,
    /// What it may do.
    pub scopes: Vec<String>,
}

/// A key just created: the only time its secret is seen.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    /// The key's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// The key to give to the client (`lk_<prefix>_<secret>`).
    pub key: String,
}

/// A key as listed (no secret).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    /// The key's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The public prefix (how to recognise it).
    pub prefix: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// When it was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The prefix of a well-formed key.
fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("lk_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(prefix, 12) && hex(secret, 32)).then_some(prefix)
}

/// Creates a key named `name` with `scopes`.
pub async fn create(pool: &PgPool, name: &str, scopes: &[Scope]) -> Result<NewKey, sqlx::Error> {
    let id = Uuid::now_v7();
    let prefix = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let key = format!("lk_{prefix}_{}", Uuid::new_v4().simple());
    let scopes: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    sqlx::query(
        "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(name)
    .bind(&prefix)
    .bind(digest(&key))
    .bind(&scopes)
    .execute(pool)
    .await?;
    Ok(NewKey {
        id,
        name: name.to_owned(),
        scopes,
        key,
    })
}

/// Every key, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, prefix, scopes, created_at, revoked_at FROM api_keys
          ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
}

/// Revokes key `id`; `false` when there is no such live key.
pub async fn revoke(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// The live key `key` is, if any.
pub async fn verify(pool: &PgPool, key: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    lookup(pool, key, &digest(key)).await
}

/// [`verify`] with the key's digest already computed.
async fn lookup(pool: &PgPool, key: &str, key_digest: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    let Some(prefix) = prefix_of(key) else {
        return Ok(None);
    };
    let row: Option<(Uuid, String, String, Vec<String>)> = sqlx::query_as(
        "SELECT id, name, key_hash, scopes FROM api_keys
          WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(id, name, hash, scopes)| {
        constant_time_eq(hash.as_bytes(), key_digest.as_bytes()).then_some(ApiKey {
            id,
            name,
            scopes,
        })
    }))
}

/// Compares without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The rate limit of every key: `per_second` sustained, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second; 0 = no limit.
    pub per_second: u32,
    /// Bucket size.
    pub burst: u32,
}

type Limiter = RateLimiter<
    Uuid,
    governor::state::keyed::DefaultKeyedStateStore<Uuid>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// What the auth middleware needs.
#[derive(Clone)]
pub struct Auth {
    pool: PgPool,
    mode: AuthMode,
    cache: moka::future::Cache<String, Option<ApiKey>>,
    limiter: Option<Arc<Limiter>>,
    burst: u32,
    /// Break-glass bearer token accepted as an admin key (the projector's `ADMIN_TOKEN`).
    admin_token: Option<Arc<str>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Authentication per `mode` over the keys in `pool`, limited per key by `limit`.
    pub fn new(pool: PgPool, mode: AuthMode, limit: RateLimit) -> Self {
        let limiter = NonZeroU32::new(limit.per_second).map(|rate| {
            let burst = NonZeroU32::new(limit.burst).unwrap_or(rate);
            let keyed: DefaultKeyedRateLimiter<Uuid> =
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst));
            Arc::new(keyed.with_middleware::<StateInformationMiddleware>())
        });
        Self {
            pool,
            mode,
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(CACHE_TTL)
                .build(),
            limiter,
            burst: limit.burst.max(limit.per_second),
            admin_token: None,
        }
    }

    /// Also accepts `token` (when set) as a key with every scope named `admin-token`.
    pub fn with_admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }

    async fn key_for(&self, presented: &str) -> Result<Option<ApiKey>, Problem> {
        if let Some(token) = &self.admin_token {
            if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                return Ok(Some(ApiKey {
                    id: Uuid::nil(),
                    name: "admin-token".into(),
                    scopes: vec![Scope::Admin.as_str().into()],
                }));
            }
        }
        let digest = digest(presented);
        if let Some(known) = self.cache.get(&digest).await {
            return Ok(known);
        }
        let found = lookup(&self.pool, presented, &digest)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "cannot verify an API key");
                Problem::unavailable("cannot verify the API key now; retry later")
            })?;
        self.cache.insert(digest, found.clone()).await;
        Ok(found)
    }
}

/// The settings every HTTP process shares (flattened into each one's clap settings).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// `api-keys`: every `/v1` (and `/admin`) request needs an API key with the route's
    /// scope; `disabled`: none (development only).
    #[arg(long, env = "AUTH_MODE", value_enum, default_value = "api-keys")]
    pub auth_mode: AuthMode,

    /// Requests per second each API key may make, sustained (token bucket); 0 = no limit.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 200)]
    pub rate_limit_per_second: u32,

    /// Requests each API key may make in a burst (the bucket's size).
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 400)]
    pub rate_limit_burst: u32,
}

impl AuthSettings {
    /// The auth these settings describe, over `pool`.
    pub fn auth(&self, pool: PgPool) -> Auth {
        if self.auth_mode == AuthMode::Disabled {
            tracing::warn!("AUTH_MODE=disabled: requests are not authenticated nor rate limited");
        }
        Auth::new(
            pool,
            self.auth_mode,
            RateLimit {
                per_second: self.rate_limit_per_second,
                burst: self.rate_limit_burst,
            },
        )
    }
}

/// Middleware state: the auth and the scope the routes need.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The shared auth (behind an `Arc`: the guard is cloned for every request).
    pub auth: Arc<Auth>,
    /// The scope every route behind the guard needs.
    pub scope: Scope,
}

/// Middleware: 401/403/429, or the request with its [`ApiKey`] and rate-limit headers.
pub async fn require(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let auth = &guard.auth;
    if auth.mode == AuthMode::Disabled {
        return next.run(request).await;
    }
    let presented = bearer(request.headers());
    let key = match presented {
        None => return unauthenticated("send an API key as `Authorization: Bearer <key>`"),
        Some(presented) => match auth.key_for(presented).await {
            Ok(Some(key)) => key,
            Ok(None) => return unauthenticated("the API key is unknown or revoked"),
            Err(problem) => return problem.into_response(),
        },
    };
    if !key.scopes.iter().any(|s| s == guard.scope.as_str()) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            format!(
                "this API key does not have the `{}` scope this route needs",
                guard.scope.as_str()
            ),
        )
        .into_response();
    }
    let mut headers = HeaderMap::new();
    if let Some(limiter) = &auth.limiter {
        match limiter.check_key(&key.id) {
            Ok(snapshot) => {
                headers.insert("ratelimit-limit", HeaderValue::from(auth.burst));
                headers.insert(
                    "ratelimit-remaining",
                    HeaderValue::from(snapshot.remaining_burst_capacity()),
                );
                headers.insert("ratelimit-reset", HeaderValue::from(0));
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                tracing::info!(key = %key.name, "rate limited");
                let mut response = Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "Too many requests",
                    format!(
                        "this API key is over its rate limit; retry in {seconds} s (nothing was done)"
                    ),
                )
                .into_response();
                let h = response.headers_mut();
                h.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                h.insert("ratelimit-limit", HeaderValue::from(auth.burst));
                h.insert("ratelimit-remaining", HeaderValue::from(0));
                h.insert("ratelimit-reset", HeaderValue::from(seconds));
                return response;
            }
        }
    }
    request.extensions_mut().insert(key);
    let mut response = next.run(request).await;
    response.headers_mut().extend(headers);
    response
}

/// The key of `Authorization: Bearer <key>`. The scheme is case-insensitive (RFC 9110,
/// section 11.1): `bearer` and `BEARER` are `Bearer`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(key.trim()).filter(|key| !key.is_empty())
}

fn unauthenticated(detail: &str) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Unauthenticated",
        detail,
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_have_a_prefix() {
        assert_eq!(
            prefix_of("lk_0123456789ab_0123456789abcdef0123456789abcdef"),
            Some("0123456789ab")
        );
        for bad in [
            "",
            "lk_",
            "lk_0123456789ab",
            "xx_0123456789ab_0123456789abcdef0123456789abcdef",
            "lk_0123456789ab_0123456789abcdef0123456789abcdeg",
            "lk_0123456789a_0123456789abcdef0123456789abcdef0",
        ] {
            assert_eq!(prefix_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let key = "lk_0123456789ab_0123456789abcdef0123456789abcdef";
        for value in [
            format!("Bearer {key}"),
            format!("bearer {key}"),
            format!("BEARER {key}"),
            format!("bEaReR   {key}"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&headers), Some(key), "{value}");
        }
        for value in [
            "Basic abc",
            "Bearer",
            "Bearer ",
            "Bearerx abc",
            &format!("Token {key}"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&headers), None, "{value}");
        }
    }

    #[test]
    fn scopes_parse_and_print() {
        for scope in [Scope::Write, Scope::Read, Scope::Admin, Scope::Export] {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        assert!("root".parse::<Scope>().is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
