//! Settings of the relay, from environment variables (or the matching flags).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ledger_platform::config::{parse_database_url, DatabaseUrl};
use ledger_platform::telemetry::LogFormat;

/// The relay: publishes every committed event to Kafka.
#[derive(Debug, Clone, Parser)]
#[command(name = "ledger-relay", version, about)]
pub struct Settings {
    /// PostgreSQL connection URL of the event store. Never logged.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: DatabaseUrl,

    /// Most connections this process opens to PostgreSQL (one more is held for leadership).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub database_max_connections: u32,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// The topic events are published to (created at start if missing).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "ledger.events")]
    pub kafka_topic: String,

    /// Partitions of the topic when the relay creates it.
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub kafka_topic_partitions: i32,

    /// Replication factor of the topic when the relay creates it.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=10))]
    pub kafka_replication_factor: i32,

    /// How long the producer keeps retrying one message before the batch is re-read and
    /// re-sent from the last checkpoint.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub kafka_message_timeout: Duration,

    /// Identity of this relay's checkpoint and leadership lock; relays sharing a name share
    /// the work (one publishes, the others stand by).
    #[arg(long, env = "RELAY_NAME", default_value = "main")]
    pub relay_name: String,

    /// Events read and published per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,

    /// When idle, how often the log is polled even without a commit notification.
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// How often a standby relay tries to take over leadership.
    #[arg(long, env = "RELAY_STANDBY_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub standby_interval: Duration,

    /// Address of the status and health endpoints.
    #[arg(long, env = "RELAY_LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: SocketAddr,

    /// CloudEvents `source` attribute of every message.
    #[arg(long, env = "CLOUDEVENTS_SOURCE", default_value = "/ledger")]
    pub cloudevents_source: String,

    /// On SIGTERM/SIGINT, how long an in-flight batch may take to be confirmed and
    /// checkpointed before the process exits anyway (it is then re-sent by the next leader).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Fault injection for tests: abort the process after the Nth batch is confirmed by the
    /// broker and before its checkpoint is written. 0 disables it.
    #[arg(
        long,
        env = "RELAY_CRASH_AFTER_BATCH",
        default_value_t = 0,
        hide = true
    )]
    pub crash_after_batch: u64,
}
