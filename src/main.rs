use clap::Parser;
use pii_vault::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pii_vault::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pii-vault: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(pii_vault::commands::dispatch(cli));
    // Everything that matters was awaited; don't wait for a blocked stdin
    // read (a stopped `run --from-file -`) to finish.
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<pii_vault::commands::Exit>() {
            // Not a failure, but not success either (a reveal waiting for
            // approval): its own message and exit status.
            Some(exit) => {
                eprintln!("pii-vault: {}", exit.message);
                std::process::ExitCode::from(exit.code)
            }
            None => {
                eprintln!("pii-vault: error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
