//! [`Search`] on SQLite: the same record, limit and alarm as on Postgres,
//! checked here in the one writer's transaction (one file, one principal).

use async_trait::async_trait;

use super::chain::now_ms;
use super::{insert_audit, os_user, sqlite_time, SqliteStore};
use crate::store::error::rule_error;
use crate::store::search::{is_token, Search, SearchKind, NOT_TOKENS};
use crate::store::{AuditEntry, StoreError};

#[async_trait]
impl Search for SqliteStore {
    async fn search_record(
        &self,
        kind: SearchKind,
        tokens: &[String],
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        if tokens.is_empty() || tokens.len() > 4 || !tokens.iter().all(|t| is_token(t)) {
            return Err(StoreError::Refused(NOT_TOKENS.into()));
        }
        if reason.trim().is_empty() || reason.chars().count() > 1000 {
            return Err(StoreError::Refused(
                "a search needs a reason (at most 1000 characters)".into(),
            ));
        }
        let me = os_user();
        let tokens_json = serde_json::to_string(tokens).expect("strings serialise");
        // The first statement writes: the file's write lock is held from
        // here, so two searches cannot both read the day's count and pass.
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE reveal_policy SET singleton = singleton")
            .execute(&mut *tx)
            .await?;
        let limit: i64 = sqlx::query_scalar("SELECT max_searches_per_day FROM reveal_policy")
            .fetch_one(&mut *tx)
            .await?;
        let today: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM searches WHERE requested_by = $1 \
             AND requested_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')",
        )
        .bind(&me)
        .fetch_one(&mut *tx)
        .await?;
        if today >= limit {
            return Err(rule_error(
                "PV018",
                format!(
                    "this login reached the daily limit of {limit} searches (max_searches_per_day): nothing was \
                     recorded or shown; try again once its oldest search of the last 24 hours is older than that"
                ),
            ));
        }
        let column = kind.column();
        let honeytokens: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM honeytokens WHERE user_id IN \
             (SELECT user_id FROM user_logins WHERE {column} IN (SELECT value FROM json_each($1)))"
        ))
        .bind(&tokens_json)
        .fetch_one(&mut *tx)
        .await?;
        let audit = AuditEntry {
            claimed_actor: claimed_actor.into(),
            action: "search".into(),
            target: format!("{column}={}", tokens.join(",")),
            reason: reason.into(),
        };
        let id = insert_audit(&mut tx, &audit, 0).await?;
        sqlx::query(
            "INSERT INTO searches (record, kind, tokens, requested_by, requested_at, honeytokens) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(kind.name())
        .bind(&tokens_json)
        .bind(&me)
        .bind(sqlite_time(now_ms()))
        .bind(honeytokens)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }
}
