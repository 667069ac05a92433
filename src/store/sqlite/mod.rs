//! The embedded default: one SQLite file, no server.
//!
//! WAL mode so that `reveal` can read while a worker writes; a busy timeout
//! so that two processes on the same file wait for each other instead of
//! failing. Only one writer at a time, which is what a small single-node
//! deployment needs.
//!
//! Where a load's time goes here is pages, not statements: every commit
//! appends each B-tree page it dirtied to the write-ahead log, and the six
//! indexes with random keys (`message_id` twice, user ids, tokens) dirty a
//! page or so per row each. So the write path keeps the page count down:
//! single-row statements (a multi-row INSERT that may abort copies every page
//! it touches into a statement journal first, a temporary file), a page cache
//! that holds a transaction's dirty pages, and checkpoints that copy a page
//! into the database file once for several commits rather than once for each.
//! The write path runs on a connection of its own, driven directly rather
//! than through sqlx (`writer`).

mod audit;
mod chain;
mod chunks;
mod erasure;
mod ingest;
mod jobs;
mod keys;
mod quarantine;
mod reveal;
mod rewrite;
mod search;
mod trail;
mod writer;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;

use super::{MigrateOptions, Profile, Store, StoreError};
use writer::{Writer, WriterSettings};

use chain::insert_audit;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Page cache of the writer's connection, in KiB (SQLite's default is
/// 2,000): room for the index pages one large transaction dirties, so that
/// they are neither spilled into the log before the commit nor read back
/// from it. Measured at 200,000 rows (random-key index pages then total
/// about 64 MiB): 16 MiB loaded 16,500 rows/s, 24 MiB 18,800, 28 MiB 20,000
/// but put a worker's peak RSS over its 64 MiB; 24 MiB keeps it near 58.
const WRITER_CACHE_KIB: i64 = 24 * 1024;

/// Log pages after which a commit checkpoints (SQLite's default is 1,000).
/// A page dirtied by several commits in between is copied into the database
/// file once; the log grows to about this plus one transaction (128 MiB and
/// more while a large file loads, cut back to [`WAL_SIZE_LIMIT`] after each
/// checkpoint). Late in a large load one transaction dirties thousands of
/// index pages, so at 8,192 every commit checkpointed: 32,768 lets a page
/// be copied once for several commits (16,500 -> 18,000 rows/s).
const AUTOCHECKPOINT_PAGES: u32 = 32768;

/// What the log file is cut back to after a checkpoint, so that one large
/// load does not leave a large file behind (bytes).
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// How long a statement waits for another process's write to end.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of every connection to the file, sqlx's and the writer's
/// alike, in the order they are set.
fn file_pragmas() -> Vec<(&'static str, String)> {
    vec![
        ("journal_mode", "WAL".into()),
        // Every commit is on disk before it returns: a queue message is
        // deleted right after its batch commits, so a commit that a power
        // cut could still take back would lose it. One sync per batch costs
        // little beside the batch's own pages.
        ("synchronous", "FULL".into()),
        ("foreign_keys", "ON".into()),
        // Deleted rows (forgotten vault rows, erased wrapped keys) are
        // overwritten with zeros instead of lingering in free pages.
        ("secure_delete", "ON".into()),
        ("wal_autocheckpoint", AUTOCHECKPOINT_PAGES.to_string()),
        ("journal_size_limit", WAL_SIZE_LIMIT.to_string()),
    ]
}

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// One connection for `write_batch`, so that its page cache survives
    /// from one batch to the next: a connection finds its cache stale, and
    /// drops it, whenever another connection has written in between, and a
    /// pool hands out its connections in turn.
    writer: Writer,
    pub(super) path: PathBuf,
}

impl SqliteStore {
    /// Opens the file `url` names, creating it if missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url, true).await
    }

    /// Opens the file `url` names, which must exist: [`StoreError::Missing`]
    /// (naming the file) when it does not, and nothing is created.
    pub async fn connect_existing(url: &str) -> Result<Self, StoreError> {
        Self::open(url, false).await
    }

    async fn open(url: &str, create: bool) -> Result<Self, StoreError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(create || in_memory)
            .busy_timeout(BUSY_TIMEOUT);
        for (name, value) in file_pragmas() {
            opts = opts.pragma(name, value);
        }
        let path = opts.get_filename().to_path_buf();
        if !create && !in_memory && !path.exists() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await
            .map_err(|e| super::error::sqlite_open_error(e, &path))?;
        // The pool has created and opened the file; the writer opens it too.
        let writer = Writer::open(
            &path,
            &WriterSettings {
                pragmas: file_pragmas(),
                cache_kib: WRITER_CACHE_KIB,
                busy_timeout: BUSY_TIMEOUT,
            },
        )?;
        Ok(SqliteStore { pool, writer, path })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// After an erasure: copies the WAL back into the database file and
    /// truncates it, so the pre-deletion page images the WAL still holds
    /// (ciphertexts, wrapped keys) are gone from disk too; `secure_delete`
    /// has zeroed the freed space in the database file itself. Best effort:
    /// a reader holding an old snapshot can keep the WAL alive, which is
    /// logged.
    pub(super) async fn scrub(&self) {
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await
        {
            Ok((0, _, _)) => {}
            Ok(_) => tracing::warn!(
                "the SQLite write-ahead log could not be truncated after an erasure (a reader was active); \
                 it is on the next checkpoint"
            ),
            Err(e) => tracing::warn!(error = %StoreError::from(e), "cannot checkpoint the SQLite write-ahead log"),
        }
    }
}

pub(super) fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Permanent("bad timestamp in database".into()))
}

/// The time as SQLite writes it (RFC 3339, UTC, milliseconds), taken from
/// SQLite's clock rather than bound by the client.
pub(super) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// A time as [`NOW`] writes it, for comparisons in SQL.
pub(super) fn sqlite_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Who runs this process: the only principal an SQLite file knows.
pub(super) fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// `migrate --status`: reads the file if it exists, creates nothing.
pub(super) async fn migration_status(url: &str) -> Result<super::MigrationStatus, StoreError> {
    use sqlx::Connection as _;
    // Not `read_only`: a read-only connection to a WAL file whose `-shm`
    // is gone cannot always open it. Nothing here writes.
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(false)
        .busy_timeout(BUSY_TIMEOUT);
    let path = opts.get_filename();
    let in_memory = path.as_os_str().is_empty() || path.as_os_str() == ":memory:";
    if in_memory || !path.exists() {
        return Ok(super::MigrationStatus {
            exists: false,
            migrations: super::states(&MIGRATOR, &[]),
            reapplied: Vec::new(),
            role_prefix: None,
            partitions: None,
        });
    }
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
    let table: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(&mut conn)
    .await?;
    let applied: Vec<i64> = if table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await?
    } else {
        Vec::new()
    };
    let _ = conn.close().await;
    Ok(super::MigrationStatus {
        exists: true,
        migrations: super::states(&MIGRATOR, &applied),
        reapplied: Vec::new(),
        role_prefix: None,
        partitions: None,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn profile(&self) -> Profile {
        Profile {
            // One writer at a time is all SQLite allows.
            file_writers: 1,
            queue_writers: 1,
            file_batch: 5000,
            queue_batch: 500,
            max_rotation_jobs: 1,
            self_managed: true,
            follows_alarms: false,
        }
    }

    async fn migrate_with(&self, options: &MigrateOptions) -> Result<(), StoreError> {
        if options
            .role_prefix
            .as_ref()
            .is_some_and(|p| !p.is_default())
        {
            return Err(StoreError::Permanent(
                "--role-prefix names Postgres roles; an SQLite file has no roles (its file \
                 permissions decide who may use it): leave it out"
                    .into(),
            ));
        }
        MIGRATOR.run(&self.pool).await.map_err(sqlx::Error::from)?;
        chain::backfill(&self.pool).await?;
        if let Some(on) = options.network_tokens {
            // The triggers are the setting, as Postgres's CHECK constraint is.
            let mut tx = self.pool.begin().await?;
            let mut sql = vec![
                "DROP TRIGGER IF EXISTS user_logins_no_network_tokens",
                "DROP TRIGGER IF EXISTS user_logins_no_network_tokens_update",
            ];
            if !on {
                sql.extend([
                    "UPDATE user_logins SET masked_ip_net = NULL WHERE masked_ip_net IS NOT NULL",
                    "CREATE TRIGGER user_logins_no_network_tokens BEFORE INSERT ON user_logins \
                     WHEN NEW.masked_ip_net IS NOT NULL \
                     BEGIN SELECT RAISE(ABORT, 'network tokens are turned off'); END",
                    "CREATE TRIGGER user_logins_no_network_tokens_update \
                     BEFORE UPDATE OF masked_ip_net ON user_logins \
                     WHEN NEW.masked_ip_net IS NOT NULL \
                     BEGIN SELECT RAISE(ABORT, 'network tokens are turned off'); END",
                ]);
            }
            for s in sql {
                sqlx::query(s).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn network_tokens(&self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'trigger' AND name = 'user_logins_no_network_tokens')",
        )
        .fetch_one(&self.pool)
        .await?)
    }
}
