//! Envelope encryption: data keys in memory, wrapped keys at rest.
//!
//! A data key (DEK) or token key is 32 random bytes. In memory it lives only
//! inside [`KeyMaterial`] (a `SecretBox`, zeroized on drop, redacted in
//! `Debug`). At rest only its *wrapped* form is stored: encrypted under a
//! key-encryption key (KEK) that never leaves its home (AWS KMS, or the local
//! key file of the embedded default). The [`KeyWrapper`] trait is that home.

use async_trait::async_trait;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox};

/// Length in bytes of every symmetric key pii-vault uses (AES-256, HMAC-SHA256).
pub const KEY_LEN: usize = 32;

/// What a wrapped key is for. The wrapper binds the purpose into the wrap
/// (an encryption context in KMS, associated data locally), so a KMS key
/// policy can allow a worker to unwrap the token key and nothing else, and a
/// vault key cannot be passed off as a token key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// Data keys that seal vault rows and quarantined bodies.
    Vault,
    /// The HMAC key behind `masked_ip` / `masked_device_id`.
    Token,
    /// The HMAC key behind the message ids of file lines. Separate from the
    /// token key so that a token rotation does not change line ids (which
    /// would make a re-run of an old file store everything again).
    LineIds,
}

impl KeyPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Vault => "vault",
            KeyPurpose::Token => "token",
            KeyPurpose::LineIds => "line-ids",
        }
    }

    /// The value of the `purpose` encryption-context entry.
    pub fn context(self) -> &'static str {
        match self {
            KeyPurpose::Vault => "pii-vault:vault",
            KeyPurpose::Token => "pii-vault:token",
            KeyPurpose::LineIds => "pii-vault:line-ids",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vault" => Some(KeyPurpose::Vault),
            "token" => Some(KeyPurpose::Token),
            "line-ids" => Some(KeyPurpose::LineIds),
            _ => None,
        }
    }
}

/// 256 bits of plaintext key material. Never printed, never serialized;
/// zeroized when dropped.
pub struct KeyMaterial(SecretBox<[u8; KEY_LEN]>);

impl KeyMaterial {
    /// Fresh key material from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut boxed = Box::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(boxed.as_mut());
        KeyMaterial(SecretBox::new(boxed))
    }

    /// Takes ownership of key bytes handed over by a KMS; the caller's copy
    /// should be zeroized by the caller (the AWS adapter does).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, WrapError> {
        if bytes.len() != KEY_LEN {
            return Err(WrapError::BadKeyLength(bytes.len()));
        }
        let mut boxed = Box::new([0u8; KEY_LEN]);
        boxed.copy_from_slice(bytes);
        Ok(KeyMaterial(SecretBox::new(boxed)))
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// Exposes the bytes to a key wrapper outside `crypto` (the local KEK file
    /// writer). Deliberately awkward to call.
    pub fn expose_for_wrapping(&self) -> &[u8; KEY_LEN] {
        self.bytes()
    }
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMaterial([redacted])")
    }
}

/// A key as stored: the opaque blob a [`KeyWrapper`] produced, and which
/// KEK produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Identifier of the key-encryption key (a KMS key ARN, or `local:…`).
    pub kek_id: String,
    pub blob: Vec<u8>,
}

/// Errors from a key wrapper. Messages name keys and operations, never key
/// material.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("key material has {0} bytes, expected 32")]
    BadKeyLength(usize),
    #[error("the wrapped key could not be unwrapped (wrong key-encryption key, wrong purpose, or tampered)")]
    Unwrap,
    #[error("this wrapped key was made by key-encryption key {found}, not by {expected}")]
    WrongKek { expected: String, found: String },
    #[error("{0}")]
    Permanent(String),
    #[error("{0}")]
    Transient(String),
}

impl WrapError {
    /// Whether retrying the same call later may succeed (throttling, network).
    pub fn is_transient(&self) -> bool {
        matches!(self, WrapError::Transient(_))
    }
}

/// The home of the key-encryption key. Implementations: `kms::local`
/// (a key file) and `kms::aws` (AWS KMS).
#[async_trait]
pub trait KeyWrapper: Send + Sync {
    /// Identifier of the KEK that new keys are wrapped under.
    fn kek_id(&self) -> String;

    /// A fresh random key, returned both in plaintext (for use now) and
    /// wrapped (for storage).
    async fn generate(&self, purpose: KeyPurpose) -> Result<(KeyMaterial, WrappedKey), WrapError>;

    /// Recovers the plaintext of a stored key.
    async fn unwrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<KeyMaterial, WrapError>;

    /// Wraps existing key material under this wrapper's KEK. Only for moving
    /// keys from the local key file into KMS; KMS-to-KMS uses [`Self::rewrap`].
    async fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError>;

    /// Switches the KEK that new keys are wrapped under (after `rotate kek`,
    /// running workers follow the KEK of the current token key).
    async fn follow(&self, kek_id: &str) -> Result<(), WrapError>;

    /// Re-wraps a stored key under this wrapper's KEK. With KMS this is
    /// `ReEncrypt`, so the plaintext never leaves KMS.
    async fn rewrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, WrapError>;

    /// Checks at start-up that the KEK exists and may be used, so that a
    /// misconfiguration is one clear error instead of retries forever.
    async fn check(&self) -> Result<(), WrapError>;
}
