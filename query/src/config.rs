//! Settings of the query API, from environment variables (or the matching flags).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ledger_platform::config::{parse_database_url, DatabaseUrl};
use ledger_platform::telemetry::LogFormat;

/// The query API of the ledger.
#[derive(Debug, Clone, Parser)]
#[command(name = "ledger-query", version, about)]
pub struct Settings {
    /// PostgreSQL connection URL (the read models). Never logged.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: DatabaseUrl,

    /// Most connections this process opens to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub database_max_connections: u32,

    /// Address the HTTP API listens on.
    #[arg(long, env = "QUERY_LISTEN_ADDR", default_value = "127.0.0.1:8083")]
    pub listen_addr: SocketAddr,

    /// Longest a read with a position token waits for the read model to reach it.
    #[arg(long, env = "READ_WAIT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub read_wait_timeout: Duration,

    /// Most account summaries kept in the cache.
    #[arg(long, env = "CACHE_MAX_ENTRIES", default_value_t = 100_000)]
    pub cache_max_entries: u64,

    /// A cached summary is dropped after this long even without a change notification.
    #[arg(long, env = "CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// A request running longer than this is answered 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// API keys and rate limits.
    #[command(flatten)]
    pub auth: ledger_platform::auth::AuthSettings,

    /// On SIGTERM/SIGINT, how long in-flight requests may take.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}
