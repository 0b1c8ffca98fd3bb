//! `ledger-projector`: build the read models from the log.

use std::process::ExitCode;

use ledger_platform::{shutdown, telemetry};
use ledger_projector::config::Settings;
use ledger_projector::startup::Application;

#[tokio::main]
async fn main() -> ExitCode {
    let settings: Settings = ledger_platform::config::parse_or_exit();
    let _telemetry = telemetry::init(settings.log_format, "ledger-projector");
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %err, "ledger-projector cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "ledger-projector failed");
            ExitCode::FAILURE
        }
    }
}
