//! [`Maintenance`] on Postgres: the rotation and erasure queries.

use async_trait::async_trait;
use sqlx::{FromRow, Row};

use chrono::NaiveDate;

use super::admin::{
    self, Forgotten, Job, JobLock, Maintenance, Retained, RotationJob, RotationRange, JOB_KINDS,
};
use super::postgres::{login_from_row, PgStore};
use super::{
    Alarm, AuditEntry, AuditFilter, KeyState, LoginRow, QuarantineRow, RevealPolicy, Store,
    StoreError, StoredKey, VaultRow,
};
use crate::crypto::{KeyPurpose, WrappedKey};

/// `pii_vault_record(action, target, reason, claimed_actor, row_count)`:
/// the audit row of a rotator's job, with actor and time from the database.
fn record<'q>(
    audit: &'q AuditEntry,
    row_count: i64,
) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
    sqlx::query_scalar("SELECT pii_vault_record($1, $2, $3, $4, $5)")
        .bind(&audit.action)
        .bind(&audit.target)
        .bind(&audit.reason)
        .bind(&audit.claimed_actor)
        .bind(row_count)
}

/// `pii_vault_rotation_advance`: moves a range's cursor (`None`: keeps it).
fn advance<'q>(
    record: i64,
    job: i64,
    no: i32,
    cursor: Option<&'q str>,
    rows: i64,
    done: bool,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query("SELECT pii_vault_rotation_advance($1, $2, $3, $4, $5, $6)")
        .bind(record)
        .bind(job)
        .bind(no)
        .bind(cursor)
        .bind(rows)
        .bind(done)
}

/// Re-seals rows still under their old key (the `String`), in `tx`: one
/// `UPDATE … FROM UNNEST` per table, so a chunk costs one statement.
async fn reseal_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    vault: &[(VaultRow, String)],
    quarantine: &[(QuarantineRow, String)],
) -> Result<u64, StoreError> {
    let mut changed = 0;
    if !vault.is_empty() {
        let ids: Vec<&str> = vault.iter().map(|(v, _)| v.message_id.as_str()).collect();
        let old: Vec<&str> = vault.iter().map(|(_, o)| o.as_str()).collect();
        let keys: Vec<&str> = vault.iter().map(|(v, _)| v.key_id.as_str()).collect();
        let nonces: Vec<&[u8]> = vault.iter().map(|(v, _)| v.nonce.as_slice()).collect();
        let cts: Vec<&[u8]> = vault.iter().map(|(v, _)| v.ciphertext.as_slice()).collect();
        changed += sqlx::query(
            "UPDATE vault SET key_id = u.key_id, nonce = u.nonce, ciphertext = u.ciphertext \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[]) \
                   AS u(message_id, old_key, key_id, nonce, ciphertext) \
                 WHERE vault.message_id = u.message_id AND vault.key_id = u.old_key",
        )
        .bind(&ids)
        .bind(&old)
        .bind(&keys)
        .bind(&nonces)
        .bind(&cts)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    if !quarantine.is_empty() {
        let ids: Vec<&str> = quarantine
            .iter()
            .map(|(q, _)| q.message_id.as_str())
            .collect();
        let old: Vec<&str> = quarantine.iter().map(|(_, o)| o.as_str()).collect();
        let keys: Vec<&str> = quarantine.iter().map(|(q, _)| q.key_id.as_str()).collect();
        let nonces: Vec<&[u8]> = quarantine.iter().map(|(q, _)| q.nonce.as_slice()).collect();
        let cts: Vec<&[u8]> = quarantine
            .iter()
            .map(|(q, _)| q.ciphertext.as_slice())
            .collect();
        changed += sqlx::query(
            "UPDATE quarantine SET key_id = u.key_id, nonce = u.nonce, ciphertext = u.ciphertext \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[]) \
                   AS u(message_id, old_key, key_id, nonce, ciphertext) \
                 WHERE quarantine.message_id = u.message_id AND quarantine.key_id = u.old_key",
        )
        .bind(&ids)
        .bind(&old)
        .bind(&keys)
        .bind(&nonces)
        .bind(&cts)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(changed)
}

impl PgStore {
    /// One chunk of a rotation range from the job-checking function `f`
    /// (the next `limit` rows with a message id in `(after, hi]`).
    async fn chunk(
        &self,
        f: &str,
        record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
        Ok(
            sqlx::query(&format!("SELECT * FROM {f}($1, $2, $3, $4, $5)"))
                .bind(record)
                .bind(job)
                .bind(after)
                .bind(hi)
                .bind(limit as i32)
                .fetch_all(self.pool())
                .await?,
        )
    }
}

#[async_trait]
impl Maintenance for PgStore {
    async fn insert_key(&self, key: &StoredKey) -> Result<bool, StoreError> {
        // No conflict target: a clash on the id or on the token-version index
        // both mean the key is not ours to insert. Time and author are set by
        // the database (the guard trigger), whatever is sent.
        let r = sqlx::query(
            "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&key.id)
        .bind(key.purpose.as_str())
        .bind(key.version)
        .bind(&key.wrapped.kek_id)
        .bind(&key.wrapped.blob)
        .bind(key.state.as_str())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn allow_kek(&self, kek_id: &str) -> Result<(), StoreError> {
        // No conflict target: the rotator has no SELECT that a target needs
        // beyond the primary key, and a duplicate is simply already allowed.
        sqlx::query("INSERT INTO kms_allowlist (kek_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(kek_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn record(&self, audit: &AuditEntry, row_count: i64) -> Result<i64, StoreError> {
        Ok(record(audit, row_count).fetch_one(self.pool()).await?)
    }

    async fn begin_job(&self, audit: &AuditEntry, row_count: i64) -> Result<Job, StoreError> {
        if !JOB_KINDS.contains(&audit.action.as_str()) {
            return Err(StoreError::Permanent(format!(
                "{} is not a job kind",
                audit.action
            )));
        }
        // The advisory lock is the session's: it lives as long as this
        // connection, which the job keeps and closes at its end instead of
        // handing it back to the pool still holding the lock.
        let mut conn = self.pool().acquire().await?;
        conn.close_on_drop();
        let id = record(audit, row_count).fetch_one(&mut *conn).await?;
        Ok(Job::new(id, JobLock::Pg(conn)))
    }

    async fn update_wrapped(&self, key_id: &str, wrapped: &WrappedKey) -> Result<(), StoreError> {
        sqlx::query("UPDATE vault_keys SET wrapped = $1, kek_id = $2 WHERE id = $3 AND state <> 'destroyed'")
            .bind(&wrapped.blob)
            .bind(&wrapped.kek_id)
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn set_key_state(&self, key_id: &str, state: KeyState) -> Result<(), StoreError> {
        sqlx::query("UPDATE vault_keys SET state = $1 WHERE id = $2 AND state <> 'destroyed'")
            .bind(state.as_str())
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn transition_keys(
        &self,
        purpose: KeyPurpose,
        from: KeyState,
        to: KeyState,
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        // The guard trigger erases `wrapped` of a destroyed key.
        Ok(sqlx::query_scalar(
            "UPDATE vault_keys SET state = $1 WHERE purpose = $2 AND state = $3 AND id <> $4 RETURNING id",
        )
        .bind(to.as_str())
        .bind(purpose.as_str())
        .bind(from.as_str())
        .bind(except)
        .fetch_all(self.pool())
        .await?)
    }

    async fn count_sealed_under(&self, key_ids: &[String]) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM vault WHERE key_id = ANY($1)) \
                  + (SELECT count(*) FROM quarantine WHERE key_id = ANY($1))",
        )
        .bind(key_ids)
        .fetch_one(self.pool())
        .await?)
    }

    async fn vault_rows_under(
        &self,
        job: i64,
        key_ids: &[String],
        after: &str,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_vault_rows($1, $2, $3, $4)")
            .bind(job)
            .bind(key_ids)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn quarantine_rows_under(
        &self,
        job: i64,
        key_ids: &[String],
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_quarantine_rows($1, $2, $3, $4)")
            .bind(job)
            .bind(key_ids)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(QuarantineRow {
                    message_id: r.try_get("message_id")?,
                    reason_code: r.try_get("reason_code")?,
                    reason: r.try_get("reason")?,
                    user_id: r.try_get("user_id")?,
                    key_id: r.try_get("key_id")?,
                    nonce: r.try_get("nonce")?,
                    ciphertext: r.try_get("ciphertext")?,
                    received_at: r.try_get("received_at")?,
                })
            })
            .collect()
    }

    async fn reseal(
        &self,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = reseal_in(&mut tx, vault, quarantine).await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn destroy_unreferenced_data_keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE vault_keys k SET state = 'destroyed', wrapped = NULL \
             WHERE k.purpose = 'vault' AND k.state = 'retired' \
             AND NOT EXISTS (SELECT 1 FROM vault v WHERE v.key_id = k.id) \
             AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.key_id = k.id) RETURNING k.id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    async fn logins_to_retokenise(
        &self,
        job: i64,
        version: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, LoginRow, VaultRow)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_logins($1, $2, $3, $4)")
            .bind(job)
            .bind(version)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let login = login_from_row(r)?;
                let vault = VaultRow::of(
                    &login,
                    r.try_get("key_id")?,
                    r.try_get("nonce")?,
                    r.try_get("ciphertext")?,
                );
                Ok((r.try_get("id")?, login, vault))
            })
            .collect()
    }

    async fn update_tokens(&self, rows: &[(String, String, String)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let ips: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let devs: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        sqlx::query(
            "UPDATE user_logins SET masked_ip = u.ip, masked_device_id = u.dev \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(message_id, ip, dev) \
             WHERE user_logins.message_id = u.message_id",
        )
        .bind(&ids)
        .bind(&ips)
        .bind(&devs)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn count_stale_tokens(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            // The filter first, the vault only for what passes it: after a
            // rotation that is nothing, and the count is a scan of one table.
            "SELECT count(*) FROM user_logins l \
             WHERE (l.masked_ip NOT LIKE $1 OR l.masked_device_id NOT LIKE $1) \
             AND EXISTS (SELECT 1 FROM vault v WHERE v.message_id = l.message_id)",
        )
        .bind(admin::token_like(version))
        .fetch_one(self.pool())
        .await?)
    }

    async fn rotation_bounds(&self, kind: &str, parts: usize) -> Result<Vec<String>, StoreError> {
        let parts = parts.clamp(1, 64);
        if parts == 1 {
            return Ok(vec![String::new()]);
        }
        // Both rotations walk message ids: the vault's, or the logins'.
        // They are not evenly spread (UUIDs, line ids, legacy ids):
        // quantiles of a sample of about 20,000 of them, read page-wise.
        let table = if kind == "rotate-token-key" {
            "user_logins"
        } else {
            "vault"
        };
        let estimate: f64 = sqlx::query_scalar(&format!(
            "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = '{table}'::regclass"
        ))
        .fetch_one(self.pool())
        .await?;
        let percent = if estimate <= 0.0 {
            100.0
        } else {
            (2e6 / estimate).clamp(0.1, 100.0)
        };
        let fractions: Vec<f64> = (1..parts).map(|i| i as f64 / parts as f64).collect();
        let splits: Option<Vec<String>> = sqlx::query_scalar(&format!(
            "SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY message_id) \
             FROM (SELECT message_id FROM {table} TABLESAMPLE SYSTEM ({percent})) s"
        ))
        .bind(&fractions)
        .fetch_one(self.pool())
        .await?;
        let mut bounds = vec![String::new()];
        bounds.extend(splits.unwrap_or_default());
        bounds.dedup();
        Ok(bounds)
    }

    async fn resume_rotation(
        &self,
        record: i64,
        kind: &str,
    ) -> Result<Option<RotationJob>, StoreError> {
        let row = sqlx::query("SELECT * FROM pii_vault_rotation_job_resume($1, $2)")
            .bind(record)
            .bind(kind)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| {
            Ok(RotationJob {
                id: r.try_get("job_id")?,
                started_by: r.try_get("started_by")?,
                old_keys: r.try_get("old_keys")?,
                token_version: r.try_get("token_version")?,
            })
        })
        .transpose()
    }

    async fn start_rotation(
        &self,
        record: i64,
        kind: &str,
        token_version: Option<i64>,
        bounds: &[String],
    ) -> Result<RotationJob, StoreError> {
        sqlx::query("SELECT pii_vault_rotation_job_start($1, $2, $3, $4)")
            .bind(record)
            .bind(kind)
            .bind(token_version)
            .bind(bounds)
            .execute(self.pool())
            .await?;
        self.resume_rotation(record, kind)
            .await?
            .ok_or_else(|| StoreError::Permanent("the rotation job just started is gone".into()))
    }

    async fn rotation_ranges(
        &self,
        record: i64,
        job: i64,
    ) -> Result<Vec<RotationRange>, StoreError> {
        Ok(
            sqlx::query_as("SELECT * FROM pii_vault_rotation_job_ranges($1, $2)")
                .bind(record)
                .bind(job)
                .fetch_all(self.pool())
                .await?,
        )
    }

    async fn rotation_add_key(
        &self,
        record: i64,
        job: i64,
        key_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_job_add_key($1, $2, $3)")
            .bind(record)
            .bind(job)
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn rotation_range_done(&self, record: i64, job: i64, no: i32) -> Result<(), StoreError> {
        advance(record, job, no, None, 0, true)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn finish_rotation(&self, record: i64, job: i64) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_job_finish($1, $2)")
            .bind(record)
            .bind(job)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn vault_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = self
            .chunk(
                "pii_vault_rotation_vault_chunk",
                record,
                job,
                after,
                hi,
                limit,
            )
            .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn reseal_chunk(
        &self,
        record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let changed = reseal_in(&mut tx, vault, quarantine).await?;
        advance(record, job, no, Some(cursor), changed as i64, false)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn logins_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = self
            .chunk(
                "pii_vault_rotation_logins_by_message",
                record,
                job,
                after,
                hi,
                limit,
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, VaultRow::from_row(r)?)))
            .collect()
    }

    async fn tokens_chunk(
        &self,
        record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        rows: &[(i64, String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let ips: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let devs: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let changed = if rows.is_empty() {
            0
        } else {
            sqlx::query(
                "UPDATE user_logins SET masked_ip = u.ip, masked_device_id = u.dev \
                 FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS u(id, ip, dev) \
                 WHERE user_logins.id = u.id",
            )
            .bind(&ids)
            .bind(&ips)
            .bind(&devs)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        advance(record, job, no, Some(cursor), changed as i64, false)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE $1 OR masked_device_id NOT LIKE $1",
        )
        .bind(admin::token_like(version))
        .fetch_one(self.pool())
        .await?)
    }

    async fn forget(&self, user_id: &str, audit: &AuditEntry) -> Result<Forgotten, StoreError> {
        // One statement: the function deletes and writes the audit row in
        // the same transaction (migration 0006); the rotator has no DELETE.
        let (vault_rows, quarantined, logins_kept): (i64, i64, i64) = sqlx::query_as(
            "SELECT vault_rows, quarantined, logins_kept FROM pii_vault_forget($1, $2, $3)",
        )
        .bind(user_id)
        .bind(&audit.reason)
        .bind(&audit.claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Forgotten {
            vault_rows: vault_rows as u64,
            quarantined: quarantined as u64,
            logins_kept: logins_kept as u64,
        })
    }

    async fn retention(
        &self,
        before: NaiveDate,
        audit: &AuditEntry,
    ) -> Result<Retained, StoreError> {
        let (vault_rows, quarantined, undated_kept): (i64, i64, i64) = sqlx::query_as(
            "SELECT vault_rows, quarantined, undated_kept FROM pii_vault_retention($1, $2, $3)",
        )
        .bind(before)
        .bind(&audit.reason)
        .bind(&audit.claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Retained {
            vault_rows: vault_rows as u64,
            quarantined: quarantined as u64,
            undated_kept: undated_kept as u64,
        })
    }

    async fn count_older_than(&self, before: NaiveDate) -> Result<(u64, u64), StoreError> {
        let (vault_rows, quarantined): (i64, i64) =
            sqlx::query_as("SELECT vault_rows, quarantined FROM pii_vault_retention_preview($1)")
                .bind(before)
                .fetch_one(self.pool())
                .await?;
        Ok((vault_rows as u64, quarantined as u64))
    }

    async fn set_policy(
        &self,
        max_users_per_reveal: Option<i64>,
        max_reveals_per_day: Option<i64>,
    ) -> Result<RevealPolicy, StoreError> {
        // The database stamps who and when, and writes the audit row.
        sqlx::query(
            "UPDATE reveal_policy SET \
             max_users_per_reveal = coalesce($1::integer, max_users_per_reveal), \
             max_reveals_per_day = coalesce($2::integer, max_reveals_per_day)",
        )
        .bind(max_users_per_reveal.map(|n| n as i32))
        .bind(max_reveals_per_day.map(|n| n as i32))
        .execute(self.pool())
        .await?;
        self.policy().await
    }

    async fn add_honeytokens(&self, user_ids: &[String]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO honeytokens (user_id) SELECT * FROM UNNEST($1::text[])")
            .bind(user_ids)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn alarms(&self, filter: &AuditFilter) -> Result<Vec<Alarm>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, request_id, target, honeytokens FROM audit_alarms \
             WHERE ($2::timestamptz IS NULL OR at >= $2) AND ($3::text IS NULL OR actor = $3) \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since)
        .bind(filter.actor.as_deref())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Alarm {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: "alarm",
                    request_id: r.try_get("request_id")?,
                    target: r.try_get("target")?,
                    honeytokens: r.try_get("honeytokens")?,
                })
            })
            .collect()
    }

    async fn listen_alarms(&self) -> Result<Box<dyn admin::AlarmListener>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(self.pool()).await?;
        listener.listen("pii_vault_alarm").await?;
        Ok(Box::new(PgAlarms(listener)))
    }
}

struct PgAlarms(sqlx::postgres::PgListener);

#[async_trait]
impl admin::AlarmListener for PgAlarms {
    async fn next(&mut self) -> Result<i64, StoreError> {
        loop {
            let n = self.0.recv().await?;
            // The payload is a request id and nothing else; anything else
            // on the channel (anyone may NOTIFY) is ignored.
            if let Ok(id) = n.payload().parse() {
                return Ok(id);
            }
        }
    }
}
