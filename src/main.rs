use pii_vault::cli::Cli;
use pii_vault::telemetry::{is_broken_pipe, stderr_line};

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    pii_vault::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            stderr_line(format_args!(
                "pii-vault: error: cannot start the async runtime: {e}"
            ));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(pii_vault::commands::dispatch(cli));
    // Everything that matters was awaited; don't wait for a blocked stdin
    // read (a stopped `run --from-file -`) to finish.
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of stdout has gone (`| head -1`): it had what it wanted.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<pii_vault::commands::Exit>() {
            // Not a failure, but not success either (a reveal waiting for
            // approval, a file run stopped by a signal): its own message and
            // exit status.
            Some(exit) => {
                stderr_line(format_args!("pii-vault: {}", exit.message));
                std::process::ExitCode::from(exit.code)
            }
            None => {
                stderr_line(format_args!("pii-vault: error: {e:#}"));
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// A command line clap refuses (status 2), or `--help` / `--version` (0).
/// Under `--log-format json` (or `PII_VAULT_LOG_FORMAT=json`) a refusal is
/// one JSON line too, like every other line on stderr.
fn usage_error(mut e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    pii_vault::cli::redact_usage_error(&mut e);
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || !pii_vault::cli::json_logs_requested()
    {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ");
    let mut fields = serde_json::Map::new();
    fields.insert("detail".into(), text.trim_end().into());
    eprintln!(
        "{}",
        pii_vault::telemetry::json_line(&format!("error: {first}"), Some(fields))
    );
    std::process::ExitCode::from(2)
}
