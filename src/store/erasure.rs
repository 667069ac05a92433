//! Erasure: the audited deletion of recoverable originals, one user's or
//! everything before a day. The masked logins stay; see SECURITY.md for
//! what an erasure does and does not reach (backups).

use async_trait::async_trait;
use chrono::NaiveDate;

use super::{Requester, StoreError};

/// What `forget` erased.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub vault_rows: u64,
    pub quarantined: u64,
    pub logins_kept: u64,
}

/// What `forget --before` erased, and what it kept on purpose.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retained {
    pub vault_rows: u64,
    pub quarantined: u64,
    /// Vault rows with no date (a legacy row without a login): never erased by date.
    pub undated_kept: u64,
    /// Retired data keys that sealed nothing any more, destroyed.
    pub keys_destroyed: Vec<String>,
    /// Monthly vault partitions wholly before the day, dropped instead of
    /// deleted from (Postgres; SQLite has none).
    pub partitions_dropped: Vec<String>,
    /// Months an earlier retention detached and, stopped before its drops,
    /// left to this one to drop.
    pub earlier_drops_finished: u64,
    /// Detached months still to be dropped after this run's drops: held by
    /// another session meanwhile, dropped by the next run.
    pub drops_left: u64,
}

/// Erasing originals, each with its audit row in the same transaction.
#[async_trait]
pub trait Erasure: Send + Sync {
    /// Erases the user's vault rows and quarantined bodies.
    async fn forget(&self, user_id: &str, who: &Requester) -> Result<Forgotten, StoreError>;

    /// Erases every vault row of a login before `before` (UTC day) and every
    /// body quarantined before it, and destroys the retired data keys left
    /// with nothing to open.
    async fn retention(&self, before: NaiveDate, who: &Requester) -> Result<Retained, StoreError>;

    /// What [`Erasure::retention`] would erase now: vault rows and
    /// quarantined bodies older than `before`.
    async fn count_older_than(&self, before: NaiveDate) -> Result<(u64, u64), StoreError>;
}
