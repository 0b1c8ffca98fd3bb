//! Leadership: exactly one relay of a name publishes at a time.
//!
//! The leader holds a session-level advisory lock on a connection of its own. When the
//! process dies, PostgreSQL drops the connection and the lock with it; a standby polling
//! `pg_try_advisory_lock` takes over within its standby interval. The leader checks its
//! connection before every batch and steps down when it is gone.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// The held lock.
#[derive(Debug)]
pub struct Leadership {
    conn: PgConnection,
}

fn lock_key(relay: &str) -> String {
    format!("ledger-relay:{relay}")
}

impl Leadership {
    /// Takes leadership of `relay` if nobody holds it.
    pub async fn try_acquire(
        options: &PgConnectOptions,
        relay: &str,
    ) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = PgConnection::connect_with(options).await?;
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(lock_key(relay))
            .fetch_one(&mut conn)
            .await?;
        if acquired {
            Ok(Some(Self { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Whether the lock is still held (its connection answers).
    pub async fn still_held(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }

    /// Gives leadership up.
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}
