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
use chrono::NaiveDate;

use crate::clock;
use crate::crypto::aead::Sealer;
use crate::crypto::{KeyPurpose, KeyWrapper, TokenKey};
use crate::keyring;
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
    /// The month (by [`crate::clock`]) the key was made in: it is replaced
    /// when the month turns, so that each data key seals about one monthly
    /// partition's rows and retention can destroy it with that partition.
    month: NaiveDate,
    used: u64,
}

impl DataKeyLease {
    pub fn record_use(&mut self, n: u64) {
        self.used += n;
    }

    fn exhausted(&self, policy: &DekPolicy, need: u64) -> bool {
        self.used + need > policy.max_uses
            || self.created.elapsed() >= policy.max_age
            || self.month != clock::month_of(clock::today())
    }
}

/// Loads the current token key. Workers never create one: token keys come
/// from `pii-vault migrate` / `keys init` (owner or rotator) and `rotate
/// token-key`, so a worker login cannot plant a key whose value it knows.
pub async fn load_token_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<(Arc<TokenKey>, String)> {
    let k = store.current_token_key().await?.context(
        "the database holds no token key: run `pii-vault migrate` (or `pii-vault keys init`) \
         as the schema owner or a rotator first",
    )?;
    keyring::ensure_allowed(store, &k).await?;
    // The wrapper's error stays in the chain, so that a transient one is
    // retried (`anyhow_is_transient`).
    let material = wrapper
        .unwrap(KeyPurpose::Token, &k.wrapped)
        .await
        .with_context(|| format!("cannot unwrap token key v{} ({})", k.version, k.id))?;
    Ok((Arc::new(TokenKey::new(k.version as u32, &material)), k.id))
}

/// The key behind file line ids. Never rotated: it only makes line ids
/// unguessable, and changing it would break the idempotency of re-running
/// a file. If races ever left two, the oldest wins.
pub async fn load_line_id_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<Arc<TokenKey>> {
    let mut keys: Vec<StoredKey> = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::LineIds && k.state != KeyState::Destroyed)
        .collect();
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let k = keys.into_iter().next().context(
        "the database holds no line-id key: run `pii-vault migrate` (or `pii-vault keys init`) \
         as the schema owner or a rotator first",
    )?;
    keyring::ensure_allowed(store, &k).await?;
    let material = wrapper
        .unwrap(KeyPurpose::LineIds, &k.wrapped)
        .await
        .with_context(|| format!("cannot unwrap the line-id key ({})", k.id))?;
    Ok(Arc::new(TokenKey::new(0, &material)))
}

/// Generates and registers a fresh data key for this process.
///
/// New keys go under the KEK that wraps the current token key: after
/// `rotate kek` re-wrapped the token key, running workers follow by
/// themselves, and the old KMS key can be disabled without restarting them.
/// They follow only to a KEK on the allow-list, which workers cannot write.
pub async fn new_data_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<DataKeyLease> {
    if let Some(token) = store.current_token_key().await? {
        if token.wrapped.kek_id != wrapper.kek_id() && !token.wrapped.kek_id.starts_with("local:") {
            keyring::ensure_allowed(store, &token).await?;
            wrapper.follow(&token.wrapped.kek_id).await?;
        }
    }
    let (material, wrapped) = wrapper.generate(KeyPurpose::Vault).await?;
    let id = format!("dek-{}", uuid::Uuid::new_v4());
    store.register_data_key(&id, &wrapped).await?;
    tracing::info!(key_id = %id, kek = %wrapped.kek_id, "new data key");
    Ok(DataKeyLease {
        id,
        sealer: Sealer::new(&material),
        created: Instant::now(),
        month: clock::month_of(clock::today()),
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
        let fresh = new_data_key(store, wrapper).await?;
        if let Some(old) = slot.replace(fresh) {
            // Retired so that `keys list` shows it is done and a rotation
            // need not wait for the next one to notice. Best effort: a
            // failure here loses nothing, the key just stays active.
            if let Err(e) = store.retire_data_key(&old.id).await {
                tracing::warn!(key_id = %old.id, error = %e, "could not retire an exhausted data key");
            }
        }
    }
    Ok(slot.as_mut().expect("just filled"))
}

/// Whether an error chain holds a transient store, source or key-wrapper
/// error: what the pipeline retries when a step (getting a data key) fails
/// with an `anyhow` chain rather than one error type.
pub fn anyhow_is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::store::StoreError>()
            .is_some_and(|x| x.is_transient())
            || c.downcast_ref::<crate::source::SourceError>()
                .is_some_and(|x| x.is_transient())
            || c.downcast_ref::<crate::crypto::WrapError>()
                .is_some_and(|x| x.is_transient())
    })
}
