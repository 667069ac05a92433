//! Logging setup. Logs go to stderr (stdout is for command output such as
//! `reveal --format json`). Nothing logged anywhere carries a field value of
//! an event: the pipeline logs message ids, counts and reason codes only.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::cli::LogFormat;

/// The filter when neither `PII_VAULT_LOG` nor `RUST_LOG` holds a valid one.
const DEFAULT_FILTER: &str = "info,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn";

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

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PII_VAULT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(capped(filter));
    match format {
        LogFormat::Text => registry.with(layer.compact()).init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
    }
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
