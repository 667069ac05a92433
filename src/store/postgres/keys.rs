//! [`Keys`] on Postgres.

use async_trait::async_trait;

use super::PgStore;
use crate::crypto::WrappedKey;
use crate::store::keys;
use crate::store::{Initialised, Keys, StoreError, StoredKey};

#[async_trait]
impl Keys for PgStore {
    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError> {
        sqlx::query("SELECT pii_vault_register_data_key($1, $2, $3)")
            .bind(id)
            .bind(&wrapped.kek_id)
            .bind(&wrapped.blob)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar("SELECT pii_vault_retire_data_key($1)")
            .bind(id)
            .fetch_one(self.pool())
            .await?)
    }

    async fn allowed_keks(&self) -> Result<Vec<String>, StoreError> {
        keys::allowed_keks(&self.pool).await
    }

    async fn get_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        Ok(keys::keys_where(&self.pool, keys::ONE_KEY, Some(id))
            .await?
            .pop())
    }

    async fn current_token_key(&self) -> Result<Option<StoredKey>, StoreError> {
        Ok(keys::keys_where(&self.pool, keys::CURRENT_TOKEN_KEY, None)
            .await?
            .pop())
    }

    async fn list_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        keys::keys_where(&self.pool, keys::ALL_KEYS, None).await
    }

    async fn init_keys(
        &self,
        kek: &str,
        token: Option<&StoredKey>,
        line_ids: Option<&StoredKey>,
        claimed_actor: &str,
    ) -> Result<Initialised, StoreError> {
        let (kek_added, token_key, line_id_key): (bool, bool, bool) = sqlx::query_as(
            "SELECT kek_added, token_key, line_id_key FROM pii_vault_keys_init($1, $2, $3, $4, $5, $6)",
        )
        .bind(kek)
        .bind(token.map(|k| k.id.as_str()))
        .bind(token.map(|k| k.wrapped.blob.as_slice()))
        .bind(line_ids.map(|k| k.id.as_str()))
        .bind(line_ids.map(|k| k.wrapped.blob.as_slice()))
        .bind(claimed_actor)
        .fetch_one(self.pool())
        .await?;
        Ok(Initialised {
            kek_added,
            token_key,
            line_id_key,
        })
    }
}
