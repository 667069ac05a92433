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
mod quarantine;
mod reveal;
mod trail;

use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{Profile, Store, StoreError};

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

pub struct PgStore {
    pub(super) pool: PgPool,
    /// Set when a batch met a message id already stored: the next batches
    /// skip the `COPY` fast lane (which would fail and be redone) until one
    /// of them is all new again, e.g. while a file loaded before is re-run.
    pub(super) expect_duplicates: AtomicBool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)?.application_name("pii-vault");
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts);
        let pool = tokio::time::timeout(CONNECT_TIMEOUT, pool)
            .await
            .map_err(|_| StoreError::Transient("timed out connecting to the database".into()))??;
        Ok(PgStore {
            pool,
            expect_duplicates: AtomicBool::new(false),
        })
    }

    /// For tests and maintenance that need SQL outside the [`Store`] trait.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
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

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(sqlx::Error::from)?;
        // One transaction: the roles never see half of the boundary. The
        // lock keeps two owners migrating at once apart (only a role that
        // may change the policy can take it).
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE reveal_policy IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        for (name, sql) in FUNCTIONS {
            sqlx::Executor::execute(&mut *tx, *sql).await.map_err(|e| {
                let e = StoreError::from(e);
                StoreError::Permanent(format!("migrations/postgres/functions/{name}: {e}"))
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
