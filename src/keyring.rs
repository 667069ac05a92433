//! The keys every process relies on, and which key-encryption keys are
//! trusted to wrap them.
//!
//! Token and line-id keys are created here, by `migrate` / `keys init`,
//! run by the schema owner or a rotator, never by a worker: a worker that
//! could create the token key would know it, and every token written after
//! would be invertible by enumerating the IPv4 space.
//!
//! The allow-list of key-encryption keys lives in the database
//! (`kms_allowlist`), writable only by the owner and the rotator. Workers
//! and reveal unwrap a stored key only if its KEK is on it, so a key row
//! planted under an attacker's KMS key is refused, not followed.

use chrono::Utc;

use crate::crypto::{KeyPurpose, KeyWrapper, TokenKey};
use crate::store::{KeyState, Store, StoredKey};

/// Fails, naming the key (never its wrapping), unless `key`'s KEK is on the
/// allow-list.
pub async fn ensure_allowed(store: &dyn Store, key: &StoredKey) -> anyhow::Result<()> {
    let allowed = store.allowed_keks().await?;
    check_allowed(&allowed, key)
}

/// [`ensure_allowed`] against a list already read.
pub fn check_allowed(allowed: &[String], key: &StoredKey) -> anyhow::Result<()> {
    if allowed.contains(&key.wrapped.kek_id) {
        Ok(())
    } else {
        anyhow::bail!(
            "key {} is wrapped under a key-encryption key that is not on the KMS allow-list; refusing to use it \
             (the owner or a rotator adds a KMS key with `pii-vault migrate --kms-key-id …` or `rotate kek --to …`)",
            key.id
        )
    }
}

pub use crate::store::Initialised;

/// Every token key that logins may still carry tokens of (not destroyed),
/// unwrapped, newest version first: one normally, two while a token-key
/// rotation is under way (or after one that left logins it could not
/// re-tokenise). For `tokenize`, which must find a value's logins whichever
/// version tokenised them. Each key must be under an allowed KEK.
pub async fn live_token_keys(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<Vec<TokenKey>> {
    let mut keys: Vec<StoredKey> = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::Token && k.state != KeyState::Destroyed)
        .collect();
    anyhow::ensure!(
        !keys.is_empty(),
        "the database holds no token key: run `pii-vault migrate` (or `pii-vault keys init`) \
         as the schema owner or a rotator first"
    );
    keys.sort_by_key(|k| std::cmp::Reverse(k.version));
    let allowed = store.allowed_keks().await?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        check_allowed(&allowed, &k)?;
        let version = u32::try_from(k.version)
            .map_err(|_| anyhow::anyhow!("token key {} has no valid version", k.id))?;
        let material = wrapper
            .unwrap(KeyPurpose::Token, &k.wrapped)
            .await
            .map_err(|e| anyhow::anyhow!("cannot unwrap token key v{version} ({}): {e}", k.id))?;
        out.push(TokenKey::new(version, &material));
    }
    Ok(out)
}

/// Puts the KEK of `wrapper` on the allow-list and creates token key v1 and
/// the line-id key if the database has none. Idempotent; the store records
/// each addition in the audit trail, in the transaction that makes it.
pub async fn init_keys(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    claimed_actor: &str,
) -> anyhow::Result<Initialised> {
    let keys = store.list_keys().await?;
    let token = if keys.iter().any(|k| k.purpose == KeyPurpose::Token) {
        None
    } else {
        let (_, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
        Some(new_key("tok", KeyPurpose::Token, 1, wrapped))
    };
    let line_ids = if keys
        .iter()
        .any(|k| k.purpose == KeyPurpose::LineIds && k.state != KeyState::Destroyed)
    {
        None
    } else {
        let (_, wrapped) = wrapper.generate(KeyPurpose::LineIds).await?;
        Some(new_key("ids", KeyPurpose::LineIds, 0, wrapped))
    };
    // Two owners initialising at once: the database lets one key of each
    // purpose win; the other run finds it on its next look.
    let done = store
        .init_keys(
            &wrapper.kek_id(),
            token.as_ref(),
            line_ids.as_ref(),
            claimed_actor,
        )
        .await?;
    if done.token_key || done.line_id_key {
        tracing::info!(
            token_key = done.token_key,
            line_id_key = done.line_id_key,
            "initial keys created"
        );
    }
    Ok(done)
}

/// A key row to insert; the database sets its time and author.
pub fn new_key(
    prefix: &str,
    purpose: KeyPurpose,
    version: i64,
    wrapped: crate::crypto::WrappedKey,
) -> StoredKey {
    StoredKey {
        id: format!("{prefix}-{}", uuid::Uuid::new_v4()),
        purpose,
        version,
        wrapped,
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::WrappedKey;

    #[test]
    fn only_keys_under_an_allowed_kek_pass_and_the_error_names_no_kek() {
        let key = new_key(
            "dek",
            KeyPurpose::Vault,
            0,
            WrappedKey {
                kek_id: "arn:aws:kms:us-east-1:666:key/evil".into(),
                blob: vec![1; 40],
            },
        );
        let allowed = vec!["arn:aws:kms:us-east-1:111:key/good".to_string()];
        let err = check_allowed(&allowed, &key).unwrap_err().to_string();
        assert!(
            err.contains(&key.id) && err.contains("not on the KMS allow-list"),
            "{err}"
        );
        assert!(!err.contains("evil"), "{err}");
        assert!(check_allowed(std::slice::from_ref(&key.wrapped.kek_id), &key).is_ok());
    }
}
