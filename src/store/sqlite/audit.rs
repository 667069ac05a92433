//! [`Audit`] on SQLite: the trail, alarms (a view of the reveal requests,
//! as on Postgres) and honeytokens.

use async_trait::async_trait;
use sqlx::Row;

use super::{os_user, parse_time, sqlite_time, SqliteStore};
use crate::store::trail::{trail_entry_from_row, TRAIL_COLUMNS};
use crate::store::{Alarm, AlarmListener, Audit, AuditFilter, PlannedLogin, StoreError};
use crate::trail::TrailEntry;

#[async_trait]
impl Audit for SqliteStore {
    async fn audit_trail(&self, filter: &AuditFilter) -> Result<Vec<TrailEntry>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TRAIL_COLUMNS} FROM audit_log \
             WHERE ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR actor = $3) ORDER BY id DESC LIMIT $1"
        ))
        .bind(filter.limit)
        .bind(filter.since.map(sqlite_time))
        .bind(filter.actor.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| trail_entry_from_row(r, parse_time(&r.try_get::<String, _>("at")?)?))
            .collect()
    }

    async fn alarms(&self, filter: &AuditFilter) -> Result<Vec<Alarm>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, request_id, target, honeytokens FROM audit_alarms \
             WHERE ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR actor = $3) ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since.map(sqlite_time))
        .bind(filter.actor.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Alarm {
                    id: r.try_get("id")?,
                    at: parse_time(&r.try_get::<String, _>("at")?)?,
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
        Err(StoreError::Permanent(
            "following alarms needs Postgres (LISTEN/NOTIFY); on SQLite run `pii-vault audit --alarms` from a scheduler".into(),
        ))
    }

    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[PlannedLogin],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for id in user_ids {
            sqlx::query("INSERT INTO honeytokens (user_id, planted_by) VALUES ($1, $2)")
                .bind(id)
                .bind(os_user())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "DELETE FROM honeytoken_logins WHERE EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (honeytoken_logins.uuid_id, honeytoken_logins.line_id))",
        )
        .execute(&mut *tx)
        .await?;
        for l in logins {
            sqlx::query(
                "INSERT INTO honeytoken_logins (user_id, uuid_id, line_id, body, due_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&l.user_id)
            .bind(&l.uuid_id)
            .bind(&l.line_id)
            .bind(&l.body)
            .bind(sqlite_time(l.due_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "WITH s AS (SELECT DISTINCT user_id AS u FROM user_logins \
                        WHERE user_id NOT IN (SELECT user_id FROM honeytokens) \
                        ORDER BY random() LIMIT $1) \
             SELECT s.u, (SELECT count(*) FROM user_logins l WHERE l.user_id = s.u) FROM s",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        for u in user_ids {
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM user_logins WHERE user_id = $1) \
                      + (SELECT count(*) FROM honeytokens WHERE user_id = $1)",
            )
            .bind(u)
            .fetch_one(&self.pool)
            .await?;
            if n > 0 {
                found.push(u.clone());
            }
        }
        Ok(found)
    }
}
