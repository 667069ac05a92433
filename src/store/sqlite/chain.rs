//! The two hash chains on SQLite, written here in the one writer's
//! transactions (Postgres writes them in a trigger): each new audit row or
//! reveal request takes the chain's head, links to it and moves it.
//!
//! The head is taken with an UPDATE before it is read, so that the
//! transaction holds the file's write lock first and no other process can
//! append between the read and the write.

use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite};

use super::{os_user, parse_time, sqlite_time};
use crate::store::trail::{
    request_entry_from_row, trail_entry_from_row, REQUEST_COLUMNS, TRAIL_COLUMNS,
};
use crate::store::{AuditEntry, StoreError};
use crate::trail::{Linked, RequestEntry, TrailEntry, GENESIS};

/// Now, to the millisecond SQLite's times are kept in (the hash covers the
/// time as stored).
pub(super) fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now is a valid time")
}

async fn take_head(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    chain: &str,
) -> Result<(i64, Vec<u8>), StoreError> {
    let (id, hash): (i64, Vec<u8>) = sqlx::query_as(
        "UPDATE audit_chain SET count = count + 1 WHERE chain = $1 RETURNING head_id, head_hash",
    )
    .bind(chain)
    .fetch_one(&mut **tx)
    .await?;
    if id < 0 {
        return Err(StoreError::Permanent(
            "the audit chain is not set up yet: open the database with this version once more"
                .into(),
        ));
    }
    Ok((id, hash))
}

async fn move_head(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    chain: &str,
    id: i64,
    hash: &[u8],
) -> Result<(), StoreError> {
    sqlx::query("UPDATE audit_chain SET head_id = $2, head_hash = $3 WHERE chain = $1")
        .bind(chain)
        .bind(id)
        .bind(hash)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes an audit row with this process's clock and user as the actor,
/// next in the chain; returns its id (one past the head: ids are never
/// reused, not even after an archive).
pub(super) async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    audit: &AuditEntry,
    rows: i64,
) -> Result<i64, StoreError> {
    let (head_id, head_hash) = take_head(tx, "trail").await?;
    let mut e = TrailEntry {
        id: head_id + 1,
        at: now_ms(),
        actor: os_user(),
        claimed_actor: Some(audit.claimed_actor.clone()),
        action: audit.action.clone(),
        target: audit.target.clone(),
        reason: audit.reason.clone(),
        row_count: rows,
        xact: None,
        prev_hash: Vec::new(),
        hash: Vec::new(),
    };
    e.link_after(&head_hash);
    sqlx::query(
        "INSERT INTO audit_log (id, at, actor, claimed_actor, action, target, reason, row_count, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(e.id)
    .bind(sqlite_time(e.at))
    .bind(&e.actor)
    .bind(&e.claimed_actor)
    .bind(&e.action)
    .bind(&e.target)
    .bind(&e.reason)
    .bind(e.row_count)
    .bind(&e.prev_hash)
    .bind(&e.hash)
    .execute(&mut **tx)
    .await?;
    move_head(tx, "trail", e.id, &e.hash).await?;
    Ok(e.id)
}

/// Writes a reveal request (its id is its audit row's), next in the
/// requests' chain.
pub(super) async fn insert_request(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    mut r: RequestEntry,
    status: &str,
) -> Result<(), StoreError> {
    let (head_id, head_hash) = take_head(tx, "requests").await?;
    if r.id <= head_id {
        return Err(StoreError::Permanent(
            "reveal requests are chained in id order".into(),
        ));
    }
    r.link_after(&head_hash);
    let subjects = r
        .subjects
        .as_ref()
        .map(|s| serde_json::to_string(s).expect("user ids serialise"));
    sqlx::query(
        "INSERT INTO reveal_requests (id, selector, value, requested_by, status, users, reason, requested_at, \
         honeytokens, subjects, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(r.id)
    .bind(&r.selector)
    .bind(&r.value)
    .bind(&r.requested_by)
    .bind(status)
    .bind(r.users)
    .bind(&r.reason)
    .bind(sqlite_time(r.requested_at))
    .bind(r.honeytokens)
    .bind(subjects)
    .bind(&r.prev_hash)
    .bind(&r.hash)
    .execute(&mut **tx)
    .await?;
    move_head(tx, "requests", r.id, &r.hash).await?;
    Ok(())
}

/// A stored JSON array of user ids.
pub(super) fn parse_subjects(json: Option<String>) -> Result<Option<Vec<String>>, StoreError> {
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|_| StoreError::Permanent("bad subjects list in reveal_requests".into()))
    })
    .transpose()
}

pub(super) fn trail_row(r: &sqlx::sqlite::SqliteRow) -> Result<TrailEntry, StoreError> {
    trail_entry_from_row(r, parse_time(&r.try_get::<String, _>("at")?)?)
}

pub(super) fn request_row(r: &sqlx::sqlite::SqliteRow) -> Result<RequestEntry, StoreError> {
    request_entry_from_row(
        r,
        parse_time(&r.try_get::<String, _>("requested_at")?)?,
        parse_subjects(r.try_get("subjects")?)?,
    )
}

/// Once, on the first open after migration 0011: hashes the rows already
/// there, in id order, and sets both heads.
pub(super) async fn backfill(pool: &sqlx::SqlitePool) -> Result<(), StoreError> {
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_chain WHERE head_id < 0")
        .fetch_one(pool)
        .await?;
    if pending == 0 {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // The write lock first: a second process opening the file waits here.
    sqlx::query("UPDATE audit_chain SET count = count WHERE head_id < 0")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(&format!(
        "SELECT {TRAIL_COLUMNS} FROM audit_log ORDER BY id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let entries = rows.iter().map(trail_row).collect::<Result<Vec<_>, _>>()?;
    rehash(&mut tx, "trail", "audit_log", entries).await?;
    let rows = sqlx::query(&format!(
        "SELECT {REQUEST_COLUMNS} FROM reveal_requests ORDER BY id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let requests = rows
        .iter()
        .map(request_row)
        .collect::<Result<Vec<_>, _>>()?;
    rehash(&mut tx, "requests", "reveal_requests", requests).await?;
    tx.commit().await?;
    Ok(())
}

/// Links `rows` (in id order) from the genesis on and sets the chain's
/// head, if the chain is still waiting for it.
async fn rehash<T: Linked>(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    chain: &str,
    table: &str,
    rows: Vec<T>,
) -> Result<(), StoreError> {
    let pending: bool = sqlx::query_scalar("SELECT head_id < 0 FROM audit_chain WHERE chain = $1")
        .bind(chain)
        .fetch_one(&mut **tx)
        .await?;
    if !pending {
        return Ok(());
    }
    let mut prev = GENESIS.to_vec();
    let mut last = 0;
    let count = rows.len() as i64;
    for mut e in rows {
        e.link_after(&prev);
        sqlx::query(&format!(
            "UPDATE {table} SET prev_hash = $2, hash = $3 WHERE id = $1"
        ))
        .bind(e.id())
        .bind(e.prev_hash())
        .bind(e.hash())
        .execute(&mut **tx)
        .await?;
        prev = e.hash().to_vec();
        last = e.id();
    }
    sqlx::query("UPDATE audit_chain SET head_id = $2, head_hash = $3, count = $4 WHERE chain = $1")
        .bind(chain)
        .bind(last)
        .bind(&prev)
        .bind(count)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
