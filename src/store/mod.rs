//! Where masked rows, vault ciphertexts, keys, quarantine and the audit
//! trail live.
//!
//! One small trait per capability, each in the file of its name: [`Ingest`]
//! (a worker's batches), [`Keys`], [`Reveal`], [`Audit`] (the trail, alarms
//! and honeytokens), [`Trail`] (the hash chains, checkpoints, subject
//! ledger and archive), [`Jobs`] (rotations: leases and jobs), [`Chunks`]
//! (the rows a job reads and writes), [`Erasure`] and [`Quarantine`]
//! (listing, showing and replaying rejected messages), [`Search`] (the
//! record of each `tokenize`). [`Store`] is all
//! of them, and what a backend is: [`postgres`] (production) and [`sqlite`]
//! (the embedded default) each hold the same file names, each implementing
//! the trait of that name, and run the same conformance suite
//! (`tests/it/store_conformance.rs`). What a login may really do is the
//! database's to decide, not the trait's: on Postgres the roles' grants and
//! functions (`migrations/postgres/functions/`) hold it.
//!
//! Nothing above this module names a backend: commands ask the store's
//! [`Profile`] what it is good for.

pub mod audit;
pub mod chunks;
pub mod erasure;
pub mod error;
pub mod ingest;
pub mod jobs;
pub mod keys;
pub mod model;
pub mod postgres;
pub mod quarantine;
pub mod reveal;
pub mod rewrite;
pub mod roles;
pub mod search;
pub mod sqlite;
pub mod trail;

use std::sync::Arc;

use async_trait::async_trait;

pub use audit::{Alarm, AlarmListener, Audit, AuditFilter, PlannedLogin};
pub use chunks::{Chunks, NewTokens};
pub use erasure::{Erasure, Forgotten, Retained};
pub use error::StoreError;
pub use ingest::{Batch, BatchOutcome, DueHoneytoken, Ingest};
pub use jobs::{Job, JobKind, JobStart, Jobs, Lease, RotationRange};
pub use keys::{Initialised, Keys};
pub use model::{
    AuditEntry, KeyState, LoginRow, QuarantineRow, Requester, SourceLine, StoredKey, VaultRow,
};
pub use quarantine::{Quarantine, QuarantineEntry, QuarantineFilter, ReplayRequest, ReplayStored};
pub use reveal::{
    PolicyChange, RequestStatus, Reveal, RevealPolicy, RevealRequest, RevealedRow, RevealedRows,
    Selector,
};
pub use rewrite::{Rewrite, RewriteState, Rewrites, StaleLogin};
pub use roles::{MigrateOptions, RolePrefix};
pub use search::{Search, SearchKind};
pub use trail::{ArchivePoint, ChainHeads, LedgerEntry, Trail};

/// What a backend is good for, so that commands choose their settings
/// without naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Batches protected and committed at once by a run from a file, and
    /// by a run from a queue.
    pub file_writers: usize,
    pub queue_writers: usize,
    /// Messages per transaction from a file (larger: each commit writes
    /// every index page it touched), and from a queue.
    pub file_batch: usize,
    pub queue_batch: usize,
    /// Key ranges a rotation may work at once (1: one writer).
    pub max_rotation_jobs: usize,
    /// Owned by whoever runs the command (one file, one user): it migrates
    /// itself and sets up its keys on first use. A server store is
    /// migrated by its owner role, so that workers need no DDL rights.
    pub self_managed: bool,
    /// New alarms can be waited for (`audit --alarms --follow`).
    pub follows_alarms: bool,
}

/// A backend: every capability, and its own upkeep.
#[async_trait]
pub trait Store:
    Ingest
    + Keys
    + Reveal
    + Search
    + Audit
    + Trail
    + Jobs
    + Chunks
    + Rewrites
    + Erasure
    + Quarantine
    + Send
    + Sync
{
    fn profile(&self) -> Profile;

    /// Applies pending migrations (and, on Postgres, the current functions
    /// and grants) under the role names the database already has.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_with(&MigrateOptions::default()).await
    }

    /// [`Store::migrate`], with what `pii-vault migrate`'s flags ask for.
    async fn migrate_with(&self, options: &MigrateOptions) -> Result<(), StoreError>;

    /// Cheap liveness query, for start-up checks and `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether logins carry `masked_ip_net` (`migrate --no-network-tokens`
    /// turns it off). Any role may ask: the answer is in the catalogue.
    async fn network_tokens(&self) -> Result<bool, StoreError>;
}

/// The database backends, told apart once from the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `postgres://…` / `postgresql://…`: the production store.
    Postgres,
    /// `sqlite:PATH`: the embedded default, one file, one user.
    Sqlite,
}

impl Backend {
    fn of(url: &str) -> anyhow::Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            anyhow::bail!("unsupported database URL scheme: use postgres://… or sqlite:PATH")
        }
    }
}

/// Opens the store a URL names: `postgres://…` or `sqlite:…`.
pub async fn connect(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match Backend::of(url)? {
        Backend::Postgres => Arc::new(postgres::PgStore::connect(url).await?),
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(url).await?),
    })
}

/// One versioned migration of this build, and whether the database has it.
#[derive(Debug, Clone)]
pub struct MigrationState {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

/// What `migrate` would do to a database (`migrate --status`, `--dry-run`).
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    /// False for an SQLite file that does not exist yet (it is not created).
    pub exists: bool,
    pub migrations: Vec<MigrationState>,
    /// Files every `migrate` re-applies whatever is pending (Postgres: the
    /// functions, views and grants).
    pub reapplied: Vec<&'static str>,
    /// Postgres: the prefix of the database's role names, once migrated.
    pub role_prefix: Option<RolePrefix>,
    /// Postgres, once partitioned: the monthly partitions of the vault and
    /// what waits in its default partition, in one line.
    pub partitions: Option<String>,
}

/// The migrations of this build against the database `url` names, read
/// without changing anything: no migration, no lock, no file created.
pub async fn migration_status(url: &str) -> anyhow::Result<MigrationStatus> {
    Ok(match Backend::of(url)? {
        Backend::Postgres => postgres::migration_status(url).await?,
        Backend::Sqlite => sqlite::migration_status(url).await?,
    })
}

/// `migrate --prepare-partitions`: on a Postgres database of the
/// single-table layout, builds online the indexes migration 0017 needs, and
/// reports each step to `say`. Returns how many it built (0: nothing to
/// prepare, already partitioned or already prepared).
pub async fn prepare_partitions(
    url: &str,
    say: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<u32> {
    match Backend::of(url)? {
        Backend::Postgres => Ok(postgres::prepare_partitions(url, say).await?),
        Backend::Sqlite => anyhow::bail!(
            "--prepare-partitions is for Postgres: an SQLite database has no partitions"
        ),
    }
}

/// The states of `migrator`'s migrations given the versions applied.
fn states(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> Vec<MigrationState> {
    migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationState {
            version: m.version,
            description: m.description.to_string(),
            applied: applied.contains(&m.version),
        })
        .collect()
}

/// Opens the store a URL names, which must already exist: an SQLite file
/// that does not is [`StoreError::Missing`] and is not created. For the
/// commands that read or act on a store but never set one up.
pub async fn connect_existing(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match Backend::of(url)? {
        Backend::Postgres => Arc::new(postgres::PgStore::connect(url).await?),
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect_existing(url).await?),
    })
}

/// Whether `url` names a store this build can open (its scheme), without
/// opening it.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    Backend::of(url).map(|_| ())
}
