//! The worker's write path: one transaction per batch, exactly once by
//! message id, fenced against keys a rotation retired.

use async_trait::async_trait;

use super::{LoginRow, QuarantineRow, StoreError, VaultRow};

/// Everything one transaction writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub logins: Vec<(LoginRow, VaultRow)>,
    pub quarantined: Vec<QuarantineRow>,
    /// Encryptions done per data key, added to `vault_keys.usage_count`.
    /// Also a fence: if one of these keys is no longer active (a rotation
    /// retired it), the batch fails with [`StoreError::KeyRetired`].
    pub key_usage: Vec<(String, i64)>,
    /// The token key the batch's tokens were made with; the batch fails
    /// with [`StoreError::KeyRetired`] if it is no longer active. Empty: no
    /// check.
    pub token_key_id: String,
    /// Message ids of the honeytoken logins among `logins`: written like the
    /// rest, counted in the outcome as neither stored nor duplicate (the
    /// outcome counts what the source delivered).
    pub planted: std::collections::HashSet<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

impl std::ops::AddAssign for BatchOutcome {
    fn add_assign(&mut self, o: Self) {
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
    }
}

/// A honeytoken login that is due: a worker writes it among its batch's
/// real events, with the message id shaped like theirs.
#[derive(Clone)]
pub struct DueHoneytoken {
    pub uuid_id: String,
    pub line_id: String,
    /// The synthetic originals (`user_id`, `ip`, `device_id`).
    pub body: String,
}

impl std::fmt::Debug for DueHoneytoken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueHoneytoken")
            .field("uuid_id", &self.uuid_id)
            .field("line_id", &self.line_id)
            .finish_non_exhaustive()
    }
}

/// Writing batches: what a worker does, and all a worker role may do.
#[async_trait]
pub trait Ingest: Send + Sync {
    /// Writes a batch in one transaction: new logins with their vault rows,
    /// new quarantine rows, key usage. Rows whose `message_id` is already
    /// stored are skipped and counted as duplicates.
    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError>;

    /// Honeytoken logins due to be written (at most `limit`) and not written
    /// yet. A worker asks before every batch, whatever the answer, so that
    /// nothing in the database's statistics tells batches with one apart.
    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError>;
}
