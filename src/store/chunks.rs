//! The rows a rotation job reads and writes, a chunk at a time: sealed rows
//! under the job's old keys and their re-sealed form, logins with stale
//! tokens and their new tokens, keys re-wrapped. Every call names its
//! [`Job`]; on Postgres the database checks that the job is open, its
//! record committed and the caller's, and its lease held.

use async_trait::async_trait;

use super::{Job, QuarantineRow, StoreError, VaultRow};
use crate::crypto::WrappedKey;

/// Reading and writing under a job.
#[async_trait]
pub trait Chunks: Send + Sync {
    /// Up to `limit` vault rows under the job's old keys with a message id
    /// in `(after, hi]`, in message-id order.
    async fn vault_chunk(
        &self,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError>;

    /// Up to `limit` quarantined messages under the job's old keys with a
    /// message id above `after`, in message-id order.
    async fn quarantine_chunk(
        &self,
        job: &Job,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError>;

    /// Re-sealed rows of one chunk of range `no` (vault or quarantine, as
    /// the range is), and its cursor moved to `cursor`, in one transaction.
    /// A row is replaced only while it is still under its old key (the
    /// `String`). Returns the rows changed.
    async fn reseal_chunk(
        &self,
        job: &Job,
        no: i32,
        cursor: &str,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError>;

    /// Up to `limit` logins with a vault row, a message id in `(after, hi]`
    /// and tokens not of the job's version, in message id order, with their
    /// sealed originals and login ids.
    async fn logins_chunk(
        &self,
        job: &Job,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError>;

    /// Up to `limit` logins with a vault row, an id above `after` and tokens
    /// not of the job's version, in id order: the final sweep.
    async fn sweep_chunk(
        &self,
        job: &Job,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError>;

    /// Sets new tokens, of the job's version, and moves range `no`'s
    /// cursor to `cursor` in the same transaction (`None`: the final sweep,
    /// no range). Returns rows changed.
    async fn tokens_chunk(
        &self,
        job: &Job,
        range: Option<(i32, &str)>,
        rows: &[NewTokens],
    ) -> Result<u64, StoreError>;

    /// Stores key `key_id` re-wrapped under the job's target; `false` when it
    /// was destroyed or is already under it.
    async fn rewrap_key(
        &self,
        job: &Job,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// Retires every active data key (a KEK rotation's nudge to workers).
    async fn retire_data_keys(&self, job: &Job) -> Result<u64, StoreError>;
}

/// A login's tokens under a token-key rotation's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTokens {
    /// The login's row id.
    pub id: i64,
    pub masked_ip: String,
    pub masked_device_id: String,
    /// `None` where network tokens are turned off.
    pub masked_ip_net: Option<String>,
}
