//! Which build this is: for `--version` and `pii_vault_build_info`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

/// This build's version (Cargo's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this build was made from (`git rev-parse --short HEAD` at
/// build time, or the build environment's `PII_VAULT_COMMIT`), `unknown`
/// when neither was available (see build.rs).
pub const COMMIT: &str = env!("PII_VAULT_COMMIT");

/// What `--version` prints after the program name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PII_VAULT_COMMIT"),
    ")"
);

/// `pii_vault_build_info{version, commit} 1`: which build a process runs.
#[derive(Debug)]
pub struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(1i64);
        let mut metric = encoder.encode_descriptor(
            "build_info",
            "The version and commit of this build (always 1).",
            None,
            gauge.metric_type(),
        )?;
        let labels = [("version", VERSION), ("commit", COMMIT)];
        let metric = metric.encode_family(&labels)?;
        gauge.encode(metric)
    }
}
