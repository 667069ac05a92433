//! The embedded default's write path: one SQLite connection of its own,
//! driven directly (rusqlite) on a blocking thread, one call per batch.
//!
//! Through sqlx every statement is a message to its SQLite thread and a
//! wake-up back: two per login (the login and its vault row), which cost
//! about a fifth of a load's time in futex and eventfd calls. Here a batch
//! crosses threads once and its statements run back to back, prepared once
//! per connection. The rest of the SQLite store (reveal, rotations, erasure)
//! stays on sqlx, where a statement's round trip is not what costs.
//!
//! Both drivers link the same SQLite (the one `libsqlite3-sys` builds), and
//! this connection opens the file with the same settings as sqlx's.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::store::error::{own_rule_text, rule_error, DISK_FULL};
use crate::store::{Batch, BatchOutcome, StoreError};

/// How the writer's connection is set up.
pub(super) struct WriterSettings {
    /// Those of every connection to the file (`file_pragmas`), in order.
    pub pragmas: Vec<(&'static str, String)>,
    /// The writer's own page cache.
    pub cache_kib: i64,
    pub busy_timeout: Duration,
}

/// The connection `write_batch` uses: one writer is all SQLite allows, and
/// one connection keeps its page cache from one batch to the next.
pub(super) struct Writer {
    conn: Arc<Mutex<Connection>>,
}

impl Writer {
    /// Opens the (existing, migrated) database file for writing.
    pub fn open(path: &Path, s: &WriterSettings) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(store_error)?;
        conn.busy_timeout(s.busy_timeout).map_err(store_error)?;
        let cache = ("cache_size", format!("-{}", s.cache_kib));
        for (name, value) in s.pragmas.iter().chain([&cache]) {
            // Some pragmas answer with a row (journal_mode), some do not.
            conn.query_row(&format!("PRAGMA {name} = {value}"), [], |_| Ok(()))
                .optional()
                .map_err(store_error)?;
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(store_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Permanent(format!(
                "the SQLite file stays in journal mode {mode}, not WAL"
            )));
        }
        conn.set_prepared_statement_cache_capacity(16);
        Ok(Writer {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Writes `batch` in one transaction. On a multi-threaded runtime (the
    /// binary's) in place, the runtime moving this thread's other tasks
    /// elsewhere meanwhile: no copy of the batch, which at 5,000 rows is a
    /// few MiB of a worker's 64. Elsewhere (a single-threaded test runtime)
    /// on a blocking thread, with a copy.
    pub async fn write(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        let conn = self.conn.clone();
        // A panic while the lock was held cannot leave a transaction open:
        // the transaction's guard rolled it back while unwinding.
        let run = move |batch: &Batch| {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            write_batch(&mut conn, batch)
        };
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| run(batch))
            }
            _ => {
                let batch = batch.clone();
                tokio::task::spawn_blocking(move || run(&batch))
                    .await
                    .map_err(|_| StoreError::Permanent("the SQLite writer panicked".into()))?
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &Batch) -> Result<BatchOutcome, StoreError> {
    // A write transaction from the start (waiting out another writer), so
    // that what it reads below stays true until it commits; and a rotation
    // that retires the fenced keys is ordered before or after it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_error)?;
    for (key_id, n) in &batch.key_usage {
        let hit = tx
            .prepare_cached(
                "UPDATE vault_keys SET usage_count = usage_count + ?1 WHERE id = ?2 AND state = 'active'",
            )
            .and_then(|mut s| s.execute(params![n, key_id]))
            .map_err(store_error)?;
        if hit == 0 {
            return Err(key_state_error(&tx, key_id));
        }
    }
    if !batch.token_key_id.is_empty() {
        let state: Option<String> = tx
            .prepare_cached("SELECT state FROM vault_keys WHERE id = ?1")
            .and_then(|mut s| s.query_row([&batch.token_key_id], |r| r.get(0)).optional())
            .map_err(store_error)?;
        match state.as_deref() {
            Some("active") => {}
            Some(_) => return Err(StoreError::KeyRetired(batch.token_key_id.clone())),
            None => return Err(StoreError::UnknownKey(batch.token_key_id.clone())),
        }
    }
    let mut out = BatchOutcome::default();
    {
        // A login already stored (before, or earlier in this batch) is
        // skipped, and with it its vault row: the vault row of a login
        // stored before (and perhaps forgotten since) must not come back.
        let mut login = tx
            .prepare_cached(
                "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
                 masked_ip_net, locale, app_version, create_date) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .map_err(store_error)?;
        // A vault row left without its login is kept, as it always was.
        let mut sealed = tx
            .prepare_cached(
                "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (message_id) DO NOTHING",
            )
            .map_err(store_error)?;
        for (l, v) in &batch.logins {
            // SQLite's date text, as sqlx writes a NaiveDate.
            let date = l.create_date.map(|d| d.format("%F").to_string());
            let new = login
                .execute(params![
                    l.message_id,
                    l.user_id,
                    l.device_type,
                    l.masked_ip,
                    l.masked_device_id,
                    l.masked_ip_net,
                    l.locale,
                    l.app_version,
                    date
                ])
                .map_err(store_error)?;
            let counted = !batch.planted.contains(&l.message_id);
            if new == 0 {
                out.duplicates += u64::from(counted);
                continue;
            }
            sealed
                .execute(params![
                    v.message_id,
                    v.user_id,
                    v.key_id,
                    v.nonce,
                    v.ciphertext
                ])
                .map_err(store_error)?;
            out.stored += u64::from(counted);
        }
    }
    if !batch.quarantined.is_empty() {
        let mut q = tx
            .prepare_cached(
                "INSERT INTO quarantine (message_id, reason_code, reason, user_id, key_id, nonce, \
                 ciphertext, received_at, source, line) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .map_err(store_error)?;
        for r in &batch.quarantined {
            let done = q
                .execute(params![
                    r.message_id,
                    r.reason_code,
                    r.reason,
                    r.user_id,
                    r.key_id,
                    r.nonce,
                    r.ciphertext,
                    r.received_at.to_rfc3339(),
                    r.source,
                    r.line
                ])
                .map_err(store_error)?;
            if done == 1 {
                out.rejected += 1;
            } else {
                out.duplicates += 1;
            }
        }
    }
    tx.commit().map_err(store_error)?;
    Ok(out)
}

/// Why key `id` failed the fence: retired (or destroyed), or not stored.
fn key_state_error(conn: &Connection, id: &str) -> StoreError {
    match conn.query_row("SELECT count(*) FROM vault_keys WHERE id = ?1", [id], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => StoreError::UnknownKey(id.to_string()),
        Ok(_) => StoreError::KeyRetired(id.to_string()),
        Err(e) => store_error(e),
    }
}

/// The same errors the sqlx side gives for the same failures. SQLite's
/// messages can quote values (a CHECK or UNIQUE failure names the column,
/// a trigger's text is ours), so only our own rules' texts are kept.
fn store_error(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            if let Some((code, text)) = msg.as_deref().and_then(own_rule_text) {
                return rule_error(&code, text);
            }
            let what = format!("SQLite error {} ({:?})", f.extended_code, f.code);
            match f.code {
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Transient(what),
                ErrorCode::DiskFull => StoreError::Permanent(DISK_FULL.into()),
                _ => StoreError::Permanent(what),
            }
        }
        other => StoreError::Permanent(format!("SQLite: {:?}", std::mem::discriminant(&other))),
    }
}
