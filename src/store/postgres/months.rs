//! Settling months of the vault (functions/48_month_ledgers.sql): a month
//! no longer written to has its rows counted by user once, so that
//! retention, when it drops the month, hands that count to its record
//! instead of reading the month's rows.

use chrono::NaiveDate;
use sqlx::PgPool;

use crate::store::StoreError;

/// Settles, one month a transaction, every month that is due, in a task of
/// its own: a worker calls it when it has just made partitions (once when
/// it starts, then about once a month). Batches go on meanwhile; only late
/// rows of the month being counted wait for it. A failure, or a process
/// that exits first, costs nothing but time: retention counts a month that
/// is not settled itself.
pub(super) fn settle_due_months(pool: PgPool) {
    tokio::spawn(async move {
        loop {
            let settled: Result<Option<NaiveDate>, _> =
                sqlx::query_scalar("SELECT pii_vault_month_settle_next()")
                    .fetch_one(&pool)
                    .await;
            match settled {
                Ok(Some(month)) => tracing::info!(
                    %month,
                    "settled a month of the vault: its rows are counted by user for the subject ledger"
                ),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(
                        error = %StoreError::from(e),
                        "could not settle a month of the vault; retention will count its rows itself"
                    );
                    break;
                }
            }
        }
    });
}
