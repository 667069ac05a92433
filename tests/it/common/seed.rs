//! What a test's database owner writes directly, before a role is tried or
//! a store is checked: keys in a chosen state, allow-list entries,
//! honeytokens. The product never does this (its keys come from `migrate`,
//! `keys init`, workers and rotations, through the audited functions); a
//! test does, to start from a known state. Postgres runs the owner's rows
//! through the same guard triggers as anyone's (time, author, allow-list).
#![allow(dead_code)]

use pii_vault::store::{KeyState, StoredKey};
use sqlx::{PgPool, SqlitePool};

/// A pool of the owner of a test database, either backend.
#[derive(Clone, Copy)]
pub enum Owner<'a> {
    Pg(&'a PgPool),
    Sqlite(&'a SqlitePool),
}

impl Owner<'_> {
    /// Puts a KEK on the allow-list (idempotent).
    pub async fn allow_kek(&self, kek: &str) {
        match self {
            Owner::Pg(p) => sqlx::query("INSERT INTO kms_allowlist (kek_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(kek)
                .execute(*p)
                .await
                .map(|_| ()),
            Owner::Sqlite(p) => sqlx::query(
                "INSERT INTO kms_allowlist (kek_id, added_by) VALUES ($1, 'test') ON CONFLICT DO NOTHING",
            )
            .bind(kek)
            .execute(*p)
            .await
            .map(|_| ()),
        }
        .expect("allow-list a KEK");
    }

    /// Stores `key` as it is (state included); `false` when its id, or its
    /// token version, is taken.
    pub async fn insert_key(&self, key: &StoredKey) -> bool {
        let wrapped = (key.state != KeyState::Destroyed).then(|| key.wrapped.blob.clone());
        let n = match self {
            Owner::Pg(p) => sqlx::query(
                "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&key.id)
            .bind(key.purpose.as_str())
            .bind(key.version)
            .bind(&key.wrapped.kek_id)
            .bind(wrapped)
            .bind(key.state.as_str())
            .execute(*p)
            .await
            .map(|r| r.rows_affected()),
            Owner::Sqlite(p) => sqlx::query(
                "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, usage_count, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 0, 'test') \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&key.id)
            .bind(key.purpose.as_str())
            .bind(key.version)
            .bind(&key.wrapped.kek_id)
            .bind(wrapped)
            .bind(key.state.as_str())
            .execute(*p)
            .await
            .map(|r| r.rows_affected()),
        };
        n.unwrap_or_else(|e| panic!("insert key {}: {e}", key.id)) == 1
    }

    /// Moves key `id` to `state` (the guard triggers still apply).
    pub async fn set_key_state(&self, id: &str, state: KeyState) {
        let sql = "UPDATE vault_keys SET state = $1 WHERE id = $2";
        match self {
            Owner::Pg(p) => sqlx::query(sql)
                .bind(state.as_str())
                .bind(id)
                .execute(*p)
                .await
                .map(|_| ()),
            Owner::Sqlite(p) => sqlx::query(sql)
                .bind(state.as_str())
                .bind(id)
                .execute(*p)
                .await
                .map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("key {id} to {}: {e}", state.as_str()));
    }

    /// Lists `user_ids` as honeytokens.
    pub async fn add_honeytokens(&self, user_ids: &[&str]) {
        for id in user_ids {
            match self {
                Owner::Pg(p) => sqlx::query("INSERT INTO honeytokens (user_id) VALUES ($1)")
                    .bind(id)
                    .execute(*p)
                    .await
                    .map(|_| ()),
                Owner::Sqlite(p) => {
                    sqlx::query("INSERT INTO honeytokens (user_id, planted_by) VALUES ($1, 'test')")
                        .bind(id)
                        .execute(*p)
                        .await
                        .map(|_| ())
                }
            }
            .expect("plant a honeytoken");
        }
    }
}
