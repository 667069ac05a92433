//! [`Audit`] on Postgres: the trail, the owner's alarms and honeytokens.

use async_trait::async_trait;
use sqlx::Row;

use super::PgStore;
use crate::store::trail::{trail_entry_from_row, TRAIL_COLUMNS};
use crate::store::{Alarm, AlarmListener, Audit, AuditFilter, PlannedLogin, StoreError};
use crate::trail::TrailEntry;

#[async_trait]
impl Audit for PgStore {
    async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<TrailEntry>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRAIL_COLUMNS} FROM audit_log \
             WHERE ($2::timestamptz IS NULL OR at >= $2) AND ($3::text IS NULL OR actor = $3) ORDER BY id DESC LIMIT $1"
        ))
        .bind(filter.limit)
        .bind(filter.since)
        .bind(filter.actor.as_deref())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| trail_entry_from_row(r, r.try_get("at")?))
            .collect()
    }

    async fn alarms(&self, filter: &AuditFilter) -> Result<Vec<Alarm>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, request_id, target, honeytokens FROM audit_alarms \
             WHERE ($2::timestamptz IS NULL OR at >= $2) AND ($3::text IS NULL OR actor = $3) \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since)
        .bind(filter.actor.as_deref())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Alarm {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: "alarm",
                    request_id: r.try_get("request_id")?,
                    target: r.try_get("target")?,
                    honeytokens: r.try_get("honeytokens")?,
                })
            })
            .collect()
    }

    async fn listen_alarms(&self) -> Result<Box<dyn AlarmListener>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(self.pool()).await?;
        listener.listen("pii_vault_alarm").await?;
        Ok(Box::new(PgAlarms(listener)))
    }

    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[PlannedLogin],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("INSERT INTO honeytokens (user_id) SELECT * FROM UNNEST($1::text[])")
            .bind(user_ids)
            .execute(&mut *tx)
            .await?;
        // Bodies of logins already written are not needed any more.
        sqlx::query(
            "DELETE FROM honeytoken_logins h WHERE EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (h.uuid_id, h.line_id))",
        )
        .execute(&mut *tx)
        .await?;
        let users: Vec<&str> = logins.iter().map(|l| l.user_id.as_str()).collect();
        let uuids: Vec<&str> = logins.iter().map(|l| l.uuid_id.as_str()).collect();
        let lines: Vec<&str> = logins.iter().map(|l| l.line_id.as_str()).collect();
        let bodies: Vec<&str> = logins.iter().map(|l| l.body.as_str()).collect();
        let due: Vec<chrono::DateTime<chrono::Utc>> = logins.iter().map(|l| l.due_at).collect();
        sqlx::query(
            "INSERT INTO honeytoken_logins (user_id, uuid_id, line_id, body, due_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])",
        )
        .bind(&users)
        .bind(&uuids)
        .bind(&lines)
        .bind(&bodies)
        .bind(&due)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError> {
        // Users of a page-wise sample of about 100,000 logins (honeytokens
        // left out), each with all its logins counted: counting within the
        // sample would favour busy users.
        let estimate: f64 = sqlx::query_scalar(
            "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = 'user_logins'::regclass",
        )
        .fetch_one(self.pool())
        .await?;
        let percent = if estimate <= 0.0 {
            100.0
        } else {
            (1e7 / estimate).clamp(0.01, 100.0)
        };
        Ok(sqlx::query_as(&format!(
            "WITH s AS (SELECT DISTINCT user_id::text AS u FROM user_logins TABLESAMPLE SYSTEM ({percent}) \
                        WHERE user_id IS NOT NULL AND user_id NOT IN (SELECT user_id FROM honeytokens) \
                        LIMIT $1) \
             SELECT s.u, (SELECT count(*) FROM user_logins l WHERE l.user_id = s.u) FROM s"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT u FROM UNNEST($1::text[]) u WHERE EXISTS (SELECT 1 FROM user_logins l WHERE l.user_id = u) \
             OR EXISTS (SELECT 1 FROM honeytokens h WHERE h.user_id = u)",
        )
        .bind(user_ids)
        .fetch_all(self.pool())
        .await?)
    }
}

struct PgAlarms(sqlx::postgres::PgListener);

#[async_trait]
impl AlarmListener for PgAlarms {
    async fn next(&mut self) -> Result<i64, StoreError> {
        loop {
            let n = self.0.recv().await?;
            // Every reveal request notifies with its id (anyone may NOTIFY
            // too): the caller checks it against the alarms.
            if let Ok(id) = n.payload().parse() {
                return Ok(id);
            }
        }
    }
}
