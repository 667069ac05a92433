//! [`Erasure`] on Postgres: each erasure one call of its function, which
//! deletes and writes the audit row, with its count, in one transaction
//! (`migrations/postgres/functions/50_erasure.sql`); the rotator has no
//! DELETE of its own.

use async_trait::async_trait;
use chrono::NaiveDate;

use super::PgStore;
use crate::store::{Erasure, Forgotten, Requester, Retained, StoreError};

#[async_trait]
impl Erasure for PgStore {
    async fn forget(&self, user_id: &str, who: &Requester) -> Result<Forgotten, StoreError> {
        // One statement: the function deletes and writes the audit row in
        // the same transaction; the rotator has no DELETE.
        let (vault_rows, quarantined, logins_kept): (i64, i64, i64) = sqlx::query_as(
            "SELECT vault_rows, quarantined, logins_kept FROM pii_vault_forget($1, $2, $3)",
        )
        .bind(user_id)
        .bind(&who.reason)
        .bind(&who.claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Forgotten {
            vault_rows: vault_rows as u64,
            quarantined: quarantined as u64,
            logins_kept: logins_kept as u64,
        })
    }

    async fn retention(&self, before: NaiveDate, who: &Requester) -> Result<Retained, StoreError> {
        let (vault_rows, quarantined, undated_kept, keys_destroyed, partitions_dropped): (
            i64,
            i64,
            i64,
            Vec<String>,
            Vec<String>,
        ) = sqlx::query_as(
            "SELECT vault_rows, quarantined, undated_kept, keys_destroyed, partitions_dropped \
                 FROM pii_vault_retention($1, $2, $3)",
        )
        .bind(before)
        .bind(&who.reason)
        .bind(&who.claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Retained {
            vault_rows: vault_rows as u64,
            quarantined: quarantined as u64,
            undated_kept: undated_kept as u64,
            keys_destroyed,
            partitions_dropped,
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
}
