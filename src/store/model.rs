//! The rows every capability of the store speaks in, and their mapping from
//! either backend's result rows (written once, generic over sqlx's `Row`).
//! Nothing here holds plaintext PII: rows arrive tokenised and sealed.

use chrono::{DateTime, NaiveDate, Utc};

use super::StoreError;
use crate::crypto::{KeyPurpose, WrappedKey};

/// One `user_logins` row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoginRow {
    pub message_id: String,
    pub user_id: String,
    pub device_type: String,
    pub masked_ip: String,
    pub masked_device_id: String,
    /// The token of the IP's /24 or /48 network; `None` where network
    /// tokens are turned off, or on rows stored before they existed (until
    /// a token-key rotation fills them).
    pub masked_ip_net: Option<String>,
    pub locale: Option<String>,
    pub app_version: String,
    /// `None` only on rows converted from the legacy table that had no date.
    pub create_date: Option<NaiveDate>,
    /// Where a file line was read, for the store that dates a line by its
    /// first load (Postgres, by ranges of line numbers: migration 0019).
    /// Not a column: `None` on rows read back, and on SQS messages.
    #[serde(skip)]
    pub line: Option<SourceLine>,
}

/// A file line's input (its source id) and line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine {
    pub source: std::sync::Arc<str>,
    pub line: u64,
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
    /// Where a file reject came from: the input's source id (a file name,
    /// not PII) and line number. `None` for SQS messages.
    pub source: Option<String>,
    pub line: Option<i64>,
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

/// Who asks for a privileged job and why: the part of its audit row the
/// client supplies. Who and when are not part of it: the database sets them
/// (the login of the session, its clock), so that a client cannot name
/// someone else or backdate an entry.
#[derive(Debug, Clone)]
pub struct Requester {
    /// Who the client says is asking (`--actor`, `$USER`): kept beside the
    /// database's own `actor`, never instead of it.
    pub claimed_actor: String,
    pub reason: String,
}

/// An audit entry about to be written by a backend that writes its own
/// (SQLite; Postgres functions write theirs).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub claimed_actor: String,
    pub action: String,
    pub target: String,
    pub reason: String,
}

impl AuditEntry {
    pub fn new(who: &Requester, action: &str, target: impl Into<String>) -> Self {
        AuditEntry {
            claimed_actor: who.claimed_actor.clone(),
            action: action.into(),
            target: target.into(),
            reason: who.reason.clone(),
        }
    }
}

/// A `vault_keys` row as either backend returns it.
#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    id: String,
    purpose: String,
    version: i64,
    kek_id: String,
    wrapped: Option<Vec<u8>>,
    state: String,
    created_at: DateTime<Utc>,
    usage_count: i64,
}

impl TryFrom<KeyRow> for StoredKey {
    type Error = StoreError;

    fn try_from(r: KeyRow) -> Result<Self, StoreError> {
        Ok(StoredKey {
            purpose: KeyPurpose::parse(&r.purpose).ok_or_else(|| {
                StoreError::Permanent(format!("unknown key purpose {}", r.purpose))
            })?,
            state: KeyState::parse(&r.state)
                .ok_or_else(|| StoreError::Permanent(format!("unknown key state {}", r.state)))?,
            id: r.id,
            version: r.version,
            wrapped: WrappedKey {
                kek_id: r.kek_id,
                blob: r.wrapped.unwrap_or_default(),
            },
            created_at: r.created_at,
            usage_count: r.usage_count,
        })
    }
}

/// A login row of either backend. Rows converted from the legacy table may
/// hold NULLs where new rows never do: shown as empty text (and no date),
/// not as an error.
pub(super) fn login_from_row<'r, R>(r: &'r R) -> Result<LoginRow, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<NaiveDate>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let text = |c: &'static str| -> Result<String, StoreError> {
        Ok(r.try_get::<Option<String>, _>(c)?.unwrap_or_default())
    };
    Ok(LoginRow {
        message_id: r.try_get("message_id")?,
        user_id: text("user_id")?,
        device_type: text("device_type")?,
        masked_ip: text("masked_ip")?,
        masked_device_id: text("masked_device_id")?,
        // Read paths that predate the column do not select it.
        masked_ip_net: match r.try_get("masked_ip_net") {
            Err(sqlx::Error::ColumnNotFound(_)) => None,
            other => other?,
        },
        locale: r.try_get("locale")?,
        app_version: text("app_version")?,
        create_date: r.try_get("create_date")?,
        line: None,
    })
}

/// The sealed originals a reveal's join hands out beside `login` (columns
/// `key_id`, `nonce`, `ciphertext`), or `None` where it found no vault row
/// (a forgotten user).
pub(super) fn sealed_beside<'r, R>(
    login: &LoginRow,
    r: &'r R,
) -> Result<Option<VaultRow>, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
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

/// `(id, vault row)` of a token rotation's chunk read, either backend.
pub(super) fn id_and_vault_row<'r, R>(r: &'r R) -> Result<(i64, VaultRow), StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        r.try_get("id")?,
        VaultRow {
            message_id: r.try_get("message_id")?,
            user_id: r
                .try_get::<Option<String>, _>("user_id")?
                .unwrap_or_default(),
            key_id: r.try_get("key_id")?,
            nonce: r.try_get("nonce")?,
            ciphertext: r.try_get("ciphertext")?,
        },
    ))
}

/// A quarantine row of either backend; `received_at` decoded by the caller.
pub(super) fn quarantine_from_row<'r, R>(
    r: &'r R,
    received_at: DateTime<Utc>,
) -> Result<QuarantineRow, StoreError>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(QuarantineRow {
        message_id: r.try_get("message_id")?,
        reason_code: r.try_get("reason_code")?,
        reason: r.try_get("reason")?,
        user_id: r.try_get("user_id")?,
        key_id: r.try_get("key_id")?,
        nonce: r.try_get("nonce")?,
        ciphertext: r.try_get("ciphertext")?,
        received_at,
        // Not every query selects them (the rotations' chunks do not).
        source: r.try_get("source").unwrap_or(None),
        line: r.try_get("line").unwrap_or(None),
    })
}
