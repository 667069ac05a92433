//! The privileged side of the store: key rotation and erasure.
//!
//! Kept apart from [`super::Store`] (what workers and `reveal` use) so that
//! the operations only a rotator or an owner may run are visible as such, and
//! a database role for workers needs none of the rights these queries need.

use async_trait::async_trait;

use super::{AuditEntry, KeyState, LoginRow, QuarantineRow, StoreError, StoredKey, VaultRow};
use crate::crypto::{KeyPurpose, WrappedKey};

/// What `forget` erased.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub vault_rows: u64,
    pub quarantined: u64,
    pub logins_kept: u64,
}

/// What `forget --before` erased, and what it kept on purpose.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    pub vault_rows: u64,
    pub quarantined: u64,
    /// Vault rows with no date (a legacy row without a login): never erased by date.
    pub undated_kept: u64,
}

/// A rotation under way: its audit record (written and committed before
/// anything is read) and the lock that keeps a second rotation of the same
/// kind out. Dropping it releases the lock.
pub struct Job {
    pub record_id: i64,
    _lock: JobLock,
}

impl Job {
    pub(crate) fn new(record_id: i64, lock: JobLock) -> Self {
        Job {
            record_id,
            _lock: lock,
        }
    }

    /// Ends the job and releases its lock before returning (dropping a job
    /// releases it too, a moment later).
    pub async fn finish(self) {
        match self._lock {
            JobLock::Pg(mut conn) => {
                // Released on the session first: a closed connection's
                // backend lets go of its locks only when it has exited,
                // which the next job should not have to race.
                let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut *conn)
                    .await;
                let _ = conn.close().await;
            }
            JobLock::File(file) => drop(file),
        }
    }
}

/// What holds a job's lock: on Postgres the connection that took the
/// session-level advisory lock (closed, not returned to the pool, when the
/// job ends, which releases the lock); on SQLite an exclusive lock on a file
/// beside the database.
pub(crate) enum JobLock {
    Pg(sqlx::pool::PoolConnection<sqlx::Postgres>),
    File(std::fs::File),
}

/// The kinds of job that take a lock, as the audit trail names them.
pub const JOB_KINDS: [&str; 3] = ["rotate-kek", "rotate-data-keys", "rotate-token-key"];

#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Stores a token or line-id key (or a rotator's data key). Returns
    /// `false` when a token key of that version already exists. On
    /// Postgres only the owner and the rotator may; the database sets the
    /// time and author and refuses a KEK off the allow-list.
    async fn insert_key(&self, key: &StoredKey) -> Result<bool, StoreError>;

    /// Adds a key-encryption key to the allow-list (idempotent).
    async fn allow_kek(&self, kek_id: &str) -> Result<(), StoreError>;

    /// Writes and commits an audit entry; returns its id.
    async fn record(&self, audit: &AuditEntry, row_count: i64) -> Result<i64, StoreError>;

    /// Starts a job of kind `audit.action` (one of [`JOB_KINDS`]): takes its
    /// lock, or fails with [`StoreError::Busy`] while another job of that
    /// kind runs, and commits its audit record.
    async fn begin_job(&self, audit: &AuditEntry, row_count: i64) -> Result<Job, StoreError>;

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

    /// Vault rows and quarantined messages sealed under any key in `key_ids`.
    async fn count_sealed_under(&self, key_ids: &[String]) -> Result<i64, StoreError>;

    /// Up to `limit` vault rows sealed under any key in `key_ids`, with a
    /// message id above `after`, in message-id order, for job `job`.
    async fn vault_rows_under(
        &self,
        job: i64,
        key_ids: &[String],
        after: &str,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError>;

    /// Like [`Maintenance::vault_rows_under`], for quarantined messages.
    async fn quarantine_rows_under(
        &self,
        job: i64,
        key_ids: &[String],
        after: &str,
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

    /// Logins with a vault row, `id` greater than `after`, whose tokens were
    /// not made with token-key `version`, in id order, at most `limit`, for
    /// job `job`. Returns each with its internal id for keyset pagination.
    async fn logins_to_retokenise(
        &self,
        job: i64,
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

    /// Erases every vault row of a login before `before` (UTC day) and every
    /// body quarantined before it, honeytokens excepted, and writes the
    /// audit entry with the count, in one transaction. `audit.target` is
    /// ignored: the store names the date.
    async fn retention(
        &self,
        before: chrono::NaiveDate,
        audit: &AuditEntry,
    ) -> Result<Retained, StoreError>;

    /// What [`Maintenance::retention`] would erase now: vault rows and
    /// quarantined bodies older than `before`, honeytokens excepted.
    async fn count_older_than(&self, before: chrono::NaiveDate) -> Result<(u64, u64), StoreError>;

    /// Changes the reveal policy (owner only on Postgres; the database
    /// writes the audit row). `None` keeps a limit as it is.
    async fn set_policy(
        &self,
        max_users_per_reveal: Option<i64>,
        max_reveals_per_day: Option<i64>,
    ) -> Result<super::RevealPolicy, StoreError>;

    /// Records synthetic users as honeytokens (owner only on Postgres).
    async fn add_honeytokens(&self, user_ids: &[String]) -> Result<(), StoreError>;

    /// Reveals that touched a honeytoken, newest first (owner only).
    async fn alarms(&self, filter: &super::AuditFilter) -> Result<Vec<super::Alarm>, StoreError>;

    /// Listens for new alarms (Postgres: `LISTEN pii_vault_alarm`).
    async fn listen_alarms(&self) -> Result<Box<dyn AlarmListener>, StoreError>;
}

/// New alarms as they are raised.
#[async_trait]
pub trait AlarmListener: Send {
    /// Waits for the next alarm; returns its reveal request id.
    async fn next(&mut self) -> Result<i64, StoreError>;
}

/// The token prefix of a version, as a SQL `LIKE` pattern (`_` escaped).
pub(crate) fn token_like(version: i64) -> String {
    format!("t{version}\\_%")
}
