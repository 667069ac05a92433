//! [`Chunks`] on SQLite: the same reads and writes as on Postgres, each
//! chunk and its cursor in one transaction.

use async_trait::async_trait;
use sqlx::{FromRow, Row};

use super::jobs::{advance, stale};
use super::{parse_time, SqliteStore};
use crate::crypto::WrappedKey;
use crate::store::jobs::token_like;
use crate::store::model::{id_and_vault_row, quarantine_from_row};
use crate::store::{Chunks, Job, NewTokens, QuarantineRow, StoreError, VaultRow};

impl SqliteStore {
    /// The `LIKE` pattern of the tokens of `job`'s version.
    fn job_token_like(job: &Job) -> String {
        token_like(job.token_version.unwrap_or(0))
    }
}

#[async_trait]
impl Chunks for SqliteStore {
    async fn vault_chunk(
        &self,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, user_id, key_id, nonce, ciphertext FROM vault \
             WHERE message_id > $1 AND ($2 IS NULL OR message_id <= $2) \
             AND key_id IN (SELECT value FROM json_each((SELECT old_keys FROM rotation_jobs WHERE id = $3))) \
             ORDER BY message_id LIMIT $4",
        )
        .bind(after)
        .bind(hi)
        .bind(job.id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn quarantine_chunk(
        &self,
        job: &Job,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, reason_code, reason, user_id, key_id, nonce, ciphertext, received_at \
             FROM quarantine WHERE message_id > $1 \
             AND key_id IN (SELECT value FROM json_each((SELECT old_keys FROM rotation_jobs WHERE id = $2))) \
             ORDER BY message_id LIMIT $3",
        )
        .bind(after)
        .bind(job.id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| quarantine_from_row(r, parse_time(&r.try_get::<String, _>("received_at")?)?))
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
        let mut tx = self.pool.begin().await?;
        let rows = vault
            .iter()
            .map(|(v, old)| {
                (
                    "vault",
                    &v.message_id,
                    &v.key_id,
                    &v.nonce,
                    &v.ciphertext,
                    old,
                )
            })
            .chain(quarantine.iter().map(|(q, old)| {
                (
                    "quarantine",
                    &q.message_id,
                    &q.key_id,
                    &q.nonce,
                    &q.ciphertext,
                    old,
                )
            }));
        let mut changed = 0;
        // Encryptions per new data key, counted into `usage_count` as a
        // worker's batches are (and as Postgres's fence trigger counts a
        // re-seal), so that `keys list` shows a rotation's keys in use.
        let mut uses: std::collections::BTreeMap<&String, i64> = Default::default();
        for (table, id, key, nonce, ct, old) in rows {
            let n = sqlx::query(&format!(
                "UPDATE {table} SET key_id = $1, nonce = $2, ciphertext = $3 WHERE message_id = $4 AND key_id = $5"
            ))
            .bind(key)
            .bind(nonce)
            .bind(ct)
            .bind(id)
            .bind(old)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            changed += n;
            *uses.entry(key).or_default() += n as i64;
        }
        for (key, n) in uses.into_iter().filter(|(_, n)| *n > 0) {
            sqlx::query("UPDATE vault_keys SET usage_count = usage_count + $1 WHERE id = $2")
                .bind(n)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        advance(&mut tx, job.id, no, cursor, changed as i64).await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn logins_chunk(
        &self,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT l.id, l.message_id, l.user_id, v.key_id, v.nonce, v.ciphertext \
             FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
             WHERE l.message_id > $1 AND ($2 IS NULL OR l.message_id <= $2) AND ({}) \
             ORDER BY l.message_id LIMIT $4",
            stale(3)
        ))
        .bind(after)
        .bind(hi)
        .bind(Self::job_token_like(job))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn sweep_chunk(
        &self,
        job: &Job,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT l.id, l.message_id, l.user_id, v.key_id, v.nonce, v.ciphertext \
             FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
             WHERE l.id > $1 AND ({}) ORDER BY l.id LIMIT $3",
            stale(2)
        ))
        .bind(after)
        .bind(Self::job_token_like(job))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn tokens_chunk(
        &self,
        job: &Job,
        range: Option<(i32, &str)>,
        rows: &[NewTokens],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut changed = 0;
        for row in rows {
            changed += sqlx::query(
                "UPDATE user_logins SET masked_ip = $1, masked_device_id = $2, masked_ip_net = $3 \
                 WHERE id = $4",
            )
            .bind(&row.masked_ip)
            .bind(&row.masked_device_id)
            .bind(&row.masked_ip_net)
            .bind(row.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if let Some((no, cursor)) = range {
            advance(&mut tx, job.id, no, cursor, changed as i64).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn rewrap_key(
        &self,
        _job: &Job,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE vault_keys SET wrapped = $1, kek_id = $2 WHERE id = $3 AND state <> 'destroyed' AND kek_id <> $2",
        )
        .bind(&wrapped.blob)
        .bind(&wrapped.kek_id)
        .bind(key_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn retire_data_keys(&self, _job: &Job) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active'",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
