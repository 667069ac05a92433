//! The vault: what a sealed row holds (its format, re-exported here), and
//! reading it back: unwrap data keys (cached per run, up to a bound) and
//! open ciphertexts with the associated data of their row. Workers seal in
//! this format but never read back; the reader is used by `reveal` and the
//! rotation jobs.

mod format;

pub use format::{quarantine_aad, vault_aad, VaultPlaintext, AAD_QUARANTINE, AAD_VAULT};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context as _;

use crate::crypto::aead;
use crate::crypto::{KeyMaterial, KeyPurpose, KeyWrapper};
use crate::store::{KeyState, QuarantineRow, Store, VaultRow};
use zeroize::Zeroizing;

/// Unwrapped data keys kept at most. Every worker process seals under a
/// key of its own, so a reveal of a token seen over years, or a rotation,
/// can meet thousands of keys; each unwrap is a KMS call, so the cache is
/// large enough that rows of interleaved keys rarely unwrap one twice, and
/// small enough (a few hundred KiB) to hold whatever the vault's size.
pub const KEY_CACHE: usize = 4096;

pub struct VaultReader {
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    /// `None` for a destroyed key.
    keys: Lru<Option<KeyMaterial>>,
    /// The KMS allow-list, read once: a data key under any other KEK is
    /// refused rather than unwrapped.
    allowed: Option<Vec<String>>,
}

impl VaultReader {
    pub fn new(store: Arc<dyn Store>, wrapper: Arc<dyn KeyWrapper>) -> Self {
        Self::with_key_cache(store, wrapper, KEY_CACHE)
    }

    /// A reader that keeps at most `capacity` (at least 1) unwrapped keys.
    pub fn with_key_cache(
        store: Arc<dyn Store>,
        wrapper: Arc<dyn KeyWrapper>,
        capacity: usize,
    ) -> Self {
        VaultReader {
            store,
            wrapper,
            keys: Lru::new(capacity),
            allowed: None,
        }
    }

    /// The plaintext key for `key_id`; `None` when it was destroyed.
    pub async fn data_key(&mut self, key_id: &str) -> anyhow::Result<Option<&KeyMaterial>> {
        if !self.keys.touch(key_id) {
            let stored = self.store.get_key(key_id).await?.with_context(|| {
                format!("data key {key_id} is referenced but not stored (unknown key id)")
            })?;
            let material = if stored.state == KeyState::Destroyed {
                None
            } else {
                if self.allowed.is_none() {
                    self.allowed = Some(self.store.allowed_keks().await?);
                }
                crate::keyring::check_allowed(
                    self.allowed.as_deref().unwrap_or_default(),
                    &stored,
                )?;
                Some(
                    self.wrapper
                        .unwrap(KeyPurpose::Vault, &stored.wrapped)
                        .await
                        .with_context(|| format!("cannot unwrap data key {key_id}"))?,
                )
            };
            self.keys.insert(key_id.to_string(), material);
        }
        Ok(self.keys.get(key_id).and_then(Option::as_ref))
    }

    /// The originals of one vault row; `None` when its key was destroyed.
    pub async fn open(&mut self, row: &VaultRow) -> anyhow::Result<Option<VaultPlaintext>> {
        let Some(key) = self.data_key(&row.key_id).await? else {
            return Ok(None);
        };
        let aad = vault_aad(&row.message_id, &row.user_id, &row.key_id);
        let plain = aead::open(key, &aad, &row.nonce, &row.ciphertext)
            .with_context(|| format!("vault row of message {}", row.message_id))?;
        let v = VaultPlaintext::decode(&plain).ok_or_else(|| {
            anyhow::anyhow!(
                "vault row of message {} is not a vault record",
                row.message_id
            )
        })?;
        Ok(Some(v))
    }

    /// The raw body of a quarantined message; `None` when its key was destroyed.
    pub async fn open_quarantined(
        &mut self,
        row: &QuarantineRow,
    ) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(key) = self.data_key(&row.key_id).await? else {
            return Ok(None);
        };
        let aad = quarantine_aad(&row.message_id, row.user_id.as_deref(), &row.key_id);
        let plain = aead::open(key, &aad, &row.nonce, &row.ciphertext)
            .with_context(|| format!("quarantined message {}", row.message_id))?;
        Ok(Some(plain))
    }
}

/// A least-recently-used map from key id to `V`, holding at most `capacity`
/// entries; evicted values are dropped (key material zeroes itself).
struct Lru<V> {
    capacity: usize,
    /// Value and the tick of its last use.
    entries: HashMap<String, (V, u64)>,
    /// Last-use tick -> key id: the first entry is the one to evict.
    by_use: BTreeMap<u64, String>,
    tick: u64,
}

impl<V> Lru<V> {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Marks `key` as just used; whether it is cached.
    fn touch(&mut self, key: &str) -> bool {
        let Some((_, used)) = self.entries.get_mut(key) else {
            return false;
        };
        self.tick += 1;
        let id = self.by_use.remove(used).expect("every entry has a tick");
        *used = self.tick;
        self.by_use.insert(self.tick, id);
        true
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    fn insert(&mut self, key: String, value: V) {
        if let Some((_, used)) = self.entries.remove(&key) {
            self.by_use.remove(&used);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.by_use.insert(self.tick, key.clone());
        self.entries.insert(key, (value, self.tick));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn the_key_cache_stays_within_its_bound_and_evicts_the_least_recently_used() {
        let mut c = Lru::new(2);
        c.insert("a".into(), 1);
        c.insert("b".into(), 2);
        assert!(c.touch("a"));
        c.insert("c".into(), 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a"), Some(&1));
        assert_eq!(c.get("b"), None, "b was used least recently");
        assert!(!c.touch("b"));
        assert_eq!(c.get("c"), Some(&3));
        c.insert("c".into(), 4);
        assert_eq!((c.len(), c.get("c")), (2, Some(&4)));
        for i in 0..100 {
            c.insert(format!("k{i}"), i);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.by_use.len(), 2);
        assert_eq!((c.get("k98"), c.get("k99")), (Some(&98), Some(&99)));
    }
}
