//! [`Quarantine`] on Postgres: the list is a view without bodies; a show
//! and a replay are each a call of their functions
//! (`migrations/postgres/functions/60_quarantine.sql`), which check that
//! the audit row was committed first and is the caller's.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::Row as _;

use super::PgStore;
use crate::crypto::WrappedKey;
use crate::store::model::quarantine_from_row;
use crate::store::{
    LoginRow, Quarantine, QuarantineEntry, QuarantineFilter, QuarantineRow, ReplayRequest,
    ReplayStored, StoreError, VaultRow,
};

/// One text column of `logins`, for `unnest`.
fn column(logins: &[(LoginRow, VaultRow)], f: impl Fn(&LoginRow) -> &String) -> Vec<&str> {
    logins.iter().map(|(l, _)| f(l).as_str()).collect()
}

fn sealed(r: &sqlx::postgres::PgRow) -> Result<QuarantineRow, StoreError> {
    quarantine_from_row(r, r.try_get("received_at")?)
}

#[async_trait]
impl Quarantine for PgStore {
    async fn quarantine_list(
        &self,
        filter: &QuarantineFilter,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, reason_code, reason, received_at, source, line \
             FROM pii_vault_quarantine_list \
             WHERE ($1::timestamptz IS NULL OR received_at >= $1) AND ($2::text IS NULL OR reason_code = $2) \
             ORDER BY received_at, source, line, message_id",
        )
        .bind(filter.since)
        .bind(filter.reason_code.as_deref())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QuarantineEntry {
                    message_id: r.try_get("message_id")?,
                    reason_code: r.try_get("reason_code")?,
                    reason: r.try_get("reason")?,
                    received_at: r.try_get::<DateTime<Utc>, _>("received_at")?,
                    source: r.try_get("source")?,
                    line: r.try_get("line")?,
                })
            })
            .collect()
    }

    async fn quarantine_show_request(
        &self,
        message_id: &str,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_quarantine_show_request($1, $2, $3)")
                .bind(message_id)
                .bind(reason)
                .bind(claimed_actor)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn quarantine_show_key(&self, record: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_quarantine_show_key($1)")
                .bind(record)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn quarantine_show_fetch(
        &self,
        record: i64,
    ) -> Result<Option<QuarantineRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM pii_vault_quarantine_show_fetch($1)")
            .bind(record)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(sealed).transpose()
    }

    async fn replay_request(
        &self,
        ids: Option<&[String]>,
        key_id: &str,
        wrapped: &WrappedKey,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<ReplayRequest, StoreError> {
        let (record, row_count): (i64, i64) = sqlx::query_as(
            "SELECT record_id, row_count FROM pii_vault_quarantine_replay_request($1, $2, $3, $4, $5, $6)",
        )
        .bind(ids.map(<[String]>::to_vec))
        .bind(key_id)
        .bind(&wrapped.kek_id)
        .bind(&wrapped.blob)
        .bind(reason)
        .bind(claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(ReplayRequest { record, row_count })
    }

    async fn replay_fetch(&self, record: i64) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_quarantine_replay_fetch($1)")
            .bind(record)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sealed).collect()
    }

    async fn replay_store(
        &self,
        record: i64,
        logins: &[(LoginRow, VaultRow)],
    ) -> Result<ReplayStored, StoreError> {
        if logins.is_empty() {
            return Ok(ReplayStored::default());
        }
        let locale: Vec<Option<&str>> = logins.iter().map(|(l, _)| l.locale.as_deref()).collect();
        let nets: Vec<Option<&str>> = logins
            .iter()
            .map(|(l, _)| l.masked_ip_net.as_deref())
            .collect();
        let create_date: Vec<Option<NaiveDate>> =
            logins.iter().map(|(l, _)| l.create_date).collect();
        let nonce: Vec<&[u8]> = logins.iter().map(|(_, v)| v.nonce.as_slice()).collect();
        let ciphertext: Vec<&[u8]> = logins
            .iter()
            .map(|(_, v)| v.ciphertext.as_slice())
            .collect();
        let (stored, already): (i64, i64) = sqlx::query_as(
            "SELECT stored, already FROM pii_vault_quarantine_replay_store($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10::date[], $11, $12)",
        )
        .bind(record)
        .bind(column(logins, |l| &l.message_id))
        .bind(column(logins, |l| &l.user_id))
        .bind(column(logins, |l| &l.device_type))
        .bind(column(logins, |l| &l.masked_ip))
        .bind(column(logins, |l| &l.masked_device_id))
        .bind(&nets)
        .bind(&locale)
        .bind(column(logins, |l| &l.app_version))
        .bind(&create_date)
        .bind(&nonce)
        .bind(&ciphertext)
        .fetch_one(self.pool())
        .await?;
        Ok(ReplayStored {
            stored: stored as u64,
            already: already as u64,
        })
    }

    async fn replay_finish(&self, record: i64) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_quarantine_replay_finish($1)")
            .bind(record)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
