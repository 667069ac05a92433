//! [`Erasure`] on Postgres: each erasure one call of its function, which
//! deletes and writes the audit row, with its count, in one transaction
//! (`migrations/postgres/functions/50_erasure.sql`); the rotator has no
//! DELETE of its own.

use async_trait::async_trait;
use chrono::NaiveDate;

use super::PgStore;
use crate::store::{Erasure, Forgotten, Requester, Retained, StoreError};

/// Connections that drop retention's detached months at once. The time a
/// drop takes is the kernel freeing the month's files at `COMMIT`, which
/// overlaps across connections even on two cores (6 GB of tables in the
/// page cache: 2.6 s in one transaction, 1.9 s on two connections, 1.0-1.5
/// s on four); the pool holds eight.
const DROP_CONNECTIONS: usize = 4;

impl PgStore {
    /// Drops every month retention has detached and not yet dropped, one a
    /// transaction, on [`DROP_CONNECTIONS`] connections; returns the tables
    /// dropped. Called before retention's own transaction (what a stopped
    /// run left) and after it (its own months).
    async fn drop_detached_months(&self) -> Result<Vec<String>, StoreError> {
        let one_connection = || async {
            let mut dropped = Vec::new();
            while let Some(name) =
                sqlx::query_scalar::<_, Option<String>>("SELECT pii_vault_retention_drop_next()")
                    .fetch_one(self.pool())
                    .await?
            {
                dropped.push(name);
            }
            Ok::<_, StoreError>(dropped)
        };
        let all =
            futures::future::try_join_all((0..DROP_CONNECTIONS).map(|_| one_connection())).await?;
        Ok(all.into_iter().flatten().collect())
    }
}

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
        // What a stopped run left is dropped first, so that what is dropped
        // after the erasure is its own; a failure here must not hold up the
        // erasure, and the drops after it try again and report.
        let earlier = match self.drop_detached_months().await {
            Ok(dropped) => dropped.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, "months an earlier retention detached could not be dropped yet; erasing first");
                0
            }
        };
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
        let drops_left = async {
            self.drop_detached_months().await?;
            sqlx::query_scalar::<_, i64>("SELECT pii_vault_retention_drops_left()")
                .fetch_one(self.pool())
                .await
                .map_err(StoreError::from)
        };
        let drops_left = drops_left.await.map_err(|e| {
            StoreError::Permanent(format!(
                "the erasure is done and on the audit record, but dropping the months it detached \
                 stopped: {e}. Those months are readable by no role; `pii-vault forget --before` \
                 run again drops them"
            ))
        })?;
        Ok(Retained {
            vault_rows: vault_rows as u64,
            quarantined: quarantined as u64,
            undated_kept: undated_kept as u64,
            keys_destroyed,
            partitions_dropped,
            earlier_drops_finished: earlier,
            drops_left: drops_left as u64,
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
