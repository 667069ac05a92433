//! [`Maintenance`] on Postgres: the rotation and erasure queries.

use async_trait::async_trait;
use sqlx::{FromRow, Row};

use chrono::NaiveDate;

use super::admin::{
    self, Forgotten, Initialised, Job, JobLock, JobStart, Maintenance, PlannedLogin, Retained,
    RotationJob, RotationRange, JOB_KINDS,
};
use super::postgres::PgStore;
use super::{
    Alarm, AuditEntry, AuditFilter, QuarantineRow, RevealPolicy, Store, StoreError, StoredKey,
    VaultRow,
};
use crate::crypto::WrappedKey;

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
    async fn init_keys(
        &self,
        kek: &str,
        token: Option<&StoredKey>,
        line_ids: Option<&StoredKey>,
        claimed_actor: &str,
    ) -> Result<Initialised, StoreError> {
        let (kek_added, token_key, line_id_key): (bool, bool, bool) = sqlx::query_as(
            "SELECT kek_added, token_key, line_id_key FROM pii_vault_keys_init($1, $2, $3, $4, $5, $6)",
        )
        .bind(kek)
        .bind(token.map(|k| k.id.as_str()))
        .bind(token.map(|k| k.wrapped.blob.as_slice()))
        .bind(line_ids.map(|k| k.id.as_str()))
        .bind(line_ids.map(|k| k.wrapped.blob.as_slice()))
        .bind(claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Initialised {
            kek_added,
            token_key,
            line_id_key,
        })
    }

    async fn begin_job(&self, audit: &AuditEntry, row_count: i64) -> Result<Job, StoreError> {
        if !JOB_KINDS.contains(&audit.action.as_str()) {
            return Err(StoreError::Permanent(format!(
                "{} is not a job kind",
                audit.action
            )));
        }
        // The lease is this connection's backend's: it lives as long as the
        // connection, which the job keeps and closes at its end instead of
        // handing it back to the pool.
        let mut conn = self.pool().acquire().await?;
        conn.close_on_drop();
        let id = record(audit, row_count).fetch_one(&mut *conn).await?;
        Ok(Job::new(id, JobLock::Pg(conn)))
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

    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE $1 OR masked_device_id NOT LIKE $1",
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
                kek_target: r.try_get("kek_target")?,
            })
        })
        .transpose()
    }

    async fn start_rotation(
        &self,
        record: i64,
        start: JobStart<'_>,
    ) -> Result<RotationJob, StoreError> {
        let kind = match start {
            JobStart::DataKeys { bounds } => {
                sqlx::query("SELECT pii_vault_rotation_start_data_keys($1, $2)")
                    .bind(record)
                    .bind(bounds)
                    .execute(self.pool())
                    .await?;
                "rotate-data-keys"
            }
            JobStart::TokenKey { bounds, key } => {
                sqlx::query("SELECT pii_vault_rotation_start_token_key($1, $2, $3, $4, $5, $6)")
                    .bind(record)
                    .bind(bounds)
                    .bind(&key.id)
                    .bind(key.version)
                    .bind(&key.wrapped.kek_id)
                    .bind(&key.wrapped.blob)
                    .execute(self.pool())
                    .await?;
                "rotate-token-key"
            }
            JobStart::Kek => {
                sqlx::query("SELECT pii_vault_rotation_start_kek($1)")
                    .bind(record)
                    .execute(self.pool())
                    .await?;
                "rotate-kek"
            }
        };
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

    async fn rotation_new_data_key(
        &self,
        record: i64,
        job: i64,
        key: &StoredKey,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_new_data_key($1, $2, $3, $4, $5)")
            .bind(record)
            .bind(job)
            .bind(&key.id)
            .bind(&key.wrapped.kek_id)
            .bind(&key.wrapped.blob)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn rotation_retire_key(
        &self,
        record: i64,
        job: i64,
        key_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_retire_key($1, $2, $3)")
            .bind(record)
            .bind(job)
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn rotation_range_done(&self, record: i64, job: i64, no: i32) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_range_done($1, $2, $3)")
            .bind(record)
            .bind(job)
            .bind(no)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn finish_rotation(&self, record: i64, job: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_rotation_finish($1, $2)")
                .bind(record)
                .bind(job)
                .fetch_one(self.pool())
                .await?,
        )
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

    async fn quarantine_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_quarantine_chunk($1, $2, $3, $4)")
            .bind(record)
            .bind(job)
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

    async fn reseal_chunk(
        &self,
        record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError> {
        // A range is of one table; the function writes the one its range names.
        let mut ids = Vec::with_capacity(vault.len() + quarantine.len());
        let mut old = Vec::with_capacity(ids.capacity());
        let mut new = Vec::with_capacity(ids.capacity());
        let mut nonces = Vec::with_capacity(ids.capacity());
        let mut cts = Vec::with_capacity(ids.capacity());
        for (v, o) in vault {
            ids.push(v.message_id.as_str());
            old.push(o.as_str());
            new.push(v.key_id.as_str());
            nonces.push(v.nonce.as_slice());
            cts.push(v.ciphertext.as_slice());
        }
        for (q, o) in quarantine {
            ids.push(q.message_id.as_str());
            old.push(o.as_str());
            new.push(q.key_id.as_str());
            nonces.push(q.nonce.as_slice());
            cts.push(q.ciphertext.as_slice());
        }
        let changed: i64 = sqlx::query_scalar(
            "SELECT pii_vault_rotation_reseal($1, $2, $3, $4, $5::text[], $6::text[], $7::text[], $8::bytea[], $9::bytea[])",
        )
        .bind(record)
        .bind(job)
        .bind(no)
        .bind(cursor)
        .bind(&ids)
        .bind(&old)
        .bind(&new)
        .bind(&nonces)
        .bind(&cts)
        .fetch_one(self.pool())
        .await?;
        Ok(changed as u64)
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

    async fn sweep_chunk(
        &self,
        record: i64,
        job: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_sweep_chunk($1, $2, $3, $4)")
            .bind(record)
            .bind(job)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, VaultRow::from_row(r)?)))
            .collect()
    }

    async fn tokens_chunk(
        &self,
        record: i64,
        job: i64,
        range: Option<(i32, &str)>,
        rows: &[(i64, String, String)],
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let ips: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let devs: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let changed: i64 = sqlx::query_scalar(
            "SELECT pii_vault_rotation_tokens($1, $2, $3, $4, $5::bigint[], $6::text[], $7::text[])",
        )
        .bind(record)
        .bind(job)
        .bind(range.map(|r| r.0))
        .bind(range.map(|r| r.1))
        .bind(&ids)
        .bind(&ips)
        .bind(&devs)
        .fetch_one(self.pool())
        .await?;
        Ok(changed as u64)
    }

    async fn rewrap_key(
        &self,
        record: i64,
        job: i64,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_rotation_rewrap($1, $2, $3, $4, $5)")
                .bind(record)
                .bind(job)
                .bind(key_id)
                .bind(&wrapped.kek_id)
                .bind(&wrapped.blob)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn retire_data_keys(&self, record: i64, job: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT pii_vault_rotation_retire_data_keys($1, $2)")
            .bind(record)
            .bind(job)
            .fetch_one(self.pool())
            .await?;
        Ok(n as u64)
    }

    async fn forget(&self, user_id: &str, audit: &AuditEntry) -> Result<Forgotten, StoreError> {
        // One statement: the function deletes and writes the audit row in
        // the same transaction; the rotator has no DELETE.
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
        let (vault_rows, quarantined, undated_kept, keys_destroyed): (i64, i64, i64, Vec<String>) =
            sqlx::query_as(
                "SELECT vault_rows, quarantined, undated_kept, keys_destroyed \
                 FROM pii_vault_retention($1, $2, $3)",
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
            keys_destroyed,
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

    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[PlannedLogin],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO honeytokens (user_id) SELECT * FROM UNNEST($1::text[])")
            .bind(user_ids)
            .execute(&mut *tx)
            .await?;
        // Bodies of logins already written are not needed any more.
        sqlx::query(
            "DELETE FROM honeytoken_logins h WHERE EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (h.uuid_id, h.line_id))",
        )
        .execute(&mut *tx)
        .await?;
        let users: Vec<&str> = logins.iter().map(|l| l.user_id.as_str()).collect();
        let uuids: Vec<&str> = logins.iter().map(|l| l.uuid_id.as_str()).collect();
        let lines: Vec<&str> = logins.iter().map(|l| l.line_id.as_str()).collect();
        let bodies: Vec<&str> = logins.iter().map(|l| l.body.as_str()).collect();
        let due: Vec<chrono::DateTime<chrono::Utc>> = logins.iter().map(|l| l.due_at).collect();
        sqlx::query(
            "INSERT INTO honeytoken_logins (user_id, uuid_id, line_id, body, due_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])",
        )
        .bind(&users)
        .bind(&uuids)
        .bind(&lines)
        .bind(&bodies)
        .bind(&due)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError> {
        // Users of a page-wise sample of about 100,000 logins (honeytokens
        // left out), each with all its logins counted: counting within the
        // sample would favour busy users.
        let estimate: f64 = sqlx::query_scalar(
            "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = 'user_logins'::regclass",
        )
        .fetch_one(self.pool())
        .await?;
        let percent = if estimate <= 0.0 {
            100.0
        } else {
            (1e7 / estimate).clamp(0.01, 100.0)
        };
        Ok(sqlx::query_as(&format!(
            "WITH s AS (SELECT DISTINCT user_id::text AS u FROM user_logins TABLESAMPLE SYSTEM ({percent}) \
                        WHERE user_id IS NOT NULL AND user_id NOT IN (SELECT user_id FROM honeytokens) \
                        LIMIT $1) \
             SELECT s.u, (SELECT count(*) FROM user_logins l WHERE l.user_id = s.u) FROM s"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT u FROM UNNEST($1::text[]) u WHERE EXISTS (SELECT 1 FROM user_logins l WHERE l.user_id = u) \
             OR EXISTS (SELECT 1 FROM honeytokens h WHERE h.user_id = u)",
        )
        .bind(user_ids)
        .fetch_all(self.pool())
        .await?)
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
            // Every reveal request notifies with its id (anyone may NOTIFY
            // too): the caller checks it against the alarms.
            if let Ok(id) = n.payload().parse() {
                return Ok(id);
            }
        }
    }
}
