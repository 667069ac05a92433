//! The options of the operations commands (`migrate`, `healthcheck`), and
//! reading the database URL from a file.

use clap::Args;

use super::Cli;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Only the schema: no allow-list entry, no keys (for a DBA without KMS
    /// rights; a rotator then runs `pii-vault keys init`).
    #[arg(long)]
    pub schema_only: bool,

    /// List every migration as applied or pending; change nothing.
    #[arg(long, conflicts_with_all = ["dry_run", "schema_only"])]
    pub status: bool,

    /// Postgres, before the migrate that partitions a large single-table
    /// database by month: build the indexes it needs online (CREATE INDEX
    /// CONCURRENTLY, writers go on), so that the migrate itself only checks.
    /// Resumable: run it again after an interruption. Changes nothing else.
    #[arg(long, conflicts_with_all = ["status", "dry_run", "schema_only", "role_prefix",
          "no_network_tokens", "network_tokens"])]
    pub prepare_partitions: bool,

    /// Show the migrations that would be applied; change nothing (and
    /// create no SQLite file).
    #[arg(long, conflicts_with = "schema_only")]
    pub dry_run: bool,

    /// Postgres: name this database's roles PREFIX_worker, PREFIX_revealer,
    /// … instead of pii_vault_worker, …. Roles belong to the cluster: give
    /// each vault on a shared cluster its own prefix, or a login granted
    /// one vault's role can use the others. Fixed at the first migrate
    /// (later runs keep it; a different one is refused). Needs CREATEROLE.
    #[arg(long, env = "PII_VAULT_ROLE_PREFIX", value_name = "PREFIX",
          conflicts_with_all = ["status", "dry_run"])]
    pub role_prefix: Option<crate::store::RolePrefix>,

    /// Stop writing masked_ip_net (the token of each login's /24 or /48
    /// network), empty it, and have the database refuse it: for
    /// deployments whose policy forbids grouping logins by network.
    #[arg(long, conflicts_with_all = ["status", "dry_run", "network_tokens"])]
    pub no_network_tokens: bool,

    /// Turn network tokens back on (the default of a new database); a
    /// `rotate token-key` then fills the logins stored without one.
    #[arg(long, conflicts_with_all = ["status", "dry_run"])]
    pub network_tokens: bool,
}

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

impl Cli {
    /// With --database-url-file / DATABASE_URL_FILE: reads the URL from
    /// that file into `database_url`. Both given is an error: which one
    /// wins would be a guess.
    pub fn read_database_url_file(&mut self) -> anyhow::Result<()> {
        let Some(path) = &self.database_url_file else {
            return Ok(());
        };
        if self.database_url.is_some() {
            anyhow::bail!(
                "both a database URL (--database-url / DATABASE_URL) and a file to read it from \
                 (--database-url-file / DATABASE_URL_FILE) are given: keep one"
            );
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the database URL from {} (--database-url-file / DATABASE_URL_FILE): {e}",
                path.display()
            )
        })?;
        let url = text.trim();
        if url.is_empty() {
            anyhow::bail!(
                "{} (--database-url-file / DATABASE_URL_FILE) is empty",
                path.display()
            );
        }
        self.database_url = Some(url.to_string());
        Ok(())
    }
}
