//! The verifiable trail: both hash chains as stored, the copies of signed
//! checkpoints, the subject ledger and the archive. The chains themselves
//! are written by whatever writes an audit row or a reveal request (a
//! Postgres trigger, the SQLite writer); this capability reads them back
//! for `audit verify`, `export` and `checkpoint`, which the auditor role
//! may run.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Requester, StoreError};
use crate::trail::{ChainState, RequestEntry, TrailEntry};

/// Where both chains stand, read in one snapshot, with the database's clock.
#[derive(Debug, Clone)]
pub struct ChainHeads {
    pub trail: ChainState,
    pub requests: ChainState,
    pub now: DateTime<Utc>,
}

/// One line of a data subject's ledger: a reveal request that returned a
/// row of the user, or an erasure that touched the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerEntry {
    /// The audit record (a request's id is its audit record's).
    pub record: i64,
    pub at: DateTime<Utc>,
    /// The database login.
    pub actor: String,
    pub claimed_actor: Option<String>,
    /// `reveal`, `reveal-request`, `forget`, `retention`.
    pub action: String,
    /// For reveals: `user_id`, `masked_ip` or `masked_device_id` (the value
    /// is left out: for tokens it means nothing to the ledger's readers).
    pub selector: Option<String>,
    pub reason: String,
    /// For reveals: `granted`, `pending` or `approved`.
    pub status: Option<String>,
    pub approved_by: Option<String>,
    pub approved_at: Option<DateTime<Utc>>,
    /// When its rows were handed out (`None`: never fetched).
    pub fetched_at: Option<DateTime<Utc>>,
    /// The user's rows it covered (reveals) or erased (erasures).
    pub row_count: i64,
    /// The user's logins a reveal covered.
    pub message_ids: Option<Vec<String>>,
}

/// What an archive through one trail row takes, and where both chains
/// stand at that row (what its checkpoint signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivePoint {
    pub through: i64,
    pub trail_hash: Vec<u8>,
    pub trail_count: i64,
    pub requests_id: i64,
    pub requests_hash: Vec<u8>,
    pub requests_count: i64,
    /// Rows the database holds through it: what the archive deletes.
    pub trail_rows: i64,
    pub request_rows: i64,
    /// Why it stops short of the date asked for, if it does.
    pub held_back_by: Option<String>,
}

/// Reading the chains; keeping checkpoints; the ledger; the archive.
#[async_trait]
pub trait Trail: Send + Sync {
    async fn chain_heads(&self) -> Result<ChainHeads, StoreError>;

    /// Up to `limit` audit rows with an id above `after` (and at most
    /// `through`), in id order.
    async fn trail_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TrailEntry>, StoreError>;

    /// The same for reveal requests (the owner and the auditor only).
    async fn request_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RequestEntry>, StoreError>;

    /// Every stored checkpoint line, in sequence order.
    async fn checkpoint_lines(&self) -> Result<Vec<String>, StoreError>;

    /// The newest stored checkpoint line.
    async fn last_checkpoint(&self) -> Result<Option<String>, StoreError>;

    /// Keeps a copy of checkpoint `seq`; refused unless it is the next one,
    /// chains to the last one and names rows the database holds.
    async fn store_checkpoint(
        &self,
        seq: i64,
        at: DateTime<Utc>,
        line: &str,
    ) -> Result<(), StoreError>;

    /// Every reveal that returned a row of `user_id` and every erasure that
    /// touched it, oldest first; records the look (`subject-access`).
    async fn subject_ledger(
        &self,
        user_id: &str,
        who: &Requester,
    ) -> Result<Vec<LedgerEntry>, StoreError>;

    /// How far an archive of the rows written before `before` may go now.
    async fn archive_plan(&self, before: DateTime<Utc>) -> Result<ArchivePoint, StoreError>;

    /// Deletes the trail through `through` once archive checkpoint
    /// `checkpoint` (stored) names it as it is; writes the `audit-archive`
    /// row and returns its id (owner only).
    async fn archive(
        &self,
        through: i64,
        checkpoint: i64,
        who: &Requester,
    ) -> Result<i64, StoreError>;
}

/// An audit row of either backend; `at` decoded by the caller. A hash the
/// database holds as NULL (never written so by pii-vault) reads as empty,
/// which no check accepts.
pub(super) fn trail_entry_from_row<'r, R>(
    r: &'r R,
    at: DateTime<Utc>,
) -> Result<TrailEntry, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(TrailEntry {
        id: r.try_get("id")?,
        at,
        actor: r.try_get("actor")?,
        claimed_actor: r.try_get("claimed_actor")?,
        action: r.try_get("action")?,
        target: r.try_get("target")?,
        reason: r.try_get("reason")?,
        row_count: r.try_get("row_count")?,
        xact: r.try_get("xact")?,
        prev_hash: r
            .try_get::<Option<Vec<u8>>, _>("prev_hash")?
            .unwrap_or_default(),
        hash: r.try_get::<Option<Vec<u8>>, _>("hash")?.unwrap_or_default(),
    })
}

/// A reveal request of either backend; its time and users decoded by the
/// caller.
pub(super) fn request_entry_from_row<'r, R>(
    r: &'r R,
    requested_at: DateTime<Utc>,
    subjects: Option<Vec<String>>,
) -> Result<RequestEntry, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RequestEntry {
        id: r.try_get("id")?,
        requested_at,
        requested_by: r.try_get("requested_by")?,
        selector: r.try_get("selector")?,
        value: r.try_get("value")?,
        reason: r.try_get("reason")?,
        users: r.try_get("users")?,
        honeytokens: r.try_get("honeytokens")?,
        subjects,
        prev_hash: r
            .try_get::<Option<Vec<u8>>, _>("prev_hash")?
            .unwrap_or_default(),
        hash: r.try_get::<Option<Vec<u8>>, _>("hash")?.unwrap_or_default(),
    })
}

/// A chain's row of `audit_chain`, either backend.
pub(super) fn chain_state_from_row<'r, R>(r: &'r R) -> Result<ChainState, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ChainState {
        head_id: r.try_get("head_id")?,
        head_hash: r.try_get("head_hash")?,
        count: r.try_get("count")?,
        base_id: r.try_get("base_id")?,
        base_hash: r.try_get("base_hash")?,
        base_count: r.try_get("base_count")?,
    })
}

/// The columns [`trail_entry_from_row`] reads, in `SELECT` order.
pub(super) const TRAIL_COLUMNS: &str =
    "id, at, actor, claimed_actor, action, target, reason, row_count, xact, prev_hash, hash";

/// The columns [`request_entry_from_row`] reads (with `requested_at` and
/// `subjects`).
pub(super) const REQUEST_COLUMNS: &str =
    "id, requested_at, requested_by, selector, value, reason, users, honeytokens, subjects, prev_hash, hash";

/// Both backends' page of the trail: rows after `$1`, through `$2` (NULL:
/// to the end), at most `$3`.
pub(super) fn trail_page_sql() -> String {
    format!(
        "SELECT {TRAIL_COLUMNS} FROM audit_log \
         WHERE id > $1 AND id <= coalesce($2, 9223372036854775807) ORDER BY id LIMIT $3"
    )
}

/// The same for reveal requests.
pub(super) fn request_page_sql() -> String {
    format!(
        "SELECT {REQUEST_COLUMNS} FROM reveal_requests \
         WHERE id > $1 AND id <= coalesce($2, 9223372036854775807) ORDER BY id LIMIT $3"
    )
}

/// Both backends' checkpoint copies, oldest first, and the newest.
pub(super) const CHECKPOINT_LINES: &str = "SELECT line FROM audit_checkpoints ORDER BY seq";
pub(super) const LAST_CHECKPOINT: &str =
    "SELECT line FROM audit_checkpoints ORDER BY seq DESC LIMIT 1";
