//! [`Keys`] on SQLite.

use async_trait::async_trait;
use sqlx::Sqlite;

use super::{insert_audit, os_user, SqliteStore, NOW};
use crate::crypto::WrappedKey;
use crate::store::keys;
use crate::store::{AuditEntry, Initialised, KeyState, Keys, StoreError, StoredKey};

/// A key row as the owner of the file writes it (the database sets
/// nothing itself on SQLite).
pub(super) async fn insert_key_in(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    key: &StoredKey,
) -> Result<bool, StoreError> {
    let r = sqlx::query(&format!(
        "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, usage_count, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, {NOW}, 0, $7) ON CONFLICT DO NOTHING"
    ))
    .bind(&key.id)
    .bind(key.purpose.as_str())
    .bind(key.version)
    .bind(&key.wrapped.kek_id)
    .bind((key.state != KeyState::Destroyed).then_some(&key.wrapped.blob))
    .bind(key.state.as_str())
    .bind(os_user())
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Retired data keys no row names any more, destroyed; their ids (for a
/// finished data-key rotation and for retention).
pub(super) async fn destroy_unreferenced(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE vault_keys SET state = 'destroyed', wrapped = NULL \
         WHERE purpose = 'vault' AND state = 'retired' \
         AND NOT EXISTS (SELECT 1 FROM vault v WHERE v.key_id = vault_keys.id) \
         AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.key_id = vault_keys.id) RETURNING id",
    )
    .fetch_all(&mut **tx)
    .await?)
}

#[async_trait]
impl Keys for SqliteStore {
    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, created_by) \
             VALUES ($1, 'vault', 0, $2, $3, 'active', {NOW}, $4)"
        ))
        .bind(id)
        .bind(&wrapped.kek_id)
        .bind(&wrapped.blob)
        .bind(os_user())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE id = $1 AND purpose = 'vault' AND state = 'active'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
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
        let mut tx = self.pool.begin().await?;
        let mut done = Initialised {
            kek_added: sqlx::query(
                "INSERT INTO kms_allowlist (kek_id, added_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(kek)
            .bind(os_user())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1,
            ..Default::default()
        };
        if done.kek_added {
            let audit = AuditEntry {
                claimed_actor: claimed_actor.into(),
                action: "allow-kek".into(),
                target: kek.into(),
                reason: "key set-up".into(),
            };
            insert_audit(&mut tx, &audit, 0).await?;
        }
        let have = |purpose: &'static str| {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM vault_keys WHERE purpose = $1 AND ($1 = 'token' OR state <> 'destroyed')",
            )
            .bind(purpose)
        };
        // Under `kek`, whatever the rows say, as on Postgres.
        let under_kek = |k: &StoredKey| StoredKey {
            wrapped: WrappedKey {
                kek_id: kek.to_string(),
                blob: k.wrapped.blob.clone(),
            },
            ..k.clone()
        };
        if let Some(k) = token {
            if have("token").fetch_one(&mut *tx).await? == 0 {
                done.token_key = insert_key_in(&mut tx, &under_kek(k)).await?;
            }
        }
        if let Some(k) = line_ids {
            if have("line-ids").fetch_one(&mut *tx).await? == 0 {
                done.line_id_key = insert_key_in(&mut tx, &under_kek(k)).await?;
            }
        }
        if done.token_key || done.line_id_key {
            let audit = AuditEntry {
                claimed_actor: claimed_actor.into(),
                action: "keys-init".into(),
                target: match (done.token_key, done.line_id_key) {
                    (true, true) => "token key v1, line-id key",
                    (true, false) => "token key v1",
                    _ => "line-id key",
                }
                .into(),
                reason: "initial keys".into(),
            };
            insert_audit(&mut tx, &audit, 0).await?;
        }
        tx.commit().await?;
        Ok(done)
    }
}
