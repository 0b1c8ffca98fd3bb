//! Settings of the projector, from environment variables (or the matching flags).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ledger_platform::config::{parse_database_url, DatabaseUrl};
use ledger_platform::telemetry::LogFormat;

/// The projector: builds the read models from the log.
#[derive(Debug, Clone, Parser)]
#[command(name = "ledger-projector", version, about)]
pub struct Settings {
    /// PostgreSQL connection URL (event store and read models). Never logged.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: DatabaseUrl,

    /// Most connections this process opens to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=100))]
    pub database_max_connections: u32,

    /// Kafka bootstrap servers. When unset, the projector reads the store's log directly
    /// (same order, same no-skip guarantee).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// The topic the relay publishes to.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "ledger.events")]
    pub kafka_topic: String,

    /// Consumer group; projector instances of one group share the partitions.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "ledger-projector")]
    pub kafka_group_id: String,

    /// A member silent for this long (e.g. killed) is dropped from the group and its
    /// partitions reassigned.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub kafka_session_timeout: Duration,

    /// Static group membership (`group.instance.id`): a stable name for this replica, unique
    /// within its group (e.g. the pod or container name). A replica restarted under the same
    /// name gets its partitions back at once, without a rebalance, instead of after the
    /// session timeout. Unset: dynamic membership. The process manager's consumer uses the
    /// same name in its own group.
    #[arg(long, env = "KAFKA_GROUP_INSTANCE_ID")]
    pub kafka_group_instance_id: Option<String>,

    /// A consumer that has received nothing for this long while its group has events
    /// waiting and makes no progress on them is stalled: `/readyz` answers 503, the metric
    /// `ledger_projector_consumer_stalled` is 1, and it leaves and rejoins its group.
    #[arg(long, env = "KAFKA_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub kafka_stall_timeout: Duration,

    /// Partitions are applied by this many workers concurrently (a partition always by the
    /// same worker, in order).
    #[arg(long, env = "PROJECTOR_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,

    /// Most events applied in one transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,

    /// How long a Kafka worker waits after a batch's first message for more before it
    /// applies the batch (0: apply what is queued at once; batches still grow under load,
    /// because messages queue while the previous batch is applied).
    #[arg(long, env = "PROJECTOR_BATCH_LINGER", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,

    /// Reading the store directly: idle polling besides commit notifications.
    #[arg(long, env = "PROJECTOR_POLL_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Address of `/healthz`, `/readyz` and `/status`.
    #[arg(long, env = "PROJECTOR_LISTEN_ADDR", default_value = "127.0.0.1:8082")]
    pub listen_addr: SocketAddr,

    /// Run the transfer process manager in this process (it takes the steps of transfers:
    /// debit, credit or refund, settle). Safe to run in several processes at once.
    #[arg(long, env = "PROJECTOR_TRANSFERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub transfers: bool,

    /// Consumer group of the transfer process manager (separate from the read models').
    #[arg(long, env = "TRANSFERS_GROUP_ID", default_value = "ledger-transfers")]
    pub transfers_group_id: String,

    /// How many transfers the process manager moves forward at once.
    #[arg(long, env = "TRANSFERS_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub transfers_concurrency: u32,

    /// A transfer whose latest event in the store is older than this and not terminal
    /// (requested or debited) is driven on by the sweep, whatever Kafka still holds.
    #[arg(long, env = "TRANSFERS_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub transfers_stuck_after: Duration,

    /// How often the store is swept for stuck transfers.
    #[arg(long, env = "TRANSFERS_SWEEP_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub transfers_sweep_interval: Duration,

    /// Fault injection for tests: abort the process right after the Nth money-moving step
    /// of a transfer commits and before the transfer is told. 0 disables it.
    #[arg(
        long,
        env = "TRANSFERS_CRASH_AFTER_STEPS",
        default_value_t = 0,
        hide = true
    )]
    pub transfers_crash_after_steps: u64,

    /// Rebuild, at start, every projection whose deployed read model was built by another
    /// version of the code (otherwise the projector only says a rebuild is needed).
    #[arg(long, env = "PROJECTOR_AUTO_REBUILD", default_value_t = false)]
    pub auto_rebuild: bool,

    /// API keys (scope `admin` for the admin API) and rate limits.
    #[command(flatten)]
    pub auth: ledger_platform::auth::AuthSettings,

    /// Break-glass bearer token of the admin API (`/admin/...` on the status port), accepted
    /// besides API keys with the `admin` scope; unset = keys only.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// On SIGTERM/SIGINT, how long batches in flight may take to commit.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}
