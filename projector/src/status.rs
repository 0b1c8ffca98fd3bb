//! `/healthz`, `/readyz` and `/status`: each projection's position, lag (events and
//! seconds), dead letters, and per-partition offsets and lag.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{middleware, Json, Router};
use chrono::Utc;
use ledger_platform::http::{fallback, request_id, Problem};
use ledger_readmodels::{dead_letters, progress};
use ledger_store::LogCursor;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::apply::{Applied, STORE_READER};

/// Counters of this process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    /// Incoming events and messages handled.
    pub received: u64,
    /// (event, projection) pairs applied.
    pub applied: u64,
    /// Pairs skipped as duplicates.
    pub duplicates: u64,
    /// Dead letters recorded.
    pub dead_letters: u64,
    /// Events read from the store to repair gaps.
    pub repaired: u64,
    /// The last error, cleared by the next successful batch.
    pub last_error: Option<String>,
    /// Why the Kafka consumer is judged stalled (it receives nothing while its group's
    /// events wait), cleared by the next message received.
    pub stalled: Option<String>,
    /// Times the consumer left and rejoined its group because it was stalled.
    pub rejoins: u64,
    /// Process manager: transfers found not terminal and older than the threshold by the
    /// last sweep of the store (ADR 0016).
    pub stuck_transfers: u64,
    /// Process manager: transfers the sweeps drove on since the process started.
    pub swept_transfers: u64,
}

/// Shared counters.
pub type SharedStatus = Arc<Mutex<Counters>>;

/// Counts a committed batch.
pub fn applied(status: &SharedStatus, received: usize, applied: Applied) {
    if let Ok(mut s) = status.lock() {
        s.received += received as u64;
        s.applied += applied.applied;
        s.duplicates += applied.duplicates;
        s.dead_letters += applied.dead_letters;
        s.repaired += applied.repaired;
        s.last_error = None;
    }
}

/// Records that the consumer is stalled and rejoins its group.
pub fn stalled(status: &SharedStatus, reason: &str) {
    if let Ok(mut s) = status.lock() {
        s.stalled = Some(reason.to_owned());
        s.rejoins += 1;
    }
}

/// Clears the stalled mark (a message came).
pub fn unstalled(status: &SharedStatus) {
    if let Ok(mut s) = status.lock() {
        if s.stalled.is_some() {
            tracing::info!("consumer receives again");
            s.stalled = None;
        }
    }
}

/// Records an error.
pub fn failed(status: &SharedStatus, error: &str) {
    if let Ok(mut s) = status.lock() {
        s.last_error = Some(error.to_owned());
    }
}

/// What the status routes need.
#[derive(Clone)]
pub struct StatusState {
    pub counters: SharedStatus,
    /// Counters of the transfer process manager.
    pub process_manager: SharedStatus,
    pub pool: PgPool,
    /// `(consumer, group, topic)` when consuming Kafka.
    pub kafka: Option<(Arc<StreamConsumer>, String, String)>,
}

impl std::fmt::Debug for StatusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusState").finish_non_exhaustive()
    }
}

/// The routes, with `admin` (the admin API) merged in.
pub fn router(state: StatusState, admin: Router) -> Router {
    let for_metrics = state.clone();
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state(state)
        .merge(admin)
        .merge(ledger_platform::metrics::router(move || {
            let state = for_metrics.clone();
            async move { refresh_metrics(state).await }
        }))
        .fallback(fallback::not_found)
        .layer(middleware::from_fn(ledger_platform::metrics::layer))
        .layer(middleware::from_fn(request_id::layer))
}

/// Sets the projector's gauges from the same figures `/status` shows:
/// `ledger_projector_lag_events{projection}`, `ledger_projector_lag_seconds{projection}`,
/// `ledger_projector_dead_letters{projection}` (pending), `ledger_projector_partition_lag_events{partition}`,
/// `ledger_projector_applied_total` and `ledger_transfers_reactions_total`.
async fn refresh_metrics(state: StatusState) {
    let Ok(Json(status)) = status(State(state)).await else {
        return;
    };
    let number = |value: &Value| value.as_f64().unwrap_or(0.0);
    for projection in status["projections"].as_array().into_iter().flatten() {
        let name = projection["name"].as_str().unwrap_or("").to_owned();
        metrics::gauge!("ledger_projector_lag_events", "projection" => name.clone())
            .set(number(&projection["lag_events"]));
        metrics::gauge!("ledger_projector_lag_seconds", "projection" => name.clone())
            .set(number(&projection["lag_seconds"]));
        metrics::gauge!("ledger_projector_dead_letters", "projection" => name)
            .set(number(&projection["dead_letters"]));
    }
    metrics::gauge!("ledger_projector_dead_letters", "projection" => crate::transfers::PROCESS_MANAGER)
        .set(number(&status["transfer_process_manager"]["dead_letters"]));
    for partition in status["partitions"].as_array().into_iter().flatten() {
        let id = partition["partition"].to_string();
        metrics::gauge!("ledger_projector_partition_lag_events", "partition" => id)
            .set(number(&partition["lag_events"]));
    }
    for (consumer, counters) in [
        ("projector", &status["process"]),
        (
            crate::transfers::PROCESS_MANAGER,
            &status["transfer_process_manager"]["counters"],
        ),
    ] {
        metrics::gauge!("ledger_projector_consumer_stalled", "consumer" => consumer).set(
            if counters["stalled"].is_string() {
                1.0
            } else {
                0.0
            },
        );
        metrics::counter!("ledger_projector_consumer_rejoins_total", "consumer" => consumer)
            .absolute(counters["rejoins"].as_u64().unwrap_or(0));
    }
    metrics::counter!("ledger_projector_applied_total")
        .absolute(status["process"]["applied"].as_u64().unwrap_or(0));
    let process_manager = &status["transfer_process_manager"]["counters"];
    metrics::gauge!("ledger_transfers_stuck")
        .set(process_manager["stuck_transfers"].as_f64().unwrap_or(0.0));
    metrics::counter!("ledger_transfers_swept_total")
        .absolute(process_manager["swept_transfers"].as_u64().unwrap_or(0));
    metrics::counter!("ledger_transfers_reactions_total").absolute(
        status["transfer_process_manager"]["counters"]["applied"]
            .as_u64()
            .unwrap_or(0),
    );
}

async fn ready(State(state): State<StatusState>) -> Result<Json<Value>, Problem> {
    let postgres = ledger_platform::db::ping(&state.pool, Duration::from_secs(2)).await;
    let broker = match &state.kafka {
        None => true,
        Some((consumer, _, topic)) => {
            let consumer = consumer.clone();
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .is_ok()
            })
            .await
            .unwrap_or(false)
        }
    };
    let stalled = |counters: &SharedStatus| counters.lock().ok().and_then(|c| c.stalled.clone());
    let consumer = stalled(&state.counters);
    let process_manager = stalled(&state.process_manager);
    let checks = json!({
        "postgres": if postgres { "ok" } else { "down" },
        "broker": if state.kafka.is_none() { "not configured" } else if broker { "ok" } else { "down" },
        "consumer": consumer.as_deref().map_or("ok", |_| "stalled"),
        "transfer_process_manager": process_manager.as_deref().map_or("ok", |_| "stalled"),
    });
    if let Some(reason) = consumer.or(process_manager) {
        return Err(
            Problem::unavailable(format!("the Kafka consumer is stalled: {reason}"))
                .with("checks", checks),
        );
    }
    if postgres && broker {
        Ok(Json(json!({"status": "ready", "checks": checks})))
    } else {
        Err(
            Problem::unavailable("a dependency of the projector is unreachable")
                .with("checks", checks),
        )
    }
}

async fn status(State(state): State<StatusState>) -> Result<Json<Value>, Problem> {
    let internal = |err: sqlx::Error| {
        tracing::error!(error = %err, "status query failed");
        Problem::internal()
    };
    let counters = state.counters.lock().map(|c| c.clone()).unwrap_or_default();
    let process_manager = state
        .process_manager
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    let checkpoints = progress::all(&state.pool).await.map_err(internal)?;
    let letters = dead_letters::pending_counts(&state.pool)
        .await
        .map_err(internal)?;
    let now = Utc::now();

    // Lag: partitions' high watermarks against applied offsets (Kafka), or the store's
    // events after the reader's cursor.
    let (source, lag_events, partitions) = match &state.kafka {
        Some((consumer, group, topic)) => {
            let applied = progress::partitions(&state.pool, group, topic)
                .await
                .map_err(internal)?;
            let consumer = consumer.clone();
            let topic_name = topic.clone();
            let rows = tokio::task::spawn_blocking(move || {
                let metadata = consumer
                    .fetch_metadata(Some(&topic_name), Duration::from_secs(2))
                    .ok();
                let ids: Vec<i32> = metadata
                    .map(|m| {
                        m.topics()
                            .iter()
                            .flat_map(|t| t.partitions())
                            .map(|p| p.id())
                            .collect()
                    })
                    .unwrap_or_default();
                ids.into_iter()
                    .map(|id| {
                        let high = consumer
                            .fetch_watermarks(&topic_name, id, Duration::from_secs(2))
                            .map(|(_, high)| high)
                            .ok();
                        (id, high)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut total = 0i64;
            let partitions: Vec<Value> = rows
                .into_iter()
                .map(|(id, high)| {
                    let done = applied.iter().find(|p| p.partition == id);
                    let next = done.map_or(0, |p| p.last_offset + 1);
                    let lag = high.map(|h| (h - next).max(0));
                    total += lag.unwrap_or(0);
                    json!({
                        "partition": id,
                        "applied_offset": done.map(|p| p.last_offset),
                        "last_position": done.map(|p| p.last_position),
                        "high_watermark": high,
                        "lag_events": lag,
                    })
                })
                .collect();
            ("kafka", total, partitions)
        }
        None => {
            let (transaction_id, global_position) = progress::cursor(&state.pool, STORE_READER)
                .await
                .map_err(internal)?;
            let lag = ledger_store::lag(
                &state.pool,
                LogCursor {
                    transaction_id,
                    global_position,
                },
            )
            .await
            .map_err(internal)?;
            ("store", lag.events, Vec::new())
        }
    };
    let projections: Vec<Value> = ledger_readmodels::names::ALL
        .iter()
        .map(|name| {
            let checkpoint = checkpoints.iter().find(|c| c.projection == *name);
            let lag_seconds = match (lag_events, checkpoint.and_then(|c| c.last_event_at)) {
                (0, _) | (_, None) => 0.0,
                (_, Some(at)) => (now - at).num_milliseconds().max(0) as f64 / 1000.0,
            };
            json!({
                "name": name,
                "state": "live",
                "last_position": checkpoint.map_or(0, |c| c.last_position),
                "events_applied": checkpoint.map_or(0, |c| c.events_applied),
                "lag_events": lag_events,
                "lag_seconds": lag_seconds,
                "dead_letters": letters.iter().find(|(p, _)| p == name).map_or(0, |(_, n)| *n),
            })
        })
        .collect();
    Ok(Json(json!({
        "source": source,
        "projections": projections,
        "partitions": partitions,
        "unreadable_messages": letters.iter().find(|(p, _)| p == "*").map_or(0, |(_, n)| *n),
        "process": counters,
        "transfer_process_manager": {
            "counters": process_manager,
            "dead_letters": letters
                .iter()
                .find(|(p, _)| p == crate::transfers::PROCESS_MANAGER)
                .map_or(0, |(_, n)| *n),
        },
    })))
}
