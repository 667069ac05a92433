//! The production store: Postgres, shared by many worker replicas.
//!
//! A batch is written in one transaction, by one of two lanes. The fast
//! lane sends both tables by binary `COPY` (a bulk load's cost: no
//! speculative insertion, no per-row statement overhead); it assumes every
//! message id is new and fails as a whole if one is not. Then the batch is
//! rolled back and written by the careful lane: one statement per table with
//! the rows as parallel arrays (`UNNEST($1::text[], …)`) and `ON CONFLICT
//! DO NOTHING`, so a redelivered message that another replica already
//! committed is counted as a duplicate. Exactly-once effect rests on the
//! unique `message_id` either way.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use super::pg_copy;
use super::*;
use crate::crypto::{KeyPurpose, WrappedKey};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// `migrations/postgres/functions/*.sql` in name order: the current text of
/// every function, trigger, view and grant, re-applied by every `migrate`
/// (the list is made by build.rs).
const FUNCTIONS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/pg_functions.rs"));

/// Rows per statement. Arrays have no parameter limit; this only bounds the
/// size of one statement (and the time a single insert holds its locks)
/// when a caller hands over a very large batch.
const CHUNK: usize = 1000;

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
    pool: PgPool,
    /// Set when a batch met a message id already stored: the next batches
    /// skip the `COPY` fast lane (which would fail and be redone) until one
    /// of them is all new again, e.g. while a file loaded before is re-run.
    expect_duplicates: AtomicBool,
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

fn key_from_row(r: &PgRow) -> Result<StoredKey, StoreError> {
    let purpose: String = r.try_get("purpose")?;
    let state: String = r.try_get("state")?;
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
        created_at: r.try_get("created_at")?,
        usage_count: r.try_get("usage_count")?,
    })
}

pub(super) fn login_from_row(r: &PgRow) -> Result<LoginRow, StoreError> {
    // Rows converted from the legacy table may hold NULLs where new rows
    // never do: shown as empty text (and no date), not as an error.
    let text = |c: &str| -> Result<String, StoreError> {
        Ok(r.try_get::<Option<String>, _>(c)?.unwrap_or_default())
    };
    Ok(LoginRow {
        message_id: r.try_get("message_id")?,
        user_id: text("user_id")?,
        device_type: text("device_type")?,
        masked_ip: text("masked_ip")?,
        masked_device_id: text("masked_device_id")?,
        locale: r.try_get("locale")?,
        app_version: text("app_version")?,
        create_date: r.try_get("create_date")?,
    })
}

/// A row of `pii_vault_reveal_fetch`: the login, and its sealed originals
/// when there are any.
fn revealed_from_row(r: &PgRow) -> Result<RevealedRow, StoreError> {
    let login = login_from_row(r)?;
    let vault = sealed_beside(&login, r)?;
    Ok((login, vault))
}

const KEY_COLUMNS: &str = "id, purpose, version, kek_id, wrapped, state, created_at, usage_count";

/// The logins of a batch that can be inserted by one statement: the first
/// of each `message_id` (a later copy in the same batch is a redelivery and
/// a duplicate), in `message_id` order. Postgres may pair a skipped row's
/// vault row with the kept login if both are in one statement, so repeats
/// are dropped here; the fixed order makes concurrent replicas that insert
/// overlapping batches take their unique-index locks in the same order,
/// which keeps them from deadlocking.
fn first_of_each(logins: &[(LoginRow, VaultRow)]) -> Vec<&(LoginRow, VaultRow)> {
    let mut seen = HashSet::new();
    let mut out: Vec<_> = logins
        .iter()
        .filter(|(l, _)| seen.insert(l.message_id.as_str()))
        .collect();
    out.sort_by(|a, b| a.0.message_id.cmp(&b.0.message_id));
    out
}

/// The fast lane: both tables by binary `COPY`, as a bulk load would. It
/// assumes every message id is new (the common case under at-least-once
/// delivery) and fails as a whole on the first one that is not, with a
/// unique violation: the caller then rolls back and takes [`insert_logins`].
async fn copy_logins(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    logins: &[&(LoginRow, VaultRow)],
) -> Result<(), sqlx::Error> {
    let mut rows = pg_copy::CopyRows::new(logins.len() * 200);
    for (l, _) in logins {
        rows.row(8)
            .text(&l.message_id)
            .text(&l.user_id)
            .text(&l.device_type)
            .text(&l.masked_ip)
            .text(&l.masked_device_id)
            .opt_text(l.locale.as_deref())
            .text(&l.app_version)
            .date(l.create_date);
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
             locale, app_version, create_date) FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;

    let mut rows = pg_copy::CopyRows::new(logins.len() * 160);
    for (l, v) in logins {
        rows.row(6)
            .text(&v.message_id)
            .text(&v.user_id)
            .text(&v.key_id)
            .bytes(&v.nonce)
            .bytes(&v.ciphertext)
            .date(l.create_date);
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY vault (message_id, user_id, key_id, nonce, ciphertext, create_date) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;
    Ok(())
}

/// The lane for batches that may hold redeliveries: `ON CONFLICT DO
/// NOTHING` skips what is stored, and only the logins this statement
/// inserted get vault rows. Returns how many were new.
async fn insert_logins(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    logins: &[&(LoginRow, VaultRow)],
    planted: &HashSet<String>,
    out: &mut BatchOutcome,
) -> Result<usize, StoreError> {
    let mut fresh = 0;
    for chunk in logins.chunks(CHUNK) {
        let mut message_id = Vec::with_capacity(chunk.len());
        let mut user_id = Vec::with_capacity(chunk.len());
        let mut device_type = Vec::with_capacity(chunk.len());
        let mut masked_ip = Vec::with_capacity(chunk.len());
        let mut masked_device_id = Vec::with_capacity(chunk.len());
        let mut locale = Vec::with_capacity(chunk.len());
        let mut app_version = Vec::with_capacity(chunk.len());
        let mut create_date: Vec<Option<NaiveDate>> = Vec::with_capacity(chunk.len());
        for (l, _) in chunk {
            message_id.push(l.message_id.as_str());
            user_id.push(l.user_id.as_str());
            device_type.push(l.device_type.as_str());
            masked_ip.push(l.masked_ip.as_str());
            masked_device_id.push(l.masked_device_id.as_str());
            locale.push(l.locale.as_deref());
            app_version.push(l.app_version.as_str());
            create_date.push(l.create_date);
        }
        let inserted: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
             locale, app_version, create_date) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::date[]) \
             ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
        )
        .bind(&message_id)
        .bind(&user_id)
        .bind(&device_type)
        .bind(&masked_ip)
        .bind(&masked_device_id)
        .bind(&locale)
        .bind(&app_version)
        .bind(&create_date)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        for (l, _) in chunk {
            if planted.contains(&l.message_id) {
                continue;
            }
            if inserted.contains(&l.message_id) {
                out.stored += 1;
            } else {
                out.duplicates += 1;
            }
        }
        fresh += inserted.len();

        // Only the logins this statement inserted get vault rows: a
        // duplicate's vault row is already there, sealed under its own
        // nonce, and must not be replaced by the redelivery's. No ON
        // CONFLICT: these message ids were new to `user_logins` a moment
        // ago in this transaction, and a conflict target would need
        // SELECT on `vault`, which the worker role must not have (see
        // migrations/postgres/0002_roles.sql).
        let new: Vec<&(LoginRow, VaultRow)> = chunk
            .iter()
            .copied()
            .filter(|(l, _)| inserted.contains(&l.message_id))
            .collect();
        if new.is_empty() {
            continue;
        }
        let message_id: Vec<&str> = new.iter().map(|(_, v)| v.message_id.as_str()).collect();
        let user_id: Vec<&str> = new.iter().map(|(_, v)| v.user_id.as_str()).collect();
        let key_id: Vec<&str> = new.iter().map(|(_, v)| v.key_id.as_str()).collect();
        let nonce: Vec<&[u8]> = new.iter().map(|(_, v)| v.nonce.as_slice()).collect();
        let ciphertext: Vec<&[u8]> = new.iter().map(|(_, v)| v.ciphertext.as_slice()).collect();
        let create_date: Vec<Option<NaiveDate>> = new.iter().map(|(l, _)| l.create_date).collect();
        sqlx::query(
            "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext, create_date) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::date[])",
        )
        .bind(&message_id)
        .bind(&user_id)
        .bind(&key_id)
        .bind(&nonce)
        .bind(&ciphertext)
        .bind(&create_date)
        .execute(&mut **tx)
        .await?;
    }
    Ok(fresh)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

#[async_trait]
impl Store for PgStore {
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

    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        let mut out = BatchOutcome::default();
        let logins = first_of_each(&batch.logins);
        out.duplicates += (batch.logins.len() - logins.len()) as u64;

        // The rotation fences (active data keys, active token-key version)
        // and usage counting are the database's: statement triggers of
        // migrations/postgres/0003_trust_boundaries.sql check every insert
        // and COPY below, so `key_usage` and `token_key_id` need no query here.
        let mut tx = self.pool.begin().await?;
        if !logins.is_empty() {
            if self.expect_duplicates.load(Ordering::Relaxed) {
                let fresh = insert_logins(&mut tx, &logins, &batch.planted, &mut out).await?;
                if fresh == logins.len() {
                    self.expect_duplicates.store(false, Ordering::Relaxed);
                }
            } else {
                match copy_logins(&mut tx, &logins).await {
                    Ok(()) => {
                        out.stored += logins
                            .iter()
                            .filter(|(l, _)| !batch.planted.contains(&l.message_id))
                            .count() as u64
                    }
                    Err(e) if is_unique_violation(&e) => {
                        // A redelivery (or a file loaded again): this batch,
                        // and the next ones until a batch is all new, take
                        // the statement that skips what is already stored.
                        self.expect_duplicates.store(true, Ordering::Relaxed);
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        insert_logins(&mut tx, &logins, &batch.planted, &mut out).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }

        for chunk in batch.quarantined.chunks(CHUNK) {
            let message_id: Vec<&str> = chunk.iter().map(|r| r.message_id.as_str()).collect();
            let reason_code: Vec<&str> = chunk.iter().map(|r| r.reason_code.as_str()).collect();
            let reason: Vec<&str> = chunk.iter().map(|r| r.reason.as_str()).collect();
            let user_id: Vec<Option<&str>> = chunk.iter().map(|r| r.user_id.as_deref()).collect();
            let key_id: Vec<&str> = chunk.iter().map(|r| r.key_id.as_str()).collect();
            let nonce: Vec<&[u8]> = chunk.iter().map(|r| r.nonce.as_slice()).collect();
            let ciphertext: Vec<&[u8]> = chunk.iter().map(|r| r.ciphertext.as_slice()).collect();
            let received_at: Vec<DateTime<Utc>> = chunk.iter().map(|r| r.received_at).collect();
            // DO NOTHING also skips a repeat within this very statement, so
            // rows affected is the number of newly quarantined messages. No
            // conflict target (the primary key on message_id is the only
            // unique index): a target would need SELECT on `quarantine`,
            // which the worker role must not have.
            let done = sqlx::query(
                "INSERT INTO quarantine (message_id, reason_code, reason, user_id, key_id, nonce, \
                 ciphertext, received_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::bytea[], $7::bytea[], $8::timestamptz[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&message_id)
            .bind(&reason_code)
            .bind(&reason)
            .bind(&user_id)
            .bind(&key_id)
            .bind(&nonce)
            .bind(&ciphertext)
            .bind(&received_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            out.rejected += done;
            out.duplicates += chunk.len() as u64 - done;
        }

        tx.commit().await?;
        Ok(out)
    }

    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_register_data_key($1, $2, $3)")
            .bind(id)
            .bind(&wrapped.kek_id)
            .bind(&wrapped.blob)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar("SELECT pii_vault_retire_data_key($1)")
            .bind(id)
            .fetch_one(&self.pool)
            .await?)
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
        let (id, row_count, status): (i64, i64, String) = sqlx::query_as(
            "SELECT request_id, row_count, status FROM pii_vault_reveal_request($1, $2, $3, $4)",
        )
        .bind(column)
        .bind(value)
        .bind(reason)
        .bind(claimed_actor)
        .fetch_one(&self.pool)
        .await?;
        Ok(RevealRequest {
            id,
            row_count,
            status: RequestStatus::parse(&status)
                .ok_or_else(|| StoreError::Permanent("unknown request status".into()))?,
        })
    }

    async fn reveal_fetch<'a>(&'a self, request_id: i64) -> Result<RevealedRows<'a>, StoreError> {
        // The function checks the request, marks it fetched and returns
        // its rows in one statement, committed only once the last row is
        // sent: rows are taken off the wire one at a time, never all held.
        let rows = sqlx::query("SELECT * FROM pii_vault_reveal_fetch($1)")
            .bind(request_id)
            .fetch(&self.pool)
            .map(|r| revealed_from_row(&r?));
        RevealedRows::start(rows.boxed()).await
    }

    async fn approve(
        &self,
        request_id: i64,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_approve($1, $2, $3)")
            .bind(request_id)
            .bind(reason)
            .bind(claimed_actor)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT pii_vault_reveal_claim($1, $2)")
            .bind(request_id)
            .bind(claimed_actor)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn policy(&self) -> Result<RevealPolicy, StoreError> {
        let (max_users_per_reveal, max_reveals_per_day, changed_at, changed_by): (
            i32,
            i32,
            DateTime<Utc>,
            String,
        ) = sqlx::query_as(
            "SELECT max_users_per_reveal, max_reveals_per_day, changed_at, changed_by FROM reveal_policy",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(RevealPolicy {
            max_users_per_reveal: max_users_per_reveal.into(),
            max_reveals_per_day: max_reveals_per_day.into(),
            changed_at,
            changed_by,
        })
    }

    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT uuid_id, line_id, body FROM pii_vault_honeytokens_due($1)")
                .bind(limit.clamp(0, 100) as i32)
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
             WHERE ($2::timestamptz IS NULL OR at >= $2) AND ($3::text IS NULL OR actor = $3) \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since)
        .bind(filter.actor.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
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
