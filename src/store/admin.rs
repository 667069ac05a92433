//! The privileged side of the store: key rotation and erasure.
//!
//! Kept apart from [`super::Store`] (what workers and `reveal` use) so that
//! the operations only a rotator or an owner may run are visible as such, and
//! a database role for workers needs none of the rights these queries need.

use async_trait::async_trait;

use super::{AuditEntry, QuarantineRow, StoreError, StoredKey, VaultRow};
use crate::crypto::WrappedKey;

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
}

/// A rotation under way: its audit record (written and committed before
/// anything is read) and the lease that keeps a second rotation of the same
/// kind out. Dropping it releases the lease (once the connection is gone).
pub struct Job {
    pub record_id: i64,
    lock: JobLock,
}

impl Job {
    pub(crate) fn new(record_id: i64, lock: JobLock) -> Self {
        Job { record_id, lock }
    }

    /// Ends the job and releases its lease before returning.
    pub async fn finish(self) {
        match self.lock {
            JobLock::Pg(mut conn) => {
                // Released explicitly: a closed connection's backend lets
                // go only when it has exited, which the next job should
                // not have to race.
                let _ = sqlx::query("SELECT pii_vault_job_release($1)")
                    .bind(self.record_id)
                    .execute(&mut *conn)
                    .await;
                let _ = conn.close().await;
            }
            JobLock::File(file) => drop(file),
        }
    }
}

/// What holds a job's lease: on Postgres the connection whose backend took
/// it (`pii_vault_record`: the lease lives while that backend does, so the
/// connection is closed, not returned to the pool, when the job ends); on
/// SQLite an exclusive lock on a file beside the database.
pub(crate) enum JobLock {
    Pg(sqlx::pool::PoolConnection<sqlx::Postgres>),
    File(std::fs::File),
}

/// A rotation job as stored: what a rerun needs to continue it rather than
/// start over (see `migrations/postgres/functions/40_rotation.sql`).
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
    /// `rotate kek`: the KMS key it re-wraps under, named by the audit
    /// record of the run that started it.
    pub kek_target: Option<String>,
}

/// How a rotation job starts; what it fixes for its whole life.
#[derive(Debug, Clone, Copy)]
pub enum JobStart<'a> {
    /// Retires every active data key; the retired ones become its old set.
    /// `bounds` as [`Maintenance::rotation_bounds`] gives them.
    DataKeys { bounds: &'a [String] },
    /// Stores `key` (a version above every other) as the only active token key.
    TokenKey {
        bounds: &'a [String],
        key: &'a StoredKey,
    },
    /// Re-wraps under the KMS key its audit record names (and allow-lists it).
    Kek,
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

/// What [`Maintenance::init_keys`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Initialised {
    /// The key-encryption key was not on the allow-list and now is.
    pub kek_added: bool,
    pub token_key: bool,
    pub line_id_key: bool,
}

/// A honeytoken login to be written by a worker, among real events, from
/// `due_at` on (see [`crate::honeytoken`]).
#[derive(Debug, Clone)]
pub struct PlannedLogin {
    pub user_id: String,
    /// Its message id in a batch of SQS messages (a UUID) and in a batch of
    /// file lines (`line-` and 32 hex digits).
    pub uuid_id: String,
    pub line_id: String,
    /// The synthetic originals: `{"user_id", "ip", "device_id"}`.
    pub body: String,
    pub due_at: chrono::DateTime<chrono::Utc>,
}

/// The kinds of job that take a lease, as the audit trail names them.
pub const JOB_KINDS: [&str; 3] = ["rotate-kek", "rotate-data-keys", "rotate-token-key"];

/// The privileged operations. On Postgres each write goes through a
/// `SECURITY DEFINER` function that checks the caller's committed, leased
/// job record (rotations) or writes its own audit row beside the change
/// (key set-up, erasure); the rotator role has no direct write anywhere.
#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Puts `kek` on the allow-list and stores `token` (as v1) and
    /// `line_ids` when the database has no key of that purpose yet, each
    /// addition audited. Idempotent; a key passed but not needed is not
    /// stored.
    async fn init_keys(
        &self,
        kek: &str,
        token: Option<&StoredKey>,
        line_ids: Option<&StoredKey>,
        claimed_actor: &str,
    ) -> Result<Initialised, StoreError>;

    /// Starts a job of kind `audit.action` (one of [`JOB_KINDS`]): commits
    /// its audit record and takes its lease, or fails with
    /// [`StoreError::Busy`] while another job of that kind runs.
    async fn begin_job(&self, audit: &AuditEntry, row_count: i64) -> Result<Job, StoreError>;

    /// Vault rows and quarantined messages sealed under any key in `key_ids`.
    async fn count_sealed_under(&self, key_ids: &[String]) -> Result<i64, StoreError>;

    /// Counts logins whose tokens are not of `version` but could be (they
    /// have a vault row): zero after a complete token rotation.
    async fn count_stale_tokens(&self, version: i64) -> Result<i64, StoreError>;

    /// Counts logins whose tokens are not of `version`, whether or not their
    /// originals are still there: a bound for the audit record and the
    /// progress of a token rotation, one table scan cheaper than
    /// [`Maintenance::count_stale_tokens`].
    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError>;

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

    /// Starts a job for the run of audit record `record`, of that record's kind.
    async fn start_rotation(
        &self,
        record: i64,
        start: JobStart<'_>,
    ) -> Result<RotationJob, StoreError>;

    /// The ranges of job `job`, with their cursors.
    async fn rotation_ranges(
        &self,
        record: i64,
        job: i64,
    ) -> Result<Vec<RotationRange>, StoreError>;

    /// Stores a data key the job made for itself (active), noted in the job.
    async fn rotation_new_data_key(
        &self,
        record: i64,
        job: i64,
        key: &StoredKey,
    ) -> Result<(), StoreError>;

    /// Retires one of the job's own data keys.
    async fn rotation_retire_key(
        &self,
        record: i64,
        job: i64,
        key_id: &str,
    ) -> Result<(), StoreError>;

    /// Marks range `no` of `job` done.
    async fn rotation_range_done(&self, record: i64, job: i64, no: i32) -> Result<(), StoreError>;

    /// Ends `job`: destroys what is provably no longer needed (data keys
    /// nothing is sealed under; token versions no recoverable login
    /// carries) and records it. Returns the ids of the keys destroyed.
    async fn finish_rotation(&self, record: i64, job: i64) -> Result<Vec<String>, StoreError>;

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

    /// Up to `limit` quarantined messages under the job's old keys with a
    /// message id above `after`, in message-id order.
    async fn quarantine_chunk(
        &self,
        record: i64,
        job: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError>;

    /// Re-sealed rows of one chunk of range `no` (vault or quarantine, as
    /// the range is), and its cursor moved to `cursor`, in one transaction.
    /// A row is replaced only while it is still under its old key (the
    /// `String`). Returns the rows changed.
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

    /// Up to `limit` logins with a vault row, an id above `after` and tokens
    /// not of the job's version, in id order: the final sweep.
    async fn sweep_chunk(
        &self,
        record: i64,
        job: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError>;

    /// Sets new tokens `(id, masked_ip, masked_device_id)`, of the job's
    /// version, and moves range `no`'s cursor to `cursor` in the same
    /// transaction (`None`: the final sweep, no range). Returns rows changed.
    async fn tokens_chunk(
        &self,
        record: i64,
        job: i64,
        range: Option<(i32, &str)>,
        rows: &[(i64, String, String)],
    ) -> Result<u64, StoreError>;

    /// Stores key `key_id` re-wrapped under the job's target; `false` when it
    /// was destroyed or is already under it.
    async fn rewrap_key(
        &self,
        record: i64,
        job: i64,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// Retires every active data key (a KEK rotation's nudge to workers).
    async fn retire_data_keys(&self, record: i64, job: i64) -> Result<u64, StoreError>;

    /// Erases the user's vault rows and quarantined bodies and writes the
    /// audit entry, in one transaction.
    async fn forget(&self, user_id: &str, audit: &AuditEntry) -> Result<Forgotten, StoreError>;

    /// Erases every vault row of a login before `before` (UTC day) and every
    /// body quarantined before it, destroys the retired data keys left with
    /// nothing to open, and writes the audit entry with the count, in one
    /// transaction. `audit.target` is ignored: the store names the date.
    async fn retention(
        &self,
        before: chrono::NaiveDate,
        audit: &AuditEntry,
    ) -> Result<Retained, StoreError>;

    /// What [`Maintenance::retention`] would erase now: vault rows and
    /// quarantined bodies older than `before`.
    async fn count_older_than(&self, before: chrono::NaiveDate) -> Result<(u64, u64), StoreError>;

    /// Changes the reveal policy (owner only on Postgres; the database
    /// writes the audit row). `None` keeps a limit as it is.
    async fn set_policy(
        &self,
        max_users_per_reveal: Option<i64>,
        max_reveals_per_day: Option<i64>,
    ) -> Result<super::RevealPolicy, StoreError>;

    /// Records synthetic users as honeytokens and the logins workers are to
    /// write for them (owner only on Postgres).
    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[PlannedLogin],
    ) -> Result<(), StoreError>;

    /// A sample of real logins to shape honeytokens like (owner only):
    /// user ids, and how many logins each of them has.
    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError>;

    /// Which of `user_ids` are users already (with logins, or planted).
    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError>;

    /// Reveals that touched a honeytoken, newest first (owner only).
    async fn alarms(&self, filter: &super::AuditFilter) -> Result<Vec<super::Alarm>, StoreError>;

    /// Listens for new reveal requests (Postgres: `LISTEN pii_vault_alarm`,
    /// which every request notifies); the caller looks each up in
    /// [`Maintenance::alarms`].
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
