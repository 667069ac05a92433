//! Logging setup. Logs go to stderr (stdout is for command output such as
//! `reveal --format json`). Nothing logged anywhere carries a field value of
//! an event: the pipeline logs message ids, counts and reason codes only.

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::cli::LogFormat;

/// The filter when neither `PII_VAULT_LOG` nor `RUST_LOG` holds a valid one.
const DEFAULT_FILTER: &str = "info,sqlx=warn,aws_config=error,aws_smithy_runtime=warn";

/// Libraries whose debug and trace output can hold what pii-vault must never
/// log: the HTTP, HTTP/2 and TLS layers and the AWS SDK dump request and
/// response bodies there, and an SQS `ReceiveMessage` response body is a
/// batch of raw login events (IPs, device ids); sqlx logs every SQL
/// statement at debug (the text, not the bound values, but a statement built
/// with a value in it would show it). A target matches as a prefix, as in
/// `EnvFilter` (`aws_smithy_http` also covers `aws_smithy_http_client`).
pub const CAPPED_TARGETS: &[&str] = &[
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_sdk_sqs",
    "aws_sdk_kms",
    "aws_config",
    "aws_runtime",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "sqlx",
];

/// Whether stderr carries JSON lines (`--log-format json`): set once by
/// [`init`], read by [`stderr_line`].
static JSON_LINES: AtomicBool = AtomicBool::new(false);

pub fn init(format: LogFormat) {
    JSON_LINES.store(format == LogFormat::Json, Ordering::Relaxed);
    install_panic_hook();
    let filter = EnvFilter::try_from_env("PII_VAULT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let layer = fmt::layer()
        .with_writer(|| BarAware)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(capped(filter));
    match format {
        LogFormat::Text => registry.with(layer.compact()).init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
    }
}

/// One message for the operator on stderr that is not a tracing event (a
/// command's result line, `run`'s summary, the final error): the text as
/// it is, or under `--log-format json` one JSON object on one line
/// (`timestamp`, `level`, `message`, `target`), so that a log shipper reads
/// every line of stderr the same way. The crate's `eprintln!` is this (see
/// `lib.rs`). The level is `ERROR` for a line that starts `pii-vault:
/// error:`, `WARN` for `pii-vault: warning:`, else `INFO`; in JSON the
/// `pii-vault: ` prefix is left out.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    stderr_line_with(&args.to_string(), None);
}

/// [`stderr_line`] with `fields` added to the JSON object (ignored in text).
pub fn stderr_line_with(text: &str, fields: Option<serde_json::Map<String, serde_json::Value>>) {
    let line = if JSON_LINES.load(Ordering::Relaxed) {
        json_line(text, fields)
    } else {
        text.to_string()
    };
    // A closed stderr is no reason to fail (or panic) on the way out.
    let _ = crate::progress::suspend(|| writeln!(std::io::stderr().lock(), "{line}"));
}

/// stderr for log lines: each line is written with the progress bar (if
/// one is on screen) cleared and then drawn again below it, so that a log
/// line never lands in the middle of the bar.
struct BarAware;

impl std::io::Write for BarAware {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::progress::suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        crate::progress::suspend(|| std::io::stderr().lock().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The JSON object [`stderr_line`] writes for `text`.
pub fn json_line(text: &str, fields: Option<serde_json::Map<String, serde_json::Value>>) -> String {
    let body = text.strip_prefix("pii-vault: ").unwrap_or(text);
    let (level, message) = if let Some(m) = body.strip_prefix("error: ") {
        ("ERROR", m)
    } else if let Some(m) = body.strip_prefix("warning: ") {
        ("WARN", m)
    } else {
        ("INFO", body)
    };
    let mut obj = serde_json::Map::new();
    obj.insert(
        "timestamp".into(),
        chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .into(),
    );
    obj.insert("level".into(), level.into());
    obj.insert("message".into(), message.into());
    obj.insert("target".into(), "pii_vault".into());
    if let Some(fields) = fields {
        obj.extend(fields);
    }
    serde_json::Value::Object(obj).to_string()
}

/// Whether `e` (or what it wraps) is a write to a closed pipe: the reader
/// of stdout went away (`pii-vault audit | head -1`), which is how such a
/// pipeline ends, not a failure.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}

/// `println!` panics when stdout is a closed pipe; that is a reader that
/// has seen enough (`| head -1`), so the process ends quietly with status
/// 0, as `ls | head` does. Any other panic keeps the default report (one
/// JSON line under `--log-format json`).
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(0);
        }
        if JSON_LINES.load(Ordering::Relaxed) {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            stderr_line(format_args!("pii-vault: error: panic{at}: {text}"));
        } else {
            default(info);
        }
    }));
}

/// `filter`, but never below `info` for [`CAPPED_TARGETS`]: a filtering
/// layer to put under the output layers.
///
/// The filter comes from the environment, which an operator (or a
/// well-meant `RUST_LOG=trace` while debugging a queue) controls; raw
/// events in the log are a breach all the same, so no filter string may be
/// able to turn that output on. The cap is a second filter that an event
/// must pass as well, rather than directives appended to the user's: in an
/// `EnvFilter` a more specific directive (one naming a span or a field,
/// such as `aws_smithy_runtime[invoke]=trace`) would win over an appended
/// `aws_smithy_runtime=info`, and an appended directive would also raise a
/// target the user had set to `error` or `off`. Here each event gets the
/// stricter of the two.
pub fn capped<S>(filter: EnvFilter) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let cap = CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::INFO),
    );
    filter.and_then(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    /// A subscriber that filters with `capped(EnvFilter::new(spec))`.
    fn subscriber(spec: &str) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::registry()
            .with(capped(EnvFilter::new(spec)))
            .with(fmt::layer().with_writer(std::io::sink))
    }

    /// For each target: the target, and the levels below info at which it
    /// is enabled. (`enabled!` needs a literal target, hence the macro.)
    macro_rules! probe {
        ($($target:literal),* $(,)?) => {
            vec![$((
                $target,
                [
                    (Level::DEBUG, tracing::enabled!(target: $target, Level::DEBUG)),
                    (Level::TRACE, tracing::enabled!(target: $target, Level::TRACE)),
                ]
                .into_iter()
                .filter_map(|(level, on)| on.then_some(level))
                .collect::<Vec<Level>>(),
            )),*]
        };
    }

    /// The capped targets (and some of their modules) that are enabled at
    /// debug or trace under the current subscriber.
    fn capped_targets_enabled_below_info() -> Vec<(&'static str, Vec<Level>)> {
        let probes = probe!(
            "aws_smithy_runtime",
            "aws_smithy_runtime::client::orchestrator",
            "aws_smithy_runtime_api",
            "aws_smithy_http",
            "aws_smithy_http_client",
            "aws_smithy_http_client::hyper_1",
            "aws_sdk_sqs",
            "aws_sdk_sqs::operation::receive_message",
            "aws_sdk_kms",
            "aws_config",
            "aws_runtime",
            "hyper",
            "hyper::proto::h1::io",
            "hyper_util",
            "hyper_util::client::legacy::pool",
            "h2",
            "h2::codec",
            "rustls",
            "rustls::client::hs",
            "sqlx",
            "sqlx::query",
        );
        for t in CAPPED_TARGETS {
            assert!(
                probes.iter().any(|(p, _)| p == t),
                "{t} has no probe in this test"
            );
        }
        probes
            .into_iter()
            .filter(|(_, levels)| !levels.is_empty())
            .collect()
    }

    #[test]
    fn hostile_filters_cannot_enable_library_debug_or_trace() {
        for spec in [
            "trace",
            "debug",
            "aws_smithy_runtime=trace,hyper=trace",
            "info,aws_smithy_runtime=trace,aws_smithy_http=trace,aws_sdk_sqs=trace,hyper=trace,\
             hyper_util=trace,h2=trace,rustls=trace,sqlx=trace,aws_config=trace",
            "sqlx::query=trace,hyper::proto=trace,aws_smithy_runtime::client=trace",
            "aws_smithy_runtime[{x}]=trace,hyper[{y}]=trace",
        ] {
            tracing::subscriber::with_default(subscriber(spec), || {
                let on = capped_targets_enabled_below_info();
                assert!(on.is_empty(), "{spec:?} enables {on:?}");
            });
        }
        // The cap takes away nothing else the filter asked for, nor info
        // from the capped targets.
        tracing::subscriber::with_default(subscriber("trace"), || {
            assert!(tracing::enabled!(target: "pii_vault::pipeline", Level::TRACE));
            assert!(tracing::enabled!(target: "aws_smithy_runtime", Level::INFO));
            assert!(tracing::enabled!(target: "sqlx::query", Level::INFO));
        });
    }

    #[test]
    fn a_span_directive_cannot_enable_library_trace_inside_its_span() {
        // In an EnvFilter alone, a span directive enables everything inside
        // the span, whatever the target's own directive says.
        let spec = "warn,aws_smithy_runtime[invoke]=trace,[invoke]=trace";
        tracing::subscriber::with_default(subscriber(spec), || {
            let span = tracing::info_span!(target: "aws_smithy_runtime", "invoke");
            let _in = span.enter();
            assert!(
                tracing::enabled!(target: "pii_vault::probe", Level::TRACE),
                "the span directive does apply (else this test proves nothing)"
            );
            let on = capped_targets_enabled_below_info();
            assert!(on.is_empty(), "{spec:?} enables {on:?} inside the span");
        });
    }

    #[test]
    fn the_cap_never_raises_a_level() {
        tracing::subscriber::with_default(subscriber("error,hyper=off"), || {
            assert!(!tracing::enabled!(target: "hyper", Level::ERROR));
            assert!(!tracing::enabled!(target: "aws_sdk_sqs", Level::INFO));
            assert!(tracing::enabled!(target: "aws_sdk_sqs", Level::ERROR));
        });
        tracing::subscriber::with_default(subscriber(DEFAULT_FILTER), || {
            assert!(!tracing::enabled!(target: "sqlx::query", Level::INFO));
            assert!(tracing::enabled!(target: "pii_vault", Level::INFO));
            assert!(!tracing::enabled!(target: "pii_vault", Level::DEBUG));
        });
    }
}
