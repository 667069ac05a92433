//! [`Ingest`] on SQLite: batches go to the writer's own connection
//! (`writer.rs`).

use async_trait::async_trait;

use super::{SqliteStore, NOW};
use crate::store::{Batch, BatchOutcome, DueHoneytoken, Ingest, StoreError};

#[async_trait]
impl Ingest for SqliteStore {
    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        self.writer.write(batch).await
    }

    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "SELECT h.uuid_id, h.line_id, h.body FROM honeytoken_logins h \
             WHERE h.due_at <= {NOW} AND NOT EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (h.uuid_id, h.line_id)) \
             ORDER BY h.due_at LIMIT $1"
        ))
        .bind(limit.clamp(0, 100))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(uuid_id, line_id, body)| DueHoneytoken {
                uuid_id,
                line_id,
                body,
            })
            .collect())
    }
}
