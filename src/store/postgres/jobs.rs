//! [`Jobs`] on Postgres: every call one function of
//! `migrations/postgres/functions/40_rotation.sql`, which checks that the
//! job is open, its record committed and the caller's, and its lease held.

use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use crate::store::jobs::{token_like, LeaseHolder};
use crate::store::{
    Job, JobKind, JobStart, Jobs, Lease, Requester, RotationRange, StoreError, StoredKey,
};

/// The lease's holder: the connection whose backend took it. Closed, not
/// handed back to the pool, at the end: the lease lives as long as that
/// backend does.
struct PgLease(sqlx::pool::PoolConnection<sqlx::Postgres>);

#[async_trait]
impl LeaseHolder for PgLease {
    async fn release(mut self: Box<Self>, record: i64) {
        // Released explicitly: a closed connection's backend lets go only
        // when it has exited, which the next run should not have to race.
        let _ = sqlx::query("SELECT pii_vault_job_release($1)")
            .bind(record)
            .execute(&mut *self.0)
            .await;
        let _ = self.0.close().await;
    }
}

/// A row of `pii_vault_rotation_job_resume` as the job this run works on.
fn job_from_row(r: &sqlx::postgres::PgRow, lease: &Lease) -> Result<Job, StoreError> {
    Ok(Job {
        id: r.try_get("job_id")?,
        kind: lease.kind,
        record: lease.record,
        started_by: r.try_get("started_by")?,
        old_keys: r.try_get("old_keys")?,
        token_version: r.try_get("token_version")?,
        kek_target: r.try_get("kek_target")?,
    })
}

#[async_trait]
impl Jobs for PgStore {
    async fn begin_job(
        &self,
        kind: JobKind,
        target: &str,
        who: &Requester,
        row_count: i64,
    ) -> Result<Lease, StoreError> {
        // The lease is this connection's backend's: it lives as long as the
        // connection, which the run keeps until its end.
        let mut conn = self.pool().acquire().await?;
        conn.close_on_drop();
        let record: i64 = sqlx::query_scalar("SELECT pii_vault_record($1, $2, $3, $4, $5)")
            .bind(kind.as_str())
            .bind(target)
            .bind(&who.reason)
            .bind(&who.claimed_actor)
            .bind(row_count)
            .fetch_one(&mut *conn)
            .await?;
        Ok(Lease::new(record, kind, Box::new(PgLease(conn))))
    }

    async fn resume_job(&self, lease: &Lease) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query("SELECT * FROM pii_vault_rotation_job_resume($1, $2)")
            .bind(lease.record)
            .bind(lease.kind.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| job_from_row(&r, lease)).transpose()
    }

    async fn start_job(&self, lease: &Lease, start: JobStart<'_>) -> Result<Job, StoreError> {
        if start.kind() != lease.kind {
            return Err(StoreError::Permanent(format!(
                "a {} run cannot start a {} job",
                lease.kind,
                start.kind()
            )));
        }
        let record = lease.record;
        match start {
            JobStart::DataKeys { bounds } => {
                sqlx::query("SELECT pii_vault_rotation_start_data_keys($1, $2)")
                    .bind(record)
                    .bind(bounds)
                    .execute(self.pool())
                    .await?;
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
            }
            JobStart::Kek => {
                sqlx::query("SELECT pii_vault_rotation_start_kek($1)")
                    .bind(record)
                    .execute(self.pool())
                    .await?;
            }
        }
        self.resume_job(lease)
            .await?
            .ok_or_else(|| StoreError::Permanent("the rotation job just started is gone".into()))
    }

    async fn job_ranges(&self, job: &Job) -> Result<Vec<RotationRange>, StoreError> {
        Ok(
            sqlx::query_as("SELECT * FROM pii_vault_rotation_job_ranges($1, $2)")
                .bind(job.record)
                .bind(job.id)
                .fetch_all(self.pool())
                .await?,
        )
    }

    async fn job_new_data_key(&self, job: &Job, key: &StoredKey) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_new_data_key($1, $2, $3, $4, $5)")
            .bind(job.record)
            .bind(job.id)
            .bind(&key.id)
            .bind(&key.wrapped.kek_id)
            .bind(&key.wrapped.blob)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn job_retire_key(&self, job: &Job, key_id: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_retire_key($1, $2, $3)")
            .bind(job.record)
            .bind(job.id)
            .bind(key_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn range_done(&self, job: &Job, no: i32) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_rotation_range_done($1, $2, $3)")
            .bind(job.record)
            .bind(job.id)
            .bind(no)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn finish_job(&self, job: &Job) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_rotation_finish($1, $2)")
                .bind(job.record)
                .bind(job.id)
                .fetch_one(self.pool())
                .await?,
        )
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
        .bind(token_like(version))
        .fetch_one(self.pool())
        .await?)
    }

    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE $1 OR masked_device_id NOT LIKE $1",
        )
        .bind(token_like(version))
        .fetch_one(self.pool())
        .await?)
    }

    async fn rotation_bounds(
        &self,
        kind: JobKind,
        parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        let parts = parts.clamp(1, 64);
        if parts == 1 {
            return Ok(vec![String::new()]);
        }
        // Both rotations walk message ids: the vault's, or the logins'.
        // They are not evenly spread (UUIDs, line ids, legacy ids):
        // quantiles of a sample of about 20,000 of them, read page-wise.
        let table = if kind == JobKind::TokenKey {
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
}
