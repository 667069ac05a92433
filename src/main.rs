use clap::Parser;
use pii_vault::cli::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pii_vault::telemetry::init(cli.log_format);
    match pii_vault::commands::dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pii-vault: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
