//! Where masked rows, vault ciphertexts, keys, quarantine and audit live.
//!
//! [`Store`] is the boundary; [`sqlite`] is the embedded default and
//! [`postgres`] the production store. Both run the same conformance suite
//! (`tests/it/store_conformance.rs`). Nothing here sees plaintext PII: rows
//! arrive already tokenised and sealed.

pub mod admin;
mod pg_admin;
mod pg_copy;
pub mod postgres;
pub mod sqlite;
mod sqlite_admin;
mod sqlite_writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use futures::stream::{self, BoxStream, Stream, StreamExt, TryStreamExt};

use crate::crypto::{KeyPurpose, WrappedKey};

/// One `user_logins` row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoginRow {
    pub message_id: String,
    pub user_id: String,
    pub device_type: String,
    pub masked_ip: String,
    pub masked_device_id: String,
    pub locale: Option<String>,
    pub app_version: String,
    /// `None` only on rows converted from the legacy table that had no date.
    pub create_date: Option<NaiveDate>,
}

/// One vault row: the sealed originals of a login, bound (by the AEAD's
/// associated data) to `message_id`, `user_id` and `key_id`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VaultRow {
    pub message_id: String,
    pub user_id: String,
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl VaultRow {
    /// The vault row of `login`, as a join hands out its sealed columns.
    pub fn of(login: &LoginRow, key_id: String, nonce: Vec<u8>, ciphertext: Vec<u8>) -> Self {
        VaultRow {
            message_id: login.message_id.clone(),
            user_id: login.user_id.clone(),
            key_id,
            nonce,
            ciphertext,
        }
    }
}

/// The sealed originals a reveal's join hands out beside `login` (columns
/// `key_id`, `nonce`, `ciphertext`), or `None` where it found no vault row
/// (a forgotten user). For either backend's rows.
pub(super) fn sealed_beside<'r, R>(
    login: &LoginRow,
    r: &'r R,
) -> Result<Option<VaultRow>, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(match r.try_get::<Option<String>, _>("key_id")? {
        Some(key_id) => Some(VaultRow::of(
            login,
            key_id,
            r.try_get("nonce")?,
            r.try_get("ciphertext")?,
        )),
        None => None,
    })
}

/// A rejected message: a value-free reason and the sealed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    pub message_id: String,
    pub reason_code: String,
    pub reason: String,
    /// The user id when the body had a usable one (for `forget`).
    pub user_id: Option<String>,
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

/// Everything one transaction writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub logins: Vec<(LoginRow, VaultRow)>,
    pub quarantined: Vec<QuarantineRow>,
    /// Encryptions done per data key, added to `vault_keys.usage_count`.
    /// Also a fence: if one of these keys is no longer active (a rotation
    /// retired it), the batch fails with [`StoreError::KeyRetired`].
    pub key_usage: Vec<(String, i64)>,
    /// The token key the batch's tokens were made with; the batch fails
    /// with [`StoreError::KeyRetired`] if it is no longer active. Empty: no
    /// check.
    pub token_key_id: String,
    /// Message ids of the honeytoken logins among `logins`: written like the
    /// rest, counted in the outcome as neither stored nor duplicate (the
    /// outcome counts what the source delivered).
    pub planted: std::collections::HashSet<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

impl std::ops::AddAssign for BatchOutcome {
    fn add_assign(&mut self, o: Self) {
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// In use for new encryptions / tokens.
    Active,
    /// Still needed to read, no longer used to write.
    Retired,
    /// Wrapped key erased; whatever it sealed is unrecoverable.
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyState::Active),
            "retired" => Some(KeyState::Retired),
            "destroyed" => Some(KeyState::Destroyed),
            _ => None,
        }
    }
}

/// A key as stored in `vault_keys`.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: String,
    pub purpose: KeyPurpose,
    /// Token-key version (1, 2, …); 0 for data keys.
    pub version: i64,
    pub wrapped: WrappedKey,
    pub state: KeyState,
    pub created_at: DateTime<Utc>,
    pub usage_count: i64,
}

/// Which logins a reveal asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    UserId(String),
    MaskedIp(String),
    MaskedDeviceId(String),
}

impl Selector {
    /// The `user_logins` column a stored selector name stands for: the only
    /// names ever put into SQL as a column.
    pub fn column_named(name: &str) -> Option<&'static str> {
        ["user_id", "masked_ip", "masked_device_id"]
            .into_iter()
            .find(|c| *c == name)
    }

    /// The `user_logins` column it selects on, and the value.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Selector::UserId(v) => ("user_id", v),
            Selector::MaskedIp(v) => ("masked_ip", v),
            Selector::MaskedDeviceId(v) => ("masked_device_id", v),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::UserId(v) => write!(f, "user_id={v}"),
            Selector::MaskedIp(v) => write!(f, "masked_ip={v}"),
            Selector::MaskedDeviceId(v) => write!(f, "masked_device_id={v}"),
        }
    }
}

/// An audit entry about to be written. Who and when are not part of it:
/// the database sets them (the login of the session, its clock), so that a
/// client cannot name someone else or backdate an entry.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Who the client says is asking (`--actor`, `$USER`): kept beside the
    /// database's own `actor`, never instead of it.
    pub claimed_actor: String,
    pub action: String,
    pub target: String,
    pub reason: String,
}

/// An audit entry as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The database login that wrote the entry (on SQLite, the operating
    /// system user that ran the command).
    pub actor: String,
    pub claimed_actor: Option<String>,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub row_count: i64,
}

/// A reveal recorded in the audit trail, not yet fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevealRequest {
    /// The id of its audit row.
    pub id: i64,
    /// Logins matching the selector when it was recorded.
    pub row_count: i64,
    pub status: RequestStatus,
}

/// Where a reveal request stands under the reveal policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    /// Within the policy: may be fetched now.
    Granted,
    /// Over the policy: waits for another login's approval.
    Pending,
    /// Approved by another login: the requester may claim and fetch it once.
    Approved,
}

impl RequestStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "granted" => Some(RequestStatus::Granted),
            "pending" => Some(RequestStatus::Pending),
            "approved" => Some(RequestStatus::Approved),
            _ => None,
        }
    }
}

/// The reveal policy: limits checked by the store when a reveal is recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevealPolicy {
    pub max_users_per_reveal: i64,
    pub max_reveals_per_day: i64,
    pub changed_at: DateTime<Utc>,
    pub changed_by: String,
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub limit: i64,
    pub since: Option<DateTime<Utc>>,
    /// The database login (not the claimed actor).
    pub actor: Option<String>,
}

/// A honeytoken login that is due: a worker writes it among its batch's
/// real events, with the message id shaped like theirs.
#[derive(Clone)]
pub struct DueHoneytoken {
    pub uuid_id: String,
    pub line_id: String,
    /// The synthetic originals (`user_id`, `ip`, `device_id`).
    pub body: String,
}

impl std::fmt::Debug for DueHoneytoken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueHoneytoken")
            .field("uuid_id", &self.uuid_id)
            .field("line_id", &self.line_id)
            .finish_non_exhaustive()
    }
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

/// A login with its sealed originals as a reveal returns it: `None` where
/// the originals were erased (or never existed, for legacy rows).
pub type RevealedRow = (LoginRow, Option<VaultRow>);

/// The rows of a reveal, as they come from the database: a reveal of a
/// token shared by many logins is opened and printed row by row, so its
/// size never has to fit in memory.
///
/// Made by [`RevealedRows::start`], which has already read the first row:
/// a refusal by the database (not committed, already fetched, not this
/// login's) is the error of [`Store::reveal_fetch`] itself, not of a later
/// item.
pub struct RevealedRows<'a>(BoxStream<'a, Result<RevealedRow, StoreError>>);

impl<'a> RevealedRows<'a> {
    /// Reads the first item of `rows`, so that an error before any row is
    /// returned here.
    pub async fn start(
        mut rows: BoxStream<'a, Result<RevealedRow, StoreError>>,
    ) -> Result<RevealedRows<'a>, StoreError> {
        match rows.next().await {
            None => Ok(RevealedRows(stream::empty().boxed())),
            Some(first) => {
                let first = first?;
                Ok(RevealedRows(
                    stream::once(async { Ok(first) }).chain(rows).boxed(),
                ))
            }
        }
    }

    /// All rows at once, for callers that know the reveal is small.
    pub async fn collect_all(self) -> Result<Vec<RevealedRow>, StoreError> {
        self.0.try_collect().await
    }
}

impl Stream for RevealedRows<'_> {
    type Item = Result<RevealedRow, StoreError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for RevealedRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevealedRows")
    }
}

/// Errors from a store. Messages carry the kind of failure, never row values:
/// database error texts can quote input, so only the SQLSTATE and the
/// constraint name are kept from them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unreachable or connection lost: {0}")]
    Transient(String),
    #[error("database error: {0}")]
    Permanent(String),
    /// The batch was protected with a key that a rotation has retired
    /// meanwhile; protect it again with the current keys.
    #[error("key {0} was retired by a rotation")]
    KeyRetired(String),
    /// A key id that names no stored key of the right purpose: a bug or a
    /// tampered batch, never worth a retry with fresh keys.
    #[error("unknown key id: {0} is not a stored key")]
    UnknownKey(String),
    /// A stored key is wrapped under a KMS key that is not on the
    /// allow-list, or the database refused to store one.
    #[error("{0}")]
    KekNotAllowed(String),
    /// Another job of the same kind holds its lock.
    #[error("{0}")]
    Busy(String),
    /// The database refused the request by its own rules (an audit record
    /// not committed yet, a request of another login, an expired one, a
    /// fixed key field): the message says which, never a value.
    #[error("refused by the database: {0}")]
    Refused(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match e {
            E::Io(err) => match tls_certificate_error(&err) {
                // Retrying cannot help: the certificate will not change.
                Some(tls) => StoreError::Permanent(format!(
                    "TLS: the server's certificate was refused: {tls} \
                     (check sslrootcert, and that the host in the URL is a name in the certificate)"
                )),
                None => StoreError::Transient(format!("I/O: {}", err.kind())),
            },
            E::PoolTimedOut => StoreError::Transient("timed out waiting for a connection".into()),
            E::PoolClosed => StoreError::Transient("connection pool closed".into()),
            // "server does not support TLS", an unreadable PEM file: a retry
            // cannot fix either.
            E::Tls(e) => StoreError::Permanent(format!("TLS: {e}")),
            E::Protocol(_) => StoreError::Transient("protocol error (connection reset?)".into()),
            E::WorkerCrashed => StoreError::Transient("database worker crashed".into()),
            E::Database(db) if db.code().as_deref() == Some("42501") => {
                // Postgres names only the object here ("permission denied for
                // table vault"), never a value.
                let msg = db.message();
                let what = if msg.starts_with("permission denied for ") && msg.len() <= 200 {
                    msg
                } else {
                    "permission denied"
                };
                StoreError::Permanent(format!(
                    "{what} (SQLSTATE 42501): the database user lacks a privilege this command needs; \
                     it needs the pii_vault_* role meant for this command (see migrations/postgres/0002_roles.sql)"
                ))
            }
            // Raised by our own functions and triggers (Postgres: SQLSTATE
            // PVnnn; SQLite: a message that starts with it); their messages
            // name keys, records and rules, never row values.
            E::Database(db) if own_rule(db.as_ref()).is_some() => {
                let (code, msg) = own_rule(db.as_ref()).expect("checked");
                rule_error(&code, msg)
            }
            E::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // SQLSTATE class 08 (connection), 53 (resources), 57 (operator
                // intervention: shutdown, restart), 40 (serialization) are worth a
                // retry; SQLite BUSY/LOCKED (5, 6) too.
                let transient = ["08", "53", "57", "40"].iter().any(|c| code.starts_with(c))
                    || code == "5"
                    || code == "6"
                    || code == "517";
                let what = match db.constraint() {
                    Some(c) => format!("SQLSTATE {code} on constraint {c}"),
                    None => format!("SQLSTATE {code} ({:?})", db.kind()),
                };
                if transient {
                    StoreError::Transient(what)
                } else {
                    StoreError::Permanent(what)
                }
            }
            E::Migrate(m) => StoreError::Permanent(format!("migration failed: {m}")),
            E::RowNotFound => StoreError::Permanent("row not found".into()),
            E::ColumnDecode { index, .. } => {
                StoreError::Permanent(format!("cannot decode column {index}"))
            }
            E::Decode(_) => StoreError::Permanent("cannot decode a value".into()),
            E::ColumnNotFound(c) => StoreError::Permanent(format!("column {c} not found")),
            E::Configuration(_) => StoreError::Permanent("invalid database URL or options".into()),
            other => StoreError::Permanent(format!("{:?}", std::mem::discriminant(&other))),
        }
    }
}

/// The certificate error of a failed TLS handshake. sqlx reports rustls
/// errors as I/O errors (kind `InvalidData`) that wrap a `rustls::Error`.
fn tls_certificate_error(err: &std::io::Error) -> Option<&rustls::Error> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    matches!(
        tls,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
    .then_some(tls)
}

/// The code and message of an error raised by one of pii-vault's own
/// database rules, if it is one.
fn own_rule(db: &dyn sqlx::error::DatabaseError) -> Option<(String, String)> {
    match db.code() {
        Some(c) if c.starts_with("PV") => Some((c.to_string(), short_message(db.message()))),
        _ => own_rule_text(db.message()),
    }
}

/// An SQLite trigger's `RAISE` text that starts with one of our codes
/// (`PVnnn message`), split into the code and the message.
pub(super) fn own_rule_text(msg: &str) -> Option<(String, String)> {
    let (code, rest) = msg.split_once(' ')?;
    (code.len() == 5 && code.starts_with("PV") && code[2..].bytes().all(|b| b.is_ascii_digit()))
        .then(|| (code.to_string(), short_message(rest)))
}

fn short_message(m: &str) -> String {
    m.chars().take(300).collect()
}

/// The error for one of our own rules' refusals, by its code.
pub(super) fn rule_error(code: &str, msg: String) -> StoreError {
    let key = |m: &str| {
        m.strip_prefix("key ")
            .and_then(|m| m.split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    match code {
        "PV001" => StoreError::KeyRetired(key(&msg)),
        "PV002" => StoreError::KekNotAllowed(msg),
        "PV010" => StoreError::UnknownKey(key(&msg)),
        "PV007" => StoreError::Busy(msg),
        _ => StoreError::Refused(format!("{msg} (SQLSTATE {code})")),
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap liveness query, for start-up checks and `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Writes a batch in one transaction: new logins with their vault rows,
    /// new quarantine rows, key usage. Rows whose `message_id` is already
    /// stored are skipped and counted as duplicates.
    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError>;

    /// Registers this process's own fresh data key (purpose `vault`, state
    /// `active`; the database sets its time and author). The only key a
    /// worker may add.
    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError>;

    /// Retires a data key this login registered (active -> retired), when
    /// it reached its use cap. Returns whether it was retired.
    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError>;

    /// The key-encryption keys that stored keys may be wrapped under.
    async fn allowed_keks(&self) -> Result<Vec<String>, StoreError>;

    async fn get_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;

    /// The newest active token key, if any.
    async fn current_token_key(&self) -> Result<Option<StoredKey>, StoreError>;

    async fn list_keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// Step one of a reveal: writes and commits its audit row (action
    /// `reveal`, the selector as target, the count of matching logins).
    async fn reveal_request(
        &self,
        selector: &Selector,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<RevealRequest, StoreError>;

    /// Step two: the logins of a committed reveal request with their sealed
    /// originals, streamed. On Postgres the database refuses a request that
    /// is not this login's, not committed, already fetched or older than an
    /// hour.
    async fn reveal_fetch<'a>(&'a self, request_id: i64) -> Result<RevealedRows<'a>, StoreError>;

    /// Approves another login's pending request (the second person).
    async fn approve(
        &self,
        request_id: i64,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// The requester's claim on an approved request: a `reveal` audit row
    /// of its own, committed; its id is then passed to
    /// [`Store::reveal_fetch`]. Once per request, within 24 hours.
    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError>;

    async fn policy(&self) -> Result<RevealPolicy, StoreError>;

    /// Honeytoken logins due to be written (at most `limit`) and not written
    /// yet. A worker asks before every batch, whatever the answer, so that
    /// nothing in the database's statistics tells batches with one apart.
    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError>;

    async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
}

/// A store with the privileged operations too (rotation, `forget`).
pub trait AdminStore: Store + admin::Maintenance {}
impl<T: Store + admin::Maintenance> AdminStore for T {}

/// The database backends, told apart once from the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://…` / `postgresql://…`: the production store.
    Postgres,
    /// `sqlite:PATH`: the embedded default, one file, one user.
    Sqlite,
}

impl Backend {
    pub fn of(url: &str) -> anyhow::Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            anyhow::bail!("unsupported database URL scheme: use postgres://… or sqlite:PATH")
        }
    }
}

/// Opens the store a URL names, with its privileged operations.
pub async fn connect_admin(url: &str) -> anyhow::Result<Arc<dyn AdminStore>> {
    Ok(match Backend::of(url)? {
        Backend::Postgres => Arc::new(postgres::PgStore::connect(url).await?),
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(url).await?),
    })
}

/// Opens the store a URL names: `postgres://…` or `sqlite:…`.
pub async fn connect(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = connect_admin(url).await?;
    Ok(store)
}
