//! The embedded default: one SQLite file, no server.
//!
//! WAL mode so that `reveal` can read while a worker writes; a busy timeout
//! so that two processes on the same file wait for each other instead of
//! failing. Only one writer at a time, which is what a small single-node
//! deployment needs.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::*;
use crate::crypto::{KeyPurpose, WrappedKey};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Rows per INSERT statement: 9 parameters a row stays far below SQLite's
/// 32,766-parameter limit.
const CHUNK: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
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
            blob: r.try_get::<Option<Vec<u8>>, _>("wrapped")?.unwrap_or_default(),
        },
        state: KeyState::parse(&state).ok_or_else(|| StoreError::Permanent(format!("unknown key state {state}")))?,
        created_at: parse_time(&created_at)?,
        usage_count: r.try_get("usage_count")?,
    })
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Permanent("bad timestamp in database".into()))
}

fn login_from_row(r: &SqliteRow) -> Result<LoginRow, StoreError> {
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
        let mut tx = self.pool.begin().await?;
        let mut out = BatchOutcome::default();
        for chunk in batch.logins.chunks(CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
                 locale, app_version, create_date) ",
            );
            q.push_values(chunk, |mut b, (l, _)| {
                b.push_bind(&l.message_id)
                    .push_bind(&l.user_id)
                    .push_bind(&l.device_type)
                    .push_bind(&l.masked_ip)
                    .push_bind(&l.masked_device_id)
                    .push_bind(&l.locale)
                    .push_bind(&l.app_version)
                    .push_bind(l.create_date);
            });
            q.push(" ON CONFLICT (message_id) DO NOTHING RETURNING message_id");
            let inserted: std::collections::HashSet<String> = q
                .build_query_scalar::<String>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            out.stored += inserted.len() as u64;
            out.duplicates += (chunk.len() - inserted.len()) as u64;
            let new: Vec<&VaultRow> = chunk
                .iter()
                .filter(|(l, _)| inserted.contains(&l.message_id))
                .map(|(_, v)| v)
                .collect();
            if new.is_empty() {
                continue;
            }
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) ");
            q.push_values(new, |mut b, v| {
                b.push_bind(&v.message_id)
                    .push_bind(&v.user_id)
                    .push_bind(&v.key_id)
                    .push_bind(&v.nonce)
                    .push_bind(&v.ciphertext);
            });
            q.push(" ON CONFLICT (message_id) DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.quarantined.chunks(CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO quarantine (message_id, reason_code, reason, user_id, key_id, nonce, ciphertext, received_at) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.message_id)
                    .push_bind(&r.reason_code)
                    .push_bind(&r.reason)
                    .push_bind(&r.user_id)
                    .push_bind(&r.key_id)
                    .push_bind(&r.nonce)
                    .push_bind(&r.ciphertext)
                    .push_bind(r.received_at.to_rfc3339());
            });
            q.push(" ON CONFLICT (message_id) DO NOTHING");
            let done = q.build().execute(&mut *tx).await?.rows_affected();
            out.rejected += done;
            out.duplicates += chunk.len() as u64 - done;
        }
        for (key_id, n) in &batch.key_usage {
            sqlx::query("UPDATE vault_keys SET usage_count = usage_count + $1 WHERE id = $2")
                .bind(n)
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn insert_key(&self, key: &StoredKey) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, usage_count) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&key.id)
        .bind(key.purpose.as_str())
        .bind(key.version)
        .bind(&key.wrapped.kek_id)
        .bind(&key.wrapped.blob)
        .bind(key.state.as_str())
        .bind(key.created_at.to_rfc3339())
        .bind(key.usage_count)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn get_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE id = $1"))
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
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM vault_keys ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn reveal(
        &self,
        selector: &Selector,
        audit: &AuditEntry,
    ) -> Result<Vec<(LoginRow, Option<VaultRow>)>, StoreError> {
        let (column, value) = match selector {
            Selector::UserId(v) => ("user_id", v),
            Selector::MaskedIp(v) => ("masked_ip", v),
            Selector::MaskedDeviceId(v) => ("masked_device_id", v),
        };
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT l.message_id, l.user_id, l.device_type, l.masked_ip, l.masked_device_id, l.locale, \
             l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext \
             FROM user_logins l LEFT JOIN vault v ON v.message_id = l.message_id \
             WHERE l.{column} = $1 ORDER BY l.create_date, l.id"
        ))
        .bind(value)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let login = login_from_row(r)?;
            let key_id: Option<String> = r.try_get("key_id")?;
            let vault = match key_id {
                Some(key_id) => Some(VaultRow {
                    message_id: login.message_id.clone(),
                    user_id: login.user_id.clone(),
                    key_id,
                    nonce: r.try_get("nonce")?,
                    ciphertext: r.try_get("ciphertext")?,
                }),
                None => None,
            };
            out.push((login, vault));
        }
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, reason, row_count) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(Utc::now().to_rfc3339())
        .bind(&audit.actor)
        .bind(&audit.action)
        .bind(&audit.target)
        .bind(&audit.reason)
        .bind(out.len() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn audit_trail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, reason, row_count FROM audit_log ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("id")?,
                    at: parse_time(&r.try_get::<String, _>("at")?)?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    reason: r.try_get("reason")?,
                    row_count: r.try_get("row_count")?,
                })
            })
            .collect()
    }
}
