//! Start-up steps every service takes: open a pool on a current schema, bind a listener.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::db::{self, DbError};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// PostgreSQL is unreachable or its schema is behind.
    #[error(transparent)]
    Database(#[from] DbError),
    /// A client (e.g. Kafka) could not be configured.
    #[error("{0}")]
    Client(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A pool of at most `max_connections` on a database whose schema is current.
pub async fn pool(
    options: PgConnectOptions,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, StartupError> {
    let pool = db::connect(options, max_connections, acquire_timeout).await?;
    db::ensure_schema_current(&pool).await?;
    Ok(pool)
}

/// A listener on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}
