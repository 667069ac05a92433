//! The registry `/metrics` encodes, and the metric types the rest of
//! pii-vault counts with. The metrics are `prometheus-client` types in one
//! registry, so encoding them is the library's job: a histogram's buckets
//! are counted and encoded together, cumulative by construction, and the
//! `+Inf` bucket always equals `_count`. Labels are fixed, value-free
//! strings (reason codes, dependency and KMS operation names), never message
//! content.
//!
//! This module names no other part of pii-vault, so that whatever counts
//! (the pipeline, `kms`) can depend on it without a circle: each keeps its
//! own metrics and registers them here.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// One label with a value from a small, fixed set of names.
pub type Label = [(&'static str, &'static str); 1];

/// Counters by one label (a reason code, a dependency, an operation).
pub type LabeledCounter = Family<Label, Counter>;

/// The prefix of pii-vault's own metrics; the `process_*` ones are
/// standard and have none.
pub const PREFIX: &str = "pii_vault";

/// Creates the series of each of `values`, at 0: a series that exists from
/// the start lets a rate() over its first increment see it.
pub fn preset(family: &LabeledCounter, label: &'static str, values: &[&'static str]) {
    for v in values {
        let _ = family.get_or_create(&[(label, *v)]);
    }
}

/// Every metric a process shows on `/metrics`.
pub struct Registry {
    root: prometheus_client::registry::Registry,
}

impl Registry {
    /// The standard `process_*` metrics, and whatever `register` adds under
    /// [`PREFIX`] (counter names get their `_total` from the encoder).
    pub fn new(register: impl FnOnce(&mut prometheus_client::registry::Registry)) -> Self {
        let mut root = prometheus_client::registry::Registry::default();
        super::process::register(&mut root);
        register(root.sub_registry_with_prefix(PREFIX));
        Registry { root }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.root)
            .expect("writing to a String cannot fail");
        out
    }

    /// The OpenMetrics text format (with its `# EOF`).
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.root)
            .expect("writing to a String cannot fail");
        out
    }
}
