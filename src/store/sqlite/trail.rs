//! [`Trail`] on SQLite: the chains as the writer (`chain`) keeps them, the
//! checkpoints' copies, the subject ledger and the archive, with the same
//! checks as the Postgres functions, in the one writer's transactions.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite};

use super::chain::{request_row, trail_row};
use super::{insert_audit, parse_time, sqlite_time, SqliteStore};
use crate::store::trail::{
    chain_state_from_row, request_page_sql, trail_page_sql, CHECKPOINT_LINES, LAST_CHECKPOINT,
};
use crate::store::{
    ArchivePoint, AuditEntry, ChainHeads, LedgerEntry, Requester, StoreError, Trail,
};
use crate::trail::{Checkpoint, Kind, RequestEntry, TrailEntry};

fn refused(msg: String) -> StoreError {
    StoreError::Refused(msg)
}

fn opt_time(s: Option<String>) -> Result<Option<DateTime<Utc>>, StoreError> {
    s.filter(|s| !s.is_empty())
        .map(|s| parse_time(&s))
        .transpose()
}

#[async_trait]
impl Trail for SqliteStore {
    async fn chain_heads(&self) -> Result<ChainHeads, StoreError> {
        let mut tx = self.pool.begin().await?;
        let heads = heads(&mut tx).await?;
        tx.commit().await?;
        Ok(heads)
    }

    async fn trail_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TrailEntry>, StoreError> {
        let rows = sqlx::query(&trail_page_sql())
            .bind(after)
            .bind(through)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(trail_row).collect()
    }

    async fn request_page(
        &self,
        after: i64,
        through: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RequestEntry>, StoreError> {
        let rows = sqlx::query(&request_page_sql())
            .bind(after)
            .bind(through)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(request_row).collect()
    }

    async fn checkpoint_lines(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(CHECKPOINT_LINES)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn last_checkpoint(&self) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(LAST_CHECKPOINT)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn store_checkpoint(
        &self,
        seq: i64,
        at: DateTime<Utc>,
        line: &str,
    ) -> Result<(), StoreError> {
        let c = Checkpoint::parse(line, 1).map_err(|e| refused(e.to_string()))?;
        let mut tx = self.pool.begin().await?;
        // The write lock first (see chain.rs).
        sqlx::query("UPDATE audit_chain SET count = count WHERE chain = 'trail'")
            .execute(&mut *tx)
            .await?;
        let last: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, line FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let last_seq = last.as_ref().map_or(0, |(s, _)| *s);
        if seq != last_seq + 1 || c.seq != seq {
            return Err(refused(format!(
                "checkpoint {seq} is not the next one (the last stored is {last_seq}): run the checkpoint again"
            )));
        }
        let last_sig = match &last {
            Some((_, l)) => Some(
                Checkpoint::parse(l, 1)
                    .map_err(|e| refused(e.to_string()))?
                    .sig,
            ),
            None => None,
        };
        if c.prev_sig != last_sig {
            return Err(refused(format!(
                "checkpoint {seq} does not chain to checkpoint {last_seq}"
            )));
        }
        let heads = heads(&mut tx).await?;
        for (name, head, base, table) in [
            ("trail", &c.trail, heads.trail.base_id, "audit_log"),
            (
                "requests",
                &c.requests,
                heads.requests.base_id,
                "reveal_requests",
            ),
        ] {
            if head.head_id > base {
                let held: Option<Option<Vec<u8>>> =
                    sqlx::query_scalar(&format!("SELECT hash FROM {table} WHERE id = $1"))
                        .bind(head.head_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if held.flatten().map(hex::encode).as_deref() != Some(head.head_hash.as_str()) {
                    return Err(refused(format!(
                        "checkpoint {seq} names {name} row {} with another hash than this database holds",
                        head.head_id
                    )));
                }
            }
        }
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, at, line, stored_by, stored_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(seq)
        .bind(sqlite_time(at))
        .bind(line)
        .bind(super::os_user())
        .bind(sqlite_time(Utc::now()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn subject_ledger(
        &self,
        user_id: &str,
        who: &Requester,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE audit_chain SET count = count WHERE chain = 'trail'")
            .execute(&mut *tx)
            .await?;
        let mut out = Vec::new();
        let reveals = sqlx::query(
            "SELECT r.id, r.requested_at, r.requested_by, a.claimed_actor, a.action, r.selector, r.reason, \
                    r.status, r.approved_by, r.approved_at, r.fetched_at \
             FROM reveal_requests r JOIN audit_log a ON a.id = r.id \
             WHERE EXISTS (SELECT 1 FROM json_each(r.subjects) WHERE value = $1) \
                OR (r.subjects IS NULL AND r.selector = 'user_id' AND r.value = $1)",
        )
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in &reveals {
            let id: i64 = r.try_get("id")?;
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT rr.message_id FROM reveal_request_rows rr JOIN user_logins l ON l.message_id = rr.message_id \
                 WHERE rr.request_id = $1 AND l.user_id = $2 ORDER BY rr.message_id",
            )
            .bind(id)
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
            out.push(LedgerEntry {
                record: id,
                at: parse_time(&r.try_get::<String, _>("requested_at")?)?,
                actor: r.try_get("requested_by")?,
                claimed_actor: r.try_get("claimed_actor")?,
                action: r.try_get("action")?,
                selector: r.try_get("selector")?,
                reason: r.try_get("reason")?,
                status: r.try_get("status")?,
                approved_by: r.try_get("approved_by")?,
                approved_at: opt_time(r.try_get("approved_at")?)?,
                fetched_at: opt_time(r.try_get("fetched_at")?)?,
                row_count: ids.len() as i64,
                message_ids: Some(ids),
            });
        }
        let erasures = sqlx::query(
            "SELECT a.id, a.at, a.actor, a.claimed_actor, a.action, a.reason, e.rows \
             FROM erasure_subjects e JOIN audit_log a ON a.id = e.record WHERE e.user_id = $1",
        )
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in &erasures {
            out.push(LedgerEntry {
                record: r.try_get("id")?,
                at: parse_time(&r.try_get::<String, _>("at")?)?,
                actor: r.try_get("actor")?,
                claimed_actor: r.try_get("claimed_actor")?,
                action: r.try_get("action")?,
                selector: None,
                reason: r.try_get("reason")?,
                status: None,
                approved_by: None,
                approved_at: None,
                fetched_at: None,
                row_count: r.try_get("rows")?,
                message_ids: None,
            });
        }
        // Each quarantined body of the user's that was shown.
        let shows = sqlx::query(
            "SELECT a.id, a.at, a.actor, a.claimed_actor, a.action, a.reason, s.fetched_at, s.message_id \
             FROM quarantine_reveals s JOIN audit_log a ON a.id = s.record WHERE s.user_id = $1",
        )
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in &shows {
            let fetched_at = opt_time(r.try_get("fetched_at")?)?;
            out.push(LedgerEntry {
                record: r.try_get("id")?,
                at: parse_time(&r.try_get::<String, _>("at")?)?,
                actor: r.try_get("actor")?,
                claimed_actor: r.try_get("claimed_actor")?,
                action: r.try_get("action")?,
                selector: Some("message_id".into()),
                reason: r.try_get("reason")?,
                status: None,
                approved_by: None,
                approved_at: None,
                row_count: i64::from(fetched_at.is_some()),
                fetched_at,
                message_ids: Some(vec![r.try_get("message_id")?]),
            });
        }
        out.sort_by_key(|e| (e.at, e.record));
        let audit = AuditEntry::new(who, "subject-access", format!("user_id={user_id}"));
        insert_audit(&mut tx, &audit, out.len() as i64).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn archive_plan(&self, before: DateTime<Utc>) -> Result<ArchivePoint, StoreError> {
        let mut tx = self.pool.begin().await?;
        let want: i64 =
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM audit_log WHERE at < $1")
                .bind(sqlite_time(before))
                .fetch_one(&mut *tx)
                .await?;
        let (cut, why) = cut(&mut tx, want).await?;
        let mut p = point(&mut tx, cut).await?;
        p.held_back_by = why;
        tx.commit().await?;
        Ok(p)
    }

    async fn archive(
        &self,
        through: i64,
        checkpoint: i64,
        who: &Requester,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE audit_chain SET count = count WHERE chain = 'trail'")
            .execute(&mut *tx)
            .await?;
        let heads = heads(&mut tx).await?;
        if through <= heads.trail.base_id {
            return Err(refused(format!(
                "rows through {through} are archived already"
            )));
        }
        let line: Option<String> =
            sqlx::query_scalar("SELECT line FROM audit_checkpoints WHERE seq = $1")
                .bind(checkpoint)
                .fetch_optional(&mut *tx)
                .await?;
        let c = line
            .and_then(|l| Checkpoint::parse(&l, 1).ok())
            .filter(|c| c.kind == Kind::Archive && c.trail.head_id == through)
            .ok_or_else(|| {
                refused(format!(
                    "checkpoint {checkpoint} is not an archive checkpoint through row {through}"
                ))
            })?;
        let (may, why) = cut(&mut tx, through).await?;
        if may < through {
            return Err(refused(format!(
                "rows through {through} cannot be archived now: {}",
                why.unwrap_or_default()
            )));
        }
        let p = point(&mut tx, through).await?;
        if hex::encode(&p.trail_hash) != c.trail.head_hash
            || p.trail_count != c.trail.count
            || p.requests_id != c.requests.head_id
            || hex::encode(&p.requests_hash) != c.requests.head_hash
            || p.requests_count != c.requests.count
        {
            return Err(refused(format!(
                "checkpoint {checkpoint} does not describe the rows through {through} as they are"
            )));
        }
        for (chain, id, hash, count) in [
            ("trail", through, &p.trail_hash, p.trail_count),
            (
                "requests",
                p.requests_id,
                &p.requests_hash,
                p.requests_count,
            ),
        ] {
            sqlx::query(
                "UPDATE audit_chain SET base_id = $2, base_hash = $3, base_count = $4 WHERE chain = $1",
            )
            .bind(chain)
            .bind(id)
            .bind(hash)
            .bind(count)
            .execute(&mut *tx)
            .await?;
        }
        for sql in [
            "DELETE FROM reveal_request_rows WHERE request_id <= $1",
            "DELETE FROM reveal_requests WHERE id <= $1",
            "DELETE FROM erasure_subjects WHERE record <= $1",
            "DELETE FROM rotation_ranges WHERE job_id IN \
             (SELECT id FROM rotation_jobs WHERE max(started_by, held_by) <= $1)",
            "DELETE FROM rotation_jobs WHERE max(started_by, held_by) <= $1",
            "DELETE FROM audit_log WHERE id <= $1",
        ] {
            sqlx::query(sql).bind(through).execute(&mut *tx).await?;
        }
        let audit = AuditEntry::new(
            who,
            "audit-archive",
            format!(
                "through={through} checkpoint={checkpoint} requests={}",
                p.request_rows
            ),
        );
        let id = insert_audit(&mut tx, &audit, p.trail_rows).await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(id)
    }
}

async fn heads(tx: &mut sqlx::Transaction<'_, Sqlite>) -> Result<ChainHeads, StoreError> {
    let rows = sqlx::query(
        "SELECT chain, head_id, head_hash, count, base_id, base_hash, base_count, \
         strftime('%Y-%m-%dT%H:%M:%fZ', 'now') AS now FROM audit_chain",
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut trail = None;
    let mut requests = None;
    let mut now = Utc::now();
    for r in &rows {
        let state = chain_state_from_row(r)?;
        now = parse_time(&r.try_get::<String, _>("now")?)?;
        match r.try_get::<String, _>("chain")?.as_str() {
            "trail" => trail = Some(state),
            _ => requests = Some(state),
        }
    }
    let missing = || StoreError::Permanent("the audit chain has no head".into());
    Ok(ChainHeads {
        trail: trail.ok_or_else(missing)?,
        requests: requests.ok_or_else(missing)?,
        now,
    })
}

/// How far an archive that wants rows through `want` may go (as
/// `pii_vault_archive_cut` on Postgres; SQLite has no leases).
async fn cut(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    want: i64,
) -> Result<(i64, Option<String>), StoreError> {
    let mut cut = want;
    let mut why = None;
    let lim: Option<i64> = sqlx::query_scalar(
        "SELECT min(x) FROM ( \
           SELECT min(started_by, held_by) AS x FROM rotation_jobs WHERE finished_at IS NULL \
           UNION ALL SELECT id FROM reveal_requests WHERE fetched_at IS NULL AND requested_at > $1)",
    )
    .bind(sqlite_time(Utc::now() - chrono::Duration::hours(25)))
    .fetch_one(&mut **tx)
    .await?;
    if let Some(lim) = lim.filter(|l| *l <= cut) {
        cut = lim - 1;
        why = Some(format!(
            "row {lim} is still in use (an open rotation, or a recent reveal)"
        ));
    }
    loop {
        let lim: Option<i64> = sqlx::query_scalar(
            "SELECT min(min(started_by, held_by)) FROM rotation_jobs \
             WHERE min(started_by, held_by) <= $1 AND max(started_by, held_by) > $1",
        )
        .bind(cut)
        .fetch_one(&mut **tx)
        .await?;
        let Some(lim) = lim else { break };
        cut = lim - 1;
        why = Some(format!(
            "a rotation job's records from row {lim} on are archived together"
        ));
    }
    let base: i64 = sqlx::query_scalar("SELECT base_id FROM audit_chain WHERE chain = 'trail'")
        .fetch_one(&mut **tx)
        .await?;
    Ok((cut.max(base), why))
}

/// Where both chains stand at trail row `through`.
async fn point(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    through: i64,
) -> Result<ArchivePoint, StoreError> {
    let h = heads(tx).await?;
    let trail_hash: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT hash FROM audit_log WHERE id = $1")
            .bind(through)
            .fetch_optional(&mut **tx)
            .await?
            .flatten();
    let trail_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE id <= $1")
        .bind(through)
        .fetch_one(&mut **tx)
        .await?;
    let (requests_id, request_rows): (Option<i64>, i64) =
        sqlx::query_as("SELECT max(id), count(*) FROM reveal_requests WHERE id <= $1")
            .bind(through)
            .fetch_one(&mut **tx)
            .await?;
    let requests_id = requests_id.unwrap_or(h.requests.base_id);
    let requests_hash: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT hash FROM reveal_requests WHERE id = $1")
            .bind(requests_id)
            .fetch_optional(&mut **tx)
            .await?
            .flatten();
    Ok(ArchivePoint {
        through,
        trail_hash: trail_hash.unwrap_or(h.trail.base_hash),
        trail_count: h.trail.base_count + trail_rows,
        requests_id,
        requests_hash: requests_hash.unwrap_or(h.requests.base_hash),
        requests_count: h.requests.base_count + request_rows,
        trail_rows,
        request_rows,
        held_back_by: None,
    })
}
