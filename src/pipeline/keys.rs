//! The keys a worker holds: the current token key, and its own data key.
//!
//! Each worker generates its own data key at start-up and never unwraps a
//! stored one, so a worker needs no permission to decrypt vault keys and
//! cannot read back what it wrote. A data key is retired after
//! [`DekPolicy::max_uses`] encryptions or [`DekPolicy::max_age`], whichever
//! comes first: that keeps random-nonce collisions out of reach (NIST's
//! bound is 2^32 per key) and limits what one leaked key exposes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;

use crate::crypto::aead::Sealer;
use crate::crypto::{KeyPurpose, KeyWrapper, TokenKey};
use crate::store::{KeyState, Store, StoredKey};

#[derive(Debug, Clone, Copy)]
pub struct DekPolicy {
    pub max_uses: u64,
    pub max_age: Duration,
}

impl Default for DekPolicy {
    fn default() -> Self {
        DekPolicy {
            max_uses: 1 << 20,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// A data key in use by this process.
pub struct DataKeyLease {
    pub id: String,
    pub sealer: Sealer,
    created: Instant,
    used: u64,
}

impl DataKeyLease {
    pub fn record_use(&mut self, n: u64) {
        self.used += n;
    }

    fn exhausted(&self, policy: &DekPolicy, need: u64) -> bool {
        self.used + need > policy.max_uses || self.created.elapsed() >= policy.max_age
    }
}

/// Loads the current token key, creating version 1 if the store has none.
/// Two workers racing to create it both end up with the one that landed.
pub async fn load_token_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<(Arc<TokenKey>, String)> {
    for _ in 0..3 {
        if let Some(k) = store.current_token_key().await? {
            let material = wrapper
                .unwrap(KeyPurpose::Token, &k.wrapped)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot unwrap token key v{} (wrapped by {}): {e}",
                        k.version,
                        k.wrapped.kek_id
                    )
                })?;
            return Ok((Arc::new(TokenKey::new(k.version as u32, &material)), k.id));
        }
        let (material, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
        let key = StoredKey {
            id: format!("tok-{}", uuid::Uuid::new_v4()),
            purpose: KeyPurpose::Token,
            version: 1,
            wrapped,
            state: KeyState::Active,
            created_at: Utc::now(),
            usage_count: 0,
        };
        if store.insert_key(&key).await? {
            tracing::info!(key_id = %key.id, "created token key v1");
            return Ok((Arc::new(TokenKey::new(1, &material)), key.id));
        }
    }
    anyhow::bail!("could not load or create the token key")
}

/// The key behind file line ids, created on first use. Never rotated: it
/// only makes line ids unguessable, and changing it would break the
/// idempotency of re-running a file. Concurrent first uses settle on the
/// oldest key.
pub async fn load_line_id_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<Arc<TokenKey>> {
    let find = || async {
        let mut keys: Vec<StoredKey> = store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| k.purpose == KeyPurpose::LineIds && k.state != KeyState::Destroyed)
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        anyhow::Ok(keys.into_iter().next())
    };
    if find().await?.is_none() {
        let (_, wrapped) = wrapper.generate(KeyPurpose::LineIds).await?;
        let key = StoredKey {
            id: format!("ids-{}", uuid::Uuid::new_v4()),
            purpose: KeyPurpose::LineIds,
            version: 0,
            wrapped,
            state: KeyState::Active,
            created_at: Utc::now(),
            usage_count: 0,
        };
        store.insert_key(&key).await?;
    }
    let k = find().await?.context("line-id key vanished")?;
    let material = wrapper.unwrap(KeyPurpose::LineIds, &k.wrapped).await?;
    Ok(Arc::new(TokenKey::new(0, &material)))
}

/// Generates and stores a fresh data key for this process.
///
/// New keys go under the KEK that wraps the current token key: after
/// `rotate kek` re-wrapped the token key, running workers follow by
/// themselves, and the old KMS key can be disabled without restarting them.
pub async fn new_data_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<DataKeyLease> {
    if let Some(token) = store.current_token_key().await? {
        if token.wrapped.kek_id != wrapper.kek_id() && !token.wrapped.kek_id.starts_with("local:") {
            wrapper.follow(&token.wrapped.kek_id).await?;
        }
    }
    let (material, wrapped) = wrapper.generate(KeyPurpose::Vault).await?;
    let key = StoredKey {
        id: format!("dek-{}", uuid::Uuid::new_v4()),
        purpose: KeyPurpose::Vault,
        version: 0,
        wrapped,
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    };
    store.insert_key(&key).await?;
    tracing::info!(key_id = %key.id, kek = %key.wrapped.kek_id, "new data key");
    Ok(DataKeyLease {
        id: key.id,
        sealer: Sealer::new(&material),
        created: Instant::now(),
        used: 0,
    })
}

/// The data key to seal the next `need` values with, replaced first if the
/// current one would pass its cap.
pub async fn data_key_for<'a>(
    slot: &'a mut Option<DataKeyLease>,
    need: u64,
    policy: &DekPolicy,
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<&'a mut DataKeyLease> {
    if slot.as_ref().is_none_or(|k| k.exhausted(policy, need)) {
        *slot = Some(new_data_key(store, wrapper).await?);
    }
    Ok(slot.as_mut().expect("just filled"))
}
