//! Test support: a fresh database per test on the server named by `DATABASE_URL` (which
//! `scripts/test.sh` points at its `ledger_test` database). Databases are named
//! `ledger_test_<uuid>` and dropped by the script at the end of a run.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgPool};

/// The server's URL (`DATABASE_URL`, or the local default).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates an empty database; returns its URL.
///
/// # Panics
/// When PostgreSQL is unreachable: the test cannot run.
pub async fn empty_database() -> String {
    let admin = PgConnectOptions::from_str(&admin_url()).expect("DATABASE_URL is a postgres URL");
    let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .expect("PostgreSQL reachable at DATABASE_URL (run the tests through scripts/test.sh)");
    conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .expect("create test database");
    let base = admin_url();
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    format!("{server}/{name}")
}

/// Creates a database with every migration applied; returns its URL and a small pool.
///
/// # Panics
/// When PostgreSQL is unreachable or a migration fails.
pub async fn fresh_database() -> (String, PgPool) {
    let url = empty_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .expect("connect to the test database");
    crate::db::migrate(&pool).await.expect("migrations apply");
    (url, pool)
}
