//! Closed partitions rewritten by a rotation instead of updated in place:
//! each is copied, chunk by chunk, into a new table under the job's new
//! keys or tokens, indexed, then swapped in for the old partition. Only
//! Postgres partitions its tables; SQLite lists no partition to rewrite
//! and rotates everything in place. Every call names its [`Job`]; on
//! Postgres the database checks it, as for [`Chunks`](super::Chunks).

use async_trait::async_trait;

use super::{Job, NewTokens, StoreError, VaultRow};

/// Where the rewrite of one closed partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteState {
    /// Not started, or started by a run that was killed: started over.
    Pending,
    /// Its new table is in place of the old partition.
    Swapped,
    /// Its partition was dropped (retention) before the swap.
    Gone,
}

/// A closed partition a job rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub partition: String,
    pub state: RewriteState,
}

/// A login of a partition being rewritten whose tokens are stale: its id,
/// message id, and sealed originals (`None` when they were erased).
pub type StaleLogin = (i64, String, Option<VaultRow>);

#[async_trait]
pub trait Rewrites: Send + Sync {
    /// The closed partitions the job rewrites, oldest first.
    async fn rewrites(&self, job: &Job) -> Result<Vec<Rewrite>, StoreError>;

    /// A new, empty table for `partition` (a half-filled one left by a
    /// killed run is dropped first); `false` when the partition is gone
    /// (retention dropped it), so there is nothing to rewrite.
    async fn rewrite_begin(&self, job: &Job, partition: &str) -> Result<bool, StoreError>;

    /// Up to `limit` rows of vault partition `partition` under the job's
    /// old keys, message id above `after`, in message-id order.
    async fn rewrite_vault_chunk(
        &self,
        job: &Job,
        partition: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError>;

    /// Re-sealed rows (with the old key each was under) into the new table,
    /// and the rows `keep` (message ids) copied as they are. Returns rows
    /// written.
    async fn rewrite_vault_write(
        &self,
        job: &Job,
        partition: &str,
        rows: &[(VaultRow, String)],
        keep: &[String],
    ) -> Result<u64, StoreError>;

    /// Up to `limit` logins of user_logins partition `partition` with
    /// tokens not of the job's version, id above `after`, in id order.
    async fn rewrite_logins_chunk(
        &self,
        job: &Job,
        partition: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StaleLogin>, StoreError>;

    /// Logins with new tokens into the new table, and the logins `keep`
    /// (ids) copied as they are. Returns rows written.
    async fn rewrite_logins_write(
        &self,
        job: &Job,
        partition: &str,
        rows: &[NewTokens],
        keep: &[i64],
    ) -> Result<u64, StoreError>;

    /// Builds the new table's indexes and its bounds' CHECK.
    async fn rewrite_index(&self, job: &Job, partition: &str) -> Result<(), StoreError>;

    /// Swaps the new table in for the partition, copying first the rows
    /// written to the partition since they were read. Returns those rows.
    async fn rewrite_swap(&self, job: &Job, partition: &str) -> Result<u64, StoreError>;
}
