//! `ledger-command`: serve the command API, or `migrate` the database.

use std::process::ExitCode;

use ledger_command::config::{Cli, Command};
use ledger_command::startup::{self, Application};
use ledger_platform::{db, shutdown, telemetry};

/// mimalloc: the request path allocates many small, short-lived objects; under load glibc's
/// allocator took about a fifth of the command API's CPU samples (BENCHMARKS.md, profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = ledger_platform::config::parse_or_exit();
    let settings = cli.settings;
    // Serving handles personal data: without a usable key-encryption key it refuses to
    // start, naming the setting (never its value), as for any bad setting. Migrating does
    // not need one.
    let keyring = match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => None,
        Command::Serve => match startup::keyring_from_env() {
            Ok(keyring) => Some(keyring),
            Err(err) => {
                // Logging is not set up before the configuration is known.
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("{err}");
                }
                return ExitCode::from(2);
            }
        },
    };
    let _telemetry = telemetry::init(settings.log_format, "ledger-command");
    let result = match keyring {
        None => migrate(&settings).await,
        Some(keyring) => serve(&settings, keyring).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "ledger-command failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(
    settings: &ledger_command::config::Settings,
) -> Result<(), Box<dyn std::error::Error>> {
    let pool = db::connect(
        settings.database_url.0.clone(),
        2,
        settings.database_acquire_timeout,
    )
    .await?;
    db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn serve(
    settings: &ledger_command::config::Settings,
    keyring: ledger_pii::Keyring,
) -> Result<(), Box<dyn std::error::Error>> {
    let app = Application::build(settings, keyring).await?;
    app.run_until_stopped(shutdown::signal()).await?;
    Ok(())
}
