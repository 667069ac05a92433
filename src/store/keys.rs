//! Keys as the database holds them: wrapped, with their purpose, state and
//! use, under a KEK on the allow-list. Workers register and retire their
//! own data keys; the first token and line-id keys are set up, audited,
//! by the owner or a rotator; everything else is a rotation's (jobs).

use async_trait::async_trait;

use super::{StoreError, StoredKey};
use crate::crypto::WrappedKey;

/// What [`Keys::init_keys`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Initialised {
    /// The key-encryption key was not on the allow-list and now is.
    pub kek_added: bool,
    pub token_key: bool,
    pub line_id_key: bool,
}

/// Reading keys, a worker's own data keys, and the set-up of the first ones.
#[async_trait]
pub trait Keys: Send + Sync {
    /// Registers this process's own fresh data key (purpose `vault`, state
    /// `active`; the database sets its time and author). The only key a
    /// worker may add.
    async fn register_data_key(&self, id: &str, wrapped: &WrappedKey) -> Result<(), StoreError>;

    /// Retires a data key this login registered (active -> retired), when
    /// it reached its use cap. Returns whether it was retired.
    async fn retire_data_key(&self, id: &str) -> Result<bool, StoreError>;

    /// The key-encryption keys that stored keys may be wrapped under.
    async fn allowed_keks(&self) -> Result<Vec<String>, StoreError>;

    async fn get_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;

    /// The newest active token key, if any.
    async fn current_token_key(&self) -> Result<Option<StoredKey>, StoreError>;

    async fn list_keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// Puts `kek` on the allow-list and stores `token` (as v1) and
    /// `line_ids` when the database has no key of that purpose yet, each
    /// addition audited. Idempotent; a key passed but not needed is not
    /// stored.
    async fn init_keys(
        &self,
        kek: &str,
        token: Option<&StoredKey>,
        line_ids: Option<&StoredKey>,
        claimed_actor: &str,
    ) -> Result<Initialised, StoreError>;
}

/// The columns the key queries select, in this order.
const KEY_COLUMNS: &str = "id, purpose, version, kek_id, wrapped, state, created_at, usage_count";

/// Key rows matching `filter` (SQL over `vault_keys`, `$1` bound to
/// `arg`), in the order given: the key reads both backends share.
pub(super) const ONE_KEY: &str = "WHERE id = $1";
pub(super) const CURRENT_TOKEN_KEY: &str =
    "WHERE purpose = 'token' AND state = 'active' ORDER BY version DESC LIMIT 1";
pub(super) const ALL_KEYS: &str = "ORDER BY created_at, id";

/// Key rows matching `filter` (one of the above), `$1` bound to `arg`.
pub(super) async fn keys_where<'a, DB>(
    pool: &'a sqlx::Pool<DB>,
    filter: &'a str,
    arg: Option<&'a str>,
) -> Result<Vec<StoredKey>, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> super::model::KeyRow: sqlx::FromRow<'r, DB::Row>,
{
    let sql = format!("SELECT {KEY_COLUMNS} FROM vault_keys {filter}");
    let query = sqlx::query_as(&sql);
    let query = match arg {
        Some(a) => query.bind(a),
        None => query,
    };
    let rows: Vec<super::model::KeyRow> = query.fetch_all(pool).await?;
    rows.into_iter().map(StoredKey::try_from).collect()
}

/// The allow-list, both backends.
pub(super) async fn allowed_keks<DB>(pool: &sqlx::Pool<DB>) -> Result<Vec<String>, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> (String,): sqlx::FromRow<'r, DB::Row>,
{
    let rows: Vec<(String,)> = sqlx::query_as("SELECT kek_id FROM kms_allowlist ORDER BY kek_id")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(k,)| k).collect())
}
