//! Reading the vault back: unwrap data keys (cached per run) and open
//! ciphertexts with the associated data of their row. Used by `reveal` and
//! the rotation jobs; workers never call it.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;

use crate::crypto::aead;
use crate::crypto::{Aad, KeyMaterial, KeyPurpose, KeyWrapper};
use crate::pipeline::protect::{VaultPlaintext, AAD_QUARANTINE, AAD_VAULT};
use crate::store::{KeyState, QuarantineRow, Store, VaultRow};
use zeroize::Zeroizing;

pub struct VaultReader {
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    keys: HashMap<String, Option<KeyMaterial>>,
    /// The KMS allow-list, read once: a data key under any other KEK is
    /// refused rather than unwrapped.
    allowed: Option<Vec<String>>,
}

impl VaultReader {
    pub fn new(store: Arc<dyn Store>, wrapper: Arc<dyn KeyWrapper>) -> Self {
        VaultReader {
            store,
            wrapper,
            keys: HashMap::new(),
            allowed: None,
        }
    }

    /// The plaintext key for `key_id`; `None` when it was destroyed.
    pub async fn data_key(&mut self, key_id: &str) -> anyhow::Result<Option<&KeyMaterial>> {
        if !self.keys.contains_key(key_id) {
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
        Ok(self.keys[key_id].as_ref())
    }

    /// The originals of one vault row; `None` when its key was destroyed.
    pub async fn open(&mut self, row: &VaultRow) -> anyhow::Result<Option<VaultPlaintext>> {
        let Some(key) = self.data_key(&row.key_id).await? else {
            return Ok(None);
        };
        let aad = Aad {
            kind: AAD_VAULT,
            message_id: &row.message_id,
            user_id: &row.user_id,
            key_id: &row.key_id,
        };
        let plain = aead::open(key, &aad, &row.nonce, &row.ciphertext)
            .with_context(|| format!("vault row of message {}", row.message_id))?;
        let v: VaultPlaintext = serde_json::from_slice(&plain).map_err(|_| {
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
        let aad = Aad {
            kind: AAD_QUARANTINE,
            message_id: &row.message_id,
            user_id: row.user_id.as_deref().unwrap_or(""),
            key_id: &row.key_id,
        };
        let plain = aead::open(key, &aad, &row.nonce, &row.ciphertext)
            .with_context(|| format!("quarantined message {}", row.message_id))?;
        Ok(Some(plain))
    }
}
