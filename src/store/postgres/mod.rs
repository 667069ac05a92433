//! The production store: Postgres, shared by many worker replicas, each
//! process connecting as its role's own login. Every privileged write goes
//! through a `SECURITY DEFINER` function of `migrations/postgres/functions/`;
//! this backend calls them and maps their answers.

mod audit;
mod chunks;
mod copy;
mod erasure;
mod ingest;
mod jobs;
mod keys;
mod line_days;
mod months;
mod prepare;
mod quarantine;
mod reveal;
mod rewrite;
mod roles;
mod search;
mod trail;

use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{MigrateOptions, Profile, Store, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// `migrations/postgres/functions/*.sql` in name order: the current text of
/// every function, trigger, view and grant, re-applied by every `migrate`
/// (the list is made by build.rs).
const FUNCTIONS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/pg_functions.rs"));

/// Enough for a worker's concurrent batches plus a reveal, while many
/// replicas together stay under the server's `max_connections`.
const MAX_CONNECTIONS: u32 = 8;

/// A wrong host or a dropped SYN should fail start-up quickly (and be
/// retried by the caller), not hang for the OS TCP timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a query waits for a free (or freshly opened) connection before
/// reporting a transient error that the pipeline retries with backoff.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a pool may take to open its first connection before a direct
/// attempt is made to say why it cannot (see [`PgStore::connect`]).
const DIAGNOSE_AFTER: Duration = Duration::from_millis(200);

/// Where `opts` connect to, for messages: `HOST:PORT`, or the Unix socket.
fn address(opts: &PgConnectOptions) -> String {
    match opts.get_socket() {
        Some(dir) => format!("{}/.s.PGSQL.{}", dir.display(), opts.get_port()),
        None if opts.get_host().contains(':') => {
            format!("[{}]:{}", opts.get_host(), opts.get_port())
        }
        None => format!("{}:{}", opts.get_host(), opts.get_port()),
    }
}

pub struct PgStore {
    pub(super) pool: PgPool,
    /// Set when a batch met a message id already stored: the next batches
    /// skip the `COPY` fast lane (which would fail and be redone) until one
    /// of them is all new again, e.g. while a file loaded before is re-run.
    pub(super) expect_duplicates: AtomicBool,
    /// The monthly partitions as this process knows them: a batch with a
    /// day in a month not among them, or within a month of their end, has
    /// the partitions it needs created first (ingest.rs).
    partitions: std::sync::Mutex<ingest::KnownPartitions>,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        use sqlx::{ConnectOptions as _, Connection as _};
        let opts = PgConnectOptions::from_str(url)?.application_name("pii-vault");
        let at = address(&opts);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts.clone());
        // The pool retries a refused connection (and "too many
        // connections") until its deadline, which turns a stopped server
        // into a wait and then "timed out". A pool still without a
        // connection after a moment is asked once more, directly, whose
        // error says what is wrong at once; a healthy server costs nothing.
        let diagnose = async {
            tokio::time::sleep(DIAGNOSE_AFTER).await;
            match opts.connect().await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    std::future::pending::<sqlx::Error>().await
                }
                Err(e) => e,
            }
        };
        let attempt = async {
            tokio::select! {
                pool = pool => pool,
                e = diagnose => Err(e),
            }
        };
        let pool = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "no answer from {at} within {} s: check the host and port in the database URL, \
                     and that no firewall drops the connection",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| super::error::pg_connect_error(e, &at))?;
        Ok(PgStore {
            pool,
            expect_duplicates: AtomicBool::new(false),
            partitions: Default::default(),
        })
    }

    /// For tests and maintenance that need SQL outside the [`Store`] trait.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// `migrate --status`: one connection, reads only.
pub(super) use prepare::prepare_partitions;

pub(super) async fn migration_status(url: &str) -> Result<super::MigrationStatus, StoreError> {
    use sqlx::Connection as _;
    let opts = PgConnectOptions::from_str(url)?.application_name("pii-vault");
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&opts))
        .await
        .map_err(|_| StoreError::Transient("timed out connecting to the database".into()))??;
    let table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    let applied: Vec<i64> = if table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await?
    } else {
        Vec::new()
    };
    let role_prefix = roles::recorded_on(&mut conn).await?;
    let partitions = partitions_summary(&mut conn).await?;
    let _ = conn.close().await;
    Ok(super::MigrationStatus {
        exists: true,
        migrations: super::states(&MIGRATOR, &applied),
        reapplied: FUNCTIONS.iter().map(|(name, _)| *name).collect(),
        role_prefix,
        partitions,
    })
}

/// "16 monthly partitions, 2025-11 to 2027-03; 0 rows waiting in the
/// default partition" once migration 0017 partitioned the vault.
async fn partitions_summary(conn: &mut sqlx::PgConnection) -> Result<Option<String>, StoreError> {
    let partitioned: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('vault')), false) \
         AND to_regprocedure('pii_vault_partitions(text)') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !partitioned {
        return Ok(None);
    }
    let (n, lo, hi, waiting): (i64, Option<String>, Option<String>, i64) = sqlx::query_as(
        "SELECT count(*), to_char(min(coalesce(lo, hi - 1)), 'YYYY-MM'), to_char(max(hi) - 1, 'YYYY-MM'), \
                (SELECT count(*) FROM (SELECT 1 FROM vault_undated LIMIT 1000000) w) \
         FROM pii_vault_partitions('vault')",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(format!(
        "{n} monthly partitions, {} to {}; {waiting} vault row(s) waiting in the default partition",
        lo.unwrap_or_default(),
        hi.unwrap_or_default()
    )))
}

#[async_trait]
impl Store for PgStore {
    fn profile(&self) -> Profile {
        Profile {
            // A file keeps every writer busy: while one commits (an fsync),
            // the others protect and send; four stay well under the pool.
            file_writers: 4,
            queue_writers: 2,
            file_batch: 2000,
            queue_batch: 500,
            max_rotation_jobs: 64,
            self_managed: false,
            follows_alarms: true,
        }
    }

    async fn migrate_with(&self, options: &MigrateOptions) -> Result<(), StoreError> {
        let prefix = roles::settle(&self.pool, options.role_prefix.as_ref()).await?;
        roles::migrator(&MIGRATOR, &prefix)
            .await?
            .run(&self.pool)
            .await
            .map_err(sqlx::Error::from)?;
        roles::confirm(&self.pool, &prefix).await?;
        // One transaction: the roles never see half of the boundary. The
        // lock keeps two owners migrating at once apart (only a role that
        // may change the policy can take it).
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE reveal_policy IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        for (name, sql) in FUNCTIONS {
            let sql = roles::rename_roles(sql, &prefix);
            sqlx::Executor::execute(&mut *tx, &*sql)
                .await
                .map_err(|e| {
                    let e = StoreError::from(e);
                    StoreError::Permanent(format!("migrations/postgres/functions/{name}: {e}"))
                })?;
        }
        match options.network_tokens {
            // The CHECK constraint is the setting: Postgres refuses a
            // network token from any writer, an old worker's included.
            Some(false) => {
                for sql in [
                    "UPDATE user_logins SET masked_ip_net = NULL WHERE masked_ip_net IS NOT NULL",
                    "ALTER TABLE user_logins DROP CONSTRAINT IF EXISTS user_logins_no_network_tokens",
                    "ALTER TABLE user_logins ADD CONSTRAINT user_logins_no_network_tokens \
                     CHECK (masked_ip_net IS NULL)",
                ] {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
            }
            Some(true) => {
                sqlx::query(
                    "ALTER TABLE user_logins DROP CONSTRAINT IF EXISTS user_logins_no_network_tokens",
                )
                .execute(&mut *tx)
                .await?;
            }
            None => {}
        }
        // Three months of partitions ahead, and one for each month that has
        // rows waiting in a default partition (see functions/80_partitions.sql).
        sqlx::query(
            "SELECT count(*) FROM pii_vault_partitions_ensure('{}', \
             (clock_timestamp() AT TIME ZONE 'UTC')::date + 92)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn network_tokens(&self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_constraint \
             WHERE conrelid = 'user_logins'::regclass AND conname = 'user_logins_no_network_tokens')",
        )
        .fetch_one(&self.pool)
        .await?)
    }
}
