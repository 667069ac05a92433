//! [`Trail`] on Postgres: the chains are written by the trigger and
//! functions of migrations/postgres/functions/15_audit_chain.sql; this
//! reads them, and calls the functions that keep checkpoints, answer the
//! subject ledger and archive.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::PgStore;
use crate::store::trail::{
    chain_state_from_row, request_entry_from_row, request_page_sql, trail_entry_from_row,
    trail_page_sql, CHECKPOINT_LINES, LAST_CHECKPOINT,
};
use crate::store::{ArchivePoint, ChainHeads, LedgerEntry, Requester, StoreError, Trail};
use crate::trail::{RequestEntry, TrailEntry};

#[async_trait]
impl Trail for PgStore {
    async fn chain_heads(&self) -> Result<ChainHeads, StoreError> {
        let rows = sqlx::query(
            "SELECT chain, head_id, head_hash, count, base_id, base_hash, base_count, clock_timestamp() AS now \
             FROM audit_chain",
        )
        .fetch_all(self.pool())
        .await?;
        let mut trail = None;
        let mut requests = None;
        let mut now = Utc::now();
        for r in &rows {
            let state = chain_state_from_row(r)?;
            now = r.try_get("now")?;
            match r.try_get::<String, _>("chain")?.as_str() {
                "trail" => trail = Some(state),
                _ => requests = Some(state),
            }
        }
        let missing =
            || StoreError::Permanent("the audit chain has no head: run pii-vault migrate".into());
        Ok(ChainHeads {
            trail: trail.ok_or_else(missing)?,
            requests: requests.ok_or_else(missing)?,
            now,
        })
    }

    async fn trail_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TrailEntry>, StoreError> {
        let rows = sqlx::query(&trail_page_sql())
            .bind(after)
            .bind(through)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| trail_entry_from_row(r, r.try_get("at")?))
            .collect()
    }

    async fn request_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RequestEntry>, StoreError> {
        let rows = sqlx::query(&request_page_sql())
            .bind(after)
            .bind(through)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| request_entry_from_row(r, r.try_get("requested_at")?, r.try_get("subjects")?))
            .collect()
    }

    async fn checkpoint_lines(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(CHECKPOINT_LINES)
            .fetch_all(self.pool())
            .await?)
    }

    async fn last_checkpoint(&self) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(LAST_CHECKPOINT)
            .fetch_optional(self.pool())
            .await?)
    }

    async fn store_checkpoint(
        &self,
        seq: i64,
        at: DateTime<Utc>,
        line: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_checkpoint_store($1, $2, $3)")
            .bind(seq)
            .bind(at)
            .bind(line)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn subject_ledger(
        &self,
        user_id: &str,
        who: &Requester,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query("SELECT * FROM pii_vault_subject_ledger($1, $2, $3)")
            .bind(user_id)
            .bind(&who.reason)
            .bind(&who.claimed_actor)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LedgerEntry {
                    record: r.try_get("record")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    claimed_actor: r.try_get("claimed_actor")?,
                    action: r.try_get("action")?,
                    selector: r.try_get("selector")?,
                    reason: r.try_get("reason")?,
                    status: r.try_get("status")?,
                    approved_by: r.try_get("approved_by")?,
                    approved_at: r.try_get("approved_at")?,
                    fetched_at: r.try_get("fetched_at")?,
                    row_count: r.try_get("row_count")?,
                    message_ids: r.try_get("message_ids")?,
                })
            })
            .collect()
    }

    async fn archive_plan(&self, before: DateTime<Utc>) -> Result<ArchivePoint, StoreError> {
        let r = sqlx::query("SELECT * FROM pii_vault_archive_plan($1)")
            .bind(before)
            .fetch_one(self.pool())
            .await?;
        Ok(ArchivePoint {
            through: r.try_get("through_id")?,
            trail_hash: r.try_get("trail_hash")?,
            trail_count: r.try_get("trail_count")?,
            requests_id: r.try_get("requests_id")?,
            requests_hash: r.try_get("requests_hash")?,
            requests_count: r.try_get("requests_count")?,
            trail_rows: r.try_get("trail_rows")?,
            request_rows: r.try_get("request_rows")?,
            held_back_by: r.try_get("held_back_by")?,
        })
    }

    async fn archive(
        &self,
        through: i64,
        checkpoint: i64,
        who: &Requester,
    ) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT pii_vault_audit_archive($1, $2, $3, $4)")
                .bind(through)
                .bind(checkpoint)
                .bind(&who.reason)
                .bind(&who.claimed_actor)
                .fetch_one(self.pool())
                .await?,
        )
    }
}
