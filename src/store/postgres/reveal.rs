//! [`Reveal`] on Postgres: each step one call of its function
//! (`migrations/postgres/functions/30_reveal.sql`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use sqlx::postgres::PgRow;

use super::PgStore;
use crate::store::model::{login_from_row, sealed_beside};
use crate::store::{
    PolicyChange, RequestStatus, Reveal, RevealPolicy, RevealRequest, RevealedRow, RevealedRows,
    Selector, StoreError,
};

/// A row of `pii_vault_reveal_fetch`: the login, and its sealed originals
/// when there are any.
fn revealed_from_row(r: &PgRow) -> Result<RevealedRow, StoreError> {
    let login = login_from_row(r)?;
    let vault = sealed_beside(&login, r)?;
    Ok((login, vault))
}

#[async_trait]
impl Reveal for PgStore {
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
        .fetch_one(self.pool())
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
            .fetch(self.pool())
            .map(|r| revealed_from_row(&r?));
        RevealedRows::start(rows.boxed()).await
    }

    async fn reveal_keys(&self, request_id: i64) -> Result<Vec<String>, StoreError> {
        // The fetch function, with its checks, in a transaction that is
        // rolled back: the request's mark as fetched goes with it, and only
        // the key ids leave the database.
        let mut tx = self.pool().begin().await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT key_id FROM pii_vault_reveal_fetch($1) WHERE key_id IS NOT NULL",
        )
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        Ok(keys)
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
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT pii_vault_reveal_claim($1, $2)")
            .bind(request_id)
            .bind(claimed_actor)
            .fetch_one(self.pool())
            .await?)
    }

    async fn policy(&self) -> Result<RevealPolicy, StoreError> {
        let (max_users_per_reveal, max_reveals_per_day, max_searches_per_day, changed_at, changed_by): (
            i32,
            i32,
            i32,
            DateTime<Utc>,
            String,
        ) = sqlx::query_as(
            "SELECT max_users_per_reveal, max_reveals_per_day, max_searches_per_day, changed_at, changed_by \
             FROM reveal_policy",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(RevealPolicy {
            max_users_per_reveal: max_users_per_reveal.into(),
            max_reveals_per_day: max_reveals_per_day.into(),
            max_searches_per_day: max_searches_per_day.into(),
            changed_at,
            changed_by,
        })
    }

    async fn set_policy(&self, change: &PolicyChange) -> Result<RevealPolicy, StoreError> {
        // The database stamps who and when, and writes the audit row.
        sqlx::query(
            "UPDATE reveal_policy SET \
             max_users_per_reveal = coalesce($1::integer, max_users_per_reveal), \
             max_reveals_per_day = coalesce($2::integer, max_reveals_per_day), \
             max_searches_per_day = coalesce($3::integer, max_searches_per_day)",
        )
        .bind(change.max_users_per_reveal.map(|n| n as i32))
        .bind(change.max_reveals_per_day.map(|n| n as i32))
        .bind(change.max_searches_per_day.map(|n| n as i32))
        .execute(self.pool())
        .await?;
        self.policy().await
    }
}
