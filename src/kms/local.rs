//! A local key-encryption key in a file, for the embedded default.
//!
//! The file holds 32 random bytes (hex), is created with mode 0600 on first
//! use, and is never written anywhere else. Keys are wrapped with AES-256-GCM
//! under it, with the key's purpose in the associated data so that a vault
//! key cannot be unwrapped as a token key.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::crypto::aead::{self, Aad, NONCE_LEN};
use crate::crypto::envelope::{KeyMaterial, KeyPurpose, KeyWrapper, WrapError, WrappedKey};
use crate::crypto::token::fingerprint;

pub const KEK_FILE: &str = "local-kek.key";

pub struct LocalKek {
    kek: KeyMaterial,
    kek_id: String,
    path: PathBuf,
}

impl LocalKek {
    /// Opens `dir/local-kek.key`, creating it (and `dir`) if missing.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(KEK_FILE);
        let kek = if path.exists() {
            check_permissions(&path)?;
            let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!("cannot read the local key file {}: {e}", path.display())
            })?);
            let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
                anyhow::anyhow!(
                    "the local key file {} is not 64 hex characters",
                    path.display()
                )
            })?);
            KeyMaterial::from_slice(&bytes).map_err(|_| {
                anyhow::anyhow!("the local key file {} is not a 256-bit key", path.display())
            })?
        } else {
            let kek = KeyMaterial::generate();
            write_new_key_file(dir, &path, &kek)?;
            tracing::warn!(
                path = %path.display(),
                "created a local key-encryption key: fine for development and small single-node use, \
                 not for production (use --kms-key-id); back it up, without it the vault cannot be read"
            );
            kek
        };
        let kek_id = format!("local:{}", fingerprint(&kek));
        Ok(LocalKek { kek, kek_id, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad<'a>(&'a self, purpose: KeyPurpose) -> Aad<'a> {
        Aad {
            kind: "wrap",
            message_id: purpose.context(),
            user_id: "",
            key_id: &self.kek_id,
        }
    }

    fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError> {
        let sealed = aead::seal(&self.kek, &self.aad(purpose), key.expose_for_wrapping())
            .map_err(|e| WrapError::Permanent(e.to_string()))?;
        let mut blob = sealed.nonce.to_vec();
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(WrappedKey {
            kek_id: self.kek_id.clone(),
            blob,
        })
    }
}

fn write_new_key_file(dir: &Path, path: &Path, kek: &KeyMaterial) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the key directory {}: {e}", dir.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create the local key file {}: {e}", path.display()))?;
    let text = Zeroizing::new(hex::encode(kek.expose_for_wrapping()));
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "the local key file {} is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[async_trait]
impl KeyWrapper for LocalKek {
    fn kek_id(&self) -> String {
        self.kek_id.clone()
    }

    async fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError> {
        LocalKek::wrap(self, purpose, key)
    }

    async fn follow(&self, kek_id: &str) -> Result<(), WrapError> {
        if kek_id == self.kek_id {
            Ok(())
        } else {
            Err(WrapError::WrongKek {
                expected: self.kek_id.clone(),
                found: kek_id.to_string(),
            })
        }
    }

    async fn generate(&self, purpose: KeyPurpose) -> Result<(KeyMaterial, WrappedKey), WrapError> {
        let key = KeyMaterial::generate();
        let wrapped = self.wrap(purpose, &key)?;
        Ok((key, wrapped))
    }

    async fn unwrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<KeyMaterial, WrapError> {
        if wrapped.kek_id != self.kek_id {
            return Err(WrapError::WrongKek {
                expected: self.kek_id.clone(),
                found: wrapped.kek_id.clone(),
            });
        }
        if wrapped.blob.len() < NONCE_LEN {
            return Err(WrapError::Unwrap);
        }
        let (nonce, ct) = wrapped.blob.split_at(NONCE_LEN);
        let plain =
            aead::open(&self.kek, &self.aad(purpose), nonce, ct).map_err(|_| WrapError::Unwrap)?;
        KeyMaterial::from_slice(&plain)
    }

    async fn rewrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, WrapError> {
        let key = self.unwrap(purpose, wrapped).await?;
        self.wrap(purpose, &key)
    }

    async fn check(&self) -> Result<(), WrapError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrap_round_trip_binds_purpose_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kek.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (key, wrapped) = kek.generate(KeyPurpose::Vault).await.unwrap();
        assert!(!wrapped
            .blob
            .windows(32)
            .any(|w| w == key.expose_for_wrapping()));
        let back = kek.unwrap(KeyPurpose::Vault, &wrapped).await.unwrap();
        assert_eq!(back.expose_for_wrapping(), key.expose_for_wrapping());
        assert!(matches!(
            kek.unwrap(KeyPurpose::Token, &wrapped).await,
            Err(WrapError::Unwrap)
        ));

        // Reopening finds the same KEK.
        let again = LocalKek::open_or_create(dir.path()).unwrap();
        assert_eq!(again.kek_id(), kek.kek_id());
        assert!(again.unwrap(KeyPurpose::Vault, &wrapped).await.is_ok());

        // Another KEK cannot unwrap it.
        let other = LocalKek::open_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(other.unwrap(KeyPurpose::Vault, &wrapped).await.is_err());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_world_readable_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path()).unwrap();
        std::fs::set_permissions(kek.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalKek::open_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
