//! Counters the pipeline keeps, read by `/metrics` (and the in-flight count
//! by the summary's checks). The registry they are encoded from, and the
//! rules for labels, are in [`crate::metrics::registry`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;

use futures::future::BoxFuture;

use crate::metrics::registry::{preset, LabeledCounter, Registry};
use crate::metrics::Probe;
use crate::store::{BatchOutcome, Store};

/// Dependencies whose faults are counted (`dependency` label).
pub const DEPENDENCIES: &[&str] = &["database", "source", "kms"];

/// Upper bounds of `pii_vault_batch_size` (messages).
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0];
/// Upper bounds of `pii_vault_batch_seconds`.
const BATCH_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metrics of one `run`, and the registry `/metrics` encodes.
pub struct Stats {
    pub received: Counter,
    pub stored: Counter,
    pub duplicates: Counter,
    pub rejected: Counter,
    pub acked: Counter,
    pub ack_failures: Counter,
    pub rejected_by_reason: LabeledCounter,
    pub retries: LabeledCounter,
    pub errors: LabeledCounter,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    /// When a batch was last committed (Unix seconds; 0 before the first):
    /// `time() - pii_vault_last_batch_committed_timestamp_seconds` is how
    /// long this worker has stored nothing.
    pub last_batch_committed: Gauge,
    /// Whether the last attempt to commit a batch failed (and is being
    /// retried): the database may answer a ping and still refuse writes
    /// (its disk full, say), which `/readyz` must report.
    writes_failing: AtomicBool,
    registry: Registry,
}

impl Default for Stats {
    fn default() -> Self {
        let received = Counter::default();
        let acked = Counter::default();
        let ack_failures = Counter::default();
        let stored = Counter::default();
        let duplicates = Counter::default();
        let rejected = Counter::default();
        let rejected_by_reason = LabeledCounter::default();
        let retries = LabeledCounter::default();
        let errors = LabeledCounter::default();
        let batch_size = Histogram::new(BATCH_SIZE_BUCKETS.iter().copied());
        let batch_seconds = Histogram::new(BATCH_SECONDS_BUCKETS.iter().copied());
        let last_batch_committed = Gauge::default();
        // Every series exists from the start (at 0), so that a rate() over
        // the first increment sees it.
        preset(
            &rejected_by_reason,
            "reason",
            crate::domain::Rejection::CODES,
        );
        preset(&retries, "dependency", DEPENDENCIES);
        preset(&errors, "dependency", DEPENDENCIES);

        let registry = Registry::new(|r| {
            // Counter names get their `_total` from the encoder.
            r.register(
                "messages_received",
                "Messages received from the source",
                received.clone(),
            );
            r.register(
                "logins_stored",
                "Logins newly written to user_logins",
                stored.clone(),
            );
            r.register(
                "duplicates",
                "Redelivered messages that added nothing",
                duplicates.clone(),
            );
            r.register(
                "rejected",
                "Messages rejected and quarantined",
                rejected.clone(),
            );
            r.register(
                "messages_acked",
                "Messages acknowledged to the source after commit",
                acked.clone(),
            );
            r.register(
                "ack_failures",
                "Messages whose acknowledgement failed (will be redelivered)",
                ack_failures.clone(),
            );
            r.register(
                "rejected_by_reason",
                "Rejected messages by reason code",
                rejected_by_reason.clone(),
            );
            r.register(
                "retries",
                "Retries after transient faults, by dependency",
                retries.clone(),
            );
            r.register("errors", "Errors by dependency", errors.clone());
            r.register(
                "kms_requests",
                "AWS KMS API calls this process made, by operation (one per call; the SDK's own retries are not counted apart)",
                crate::kms::requests().clone(),
            );
            r.register(
                "batch_size",
                "Messages per committed batch",
                batch_size.clone(),
            );
            r.register(
                "batch_seconds",
                "Time to protect and commit one batch",
                batch_seconds.clone(),
            );
            r.register(
                "last_batch_committed_timestamp_seconds",
                "When this process last committed a batch (Unix time; 0 before the first)",
                last_batch_committed.clone(),
            );
            r.register_collector(Box::new(crate::metrics::build::BuildInfo));
            r.register_collector(Box::new(InFlight {
                received: received.clone(),
                acked: acked.clone(),
                ack_failures: ack_failures.clone(),
            }));
        });
        Stats {
            received,
            stored,
            duplicates,
            rejected,
            acked,
            ack_failures,
            rejected_by_reason,
            retries,
            errors,
            batch_size,
            batch_seconds,
            last_batch_committed,
            writes_failing: AtomicBool::new(false),
            registry,
        }
    }
}

impl Stats {
    pub fn record_batch(
        &self,
        o: &BatchOutcome,
        size: usize,
        reasons: &[&'static str],
        took: Duration,
    ) {
        self.writes_failing.store(false, Ordering::Relaxed);
        self.stored.inc_by(o.stored);
        self.duplicates.inc_by(o.duplicates);
        self.rejected.inc_by(o.rejected);
        // Reasons of rejections that were themselves redeliveries are not
        // counted twice: only as many as were newly quarantined.
        for r in reasons.iter().take(o.rejected as usize) {
            self.rejected_by_reason
                .get_or_create(&[("reason", r)])
                .inc();
        }
        self.batch_size.observe(size as f64);
        self.batch_seconds.observe(took.as_secs_f64());
        self.last_batch_committed
            .set(chrono::Utc::now().timestamp());
    }

    /// A retry after a transient fault of `dependency` (one of [`DEPENDENCIES`]).
    pub fn retry(&self, dependency: &'static str) {
        self.retries
            .get_or_create(&[("dependency", dependency)])
            .inc();
    }

    /// A batch that could not be committed and is retried: not ready until
    /// one commits.
    pub fn write_failed(&self) {
        self.writes_failing.store(true, Ordering::Relaxed);
    }

    /// A fault of `dependency` that was given up on.
    pub fn error(&self, dependency: &'static str) {
        self.errors
            .get_or_create(&[("dependency", dependency)])
            .inc();
    }

    /// Messages received and not yet acknowledged (or given up on).
    pub fn in_flight(&self) -> u64 {
        in_flight(&self.received, &self.acked, &self.ack_failures)
    }

    /// Every metric, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// What `metrics::serve` encodes.
impl AsRef<Registry> for Stats {
    fn as_ref(&self) -> &Registry {
        &self.registry
    }
}

/// The database, as `/readyz` checks it: it answers, and the last batch
/// written to it was committed. Here, where the store and the metrics meet,
/// because `metrics` sits below the store and cannot name it.
pub struct DatabaseProbe {
    pub store: Arc<dyn Store>,
    pub stats: Arc<Stats>,
}

impl Probe for DatabaseProbe {
    fn answers(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            !self.stats.writes_failing.load(Ordering::Relaxed) && self.store.ping().await.is_ok()
        })
    }
}

fn in_flight(received: &Counter, acked: &Counter, ack_failures: &Counter) -> u64 {
    received
        .get()
        .saturating_sub(acked.get() + ack_failures.get())
}

/// `pii_vault_in_flight`, computed at scrape time from the counters.
#[derive(Debug)]
struct InFlight {
    received: Counter,
    acked: Counter,
    ack_failures: Counter,
}

impl Collector for InFlight {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge =
            ConstGauge::new(in_flight(&self.received, &self.acked, &self.ack_failures) as i64);
        let metric = encoder.encode_descriptor(
            "in_flight",
            "Messages received and not yet acknowledged.",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_kept() {
        let s = Stats::default();
        s.received.inc_by(3);
        s.acked.inc_by(1);
        s.retry("kms");
        s.record_batch(
            &BatchOutcome {
                stored: 2,
                duplicates: 0,
                rejected: 1,
            },
            3,
            &["not_json"],
            Duration::from_millis(7),
        );
        let text = s.registry().render_prometheus();
        for line in [
            "pii_vault_messages_received_total 3",
            "pii_vault_logins_stored_total 2",
            "pii_vault_duplicates_total 0",
            "pii_vault_rejected_total 1",
            "pii_vault_messages_acked_total 1",
            "pii_vault_ack_failures_total 0",
            "pii_vault_rejected_by_reason_total{reason=\"not_json\"} 1",
            "pii_vault_retries_total{dependency=\"kms\"} 1",
            "pii_vault_retries_total{dependency=\"database\"} 0",
            "pii_vault_errors_total{dependency=\"source\"} 0",
            "pii_vault_in_flight 2",
            "pii_vault_batch_size_bucket{le=\"+Inf\"} 1",
            "pii_vault_batch_size_count 1",
            "pii_vault_batch_seconds_bucket{le=\"0.01\"} 1",
            "pii_vault_batch_seconds_bucket{le=\"0.005\"} 0",
            "# TYPE pii_vault_batch_seconds histogram",
            "# TYPE pii_vault_in_flight gauge",
            "# TYPE pii_vault_build_info gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("pii_vault_build_info{version=\"")
                    && l.contains(",commit=\"")
                    && l.ends_with("} 1")),
            "{text}"
        );
        let at = text
            .lines()
            .find_map(|l| l.strip_prefix("pii_vault_last_batch_committed_timestamp_seconds "))
            .expect("the last-batch gauge");
        assert!(at.parse::<i64>().unwrap() > 1_700_000_000, "{at}");
        let om = s.registry().render_openmetrics();
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
