//! Counters the pipeline keeps, read by the summary line, the progress bar
//! and `/metrics`. Lock-free on the hot path; labels are fixed, value-free
//! strings (reason codes, dependency names), never message content.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::store::BatchOutcome;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter per label value; the set of labels is small and static.
#[derive(Default)]
pub struct LabeledCounter(Mutex<BTreeMap<&'static str, u64>>);

impl LabeledCounter {
    pub fn with_label(&self, label: &'static str) -> LabelHandle<'_> {
        LabelHandle(self, label)
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("stats lock").clone()
    }
    pub fn preset(&self, labels: &[&'static str]) {
        let mut m = self.0.lock().expect("stats lock");
        for l in labels {
            m.entry(l).or_insert(0);
        }
    }
}

pub struct LabelHandle<'a>(&'a LabeledCounter, &'static str);

impl LabelHandle<'_> {
    pub fn add(&self, n: u64) {
        *self
            .0
             .0
            .lock()
            .expect("stats lock")
            .entry(self.1)
            .or_insert(0) += n;
    }
    pub fn inc(&self) {
        self.add(1)
    }
}

/// A Prometheus histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths, to stay lock-free.
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

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
}

impl Default for Stats {
    fn default() -> Self {
        let s = Stats {
            received: Counter::default(),
            stored: Counter::default(),
            duplicates: Counter::default(),
            rejected: Counter::default(),
            acked: Counter::default(),
            ack_failures: Counter::default(),
            rejected_by_reason: LabeledCounter::default(),
            retries: LabeledCounter::default(),
            errors: LabeledCounter::default(),
            batch_size: Histogram::new(&[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]),
            batch_seconds: Histogram::new(&[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        };
        s.rejected_by_reason.preset(crate::domain::Rejection::CODES);
        s.retries.preset(&["database", "source", "kms"]);
        s.errors.preset(&["database", "source", "kms"]);
        s
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
        self.stored.add(o.stored);
        self.duplicates.add(o.duplicates);
        self.rejected.add(o.rejected);
        // Reasons of rejections that were themselves redeliveries are not
        // counted twice: only as many as were newly quarantined.
        for r in reasons.iter().take(o.rejected as usize) {
            self.rejected_by_reason.with_label(r).inc();
        }
        self.batch_size.observe(size as f64);
        self.batch_seconds.observe(took.as_secs_f64());
    }

    /// Messages received and not yet acknowledged (or given up on).
    pub fn in_flight(&self) -> u64 {
        self.received
            .get()
            .saturating_sub(self.acked.get() + self.ack_failures.get())
    }

    /// Prometheus text exposition format, every name prefixed `pii_vault_`.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "pii_vault_messages_received_total",
                "Messages received from the source.",
                &self.received,
            ),
            (
                "pii_vault_logins_stored_total",
                "Logins newly written to user_logins.",
                &self.stored,
            ),
            (
                "pii_vault_duplicates_total",
                "Redelivered messages that added nothing.",
                &self.duplicates,
            ),
            (
                "pii_vault_rejected_total",
                "Messages rejected and quarantined.",
                &self.rejected,
            ),
            (
                "pii_vault_messages_acked_total",
                "Messages acknowledged to the source after commit.",
                &self.acked,
            ),
            (
                "pii_vault_ack_failures_total",
                "Messages whose acknowledgement failed (will be redelivered).",
                &self.ack_failures,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let labeled = [
            (
                "pii_vault_rejected_by_reason_total",
                "Rejected messages by reason code.",
                "reason",
                &self.rejected_by_reason,
            ),
            (
                "pii_vault_retries_total",
                "Retries after transient faults, by dependency.",
                "dependency",
                &self.retries,
            ),
            (
                "pii_vault_errors_total",
                "Errors by dependency.",
                "dependency",
                &self.errors,
            ),
        ];
        for (name, help, label, c) in labeled {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in c.snapshot() {
                let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP pii_vault_in_flight Messages received and not yet acknowledged.\n# TYPE pii_vault_in_flight gauge\npii_vault_in_flight {}",
            self.in_flight()
        );
        self.batch_size.render(
            &mut out,
            "pii_vault_batch_size",
            "Messages per committed batch.",
        );
        self.batch_seconds.render(
            &mut out,
            "pii_vault_batch_seconds",
            "Time to protect and commit one batch.",
        );
        out
    }
}
