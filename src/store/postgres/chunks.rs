//! [`Chunks`] on Postgres: each read and each write one call of its
//! job-checking function (`migrations/postgres/functions/40_rotation.sql`).

use async_trait::async_trait;
use sqlx::{FromRow, Row};

use super::PgStore;
use crate::crypto::WrappedKey;
use crate::store::model::{id_and_vault_row, quarantine_from_row};
use crate::store::{Chunks, Job, NewTokens, QuarantineRow, StoreError, VaultRow};

impl PgStore {
    /// One chunk of a rotation range from the job-checking function `f`
    /// (the next `limit` rows with a message id in `(after, hi]`).
    async fn chunk(
        &self,
        f: &str,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
        Ok(
            sqlx::query(&format!("SELECT * FROM {f}($1, $2, $3, $4, $5)"))
                .bind(job.record)
                .bind(job.id)
                .bind(after)
                .bind(hi)
                .bind(limit as i32)
                .fetch_all(self.pool())
                .await?,
        )
    }
}

#[async_trait]
impl Chunks for PgStore {
    async fn vault_chunk(
        &self,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = self
            .chunk("pii_vault_rotation_vault_chunk", job, after, hi, limit)
            .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn quarantine_chunk(
        &self,
        job: &Job,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_quarantine_chunk($1, $2, $3, $4)")
            .bind(job.record)
            .bind(job.id)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| quarantine_from_row(r, r.try_get("received_at")?))
            .collect()
    }

    async fn reseal_chunk(
        &self,
        job: &Job,
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
        .bind(job.record)
        .bind(job.id)
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
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = self
            .chunk(
                "pii_vault_rotation_logins_by_message",
                job,
                after,
                hi,
                limit,
            )
            .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn sweep_chunk(
        &self,
        job: &Job,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rotation_sweep_chunk($1, $2, $3, $4)")
            .bind(job.record)
            .bind(job.id)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn tokens_chunk(
        &self,
        job: &Job,
        range: Option<(i32, &str)>,
        rows: &[NewTokens],
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let ips: Vec<&str> = rows.iter().map(|r| r.masked_ip.as_str()).collect();
        let devs: Vec<&str> = rows.iter().map(|r| r.masked_device_id.as_str()).collect();
        let nets: Vec<Option<&str>> = rows.iter().map(|r| r.masked_ip_net.as_deref()).collect();
        let changed: i64 = sqlx::query_scalar(
            "SELECT pii_vault_rotation_tokens($1, $2, $3, $4, $5::bigint[], $6::text[], $7::text[], \
             $8::text[])",
        )
        .bind(job.record)
        .bind(job.id)
        .bind(range.map(|r| r.0))
        .bind(range.map(|r| r.1))
        .bind(&ids)
        .bind(&ips)
        .bind(&devs)
        .bind(&nets)
        .fetch_one(self.pool())
        .await?;
        Ok(changed as u64)
    }

    async fn rewrap_key(
        &self,
        job: &Job,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_rotation_rewrap($1, $2, $3, $4, $5)")
                .bind(job.record)
                .bind(job.id)
                .bind(key_id)
                .bind(&wrapped.kek_id)
                .bind(&wrapped.blob)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn retire_data_keys(&self, job: &Job) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT pii_vault_rotation_retire_data_keys($1, $2)")
            .bind(job.record)
            .bind(job.id)
            .fetch_one(self.pool())
            .await?;
        Ok(n as u64)
    }
}
