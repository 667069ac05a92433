//! The key that signs audit checkpoints, and the key they are checked
//! against.
//!
//! On the embedded default an Ed25519 key in the key directory:
//! `audit-signing.key` (the seed, kept like the local key-encryption key:
//! mode 600, owned by the user, never a symbolic link) and
//! `audit-signing.pub` (its public half, PEM, to hand to auditors). In
//! production an asymmetric KMS key ([`super::aws::AwsSigner`]), whose
//! private half never leaves KMS.
//!
//! What a checkpoint is checked against must not come from whoever it
//! guards against: `audit verify --public-key FILE` with a copy the auditor
//! keeps is the strong form; the defaults (KMS `GetPublicKey`, or the
//! `.pub` file beside the key) are for when that trust is already given.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::local::{open_key_file, read_key_file, write_new_key_file};
use crate::crypto::signing::{Algorithm, Ed25519Key, Signer, VerifyingKey};
use crate::crypto::{KeyMaterial, WrapError};

pub const SIGNING_KEY_FILE: &str = "audit-signing.key";
pub const PUBLIC_KEY_FILE: &str = "audit-signing.pub";

pub struct LocalSigner {
    key: Ed25519Key,
    key_id: String,
}

impl LocalSigner {
    /// Opens `dir/audit-signing.key`, creating it (and the `.pub` beside
    /// it) if missing.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(SIGNING_KEY_FILE);
        let seed = match open_key_file(&path)? {
            Some(file) => read_key_file(&path, file)?,
            None => {
                let seed = KeyMaterial::generate();
                write_new_key_file(dir, &path, &seed)?;
                let signer = Self::from_seed(&seed);
                let pub_path = dir.join(PUBLIC_KEY_FILE);
                std::fs::write(&pub_path, signer.key.verifying_key().to_pem()).map_err(|e| {
                    anyhow::anyhow!("cannot write the public key {}: {e}", pub_path.display())
                })?;
                tracing::warn!(
                    path = %path.display(),
                    public_key = %pub_path.display(),
                    "created a local key that signs audit checkpoints: give its public key to your auditors, \
                     and keep the checkpoints somewhere the database's owner cannot write"
                );
                return Ok(signer);
            }
        };
        Ok(Self::from_seed(&seed))
    }

    fn from_seed(seed: &KeyMaterial) -> Self {
        let key = Ed25519Key::from_seed(seed);
        let key_id = format!("local:ed25519:{}", key.verifying_key().fingerprint());
        LocalSigner { key, key_id }
    }
}

#[async_trait]
impl Signer for LocalSigner {
    fn key_id(&self) -> String {
        self.key_id.clone()
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::Ed25519
    }

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, WrapError> {
        Ok(self.key.sign(message))
    }

    async fn verifying_key(&self) -> Result<VerifyingKey, WrapError> {
        Ok(self.key.verifying_key())
    }
}

/// The signer the command line asks for: the KMS key `kms_key_id`, else
/// the local key file (created on first use, with a warning).
pub async fn signer_from_config(
    kms_key_id: Option<&str>,
    key_dir: &Path,
) -> anyhow::Result<Arc<dyn Signer>> {
    match kms_key_id {
        Some(id) => {
            Ok(Arc::new(super::aws::AwsSigner::connect(id).await.map_err(
                |e| anyhow::anyhow!("checkpoint signing key {id}: {e}"),
            )?))
        }
        None => Ok(Arc::new(LocalSigner::open_or_create(key_dir)?)),
    }
}

/// Reads a public key file (PEM, or DER as KMS `GetPublicKey` returns it).
pub fn read_public_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read the public key {}: {e}", path.display()))?;
    let parsed = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => VerifyingKey::from_pem(text),
        _ => VerifyingKey::from_der(&bytes),
    };
    parsed.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The key checkpoints are checked against: `public_key` if given, else
/// the KMS key's public half, else the local `.pub` file; `None` if there
/// is none of these (no checkpoints were ever signed here).
pub async fn trusted_key(
    public_key: Option<&Path>,
    kms_key_id: Option<&str>,
    key_dir: &Path,
) -> anyhow::Result<Option<VerifyingKey>> {
    if let Some(path) = public_key {
        return read_public_key(path).map(Some);
    }
    if let Some(id) = kms_key_id {
        let signer = super::aws::AwsSigner::connect(id)
            .await
            .map_err(|e| anyhow::anyhow!("checkpoint signing key {id}: {e}"))?;
        return Ok(Some(signer.verifying_key().await.map_err(|e| {
            anyhow::anyhow!("checkpoint signing key {id}: {e}")
        })?));
    }
    let local = key_dir.join(PUBLIC_KEY_FILE);
    if local.exists() {
        return read_public_key(&local).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_key_is_made_once_and_its_public_file_verifies_its_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalSigner::open_or_create(dir.path()).unwrap();
        let b = LocalSigner::open_or_create(dir.path()).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let sig = a.sign(b"checkpoint").await.unwrap();
        let trusted = trusted_key(None, None, dir.path()).await.unwrap().unwrap();
        assert!(trusted.verify(b"checkpoint", &sig));
        assert!(a.key_id().ends_with(&trusted.fingerprint()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SIGNING_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
