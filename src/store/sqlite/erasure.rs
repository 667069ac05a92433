//! [`Erasure`] on SQLite: each erasure and its audit row in one
//! transaction, then a checkpoint that truncates the write-ahead log (so
//! the erased pages are gone from disk too).

use async_trait::async_trait;

use super::keys::destroy_unreferenced;
use super::{insert_audit, SqliteStore};
use crate::store::{AuditEntry, Erasure, Forgotten, Requester, Retained, StoreError};

/// What retention erases (and `--dry-run` counts), `$1` the day as ISO
/// text: vault rows of logins before it, bodies quarantined before it.
/// Dates and times are ISO text here, so they compare as strings; a login's
/// day is on its `user_logins` row (SQLite's vault has none, and stays small
/// enough for the join).
const VAULT_BEFORE: &str =
    "message_id IN (SELECT message_id FROM user_logins WHERE create_date < $1)";
const QUARANTINE_BEFORE: &str = "received_at < $1";

#[async_trait]
impl Erasure for SqliteStore {
    async fn forget(&self, user_id: &str, who: &Requester) -> Result<Forgotten, StoreError> {
        let audit = AuditEntry::new(who, "forget", format!("user_id={user_id}"));
        let mut tx = self.pool.begin().await?;
        let vault_rows = sqlx::query("DELETE FROM vault WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let quarantined = sqlx::query("DELETE FROM quarantine WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let logins_kept: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
        let record = insert_audit(&mut tx, &audit, (vault_rows + quarantined) as i64).await?;
        sqlx::query("INSERT INTO erasure_subjects (record, user_id, rows) VALUES ($1, $2, $3)")
            .bind(record)
            .bind(user_id)
            .bind((vault_rows + quarantined) as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(Forgotten {
            vault_rows,
            quarantined,
            logins_kept: logins_kept as u64,
        })
    }

    async fn retention(
        &self,
        before: chrono::NaiveDate,
        who: &Requester,
    ) -> Result<Retained, StoreError> {
        let day = before.format("%Y-%m-%d").to_string();
        let mut tx = self.pool.begin().await?;
        // Which users lose what, for the subject ledger (user ids only),
        // counted before the rows go.
        let touched: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT user_id, sum(n) FROM ( \
               SELECT user_id, count(*) AS n FROM vault WHERE {VAULT_BEFORE} GROUP BY user_id \
               UNION ALL \
               SELECT user_id, count(*) FROM quarantine WHERE {QUARANTINE_BEFORE} AND user_id IS NOT NULL GROUP BY user_id) \
             GROUP BY user_id"
        ))
        .bind(&day)
        .fetch_all(&mut *tx)
        .await?;
        let vault_rows = sqlx::query(&format!("DELETE FROM vault WHERE {VAULT_BEFORE}"))
            .bind(&day)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let quarantined = sqlx::query(&format!("DELETE FROM quarantine WHERE {QUARANTINE_BEFORE}"))
            .bind(&day)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let undated_kept: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM vault v WHERE NOT EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id AND l.create_date IS NOT NULL)",
        )
        .fetch_one(&mut *tx)
        .await?;
        let keys_destroyed = destroy_unreferenced(&mut tx).await?;
        let audit = AuditEntry::new(
            who,
            "retention",
            format!("before={day} keys_destroyed={}", keys_destroyed.len()),
        );
        let record = insert_audit(&mut tx, &audit, (vault_rows + quarantined) as i64).await?;
        for (user_id, n) in &touched {
            sqlx::query("INSERT INTO erasure_subjects (record, user_id, rows) VALUES ($1, $2, $3)")
                .bind(record)
                .bind(user_id)
                .bind(n)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.scrub().await;
        Ok(Retained {
            vault_rows,
            quarantined,
            undated_kept: undated_kept as u64,
            keys_destroyed,
            partitions_dropped: Vec::new(),
            earlier_drops_finished: 0,
            drops_left: 0,
        })
    }

    async fn count_older_than(&self, before: chrono::NaiveDate) -> Result<(u64, u64), StoreError> {
        let day = before.format("%Y-%m-%d").to_string();
        let (vault_rows, quarantined): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM vault WHERE {VAULT_BEFORE}), \
                    (SELECT count(*) FROM quarantine WHERE {QUARANTINE_BEFORE})"
        ))
        .bind(&day)
        .fetch_one(&self.pool)
        .await?;
        Ok((vault_rows as u64, quarantined as u64))
    }
}
