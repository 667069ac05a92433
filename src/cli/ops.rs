//! The options of the operations commands (`healthcheck`).

use clap::Args;

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The readiness URL [default: http://127.0.0.1:PORT/readyz, PORT from
    /// PII_VAULT_METRICS_ADDR, else 9187]. Plain http only.
    #[arg(long, env = "PII_VAULT_HEALTHCHECK_URL", value_name = "URL")]
    pub url: Option<String>,

    /// Seconds to wait for the answer.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
}
