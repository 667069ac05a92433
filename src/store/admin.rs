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

/// A rotation job as stored: what a rerun needs to continue it rather than
/// start over (see `migrations/postgres/0005_rotation_scale.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationJob {
    pub id: i64,
    /// The audit record of the run that started it.
    pub started_by: i64,
    /// `rotate data-keys`: the keys whose rows it re-encrypts, fixed when
    /// the job starts, so that a rerun never takes the new keys of the run
    /// it continues for old ones.
    pub old_keys: Vec<String>,
    /// `rotate token-key`: the version it makes current, fixed when the job
    /// starts, so that a rerun does not make yet another one.
    pub token_version: Option<i64>,
}

/// One key range of a rotation job: rows of `table` with a key in
/// `(lo, hi]` (no `hi`: to the end). `cursor` is the last key whose chunk
/// is committed: a rerun continues after it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RotationRange {
    pub no: i32,
    #[sqlx(rename = "tbl")]
    pub table: String,
    pub lo: String,
    pub hi: Option<String>,
    pub cursor: String,
    pub rows_done: i64,
    pub done: bool,
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

    /// Boundaries for splitting the main table of a job of `kind` into up to
    /// `parts` key ranges of about equal size: the first element is the
    /// start (below every key), each next one the upper end of a range.
    async fn rotation_bounds(&self, kind: &str, parts: usize) -> Result<Vec<String>, StoreError>;

    /// Takes over the unfinished job of `kind` for the run of audit record
    /// `record`, if there is one; retires the data keys the run that left it
    /// made for itself.
    async fn resume_rotation(
        &self,
        record: i64,
        kind: &str,
    ) -> Result<Option<RotationJob>, StoreError>;

    /// Starts a job of `kind` with the ranges `bounds` describe (see
    /// [`Maintenance::rotation_bounds`]). For `rotate data-keys` this
    /// retires every active data key and fixes the old set, atomically.
    async fn start_rotation(
        &self,
        record: i64,
        kind: &str,
        token_version: Option<i64>,
        bounds: &[String],
    ) -> Result<RotationJob, StoreError>;

    /// The ranges of job `job`, with their cursors.
    async fn rotation_ranges(
        &self,
        record: i64,
        job: i64,
    ) -> Result<Vec<RotationRange>, StoreError>;

    /// Notes a data key the job made for itself.
    async fn rotation_add_key(&self, record: i64, job: i64, key_id: &str)
        -> Result<(), StoreError>;

    /// Marks range `no` of `job` done.
    async fn rotation_range_done(&self, record: i64, job: i64, no: i32) -> Result<(), StoreError>;

    /// Marks `job` finished: a later run starts a new one.
    async fn finish_rotation(&self, record: i64, job: i64) -> Result<(), StoreError>;

    /// Up to `limit` vault rows under the job's old keys with a message id
    /// in `(after, hi]`, in message-id order.
    async fn vault_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError>;

    /// [`Maintenance::reseal`] of one chunk of range `no`, and its cursor
    /// moved to `cursor`, in one transaction.
    async fn reseal_chunk(
        &self,
        record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError>;

    /// Up to `limit` logins with a vault row, a message id in `(after, hi]`
    /// and tokens not of the job's version, in message id order, with their
    /// sealed originals.
    async fn logins_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError>;

    /// Sets new tokens `(id, masked_ip, masked_device_id)` of one chunk of
    /// range `no`, and moves its cursor to `cursor`, in one transaction.
    async fn tokens_chunk(
        &self,
        record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        rows: &[(i64, String, String)],
    ) -> Result<(), StoreError>;

    /// Counts logins whose tokens are not of `version`, whether or not their
    /// originals are still there: a bound for the audit record and the
    /// progress of a token rotation, one table scan cheaper than
    /// [`Maintenance::count_stale_tokens`].
    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError>;

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
