//! Rejected messages after the fact: listed without their bodies, one body
//! shown under an audit row committed first, and bodies replayed through
//! the current parser once it accepts them, each stored exactly once under
//! its original message id.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{LoginRow, QuarantineRow, StoreError, VaultRow};
use crate::crypto::WrappedKey;

/// A quarantined message as `quarantine list` shows it: no body, no key,
/// no user id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineEntry {
    /// The SQS message id, or a file line's keyed id (`line-…`).
    pub message_id: String,
    pub reason_code: String,
    /// Value-free by construction (it names a field, never its value).
    pub reason: String,
    pub received_at: DateTime<Utc>,
    /// A file reject's source id (its file name, or `--source-id`).
    pub source: Option<String>,
    /// A file reject's line number.
    pub line: Option<i64>,
}

/// Which quarantined messages `quarantine list` shows.
#[derive(Debug, Clone, Default)]
pub struct QuarantineFilter {
    /// Received at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// This reason code only.
    pub reason_code: Option<String>,
}

/// A recorded replay: the id of its audit row and how many quarantined
/// messages it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRequest {
    pub record: i64,
    pub row_count: i64,
}

/// What one call of [`Quarantine::replay_store`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStored {
    /// New logins stored.
    pub stored: u64,
    /// Message ids already in `user_logins` (stored before): not stored again.
    pub already: u64,
}

#[async_trait]
pub trait Quarantine: Send + Sync {
    /// The quarantined messages not replayed yet, oldest first.
    async fn quarantine_list(
        &self,
        filter: &QuarantineFilter,
    ) -> Result<Vec<QuarantineEntry>, StoreError>;

    /// Step one of `quarantine show`: writes and commits the audit row
    /// (action `quarantine-show`), counted against the reveal policy's
    /// daily limit. Returns its id.
    async fn quarantine_show_request(
        &self,
        message_id: &str,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError>;

    /// The data key of a committed show record's body (`None`: no longer
    /// quarantined), to unwrap before step two uses the record up.
    async fn quarantine_show_key(&self, record: i64) -> Result<Option<String>, StoreError>;

    /// Step two: the sealed body of a committed show record of this
    /// login's, once. `None` when the message is no longer quarantined.
    async fn quarantine_show_fetch(&self, record: i64)
        -> Result<Option<QuarantineRow>, StoreError>;

    /// Step one of `quarantine replay`: writes and commits the audit row
    /// (action `quarantine-replay`), fixes the messages it covers (`ids`,
    /// or all when `None`) and registers the data key it seals under.
    async fn replay_request(
        &self,
        ids: Option<&[String]>,
        key_id: &str,
        wrapped: &WrappedKey,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<ReplayRequest, StoreError>;

    /// Step two: the sealed bodies of a committed replay that are still
    /// quarantined.
    async fn replay_fetch(&self, record: i64) -> Result<Vec<QuarantineRow>, StoreError>;

    /// Step three: the logins that now pass, under their original message
    /// ids and sealed under the replay's key, in one transaction; their
    /// quarantine rows become tombstones (no body). A message id already
    /// stored is not stored again.
    async fn replay_store(
        &self,
        record: i64,
        logins: &[(LoginRow, VaultRow)],
    ) -> Result<ReplayStored, StoreError>;

    /// The end of a replay: its data key retired.
    async fn replay_finish(&self, record: i64) -> Result<(), StoreError>;
}
