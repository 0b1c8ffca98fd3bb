//! `ledger-query`: serve the read models.

use std::process::ExitCode;

use ledger_platform::{shutdown, telemetry};
use ledger_query::config::Settings;
use ledger_query::startup::Application;

/// mimalloc: the request path allocates many small, short-lived objects; under load glibc's
/// allocator took about a fifth of the command API's CPU samples (BENCHMARKS.md, profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let settings: Settings = ledger_platform::config::parse_or_exit();
    let _telemetry = telemetry::init(settings.log_format, "ledger-query");
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %err, "ledger-query cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "ledger-query failed");
            ExitCode::FAILURE
        }
    }
}
