//! What can go wrong in a store, said without row values: database error
//! texts can quote input, so only the SQLSTATE, the constraint name and the
//! messages of pii-vault's own rules (which name keys and records, never
//! values) are kept. Both backends map their errors here, so that callers
//! tell a retry from a refusal the same way on either.

/// Errors from a store. Messages carry the kind of failure, never row values:
/// database error texts can quote input, so only the SQLSTATE and the
/// constraint name are kept from them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unreachable or connection lost: {0}")]
    Transient(String),
    #[error("database error: {0}")]
    Permanent(String),
    /// The server answers but cannot write for now (its disk is full):
    /// retried like a lost connection, and said as what it is.
    #[error("{0}")]
    Unavailable(String),
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

/// SQLite's disk is full: the transaction was rolled back whole, so a rerun
/// of the same command stores what is missing and nothing twice.
pub(super) const DISK_FULL: &str =
    "the disk holding the SQLite database is full (SQLite error 13): \
     the batch being written was not stored; free space, then run the same command again \
     (what was stored is not stored twice)";

/// The Postgres server's disk is full: writes fail until it has space again,
/// so a worker holds its messages and retries.
const PG_DISK_FULL: &str =
    "the database server's disk is full (SQLSTATE 53100): nothing was written; \
     free space on the server (a worker retries by itself; run any other command again)";

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_) | StoreError::Unavailable(_))
    }
}

/// What the retry loops of workers and commands wait out.
impl crate::retry::Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
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
                     it needs the pii_vault_* role meant for this command (see migrations/postgres/functions/)"
                ))
            }
            // Raised by our own functions and triggers (Postgres: SQLSTATE
            // PVnnn; SQLite: a message that starts with it); their messages
            // name keys, records and rules, never row values.
            E::Database(db) if own_rule(db.as_ref()).is_some() => {
                let (code, msg) = own_rule(db.as_ref()).expect("checked");
                rule_error(&code, msg)
            }
            E::Database(db) if db.code().as_deref() == Some("53100") => {
                StoreError::Unavailable(PG_DISK_FULL.into())
            }
            // SQLite's SQLITE_FULL, as sqlx reports it (the extended code).
            E::Database(db) if db.code().as_deref() == Some("13") => {
                StoreError::Permanent(DISK_FULL.into())
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
