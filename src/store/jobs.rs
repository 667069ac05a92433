//! Rotation jobs as the store keeps them: a job outlives the process that
//! runs it (a killed run is resumed), one runs per kind at a time (the
//! lease), and every read of ciphertext and every write of keys,
//! ciphertext or tokens is made under a job whose audit record is
//! committed and whose lease the caller holds (checked by the database on
//! Postgres, `migrations/postgres/functions/40_rotation.sql`).

use async_trait::async_trait;

use super::{Requester, StoreError, StoredKey};

/// The kinds of job, as the audit trail names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Kek,
    DataKeys,
    TokenKey,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [JobKind::Kek, JobKind::DataKeys, JobKind::TokenKey];

    /// The audit action (and the database's name of the kind).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Kek => "rotate-kek",
            JobKind::DataKeys => "rotate-data-keys",
            JobKind::TokenKey => "rotate-token-key",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What holds a lease for its run, released when the run ends (a Postgres
/// connection whose backend took it; a lock file on SQLite).
#[async_trait]
pub trait LeaseHolder: Send {
    /// Lets go of the lease of audit record `record` before returning.
    async fn release(self: Box<Self>, record: i64);
}

/// A run's claim on a kind of job: its audit record (written and committed
/// before anything is read) and the lease that keeps a second run of the
/// same kind out. Dropping it lets go as the holder goes.
pub struct Lease {
    pub record: i64,
    pub kind: JobKind,
    /// In a mutex only so that a lease can be shared between tasks (its
    /// holder is used once, at the end).
    holder: std::sync::Mutex<Box<dyn LeaseHolder>>,
}

impl Lease {
    pub(crate) fn new(record: i64, kind: JobKind, holder: Box<dyn LeaseHolder>) -> Self {
        Lease {
            record,
            kind,
            holder: std::sync::Mutex::new(holder),
        }
    }

    /// Ends the run and releases its lease before returning.
    pub async fn finish(self) {
        let holder = self.holder.into_inner().unwrap_or_else(|e| e.into_inner());
        holder.release(self.record).await;
    }
}

/// A job as this run works on it: the stored job, taken over by the run's
/// record. Every call under a job names both, and the database checks that
/// they belong together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    /// The audit record of this run.
    pub record: i64,
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

/// How a job starts; what it fixes for its whole life.
#[derive(Debug, Clone, Copy)]
pub enum JobStart<'a> {
    /// Retires every active data key; the retired ones become its old set.
    /// `bounds` as [`Jobs::rotation_bounds`] gives them.
    DataKeys { bounds: &'a [String] },
    /// Stores `key` (a version above every other) as the only active token key.
    TokenKey {
        bounds: &'a [String],
        key: &'a StoredKey,
    },
    /// Re-wraps under the KMS key its audit record names (and allow-lists it).
    Kek,
}

impl JobStart<'_> {
    pub fn kind(&self) -> JobKind {
        match self {
            JobStart::DataKeys { .. } => JobKind::DataKeys,
            JobStart::TokenKey { .. } => JobKind::TokenKey,
            JobStart::Kek => JobKind::Kek,
        }
    }
}

/// One key range of a job: rows of `table` with a key in `(lo, hi]` (no
/// `hi`: to the end). `cursor` is the last key whose chunk is committed: a
/// rerun continues after it.
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

/// Rotations: their leases and their jobs (the rows a job reads and writes
/// are [`Chunks`](super::Chunks)).
#[async_trait]
pub trait Jobs: Send + Sync {
    /// Commits the audit record of a run of `kind` (target, reason, the
    /// rows it expects) and takes the kind's lease, or fails with
    /// [`StoreError::Busy`] while another run of that kind holds it.
    async fn begin_job(
        &self,
        kind: JobKind,
        target: &str,
        who: &Requester,
        row_count: i64,
    ) -> Result<Lease, StoreError>;

    /// Takes over the unfinished job of the lease's kind, if there is one;
    /// retires the data keys the run that left it made for itself.
    async fn resume_job(&self, lease: &Lease) -> Result<Option<Job>, StoreError>;

    /// Starts a job of the lease's kind.
    async fn start_job(&self, lease: &Lease, start: JobStart<'_>) -> Result<Job, StoreError>;

    /// The ranges of `job`, with their cursors.
    async fn job_ranges(&self, job: &Job) -> Result<Vec<RotationRange>, StoreError>;

    /// Stores a data key the job made for itself (active), noted in the job.
    async fn job_new_data_key(&self, job: &Job, key: &StoredKey) -> Result<(), StoreError>;

    /// Retires one of the job's own data keys.
    async fn job_retire_key(&self, job: &Job, key_id: &str) -> Result<(), StoreError>;

    /// Marks range `no` of `job` done.
    async fn range_done(&self, job: &Job, no: i32) -> Result<(), StoreError>;

    /// Ends `job`: destroys what is provably no longer needed (data keys
    /// nothing is sealed under; token versions no recoverable login
    /// carries) and records it. Returns the ids of the keys destroyed.
    async fn finish_job(&self, job: &Job) -> Result<Vec<String>, StoreError>;

    /// Vault rows and quarantined messages sealed under any key in `key_ids`.
    async fn count_sealed_under(&self, key_ids: &[String]) -> Result<i64, StoreError>;

    /// Counts logins whose tokens are not of `version` but could be (they
    /// have a vault row): zero after a complete token rotation.
    async fn count_stale_tokens(&self, version: i64) -> Result<i64, StoreError>;

    /// Counts logins whose tokens are not of `version`, whether or not their
    /// originals are still there: a bound for the audit record and the
    /// progress of a token rotation, one table scan cheaper than
    /// [`Jobs::count_stale_tokens`].
    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError>;

    /// Boundaries for splitting the main table of a job of `kind` into up to
    /// `parts` key ranges of about equal size: the first element is the
    /// start (below every key), each next one the upper end of a range.
    async fn rotation_bounds(&self, kind: JobKind, parts: usize)
        -> Result<Vec<String>, StoreError>;
}

/// The token prefix of a version, as a SQL `LIKE` pattern (`_` escaped).
pub(super) fn token_like(version: i64) -> String {
    format!("t{version}\\_%")
}
