//! `ledger-admin`: the operator's CLI. Rebuild or dry-run a projection, replay a range,
//! republish to Kafka, work the dead letters, see every projection's state.
//!
//! Output is for people (tables, a progress bar on a terminal) unless `--json` is given.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ledger_platform::auth::{self, Scope};
use ledger_platform::config::{parse_database_url, DatabaseUrl};
use ledger_projector::ops::{self, dead_letters, overview, rebuild, replay, republish};
use serde::Serialize;

/// Operator commands for the ledger's read models.
#[derive(Debug, Parser)]
#[command(name = "ledger-admin", version, about)]
struct Cli {
    /// PostgreSQL connection URL. Never logged.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    database_url: DatabaseUrl,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Each projection: position, lag, live or rebuilding, version, dead letters.
    Status,
    /// Build PROJECTION afresh from the event store beside the live one, then swap it in.
    Rebuild {
        /// account_summary, account_statement, subject_totals, transfers or subjects; `all`, or several
        /// separated by commas, rebuilds them in one pass over the log (not with --dry-run).
        projection: String,
        /// Build the copy and report how it differs from the live model; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: write every difference to FILE as it is found, one JSON object
        /// a line (`{"table", "kind", "row"}`); the report keeps the first 100 of each kind.
        #[arg(long, value_name = "FILE", requires = "dry_run")]
        differences: Option<std::path::PathBuf>,
        /// Events per transaction.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
    },
    /// Re-apply the events at positions FROM..=TO to PROJECTION (idempotent).
    Replay {
        projection: String,
        #[arg(long)]
        from: i64,
        #[arg(long, default_value_t = i64::MAX)]
        to: i64,
    },
    /// Send the events from position FROM on to Kafka again.
    Republish {
        #[arg(long)]
        from: i64,
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        #[arg(long, env = "KAFKA_TOPIC", default_value = "ledger.events")]
        topic: String,
    },
    /// Dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// API keys of the command, query and admin APIs.
    #[command(subcommand)]
    Keys(KeyCommand),
    /// Personal data: the data keys of the data subjects (needs PII_KEK, PII_KEK_PREVIOUS).
    #[command(subcommand)]
    Pii(PiiCommand),
}

#[derive(Debug, Subcommand)]
enum PiiCommand {
    /// Rotate the key-encryption key: rewrap every live data key not under PII_KEK with it
    /// (the old KEK in PII_KEK_PREVIOUS). Idempotent; run until only the new id is listed.
    Rewrap {
        /// Data keys per transaction.
        #[arg(long = "batch", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Move names and references written in clear before data subjects existed (v1
    /// openings' `owner`, v2 references) into subjects and ciphertext, in place, one owner
    /// name per transaction (ADR 0019). Idempotent; run `rebuild all` afterwards so the read
    /// models drop the names in clear.
    MigrateLegacy {
        /// Owner names looked up at a time.
        #[arg(long = "batch", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch: i64,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key; its secret is printed once and never stored.
    Create {
        /// Who or what the key is for (shown in audits and logs).
        #[arg(long)]
        name: String,
        /// What it may do; repeat or separate with commas (write, read, admin).
        #[arg(long = "scope", value_enum, value_delimiter = ',', required = true)]
        scopes: Vec<Scope>,
    },
    /// Every key, without secrets.
    List,
    /// Revoke a key (effective within seconds).
    Revoke { id: uuid::Uuid },
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List dead letters (pending by default).
    List {
        /// pending, retried, skipped, superseded or all.
        #[arg(long, default_value = "pending")]
        status: String,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One dead letter with its raw message and history.
    Show { id: i64 },
    /// Apply it again (after a fix).
    Retry {
        id: i64,
        /// Who acts (recorded); defaults to $USER.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// Give up on it (it stays recorded as skipped).
    Skip {
        id: i64,
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = ledger_platform::config::parse_or_exit();
    let pool =
        match ledger_platform::startup::pool(cli.database_url.0.clone(), 4, Duration::from_secs(5))
            .await
        {
            Ok(pool) => pool,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        };
    match execute(&cli, &pool).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The data-key store, with the keyring from `PII_KEK` / `PII_KEK_PREVIOUS`, checked against
/// the stored keys: what rebuilds, replays and retries decrypt personal fields with.
async fn key_store(pool: &sqlx::PgPool) -> Result<ledger_pii::KeyStore, ops::OpError> {
    let keyring = ledger_pii::Keyring::from_env()?;
    let keys =
        ledger_pii::KeyStore::new(pool.clone(), keyring, ledger_pii::CacheSettings::default());
    keys.verify_keyring().await?;
    Ok(keys)
}

fn print<T: Serialize + std::fmt::Debug>(json: bool, value: &T, human: impl FnOnce(&T)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        human(value);
    }
}

async fn execute(cli: &Cli, pool: &sqlx::PgPool) -> Result<(), ops::OpError> {
    match &cli.command {
        Command::Status => {
            let states = overview::overview(pool).await?;
            print(cli.json, &states, |states| {
                println!(
                    "{:<18} {:<10} {:>10} {:>8} {:>9} {:>8} {:>7} {:>12}",
                    "projection",
                    "state",
                    "position",
                    "lag",
                    "lag (s)",
                    "version",
                    "dead",
                    "rebuild at"
                );
                for s in states {
                    println!(
                        "{:<18} {:<10} {:>10} {:>8} {:>9.1} {:>8} {:>7} {:>12}",
                        s.name,
                        s.state,
                        s.position,
                        s.lag_events,
                        s.lag_seconds,
                        format!(
                            "{}{}",
                            s.deployed_version.map_or("-".into(), |v| v.to_string()),
                            if s.needs_rebuild { "*" } else { "" }
                        ),
                        s.dead_letters,
                        s.rebuild_position.map_or("-".into(), |p| p.to_string()),
                    );
                }
                if states.iter().any(|s| s.needs_rebuild) {
                    println!("* built by another version of the code: rebuild it");
                }
            });
        }
        Command::Rebuild {
            projection,
            dry_run,
            differences,
            batch_size,
        } if rebuild::selection(projection)?.len() > 1 => {
            if *dry_run {
                return Err(ops::OpError::Invalid(
                    "--dry-run compares one projection at a time: name one".into(),
                ));
            }
            let selected = rebuild::selection(projection)?;
            rebuild_in_one_pass(pool, &selected, *batch_size, cli.json).await?;
        }
        Command::Rebuild {
            projection,
            dry_run,
            differences,
            batch_size,
        } => {
            let bar = if std::io::stderr().is_terminal() && !cli.json {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(format!("rebuilding {projection}"));
                Some(bar)
            } else {
                None
            };
            let on_progress = |progress: rebuild::Progress| {
                if let Some(bar) = &bar {
                    bar.set_length(u64::try_from(progress.total).unwrap_or(0));
                    bar.set_position(u64::try_from(progress.events).unwrap_or(0));
                }
            };
            let report = if *dry_run {
                let mut out = match differences {
                    Some(path) => Some(std::io::BufWriter::new(
                        std::fs::File::create(path).map_err(|err| {
                            ops::OpError::Invalid(format!("{}: {err}", path.display()))
                        })?,
                    )),
                    None => None,
                };
                let mut written: std::io::Result<()> = Ok(());
                let report = rebuild::dry_run(
                    pool,
                    &key_store(pool).await?,
                    projection,
                    *batch_size,
                    on_progress,
                    &mut |difference| {
                        if let (Some(out), Ok(())) = (out.as_mut(), &written) {
                            written = serde_json::to_writer(&mut *out, &difference)
                                .map_err(std::io::Error::from)
                                .and_then(|()| writeln!(out));
                        }
                    },
                )
                .await?;
                if let Some(mut out) = out {
                    written = written.and_then(|()| out.flush());
                }
                written.map_err(|err| ops::OpError::Invalid(format!("--differences: {err}")))?;
                report
            } else {
                rebuild::rebuild(
                    pool,
                    &key_store(pool).await?,
                    projection,
                    *batch_size,
                    false,
                    on_progress,
                )
                .await?
            };
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            print(cli.json, &report, |report| {
                if report.swapped {
                    println!(
                        "{} rebuilt from {} events (up to position {}) and swapped in",
                        report.projection, report.progress.events, report.progress.position
                    );
                } else {
                    println!(
                        "dry run of {}: {} events; live model unchanged",
                        report.projection, report.progress.events
                    );
                    for (table, diff) in &report.differences {
                        if diff.is_empty() {
                            println!("  {table}: identical");
                        } else {
                            println!(
                                "  {table}: {} missing, {} extra, {} different",
                                diff.counts.missing, diff.counts.extra, diff.counts.different
                            );
                            for row in &diff.missing {
                                println!("    missing   {row}");
                            }
                            for row in &diff.extra {
                                println!("    extra     {row}");
                            }
                            for row in &diff.different {
                                println!("    different {row}");
                            }
                        }
                    }
                }
            });
        }
        Command::Replay {
            projection,
            from,
            to,
        } => {
            let report =
                replay::replay(pool, &key_store(pool).await?, projection, *from, *to).await?;
            print(cli.json, &report, |r| {
                println!("replayed {} events into {projection}: {} applied, {} already there, {} dead-lettered", r.events, r.applied, r.duplicates, r.dead_letters);
            });
        }
        Command::Republish {
            from,
            brokers,
            topic,
        } => {
            let settings: ledger_relay::config::Settings =
                ledger_platform::config::try_parse_from([
                    "ledger-relay",
                    "--database-url",
                    "postgres://unused@localhost/unused",
                    "--kafka-brokers",
                    brokers.as_str(),
                    "--kafka-topic",
                    topic.as_str(),
                ])
                .map_err(|err| ops::OpError::Invalid(format!("{err:?}")))?;
            let sent = republish::republish(pool, &settings, *from).await?;
            print(cli.json, &serde_json::json!({"republished": sent}), |_| {
                println!("republished {sent} events from position {from} to {topic}");
            });
        }
        Command::DeadLetters(command) => match command {
            DeadLetterCommand::List { status, limit } => {
                let status = (status != "all").then_some(status.as_str());
                let letters = dead_letters::list(pool, status, *limit).await?;
                print(cli.json, &letters, |letters| {
                    println!(
                        "{:>6} {:<18} {:<10} {:>10} {:<16} reason",
                        "id", "projection", "status", "position", "event type"
                    );
                    for l in letters {
                        println!(
                            "{:>6} {:<18} {:<10} {:>10} {:<16} {}",
                            l.id,
                            l.projection,
                            l.status,
                            l.global_position.map_or("-".into(), |p| p.to_string()),
                            l.event_type.clone().unwrap_or_else(|| "-".into()),
                            l.reason
                        );
                    }
                });
            }
            DeadLetterCommand::Show { id } => {
                let shown = dead_letters::show(pool, *id).await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&shown).unwrap_or_default()
                );
            }
            DeadLetterCommand::Retry { id, actor } => {
                let shown = dead_letters::retry(pool, &key_store(pool).await?, *id, actor).await?;
                print(cli.json, &shown, |s| {
                    let last = s.actions.last().map_or("", |a| a.outcome.as_str());
                    println!("dead letter {}: {} ({last})", s.letter.id, s.letter.status);
                });
            }
            DeadLetterCommand::Skip { id, actor } => {
                let shown = dead_letters::skip(pool, *id, actor).await?;
                print(cli.json, &shown, |s| {
                    println!("dead letter {}: {}", s.letter.id, s.letter.status)
                });
            }
        },
        Command::Pii(PiiCommand::Rewrap { batch }) => {
            let report = key_store(pool).await?.rewrap_all(*batch).await?;
            let failed: Vec<serde_json::Value> = report
                .failed
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "subject_id": f.subject,
                        "version": f.version,
                        "error": f.error.to_string(),
                    })
                })
                .collect();
            let value = serde_json::json!({
                "rewrapped": report.rewrapped,
                "batches": report.batches,
                "failed": failed,
                "live_by_kek": report.live_by_kek,
            });
            print(cli.json, &value, |_| {
                println!(
                    "rewrapped {} data keys in {} batches",
                    report.rewrapped, report.batches
                );
                for failure in &report.failed {
                    println!(
                        "not rewrapped: subject {} version {}: {}",
                        failure.subject, failure.version, failure.error
                    );
                }
                println!("live data keys per KEK id:");
                for (kek, count) in &report.live_by_kek {
                    println!("  {kek:<20} {count:>10}");
                }
            });
        }
        Command::Pii(PiiCommand::MigrateLegacy { batch }) => {
            let keys = key_store(pool).await?;
            let report = ledger_pii::legacy::migrate(pool, &keys, *batch)
                .await
                .map_err(|err| match err {
                    ledger_pii::legacy::LegacyError::Database(err) => ops::OpError::Database(err),
                    ledger_pii::legacy::LegacyError::Key(err) => ops::OpError::Keys(err),
                })?;
            print(cli.json, &report, |r| {
                println!(
                    "moved {} legacy owner names into subjects ({} erased meanwhile): {} openings \
                     and {} references rewritten, {} snapshots deleted, {} stored answers and {} \
                     dead letters scrubbed",
                    r.subjects,
                    r.erased_subjects,
                    r.openings,
                    r.references,
                    r.snapshots,
                    r.answers,
                    r.dead_letters
                );
                if r.subjects > 0 {
                    println!("next: ledger-admin rebuild all (the read models still hold the names in clear)");
                }
            });
        }
        Command::Keys(command) => match command {
            KeyCommand::Create { name, scopes } => {
                let name = name.trim();
                if name.is_empty() || name.len() > 100 {
                    return Err(ops::OpError::Invalid(
                        "--name must be 1 to 100 characters".into(),
                    ));
                }
                let created = auth::create(pool, name, scopes).await?;
                print(cli.json, &created, |k| {
                    println!(
                        "created key {} ({}) with scopes {}",
                        k.id,
                        k.name,
                        k.scopes.join(",")
                    );
                    println!("{}", k.key);
                    println!("(store it now: it is not kept and cannot be shown again)");
                });
            }
            KeyCommand::List => {
                let keys = auth::list(pool).await?;
                print(cli.json, &keys, |keys| {
                    println!(
                        "{:<36} {:<14} {:<16} {:<18} state",
                        "id", "prefix", "scopes", "name"
                    );
                    for k in keys {
                        println!(
                            "{:<36} {:<14} {:<16} {:<18} {}",
                            k.id,
                            k.prefix,
                            k.scopes.join(","),
                            k.name,
                            k.revoked_at
                                .map_or("live".to_owned(), |at| format!("revoked {at}"))
                        );
                    }
                });
            }
            KeyCommand::Revoke { id } => {
                if !auth::revoke(pool, *id).await? {
                    return Err(ops::OpError::Invalid(format!("no live key {id}")));
                }
                print(cli.json, &serde_json::json!({"revoked": id}), |_| {
                    println!("revoked key {id}");
                });
            }
        },
    }
    Ok(())
}

/// `ledger-admin rebuild all` (or several names): one pass over the log for all of them,
/// with a progress bar per projection.
async fn rebuild_in_one_pass(
    pool: &sqlx::PgPool,
    selected: &[&'static str],
    batch_size: i64,
    json: bool,
) -> Result<(), ops::OpError> {
    let bars = (std::io::stderr().is_terminal() && !json).then(|| {
        let multi = indicatif::MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{spinner} {msg:<18} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars: Vec<(&str, ProgressBar)> = selected
            .iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_message(*name);
                (*name, bar)
            })
            .collect();
        bars
    });
    let on_progress = |name: &str, progress: rebuild::Progress| {
        if let Some(bar) = bars
            .iter()
            .flatten()
            .find_map(|(n, bar)| (*n == name).then_some(bar))
        {
            bar.set_length(u64::try_from(progress.total).unwrap_or(0));
            bar.set_position(u64::try_from(progress.events).unwrap_or(0));
        }
    };
    let reports = rebuild::rebuild_many(
        pool,
        &key_store(pool).await?,
        selected,
        batch_size,
        on_progress,
    )
    .await?;
    for (_, bar) in bars.iter().flatten() {
        bar.finish_and_clear();
    }
    print(json, &reports, |reports| {
        for report in reports {
            println!(
                "{} rebuilt from {} events (up to position {}) and swapped in",
                report.projection, report.progress.events, report.progress.position
            );
        }
    });
    Ok(())
}
