//! [`Rewrites`] on Postgres: each step one call of its job-checking
//! function (`migrations/postgres/functions/45_rewrite.sql`).

use async_trait::async_trait;
use sqlx::{FromRow, Row};

use super::PgStore;
use crate::store::{
    Job, NewTokens, Rewrite, RewriteState, Rewrites, StaleLogin, StoreError, VaultRow,
};

impl PgStore {
    /// Calls the step function `f(record, job, partition)`.
    async fn rewrite_step(&self, f: &str, job: &Job, partition: &str) -> Result<(), StoreError> {
        sqlx::query(&format!("SELECT {f}($1, $2, $3)"))
            .bind(job.record)
            .bind(job.id)
            .bind(partition)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Rewrites for PgStore {
    async fn rewrites(&self, job: &Job) -> Result<Vec<Rewrite>, StoreError> {
        let rows = sqlx::query("SELECT partition, state FROM pii_vault_rewrite_list($1, $2)")
            .bind(job.record)
            .bind(job.id)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(Rewrite {
                    partition: r.try_get("partition")?,
                    state: match state.as_str() {
                        "swapped" => RewriteState::Swapped,
                        "gone" => RewriteState::Gone,
                        _ => RewriteState::Pending,
                    },
                })
            })
            .collect()
    }

    async fn rewrite_begin(&self, job: &Job, partition: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_rewrite_begin($1, $2, $3)")
                .bind(job.record)
                .bind(job.id)
                .bind(partition)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn rewrite_vault_chunk(
        &self,
        job: &Job,
        partition: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rewrite_vault_chunk($1, $2, $3, $4, $5)")
            .bind(job.record)
            .bind(job.id)
            .bind(partition)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn rewrite_vault_write(
        &self,
        job: &Job,
        partition: &str,
        rows: &[(VaultRow, String)],
        keep: &[String],
    ) -> Result<u64, StoreError> {
        let ids: Vec<&str> = rows.iter().map(|(v, _)| v.message_id.as_str()).collect();
        let old: Vec<&str> = rows.iter().map(|(_, o)| o.as_str()).collect();
        let new: Vec<&str> = rows.iter().map(|(v, _)| v.key_id.as_str()).collect();
        let nonces: Vec<&[u8]> = rows.iter().map(|(v, _)| v.nonce.as_slice()).collect();
        let cts: Vec<&[u8]> = rows.iter().map(|(v, _)| v.ciphertext.as_slice()).collect();
        let n: i64 = sqlx::query_scalar(
            "SELECT pii_vault_rewrite_vault_write($1, $2, $3, $4::text[], $5::text[], $6::text[], \
             $7::bytea[], $8::bytea[], $9::text[])",
        )
        .bind(job.record)
        .bind(job.id)
        .bind(partition)
        .bind(&ids)
        .bind(&old)
        .bind(&new)
        .bind(&nonces)
        .bind(&cts)
        .bind(keep)
        .fetch_one(self.pool())
        .await?;
        Ok(n as u64)
    }

    async fn rewrite_logins_chunk(
        &self,
        job: &Job,
        partition: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StaleLogin>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_rewrite_logins_chunk($1, $2, $3, $4, $5)")
            .bind(job.record)
            .bind(job.id)
            .bind(partition)
            .bind(after)
            .bind(limit as i32)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get("id")?;
                let message_id: String = r.try_get("message_id")?;
                let key_id: Option<String> = r.try_get("key_id")?;
                let vault = match key_id {
                    None => None,
                    Some(key_id) => Some(VaultRow {
                        message_id: message_id.clone(),
                        user_id: r
                            .try_get::<Option<String>, _>("user_id")?
                            .unwrap_or_default(),
                        key_id,
                        nonce: r.try_get("nonce")?,
                        ciphertext: r.try_get("ciphertext")?,
                    }),
                };
                Ok((id, message_id, vault))
            })
            .collect()
    }

    async fn rewrite_logins_write(
        &self,
        job: &Job,
        partition: &str,
        rows: &[NewTokens],
        keep: &[i64],
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let ips: Vec<&str> = rows.iter().map(|r| r.masked_ip.as_str()).collect();
        let devs: Vec<&str> = rows.iter().map(|r| r.masked_device_id.as_str()).collect();
        let nets: Vec<Option<&str>> = rows.iter().map(|r| r.masked_ip_net.as_deref()).collect();
        let n: i64 = sqlx::query_scalar(
            "SELECT pii_vault_rewrite_logins_write($1, $2, $3, $4::bigint[], $5::text[], $6::text[], \
             $7::text[], $8::bigint[])",
        )
        .bind(job.record)
        .bind(job.id)
        .bind(partition)
        .bind(&ids)
        .bind(&ips)
        .bind(&devs)
        .bind(&nets)
        .bind(keep)
        .fetch_one(self.pool())
        .await?;
        Ok(n as u64)
    }

    async fn rewrite_index(&self, job: &Job, partition: &str) -> Result<(), StoreError> {
        self.rewrite_step("pii_vault_rewrite_index", job, partition)
            .await
    }

    async fn rewrite_swap(&self, job: &Job, partition: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT pii_vault_rewrite_swap($1, $2, $3)")
            .bind(job.record)
            .bind(job.id)
            .bind(partition)
            .fetch_one(self.pool())
            .await?;
        Ok(n as u64)
    }
}
