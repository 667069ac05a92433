//! [`Search`] on Postgres: one call of `pii_vault_search_record`
//! (`migrations/postgres/functions/70_search.sql`), committed on return.

use async_trait::async_trait;

use super::PgStore;
use crate::store::search::{Search, SearchKind};
use crate::store::StoreError;

#[async_trait]
impl Search for PgStore {
    async fn search_record(
        &self,
        kind: SearchKind,
        tokens: &[String],
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        // Autocommit: the record is committed when the call returns, before
        // the caller prints anything.
        Ok(
            sqlx::query_scalar("SELECT pii_vault_search_record($1, $2, $3, $4)")
                .bind(kind.name())
                .bind(tokens)
                .bind(reason)
                .bind(claimed_actor)
                .fetch_one(self.pool())
                .await?,
        )
    }
}
