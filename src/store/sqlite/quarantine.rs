//! [`Quarantine`] on SQLite: the same steps as on Postgres, checked here
//! (one file, one principal). Replayed logins go through the writer, as a
//! worker's batch does: exactly once by message id.

use async_trait::async_trait;
use chrono::Utc;
use sqlx::Row as _;

use super::{insert_audit, parse_time, SqliteStore, NOW};
use crate::crypto::WrappedKey;
use crate::store::model::quarantine_from_row;
use crate::store::{
    AuditEntry, Batch, Keys as _, LoginRow, Quarantine, QuarantineEntry, QuarantineFilter,
    QuarantineRow, ReplayRequest, ReplayStored, StoreError, VaultRow,
};

/// The columns of a sealed quarantine row.
const SEALED: &str = "q.message_id, q.reason_code, q.reason, q.user_id, q.key_id, q.nonce, \
                      q.ciphertext, q.received_at, q.source, q.line";

fn sealed(r: &sqlx::sqlite::SqliteRow) -> Result<QuarantineRow, StoreError> {
    quarantine_from_row(r, parse_time(&r.try_get::<String, _>("received_at")?)?)
}

fn refused(msg: impl Into<String>) -> StoreError {
    StoreError::Refused(msg.into())
}

#[async_trait]
impl Quarantine for SqliteStore {
    async fn quarantine_list(
        &self,
        filter: &QuarantineFilter,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, reason_code, reason, received_at, source, line FROM quarantine \
             WHERE replayed_at IS NULL AND ($1 IS NULL OR reason_code = $1)",
        )
        .bind(filter.reason_code.as_deref())
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let received_at = parse_time(&r.try_get::<String, _>("received_at")?)?;
            if filter.since.is_some_and(|s| received_at < s) {
                continue;
            }
            out.push(QuarantineEntry {
                message_id: r.try_get("message_id")?,
                reason_code: r.try_get("reason_code")?,
                reason: r.try_get("reason")?,
                received_at,
                source: r.try_get("source")?,
                line: r.try_get("line")?,
            });
        }
        out.sort_by(|a, b| {
            (a.received_at, &a.source, a.line, &a.message_id).cmp(&(
                b.received_at,
                &b.source,
                b.line,
                &b.message_id,
            ))
        });
        Ok(out)
    }

    async fn quarantine_show_request(
        &self,
        message_id: &str,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        if reason.trim().is_empty() || reason.chars().count() > 1000 {
            return Err(refused(
                "showing a quarantined body needs a reason (at most 1000 characters)",
            ));
        }
        let me = super::os_user();
        // The first statement writes: two requests cannot both read the
        // day's count and both pass.
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE reveal_policy SET singleton = singleton")
            .execute(&mut *tx)
            .await?;
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM quarantine WHERE message_id = $1 AND replayed_at IS NULL",
        )
        .bind(message_id)
        .fetch_one(&mut *tx)
        .await?;
        if found == 0 {
            return Err(refused("no quarantined message has this id"));
        }
        let max_per_day: i64 = sqlx::query_scalar("SELECT max_reveals_per_day FROM reveal_policy")
            .fetch_one(&mut *tx)
            .await?;
        let today = super::reveal::reveals_today(&mut tx, &me).await?;
        if today >= max_per_day {
            return Err(refused(format!(
                "this login reached the daily limit of {max_per_day} reveals \
                 (quarantine show counts as one); nothing was shown"
            )));
        }
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "quarantine-show".into(),
            target: format!("message_id={message_id}"),
            reason: reason.into(),
        };
        let id = insert_audit(&mut tx, &audit, 1).await?;
        sqlx::query(&format!(
            "INSERT INTO quarantine_reveals (record, message_id, requested_by, requested_at, user_id) \
             VALUES ($1, $2, $3, {NOW}, (SELECT user_id FROM quarantine WHERE message_id = $2))"
        ))
        .bind(id)
        .bind(message_id)
        .bind(&me)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn quarantine_show_key(&self, record: i64) -> Result<Option<String>, StoreError> {
        let key: Option<Option<String>> = sqlx::query_scalar(
            "SELECT q.key_id FROM quarantine_reveals s \
             JOIN audit_log a ON a.id = s.record AND a.action = 'quarantine-show' \
             LEFT JOIN quarantine q ON q.message_id = s.message_id AND q.replayed_at IS NULL \
             WHERE s.record = $1",
        )
        .bind(record)
        .fetch_optional(&self.pool)
        .await?;
        match key {
            None => Err(refused(format!("record {record} is not a quarantine show"))),
            Some(key) => Ok(key),
        }
    }

    async fn quarantine_show_fetch(
        &self,
        record: i64,
    ) -> Result<Option<QuarantineRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, Option<String>, String)> = sqlx::query_as(
            "SELECT s.message_id, s.fetched_at, s.requested_at FROM quarantine_reveals s \
             JOIN audit_log a ON a.id = s.record AND a.action = 'quarantine-show' WHERE s.record = $1",
        )
        .bind(record)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((message_id, fetched, at)) = found else {
            return Err(refused(format!("record {record} is not a quarantine show")));
        };
        if fetched.is_some() {
            return Err(refused(format!(
                "quarantine show {record} was already fetched"
            )));
        }
        if parse_time(&at)? < Utc::now() - chrono::Duration::hours(1) {
            return Err(refused(format!("audit record {record} has expired")));
        }
        sqlx::query(&format!(
            "UPDATE quarantine_reveals SET fetched_at = {NOW} WHERE record = $1"
        ))
        .bind(record)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {SEALED} FROM quarantine q WHERE q.message_id = $1 AND q.replayed_at IS NULL"
        ))
        .bind(&message_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.as_ref().map(sealed).transpose()
    }

    async fn replay_request(
        &self,
        ids: Option<&[String]>,
        key_id: &str,
        wrapped: &WrappedKey,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<ReplayRequest, StoreError> {
        if reason.trim().is_empty() || reason.chars().count() > 1000 {
            return Err(refused("a replay needs a reason (at most 1000 characters)"));
        }
        self.register_data_key(key_id, wrapped).await?;
        let ids_json = ids.map(|i| serde_json::to_string(i).expect("strings serialise"));
        let covered = "replayed_at IS NULL AND ($1 IS NULL OR message_id IN (SELECT value FROM json_each($1)))";
        let mut tx = self.pool.begin().await?;
        let n: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM quarantine WHERE {covered}"))
                .bind(&ids_json)
                .fetch_one(&mut *tx)
                .await?;
        let target = match ids {
            None => "all".to_string(),
            Some(ids) => format!("message_id={}", ids.join(","))
                .chars()
                .take(512)
                .collect(),
        };
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "quarantine-replay".into(),
            target,
            reason: reason.into(),
        };
        let record = insert_audit(&mut tx, &audit, n).await?;
        sqlx::query("INSERT INTO quarantine_replays (record, key_id) VALUES ($1, $2)")
            .bind(record)
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO quarantine_replay_rows (record, message_id) \
             SELECT $2, message_id FROM quarantine WHERE {covered}"
        ))
        .bind(&ids_json)
        .bind(record)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ReplayRequest {
            record,
            row_count: n,
        })
    }

    async fn replay_fetch(&self, record: i64) -> Result<Vec<QuarantineRow>, StoreError> {
        self.replay_key(record).await?;
        let rows = sqlx::query(&format!(
            "SELECT {SEALED} FROM quarantine_replay_rows rr JOIN quarantine q ON q.message_id = rr.message_id \
             WHERE rr.record = $1 AND q.replayed_at IS NULL ORDER BY q.message_id"
        ))
        .bind(record)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sealed).collect()
    }

    async fn replay_store(
        &self,
        record: i64,
        logins: &[(LoginRow, VaultRow)],
    ) -> Result<ReplayStored, StoreError> {
        if logins.is_empty() {
            return Ok(ReplayStored::default());
        }
        let key = self.replay_key(record).await?;
        let ids: Vec<&str> = logins.iter().map(|(l, _)| l.message_id.as_str()).collect();
        let ids_json = serde_json::to_string(&ids).expect("strings serialise");
        let covered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM quarantine_replay_rows rr \
             WHERE rr.record = $1 AND rr.message_id IN (SELECT value FROM json_each($2))",
        )
        .bind(record)
        .bind(&ids_json)
        .fetch_one(&self.pool)
        .await?;
        if covered != ids.len() as i64 || logins.iter().any(|(_, v)| v.key_id != key) {
            return Err(refused(format!(
                "quarantine replay {record}: a message id it does not cover"
            )));
        }
        // The ones another replay (run beside this one) has not taken
        // meanwhile: the rest are skipped, counted neither as stored nor as
        // already stored by this replay, as on Postgres.
        let live: std::collections::HashSet<String> = sqlx::query_scalar(
            "SELECT message_id FROM quarantine \
             WHERE replayed_at IS NULL AND message_id IN (SELECT value FROM json_each($1))",
        )
        .bind(&ids_json)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let todo: Vec<(LoginRow, VaultRow)> = logins
            .iter()
            .filter(|(l, _)| live.contains(&l.message_id))
            .cloned()
            .collect();
        // Exactly once by message id, as a worker's batch: a message id
        // already stored is counted as a duplicate and not written again.
        // A crash between this and the tombstones below leaves the rows
        // quarantined; the next replay finds them stored and only marks them.
        let out = if todo.is_empty() {
            crate::store::BatchOutcome::default()
        } else {
            self.writer
                .write(&Batch {
                    key_usage: vec![(key, todo.len() as i64)],
                    logins: todo,
                    ..Batch::default()
                })
                .await?
        };
        sqlx::query(&format!(
            "UPDATE quarantine SET replayed_at = {NOW}, key_id = NULL, nonce = NULL, ciphertext = NULL, \
             user_id = NULL WHERE replayed_at IS NULL AND message_id IN (SELECT value FROM json_each($1))"
        ))
        .bind(&ids_json)
        .execute(&self.pool)
        .await?;
        Ok(ReplayStored {
            stored: out.stored,
            already: out.duplicates,
        })
    }

    async fn replay_finish(&self, record: i64) -> Result<(), StoreError> {
        let key = self.replay_key(record).await?;
        self.retire_data_key(&key).await?;
        sqlx::query(&format!(
            "UPDATE quarantine_replays SET finished_at = {NOW} WHERE record = $1"
        ))
        .bind(record)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl SqliteStore {
    /// The data key of an unfinished replay.
    async fn replay_key(&self, record: i64) -> Result<String, StoreError> {
        let found: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT key_id, finished_at FROM quarantine_replays WHERE record = $1")
                .bind(record)
                .fetch_optional(&self.pool)
                .await?;
        match found {
            None => Err(refused(format!(
                "record {record} is not a quarantine replay"
            ))),
            Some((_, Some(_))) => Err(refused(format!("quarantine replay {record} is finished"))),
            Some((key, None)) => Ok(key),
        }
    }
}
