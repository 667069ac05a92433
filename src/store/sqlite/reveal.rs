//! [`Reveal`] on SQLite: the same two steps and policy as on Postgres,
//! checked here in the one writer's transactions (one file, one principal).

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt as _;

use super::chain::{insert_request, now_ms};
use super::{insert_audit, os_user, parse_time, SqliteStore, NOW};
use crate::store::model::{login_from_row, sealed_beside};
use crate::store::{
    AuditEntry, PolicyChange, RequestStatus, Reveal, RevealPolicy, RevealRequest, RevealedRows,
    Selector, StoreError,
};
use crate::trail::RequestEntry;

/// The logins of a recorded reveal, fixed when it was recorded, with their
/// sealed originals where there are any.
const REVEAL_ROWS: &str =
    "SELECT l.message_id, l.user_id, l.device_type, l.masked_ip, l.masked_device_id, \
     l.locale, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext \
     FROM reveal_request_rows rr JOIN user_logins l ON l.message_id = rr.message_id \
     LEFT JOIN vault v ON v.message_id = l.message_id \
     WHERE rr.request_id = $1 ORDER BY l.create_date, l.id";

#[async_trait]
impl Reveal for SqliteStore {
    async fn reveal_request(
        &self,
        selector: &Selector,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<RevealRequest, StoreError> {
        if !selector.is_token_shaped() {
            return Err(StoreError::Refused(Selector::NOT_A_TOKEN.into()));
        }
        let (column, value) = selector.parts();
        let me = os_user();
        // BEGIN IMMEDIATE in effect: the first statement writes, so two
        // requests cannot both read the day's count and both pass.
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE reveal_policy SET singleton = singleton")
            .execute(&mut *tx)
            .await?;
        let row_count: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM user_logins WHERE {column} = $1"
        ))
        .bind(value)
        .fetch_one(&mut *tx)
        .await?;
        // The users it covers, fixed with its rows (the subject ledger).
        let subjects: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT user_id FROM user_logins WHERE {column} = $1 AND user_id IS NOT NULL ORDER BY user_id"
        ))
        .bind(value)
        .fetch_all(&mut *tx)
        .await?;
        let users = subjects.len() as i64;
        let honey: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM honeytokens WHERE user_id IN (SELECT value FROM json_each($1))",
        )
        .bind(serde_json::to_string(&subjects).expect("user ids serialise"))
        .fetch_one(&mut *tx)
        .await?;
        let (max_users, max_per_day): (i64, i64) =
            sqlx::query_as("SELECT max_users_per_reveal, max_reveals_per_day FROM reveal_policy")
                .fetch_one(&mut *tx)
                .await?;
        let today = reveals_today(&mut tx, &me).await?;
        let status = if users > max_users || today >= max_per_day {
            RequestStatus::Pending
        } else {
            RequestStatus::Granted
        };
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: match status {
                RequestStatus::Granted => "reveal",
                _ => "reveal-request",
            }
            .into(),
            target: selector.to_string(),
            reason: reason.into(),
        };
        let id = insert_audit(&mut tx, &audit, row_count).await?;
        insert_request(
            &mut tx,
            RequestEntry {
                id,
                requested_at: now_ms(),
                requested_by: me.clone(),
                selector: column.to_string(),
                value: value.to_string(),
                reason: reason.to_string(),
                users,
                honeytokens: honey,
                subjects: Some(subjects),
                prev_hash: Vec::new(),
                hash: Vec::new(),
            },
            if status == RequestStatus::Granted {
                "granted"
            } else {
                "pending"
            },
        )
        .await?;
        // The logins it covers, fixed now: a later fetch hands out these.
        sqlx::query(&format!(
            "INSERT INTO reveal_request_rows (request_id, message_id) \
             SELECT $1, message_id FROM user_logins WHERE {column} = $2"
        ))
        .bind(id)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        // No LISTEN/NOTIFY in SQLite: the alarms view is the signal
        // (`pii-vault audit --alarms`).
        tx.commit().await?;
        Ok(RevealRequest {
            id,
            row_count,
            status,
        })
    }

    async fn reveal_fetch<'a>(&'a self, request_id: i64) -> Result<RevealedRows<'a>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let found: Option<(i64, Option<String>, String)> = sqlx::query_as(
            "SELECT r.id, r.fetched_at, a.at FROM reveal_requests r \
             JOIN audit_log a ON a.id = $1 \
             WHERE (r.id = $1 AND r.status = 'granted') OR (r.fetch_record = $1 AND r.status = 'approved')",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, fetched, at)) = found else {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} does not exist or is not granted"
            )));
        };
        if fetched.is_some() {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} was already fetched"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(1) {
            return Err(StoreError::Refused(format!(
                "audit record {request_id} has expired"
            )));
        }
        let marked = sqlx::query(&format!(
            "UPDATE reveal_requests SET fetched_at = {NOW} WHERE id = $1 AND fetched_at IS NULL"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if marked != 1 {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} was already fetched"
            )));
        }
        // The request is spent before its first row is read: reading and
        // printing a large reveal must not hold SQLite's one write lock
        // (workers would wait on it for as long as the terminal or a pipe
        // takes). A reveal that fails half-way is not fetched again; it is
        // asked for, and audited, anew.
        tx.commit().await?;
        let rows = sqlx::query(REVEAL_ROWS)
            .bind(id)
            .fetch(&self.pool)
            .map(|r| {
                let r = r?;
                let login = login_from_row(&r)?;
                let vault = sealed_beside(&login, &r)?;
                Ok((login, vault))
            });
        RevealedRows::start(rows.boxed()).await
    }

    async fn reveal_keys(&self, request_id: i64) -> Result<Vec<String>, StoreError> {
        // The checks of `reveal_fetch`, without marking the request.
        let found: Option<(i64, Option<String>, String)> = sqlx::query_as(
            "SELECT r.id, r.fetched_at, a.at FROM reveal_requests r \
             JOIN audit_log a ON a.id = $1 \
             WHERE (r.id = $1 AND r.status = 'granted') OR (r.fetch_record = $1 AND r.status = 'approved')",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, fetched, at)) = found else {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} does not exist or is not granted"
            )));
        };
        if fetched.is_some() {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} was already fetched"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(1) {
            return Err(StoreError::Refused(format!(
                "audit record {request_id} has expired"
            )));
        }
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT v.key_id FROM reveal_request_rows rr \
             JOIN vault v ON v.message_id = rr.message_id WHERE rr.request_id = $1",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn approve(
        &self,
        request_id: i64,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let me = os_user();
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, String, String)> = sqlx::query_as(
            "SELECT status, requested_by, requested_at FROM reveal_requests WHERE id = $1",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((_, by, at)) = found.filter(|(status, _, _)| status == "pending") else {
            return Err(StoreError::Refused(format!(
                "request {request_id} is not a pending reveal request"
            )));
        };
        if by == me {
            return Err(StoreError::Refused(format!(
                "request {request_id} was made by this user: another login must approve it \
                 (the two-person rule needs two database logins: use Postgres)"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(24) {
            return Err(StoreError::Refused(format!(
                "request {request_id} has expired"
            )));
        }
        sqlx::query(&format!(
            "UPDATE reveal_requests SET status = 'approved', approved_by = $1, approved_at = {NOW} WHERE id = $2"
        ))
        .bind(&me)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "approve".into(),
            target: format!("request {request_id}"),
            reason: reason.into(),
        };
        insert_audit(&mut tx, &audit, 0).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        type Req = (
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            Option<i64>,
            String,
        );
        let found: Option<Req> = sqlx::query_as(
            "SELECT status, requested_by, requested_at, selector, value, approved_by, fetch_record, reason \
             FROM reveal_requests WHERE id = $1",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((status, _, at, column, value, approver, fetched, reason)) =
            found.filter(|r| r.1 == os_user())
        else {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} is not one of this login"
            )));
        };
        if status != "approved" {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} is {status}, not approved"
            )));
        }
        if Utc::now() - parse_time(&at)? > chrono::Duration::hours(24) {
            return Err(StoreError::Refused(format!(
                "reveal request {request_id} has expired"
            )));
        }
        // Claimed but not fetched (the fetch failed): the same claim again.
        if let Some(claim) = fetched {
            let done: Option<String> =
                sqlx::query_scalar("SELECT fetched_at FROM reveal_requests WHERE id = $1")
                    .bind(request_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if done.is_some() {
                return Err(StoreError::Refused(format!(
                    "reveal request {request_id} was already fetched"
                )));
            }
            return Ok(claim);
        }
        let column = Selector::column_named(&column)
            .ok_or_else(|| StoreError::Permanent("unknown reveal selector".into()))?;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reveal_request_rows WHERE request_id = $1")
                .bind(request_id)
                .fetch_one(&mut *tx)
                .await?;
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "reveal".into(),
            target: format!("{column}={value}"),
            reason: format!(
                "{reason} (request {request_id}, approved by {})",
                approver.unwrap_or_default()
            ),
        };
        let id = insert_audit(&mut tx, &audit, n).await?;
        sqlx::query("UPDATE reveal_requests SET fetch_record = $1 WHERE id = $2")
            .bind(id)
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn policy(&self) -> Result<RevealPolicy, StoreError> {
        let (max_users_per_reveal, max_reveals_per_day, max_searches_per_day, changed_at, changed_by): (
            i64,
            i64,
            i64,
            String,
            String,
        ) = sqlx::query_as(
            "SELECT max_users_per_reveal, max_reveals_per_day, max_searches_per_day, changed_at, changed_by \
             FROM reveal_policy",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(RevealPolicy {
            max_users_per_reveal,
            max_reveals_per_day,
            max_searches_per_day,
            changed_at: parse_time(&changed_at)?,
            changed_by,
        })
    }

    async fn set_policy(&self, change: &PolicyChange) -> Result<RevealPolicy, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (old_users, old_day, old_search): (i64, i64, i64) = sqlx::query_as(
            "SELECT max_users_per_reveal, max_reveals_per_day, max_searches_per_day FROM reveal_policy",
        )
        .fetch_one(&mut *tx)
        .await?;
        let (users, day, search) = (
            change.max_users_per_reveal.unwrap_or(old_users),
            change.max_reveals_per_day.unwrap_or(old_day),
            change.max_searches_per_day.unwrap_or(old_search),
        );
        sqlx::query(&format!(
            "UPDATE reveal_policy SET max_users_per_reveal = $1, max_reveals_per_day = $2, \
             max_searches_per_day = $3, changed_at = {NOW}, changed_by = $4"
        ))
        .bind(users)
        .bind(day)
        .bind(search)
        .bind(os_user())
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry {
            claimed_actor: os_user(),
            action: "policy-set".into(),
            target: format!(
                "max_users_per_reveal={users} max_reveals_per_day={day} max_searches_per_day={search}"
            ),
            reason: format!(
                "was max_users_per_reveal={old_users} max_reveals_per_day={old_day} \
                 max_searches_per_day={old_search}"
            ),
        };
        insert_audit(&mut tx, &audit, 0).await?;
        tx.commit().await?;
        self.policy().await
    }
}

/// What counts against `login`'s daily reveal limit: its granted reveals
/// and its shown quarantined bodies of the last 24 hours (as
/// `pii_vault_reveals_today` on Postgres).
pub(super) async fn reveals_today(
    conn: &mut sqlx::SqliteConnection,
    login: &str,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM reveal_requests WHERE requested_by = $1 AND status = 'granted' \
           AND requested_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')) \
         + (SELECT count(*) FROM quarantine_reveals WHERE requested_by = $1 \
           AND requested_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day'))",
    )
    .bind(login)
    .fetch_one(conn)
    .await?)
}
