//! The privileged side of the store: key rotation and erasure.
//!
//! Kept apart from [`super::Store`] (what workers and `reveal` use) so that
//! the operations only a rotator or an owner may run are visible as such, and
//! a database role for workers needs none of the rights these queries need.

use async_trait::async_trait;

use super::{AuditEntry, KeyState, LoginRow, QuarantineRow, StoreError, VaultRow};
use crate::crypto::{KeyPurpose, WrappedKey};

/// What `forget` erased.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub vault_rows: u64,
    pub quarantined: u64,
    pub logins_kept: u64,
}

#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Stores a re-wrapped key (after `rotate kek`).
    async fn update_wrapped(&self, key_id: &str, wrapped: &WrappedKey) -> Result<(), StoreError>;

    /// Sets the state of one key (not of a destroyed one).
    async fn set_key_state(&self, key_id: &str, state: KeyState) -> Result<(), StoreError>;

    /// Moves every key of `purpose` in state `from` (other than `except`) to
    /// `to`; returns their ids. Workers notice on their next commit (their
    /// key fails the fence in `write_batch`) and switch to a fresh key.
    async fn transition_keys(
        &self,
        purpose: KeyPurpose,
        from: KeyState,
        to: KeyState,
        except: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` vault rows sealed under any key in `key_ids`.
    async fn vault_rows_under(
        &self,
        key_ids: &[String],
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError>;

    /// Up to `limit` quarantined rows sealed under any key in `key_ids`.
    async fn quarantine_rows_under(
        &self,
        key_ids: &[String],
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError>;

    /// Replaces sealed rows in one transaction. Each update only applies if
    /// the row is still under its old key (the `String`), so a rerun or a
    /// concurrent rotator cannot clobber newer work. Returns rows changed.
    async fn reseal(
        &self,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError>;

    /// Destroys (erases the wrapped key of) every retired data key that no
    /// vault or quarantine row refers to any more. Returns their ids.
    async fn destroy_unreferenced_data_keys(&self) -> Result<Vec<String>, StoreError>;

    /// Logins with a vault row, `id` greater than `after`, whose `masked_ip`
    /// was not made with token-key `version`, in id order, at most `limit`.
    /// Returns each with its internal id for keyset pagination.
    async fn logins_to_retokenise(
        &self,
        version: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, LoginRow, VaultRow)>, StoreError>;

    /// Sets new tokens: `(message_id, masked_ip, masked_device_id)`.
    async fn update_tokens(&self, rows: &[(String, String, String)]) -> Result<(), StoreError>;

    /// Counts logins whose tokens are not of `version` but could be (they
    /// have a vault row): zero after a complete token rotation.
    async fn count_stale_tokens(&self, version: i64) -> Result<i64, StoreError>;

    /// Erases the user's vault rows and quarantined bodies and writes the
    /// audit entry, in one transaction.
    async fn forget(&self, user_id: &str, audit: &AuditEntry) -> Result<Forgotten, StoreError>;
}

/// The token prefix of a version, as a SQL `LIKE` pattern (`_` escaped).
pub(crate) fn token_like(version: i64) -> String {
    format!("t{version}\\_%")
}
