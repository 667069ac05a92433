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
    /// A connection could not be opened for a reason a retry will not fix
    /// (a wrong user, password or database name; a file that cannot be
    /// created): said as what is wrong and what to do.
    #[error("{0}")]
    Connect(String),
    /// Another job of the same kind holds its lock.
    #[error("{0}")]
    Busy(String),
    /// A lock the statement waited for stayed held past `lock_timeout`
    /// (SQLSTATE 55P03): the transaction was rolled back whole. Not
    /// transient for the retry loops, since the holder may be a long
    /// transaction of anyone's; a caller that knows its lock is short-lived
    /// (a rotation's swap) waits and tries again.
    #[error("{0}")]
    LockTimeout(String),
    /// The database refused the request by its own rules (an audit record
    /// not committed yet, a request of another login, an expired one, a
    /// fixed key field): the message says which, never a value.
    #[error("refused by the database: {0}")]
    Refused(String),
    /// A daily limit of the reveal policy is reached (searches per login,
    /// PV018): said as the database says it, with the limit.
    #[error("{0}")]
    OverLimit(String),
    /// An SQLite file that a command which must not create one was asked
    /// to open does not exist (the path, as given).
    #[error("no database file at {0}")]
    Missing(String),
}

/// SQLite's disk is full: the transaction was rolled back whole, so a rerun
/// of the same command stores what is missing and nothing twice.
pub(super) const DISK_FULL: &str =
    "the disk holding the SQLite database is full (SQLite error 13): \
     the batch being written was not stored; free space, then run the same command again \
     (what was stored is not stored twice)";

/// A lock stayed held past `lock_timeout`; said without the statement.
const PG_LOCK_TIMEOUT: &str =
    "a lock this command needs stayed held by another session past lock_timeout (SQLSTATE 55P03): \
     nothing of this transaction was written; run the same command again (the usual holder is a \
     long open transaction on the tables: pg_stat_activity shows it)";

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
            E::Database(db) if db.code().as_deref() == Some("55P03") => {
                StoreError::LockTimeout(PG_LOCK_TIMEOUT.into())
            }
            // A deadlock (40P01) or a serialization failure (40001): the
            // server is there and rolled the transaction back whole, which
            // is not "connection lost".
            E::Database(db) if db.code().as_deref().is_some_and(|c| c.starts_with("40")) => {
                StoreError::Unavailable(format!(
                    "the transaction lost a conflict with another one (SQLSTATE {}: a deadlock or a \
                     serialization failure) and was rolled back whole: nothing of it was written \
                     (a worker retries by itself; run any other command again)",
                    db.code().unwrap_or_default()
                ))
            }
            // SQLite's SQLITE_FULL, as sqlx reports it (the extended code).
            E::Database(db) if db.code().as_deref() == Some("13") => {
                StoreError::Permanent(DISK_FULL.into())
            }
            E::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // SQLSTATE class 08 (connection), 53 (resources), 57 (operator
                // intervention: shutdown, restart) are worth a retry (40, the
                // transaction conflicts, above); SQLite BUSY/LOCKED (5, 6) too.
                let transient = ["08", "53", "57"].iter().any(|c| code.starts_with(c))
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

/// A failed attempt to open a connection to Postgres at `at` (`HOST:PORT`,
/// or the socket path), said as what is wrong and what to do. The server's
/// own texts name the user or the database; only their gist is kept here,
/// so that the message holds nothing but the address (which is
/// configuration, not data; a password never is part of it).
pub fn pg_connect_error(e: sqlx::Error, at: &str) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Io(err) => match err.kind() {
            std::io::ErrorKind::ConnectionRefused => StoreError::Unavailable(format!(
                "connection refused at {at} — is Postgres running there, on that port? \
                 (check the host and port in the database URL)"
            )),
            _ if err.to_string().contains("lookup address") => StoreError::Unavailable(format!(
                "the database host of {at} is not known (DNS cannot resolve it): \
                 check the host in the database URL"
            )),
            std::io::ErrorKind::TimedOut => StoreError::Unavailable(format!(
                "no answer from {at} (timed out): check the host and port in the database URL, \
                 and that no firewall drops the connection"
            )),
            std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                StoreError::Unavailable(format!(
                    "{at} cannot be reached ({}): check the host in the database URL and the network",
                    err.kind()
                ))
            }
            std::io::ErrorKind::NotFound => StoreError::Unavailable(format!(
                "no Postgres socket at {at}: is Postgres running, with its socket in that directory?"
            )),
            _ => match StoreError::from(E::Io(err)) {
                StoreError::Transient(m) => {
                    StoreError::Unavailable(format!("cannot connect to {at}: {m}"))
                }
                other => other,
            },
        },
        E::Tls(msg) if msg.to_string().contains("does not support TLS") => StoreError::Connect(format!(
            "the server at {at} does not offer TLS, and the database URL requires it (sslmode=require, \
             verify-ca or verify-full): enable ssl on the server, or change sslmode"
        )),
        E::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let msg = db.message();
            let said = match code.as_str() {
                "28000" if msg.contains("does not exist") => {
                    "the user in the database URL does not exist on the server (SQLSTATE 28000): \
                     fix the user name, or create that login (CREATE ROLE … LOGIN) and grant it \
                     the pii_vault_* role this command needs"
                }
                "28000" if msg.contains("not permitted to log in") => {
                    "the user in the database URL is a role that may not log in (NOLOGIN, SQLSTATE 28000): \
                     connect as a login user granted that role (CREATE ROLE … LOGIN IN ROLE …)"
                }
                "28000" if msg.contains("no encryption") => {
                    "the server accepts this connection only over TLS (pg_hba.conf, SQLSTATE 28000): \
                     add sslmode=require (or verify-full) to the database URL"
                }
                "28000" if msg.contains("pg_hba.conf") => {
                    "the server's pg_hba.conf allows no connection for this host, user, database and \
                     TLS mode (SQLSTATE 28000): check the database URL, or ask the DBA to allow it"
                }
                "28000" => {
                    "the server refused this login (SQLSTATE 28000): check the user in the database URL"
                }
                "28P01" => {
                    "password authentication failed for the user in the database URL (SQLSTATE 28P01): \
                     check the password (in the URL or its password= parameter)"
                }
                "3D000" => {
                    "the database named in the URL does not exist on the server (SQLSTATE 3D000): \
                     fix the name, or create it (createdb) and run `pii-vault migrate` as its owner"
                }
                "53300" => {
                    return StoreError::Unavailable(
                        "the server has no free connection slots (SQLSTATE 53300, too many connections): \
                         try again later, run fewer workers or --writers, or raise max_connections"
                            .into(),
                    )
                }
                "57P03" => {
                    return StoreError::Unavailable(
                        "the server is starting up or shutting down (SQLSTATE 57P03): try again in a moment"
                            .into(),
                    )
                }
                _ => return StoreError::from(E::Database(db)),
            };
            StoreError::Connect(said.into())
        }
        E::PoolTimedOut => StoreError::Unavailable(format!(
            "no answer from {at} (timed out): check the host and port in the database URL"
        )),
        other => StoreError::from(other),
    }
}

/// A failed attempt to open the SQLite file at `path`, said as what to do.
pub fn sqlite_open_error(e: sqlx::Error, path: &std::path::Path) -> StoreError {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    };
    // SQLite's extended codes keep the primary code in the low byte.
    let primary = code
        .as_deref()
        .and_then(|c| c.parse::<u32>().ok())
        .map(|c| c & 0xff);
    let path = path.display();
    match primary {
        Some(14) => StoreError::Connect(format!(
            "cannot create or open the SQLite file {path} (SQLite error 14): its directory must exist \
             and be writable by this user (SQLite writes journal files beside it); run from another \
             directory or set --database-url sqlite:PATH"
        )),
        Some(8) => StoreError::Connect(format!(
            "the SQLite file {path} is read-only for this user (SQLite error 8): make it and its \
             directory writable, or set --database-url sqlite:PATH"
        )),
        Some(26) => StoreError::Connect(format!(
            "{path} is not an SQLite database (SQLite error 26): point --database-url at pii-vault's file"
        )),
        _ => StoreError::from(e),
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
        "PV018" => StoreError::OverLimit(msg),
        _ => StoreError::Refused(format!("{msg} (SQLSTATE {code})")),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::StoreError;

    /// A database error with only a SQLSTATE, as the server would send it.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {} with the value 203.0.113.9 in it", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "error with the value 203.0.113.9 in it"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn mapped(code: &'static str) -> StoreError {
        sqlx::Error::Database(Box::new(Coded(code))).into()
    }

    #[test]
    fn a_lost_conflict_is_retried_and_said_as_what_it_is_without_the_servers_text() {
        for code in ["40P01", "40001"] {
            let e = mapped(code);
            assert!(e.is_transient(), "{code}");
            let said = e.to_string();
            assert!(
                said.contains(code) && said.contains("rolled back whole"),
                "{said}"
            );
            assert!(!said.contains("connection lost"), "{said}");
            assert!(!said.contains("203.0.113.9"), "{said}");
        }
        let lost = mapped("57P01");
        assert!(lost.is_transient());
        assert!(lost.to_string().contains("connection lost"));
        assert!(!mapped("23505").is_transient());
    }
}
