//! `ledger-command`: serve the command API, or `migrate` the database.

use std::process::ExitCode;

use ledger_command::config::{Cli, Command};
use ledger_command::startup::Application;
use ledger_platform::{db, shutdown, telemetry};

/// mimalloc: the request path allocates many small, short-lived objects; under load glibc's
/// allocator took about a fifth of the command API's CPU samples (BENCHMARKS.md, profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = ledger_platform::config::parse_or_exit();
    let _telemetry = telemetry::init(cli.settings.log_format, "ledger-command");
    let settings = cli.settings;
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => migrate(&settings).await,
        Command::Serve => serve(&settings).await,
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
) -> Result<(), Box<dyn std::error::Error>> {
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown::signal()).await?;
    Ok(())
}
