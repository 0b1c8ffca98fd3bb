//! Change notifications from the projector (`LISTEN ledger_read_models`, payload: account
//! id): they invalidate cached summaries and wake reads waiting for a position.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger_readmodels::summaries::AccountSummary;
use ledger_readmodels::CHANGES_CHANNEL;
use moka::future::Cache;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;

/// The cache of account summaries and the stream of changed account ids.
#[derive(Clone)]
pub struct Changes {
    /// Account summaries by id.
    pub cache: Cache<String, Arc<AccountSummary>>,
    sender: broadcast::Sender<Arc<str>>,
    /// Bumped on every notification (and on reconnects): a fetch that started before a bump
    /// does not fill the cache, so an invalidation can never be undone by a slow reader.
    generation: Arc<AtomicU64>,
    /// Cache hits and misses, for the metrics to come.
    pub hits: Arc<AtomicU64>,
    pub misses: Arc<AtomicU64>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Changes {
    /// A cache of at most `max_entries`, each kept at most `ttl`.
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let (sender, _) = broadcast::channel(4096);
        Self {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            sender,
            generation: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
            misses: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current generation (read before fetching from the database).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches `summary` unless a change arrived since `generation` was read.
    pub async fn fill(&self, generation: u64, summary: Arc<AccountSummary>) {
        if self.generation() == generation {
            self.cache.insert(summary.account_id.clone(), summary).await;
        }
    }

    /// Receives the ids of changed accounts from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }

    async fn changed(&self, account_id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(account_id).await;
        let _ = self.sender.send(Arc::from(account_id));
    }

    async fn reset(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    /// Listens until the process ends. Whenever the listener (re)connects, the whole cache
    /// is dropped: notifications sent while it was away are lost.
    pub async fn listen(self, pool: PgPool) {
        loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => match listener.listen(CHANGES_CHANNEL).await {
                    Ok(()) => {
                        self.reset().await;
                        loop {
                            match listener.try_recv().await {
                                Ok(Some(notification)) => {
                                    self.changed(notification.payload()).await
                                }
                                Ok(None) => {
                                    tracing::warn!("change listener reconnected; cache dropped");
                                    self.reset().await;
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "change listener failed");
                                    break;
                                }
                            }
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot LISTEN for changes"),
                },
                Err(err) => tracing::warn!(error = %err, "cannot connect the change listener"),
            }
            self.reset().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
