//! Sending events from the store to Kafka again, for downstream consumers (at least once:
//! consumers deduplicate by `ce_id`).

use ledger_store::LogCursor;
use sqlx::PgPool;

use super::OpError;

/// Re-sends every event with a global position of at least `from`, in the log's
/// commit-safe order; returns how many were sent.
pub async fn republish(
    pool: &PgPool,
    relay_settings: &ledger_relay::config::Settings,
    from: i64,
) -> Result<u64, OpError> {
    let producer =
        ledger_relay::kafka::producer(relay_settings).map_err(|e| OpError::Kafka(e.to_string()))?;
    let mut cursor = LogCursor::default();
    let mut sent = 0u64;
    loop {
        let batch = ledger_store::read_after(pool, cursor, 500).await?;
        let Some(last) = batch.last().map(|e| e.cursor) else {
            break;
        };
        let wanted: Vec<_> = batch
            .into_iter()
            .filter(|e| e.event.global_position >= from)
            .collect();
        ledger_relay::kafka::publish(
            &producer,
            &relay_settings.kafka_topic,
            &relay_settings.cloudevents_source,
            &wanted,
        )
        .await
        .map_err(|e| OpError::Kafka(e.to_string()))?;
        sent += wanted.len() as u64;
        cursor = last;
    }
    Ok(sent)
}
