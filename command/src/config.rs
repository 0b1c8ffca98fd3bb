//! Settings, read from environment variables (or the matching flags) and validated at start.
//! A bad value stops the process with a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ledger_platform::config::{parse_database_url, DatabaseUrl};
use ledger_platform::telemetry::LogFormat;

/// The command API of the ledger.
#[derive(Debug, Parser)]
#[command(name = "ledger-command", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub settings: Settings,
}

/// Subcommands.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply pending database migrations and exit. Safe to run from several instances at once.
    Migrate,
}

/// Every setting of the command service.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// PostgreSQL connection URL, e.g. postgres://ledger@127.0.0.1:5432/ledger. Never logged.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: DatabaseUrl,

    /// Most connections this process opens to PostgreSQL.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// How long a request waits for a free database connection before it is answered 503.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub database_acquire_timeout: Duration,

    /// Address the HTTP API listens on.
    #[arg(long, env = "COMMAND_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// An account's state is snapshotted every this many events.
    #[arg(long, env = "SNAPSHOT_EVERY", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub snapshot_every: u64,

    /// Retries of a command that lost a version race, before answering 409.
    #[arg(long, env = "COMMAND_MAX_RETRIES", default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub command_max_retries: u32,

    /// Writer tasks committing commands (group commit, ADR 0010); accounts are spread over
    /// them and each commits one batch at a time.
    #[arg(long, env = "COMMAND_WRITERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub command_writers: u16,

    /// Most commands one writer commits in one statement.
    #[arg(long, env = "COMMAND_BATCH_MAX", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub command_batch_max: u16,

    /// Batches one writer may have committing at once (pipelining, ADR 0010): with 2, the
    /// writer decides and sends the next batch while the previous one commits, holding back
    /// commands on the aggregates (and keys, steps) still in flight. 1 commits one batch at
    /// a time.
    #[arg(long, env = "COMMAND_PIPELINE_DEPTH", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub command_pipeline_depth: u16,

    /// Most commands waiting for one writer beside the batch it commits; more are refused
    /// at once with 503 `overloaded` and `Retry-After`, before anything is queued.
    #[arg(long, env = "COMMAND_QUEUE_MAX", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub command_queue_max: u32,

    /// Fault injection for tests: this many batch statements commit and are then reported as
    /// a lost connection. 0 disables it.
    #[arg(
        long,
        env = "COMMAND_FAULT_LOST_COMMITS",
        default_value_t = 0,
        hide = true
    )]
    pub command_fault_lost_commits: u32,

    /// Fault injection for tests: this many checks of a lost commit fail as if the store
    /// could not be read. 0 disables it.
    #[arg(
        long,
        env = "COMMAND_FAULT_FAILED_CHECKS",
        default_value_t = 0,
        hide = true
    )]
    pub command_fault_failed_checks: u32,

    /// Most aggregates kept in memory per aggregate type (their state is re-read from the
    /// store when evicted or found stale).
    #[arg(long, env = "COMMAND_CACHE_CAPACITY", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub command_cache_capacity: u64,

    /// How long an Idempotency-Key is remembered; afterwards it may be used again.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_retention: Duration,

    /// Largest request body accepted, in bytes; larger bodies are answered 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(64..=16 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// A request running longer than this is answered 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// API keys and rate limits.
    #[command(flatten)]
    pub auth: ledger_platform::auth::AuthSettings,

    /// On SIGTERM/SIGINT, in-flight requests get this long to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_platform::config::{try_parse_from, ParseFailure};

    #[test]
    fn settings_have_sane_defaults() {
        let cli: Cli = try_parse_from([
            "ledger-command",
            "--database-url",
            "postgres://u:secret@h/db",
        ])
        .unwrap();
        assert_eq!(cli.settings.snapshot_every, 100);
        assert_eq!(cli.settings.command_queue_max, 512);
        assert_eq!(
            cli.settings.idempotency_retention,
            Duration::from_secs(86_400)
        );
        assert!(!format!("{:?}", cli.settings).contains("secret"));
    }

    #[test]
    fn a_bad_database_url_is_reported_by_its_variable_name() {
        let failure =
            try_parse_from::<Cli, _, _>(["ledger-command", "--database-url", "mysql://x"])
                .unwrap_err();
        let ParseFailure::Config(message) = failure else {
            panic!("{failure:?}");
        };
        assert!(message.starts_with("DATABASE_URL="), "{message}");
    }
}
