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
//! than through sqlx (`sqlite_writer`).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, Sqlite, SqlitePool};

use super::sqlite_writer::{Writer, WriterSettings};
use super::*;
use crate::crypto::{KeyPurpose, WrappedKey};

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
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT);
        for (name, value) in file_pragmas() {
            opts = opts.pragma(name, value);
        }
        let path = opts.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await?;
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

fn key_from_row(r: &SqliteRow) -> Result<StoredKey, StoreError> {
    let purpose: String = r.try_get("purpose")?;
    let state: String = r.try_get("state")?;
    let created_at: String = r.try_get("created_at")?;
    Ok(StoredKey {
        id: r.try_get("id")?,
        purpose: KeyPurpose::parse(&purpose)
            .ok_or_else(|| StoreError::Permanent(format!("unknown key purpose {purpose}")))?,
        version: r.try_get("version")?,
        wrapped: WrappedKey {
            kek_id: r.try_get("kek_id")?,
            blob: r
                .try_get::<Option<Vec<u8>>, _>("wrapped")?
                .unwrap_or_default(),
        },
        state: KeyState::parse(&state)
            .ok_or_else(|| StoreError::Permanent(format!("unknown key state {state}")))?,
        created_at: parse_time(&created_at)?,
        usage_count: r.try_get("usage_count")?,
    })
}

pub(super) fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Permanent("bad timestamp in database".into()))
}

pub(super) fn login_from_row(r: &SqliteRow) -> Result<LoginRow, StoreError> {
    Ok(LoginRow {
        message_id: r.try_get("message_id")?,
        user_id: r.try_get("user_id")?,
        device_type: r.try_get("device_type")?,
        masked_ip: r.try_get("masked_ip")?,
        masked_device_id: r.try_get("masked_device_id")?,
        locale: r.try_get("locale")?,
        app_version: r.try_get("app_version")?,
        create_date: r.try_get("create_date")?,
    })
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

/// The reveal query for each selector column, as static text (a streamed
/// query borrows its SQL for as long as rows come).
/// The logins of a recorded reveal, fixed when it was recorded, with their
/// sealed originals where there are any.
const REVEAL_ROWS: &str =
    "SELECT l.message_id, l.user_id, l.device_type, l.masked_ip, l.masked_device_id, \
     l.locale, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext \
     FROM reveal_request_rows rr JOIN user_logins l ON l.message_id = rr.message_id \
     LEFT JOIN vault v ON v.message_id = l.message_id \
     WHERE rr.request_id = $1 ORDER BY l.create_date, l.id";

const KEY_COLUMNS: &str = "id, purpose, version, kek_id, wrapped, state, created_at, usage_count";

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(sqlx::Error::from)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        self.writer.write(batch).await
    }

    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, created_by) \
             VALUES ($1, 'vault', 0, $2, $3, 'active', {NOW}, $4)"
        ))
        .bind(id)
        .bind(&wrapped.kek_id)
        .bind(&wrapped.blob)
        .bind(os_user())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE id = $1 AND purpose = 'vault' AND state = 'active'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn allowed_keks(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT kek_id FROM kms_allowlist ORDER BY kek_id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn get_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM vault_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn current_token_key(&self) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM vault_keys WHERE purpose = 'token' AND state = 'active' \
             ORDER BY version DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM vault_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn reveal_request(
        &self,
        selector: &Selector,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<RevealRequest, StoreError> {
        let (column, value) = selector.parts();
        let me = os_user();
        // BEGIN IMMEDIATE in effect: the first statement writes, so two
        // requests cannot both read the day's count and both pass.
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE reveal_policy SET singleton = singleton")
            .execute(&mut *tx)
            .await?;
        let (row_count, users, honey): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(DISTINCT l.user_id), count(DISTINCT h.user_id) FROM user_logins l \
             LEFT JOIN honeytokens h ON h.user_id = l.user_id WHERE l.{column} = $1"
        ))
        .bind(value)
        .fetch_one(&mut *tx)
        .await?;
        let (max_users, max_per_day): (i64, i64) =
            sqlx::query_as("SELECT max_users_per_reveal, max_reveals_per_day FROM reveal_policy")
                .fetch_one(&mut *tx)
                .await?;
        let today: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reveal_requests WHERE requested_by = $1 AND status = 'granted' \
             AND requested_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')",
        )
        .bind(&me)
        .fetch_one(&mut *tx)
        .await?;
        let status = if users > max_users || today >= max_per_day {
            RequestStatus::Pending
        } else {
            RequestStatus::Granted
        };
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: match status {
                RequestStatus::Granted => "reveal",
                _ => "reveal-request",
            }
            .into(),
            target: selector.to_string(),
            reason: reason.into(),
        };
        let id = insert_audit(&mut tx, &audit, row_count).await?;
        sqlx::query(&format!(
            "INSERT INTO reveal_requests (id, selector, value, requested_by, status, users, reason, requested_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {NOW})"
        ))
        .bind(id)
        .bind(column)
        .bind(value)
        .bind(&me)
        .bind(if status == RequestStatus::Granted { "granted" } else { "pending" })
        .bind(users)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        // The logins it covers, fixed now: a later fetch hands out these.
        sqlx::query(&format!(
            "INSERT INTO reveal_request_rows (request_id, message_id) \
             SELECT $1, message_id FROM user_logins WHERE {column} = $2"
        ))
        .bind(id)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        if honey > 0 {
            sqlx::query(
                "INSERT INTO audit_alarms (actor, request_id, target, honeytokens) VALUES ($1, $2, $3, $4)",
            )
            .bind(&me)
            .bind(id)
            .bind(selector.to_string())
            .bind(honey)
            .execute(&mut *tx)
            .await?;
        }
        // No LISTEN/NOTIFY in SQLite: the alarm table is the signal
        // (`pii-vault audit --alarms`).
        tx.commit().await?;
        Ok(RevealRequest {
            id,
            row_count,
            status,
        })
    }

    async fn reveal_fetch<'a>(&'a self, request_id: i64) -> Result<RevealedRows<'a>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(i64, Option<String>, String)> = sqlx::query_as(
            "SELECT r.id, r.fetched_at, a.at FROM reveal_requests r \
             JOIN audit_log a ON a.id = $1 \
             WHERE (r.id = $1 AND r.status = 'granted') OR (r.fetch_record = $1 AND r.status = 'approved')",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, fetched, at)) = found else {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} does not exist or is not granted"
            )));
        };
        if fetched.is_some() {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} was already fetched"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(1) {
            return Err(StoreError::Refused(format!(
                "audit record {request_id} has expired"
            )));
        }
        let marked = sqlx::query(&format!(
            "UPDATE reveal_requests SET fetched_at = {NOW} WHERE id = $1 AND fetched_at IS NULL"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if marked != 1 {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} was already fetched"
            )));
        }
        // The request is spent before its first row is read: reading and
        // printing a large reveal must not hold SQLite's one write lock
        // (workers would wait on it for as long as the terminal or a pipe
        // takes). A reveal that fails half-way is not fetched again; it is
        // asked for, and audited, anew.
        tx.commit().await?;
        let rows = sqlx::query(REVEAL_ROWS)
            .bind(id)
            .fetch(&self.pool)
            .map(|r| {
                let r = r?;
                let login = login_from_row(&r)?;
                let vault = sealed_beside(&login, &r)?;
                Ok((login, vault))
            });
        RevealedRows::start(rows.boxed()).await
    }

    async fn approve(
        &self,
        request_id: i64,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let me = os_user();
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, String, String)> = sqlx::query_as(
            "SELECT status, requested_by, requested_at FROM reveal_requests WHERE id = $1",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((_, by, at)) = found.filter(|(status, _, _)| status == "pending") else {
            return Err(StoreError::Refused(format!(
                "request {request_id} is not a pending reveal request"
            )));
        };
        if by == me {
            return Err(StoreError::Refused(format!(
                "request {request_id} was made by this user: another login must approve it \
                 (the two-person rule needs two database logins: use Postgres)"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(24) {
            return Err(StoreError::Refused(format!(
                "request {request_id} has expired"
            )));
        }
        sqlx::query(&format!(
            "UPDATE reveal_requests SET status = 'approved', approved_by = $1, approved_at = {NOW} WHERE id = $2"
        ))
        .bind(&me)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "approve".into(),
            target: format!("request {request_id}"),
            reason: reason.into(),
        };
        insert_audit(&mut tx, &audit, 0).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        type Req = (
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            Option<i64>,
            String,
        );
        let found: Option<Req> = sqlx::query_as(
            "SELECT status, requested_by, requested_at, selector, value, approved_by, fetch_record, reason \
             FROM reveal_requests WHERE id = $1",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((status, _, at, column, value, approver, fetched, reason)) =
            found.filter(|r| r.1 == os_user())
        else {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} is not one of this login"
            )));
        };
        if status != "approved" {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} is {status}, not approved"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(24) {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} has expired"
            )));
        }
        // Claimed but not fetched (the fetch failed): the same claim again.
        if let Some(claim) = fetched {
            let done: Option<String> =
                sqlx::query_scalar("SELECT fetched_at FROM reveal_requests WHERE id = $1")
                    .bind(request_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if done.is_some() {
                return Err(StoreError::Refused(format!(
                    "reveal request {request_id} was already fetched"
                )));
            }
            return Ok(claim);
        }
        let column = Selector::column_named(&column)
            .ok_or_else(|| StoreError::Permanent("unknown reveal selector".into()))?;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reveal_request_rows WHERE request_id = $1")
                .bind(request_id)
                .fetch_one(&mut *tx)
                .await?;
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "reveal".into(),
            target: format!("{column}={value}"),
            reason: format!(
                "{reason} (request {request_id}, approved by {})",
                approver.unwrap_or_default()
            ),
        };
        let id = insert_audit(&mut tx, &audit, n).await?;
        sqlx::query("UPDATE reveal_requests SET fetch_record = $1 WHERE id = $2")
            .bind(id)
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn policy(&self) -> Result<RevealPolicy, StoreError> {
        let (max_users_per_reveal, max_reveals_per_day, changed_at, changed_by): (
            i64,
            i64,
            String,
            String,
        ) = sqlx::query_as(
            "SELECT max_users_per_reveal, max_reveals_per_day, changed_at, changed_by FROM reveal_policy",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(RevealPolicy {
            max_users_per_reveal,
            max_reveals_per_day,
            changed_at: parse_time(&changed_at)?,
            changed_by,
        })
    }

    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "SELECT h.uuid_id, h.line_id, h.body FROM honeytoken_logins h \
             WHERE h.due_at <= {NOW} AND NOT EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (h.uuid_id, h.line_id)) \
             ORDER BY h.due_at LIMIT $1"
        ))
        .bind(limit.clamp(0, 100))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(uuid_id, line_id, body)| DueHoneytoken {
                uuid_id,
                line_id,
                body,
            })
            .collect())
    }

    async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, claimed_actor, action, target, reason, row_count FROM audit_log \
             WHERE ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR actor = $3) ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since.map(sqlite_time))
        .bind(filter.actor.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("id")?,
                    at: parse_time(&r.try_get::<String, _>("at")?)?,
                    actor: r.try_get("actor")?,
                    claimed_actor: r.try_get("claimed_actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    reason: r.try_get("reason")?,
                    row_count: r.try_get("row_count")?,
                })
            })
            .collect()
    }
}

/// Writes an audit row with SQLite's clock and the process's user as the
/// actor; returns its id.
pub(super) async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    audit: &AuditEntry,
    rows: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(&format!(
        "INSERT INTO audit_log (at, actor, claimed_actor, action, target, reason, row_count) \
         VALUES ({NOW}, $1, $2, $3, $4, $5, $6) RETURNING id"
    ))
    .bind(os_user())
    .bind(&audit.claimed_actor)
    .bind(&audit.action)
    .bind(&audit.target)
    .bind(&audit.reason)
    .bind(rows)
    .fetch_one(&mut **tx)
    .await?)
}
