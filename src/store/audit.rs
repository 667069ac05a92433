//! The trail and what watches it: every privileged act's audit row as the
//! database wrote it, the alarms of reveals that touched a honeytoken, and
//! the planting of those traps.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;
use crate::trail::TrailEntry;

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub limit: i64,
    pub since: Option<DateTime<Utc>>,
    /// The database login (not the claimed actor).
    pub actor: Option<String>,
}

/// A reveal that touched a honeytoken. Only the owner can read these.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alarm {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: &'static str,
    pub request_id: i64,
    pub target: String,
    pub honeytokens: i64,
}

/// A honeytoken login to be written by a worker, among real events, from
/// `due_at` on (the honeytoken module plans them).
#[derive(Debug, Clone)]
pub struct PlannedLogin {
    pub user_id: String,
    /// Its message id in a batch of SQS messages (a UUID) and in a batch of
    /// file lines (`line-` and 32 hex digits).
    pub uuid_id: String,
    pub line_id: String,
    /// The synthetic originals: `{"user_id", "ip", "device_id"}`.
    pub body: String,
    pub due_at: DateTime<Utc>,
}

/// New alarms as they are raised.
#[async_trait]
pub trait AlarmListener: Send {
    /// Waits for the next notification; returns the request id it names
    /// (every request notifies: look it up in [`Audit::alarms`]).
    async fn next(&mut self) -> Result<i64, StoreError>;
}

/// Reading the trail; the owner's alarms and honeytokens.
#[async_trait]
pub trait Audit: Send + Sync {
    /// Entries, newest first.
    async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<TrailEntry>, StoreError>;

    /// Reveals that touched a honeytoken, newest first (owner only).
    async fn alarms(&self, filter: &AuditFilter) -> Result<Vec<Alarm>, StoreError>;

    /// Listens for new reveal requests (Postgres: `LISTEN pii_vault_alarm`,
    /// which every request notifies); the caller looks each up in
    /// [`Audit::alarms`].
    async fn listen_alarms(&self) -> Result<Box<dyn AlarmListener>, StoreError>;

    /// Records synthetic users as honeytokens and the logins workers are to
    /// write for them (owner only on Postgres).
    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[PlannedLogin],
    ) -> Result<(), StoreError>;

    /// A sample of real users to shape honeytokens like (owner only): user
    /// ids, and how many logins each of them has.
    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError>;

    /// Which of `user_ids` are users already (with logins, or planted).
    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError>;
}
