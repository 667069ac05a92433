//! Signatures over audit checkpoints: what lets an auditor check, offline
//! and with nothing but a public key, that a checkpoint was made by the
//! holder of the signing key and not by whoever controls the database.
//!
//! Two algorithms: Ed25519 for the embedded default (a key file beside the
//! local key-encryption key) and ECDSA P-256 with SHA-256 for AWS KMS
//! (`Sign`, key spec `ECC_NIST_P256`), whose private key never leaves KMS.
//! Verification is local for both: public keys are read as SubjectPublicKeyInfo
//! (PEM or DER), the form `openssl` and KMS `GetPublicKey` use.

use async_trait::async_trait;
use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::Signer as _;
use p256::ecdsa::signature::Verifier as _;

use super::digest::sha256;
use super::envelope::{KeyMaterial, WrapError};

/// The algorithms a checkpoint may be signed with, named as in the
/// checkpoint line's `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ed25519,
    /// ECDSA over NIST P-256 of the message's SHA-256, signature in DER (KMS
    /// `ECDSA_SHA_256`).
    EcdsaP256Sha256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ed25519" => Some(Algorithm::Ed25519),
            "ecdsa-p256-sha256" => Some(Algorithm::EcdsaP256Sha256),
            _ => None,
        }
    }
}

/// Whoever signs checkpoints: a local Ed25519 key (`kms::signing`) or an
/// asymmetric AWS KMS key (`kms::aws`).
#[async_trait]
pub trait Signer: Send + Sync {
    /// Names the key in each checkpoint line (`local:ed25519:…`, a KMS ARN).
    fn key_id(&self) -> String;

    fn algorithm(&self) -> Algorithm;

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, WrapError>;

    /// The public half, to hand to auditors and to check a signature with.
    async fn verifying_key(&self) -> Result<VerifyingKey, WrapError>;
}

/// An Ed25519 private key made from a 32-byte seed (zeroized on drop by
/// `ed25519-dalek`).
pub struct Ed25519Key(ed25519_dalek::SigningKey);

impl Ed25519Key {
    pub fn from_seed(seed: &KeyMaterial) -> Self {
        Ed25519Key(ed25519_dalek::SigningKey::from_bytes(seed.bytes()))
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::Ed25519(self.0.verifying_key())
    }
}

impl std::fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Key([redacted])")
    }
}

/// A public key that checkpoint signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyingKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// A public key that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not an Ed25519 or ECDSA P-256 public key (SubjectPublicKeyInfo, PEM or DER)")]
pub struct BadPublicKey;

impl VerifyingKey {
    /// From SubjectPublicKeyInfo in DER (KMS `GetPublicKey`).
    pub fn from_der(der: &[u8]) -> Result<Self, BadPublicKey> {
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_der(der) {
            return Ok(VerifyingKey::Ed25519(k));
        }
        p256::PublicKey::from_public_key_der(der)
            .map(|k| VerifyingKey::P256(k.into()))
            .map_err(|_| BadPublicKey)
    }

    /// From a `-----BEGIN PUBLIC KEY-----` file.
    pub fn from_pem(pem: &str) -> Result<Self, BadPublicKey> {
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            return Ok(VerifyingKey::Ed25519(k));
        }
        use p256::pkcs8::DecodePublicKey as _;
        p256::PublicKey::from_public_key_pem(pem)
            .map(|k| VerifyingKey::P256(k.into()))
            .map_err(|_| BadPublicKey)
    }

    pub fn to_der(&self) -> Vec<u8> {
        use p256::pkcs8::EncodePublicKey as _;
        match self {
            VerifyingKey::Ed25519(k) => k
                .to_public_key_der()
                .expect("an Ed25519 key encodes")
                .into_vec(),
            VerifyingKey::P256(k) => p256::PublicKey::from(k)
                .to_public_key_der()
                .expect("a P-256 key encodes")
                .into_vec(),
        }
    }

    pub fn to_pem(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.to_der());
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            VerifyingKey::Ed25519(_) => Algorithm::Ed25519,
            VerifyingKey::P256(_) => Algorithm::EcdsaP256Sha256,
        }
    }

    /// The first 16 hex digits of the SHA-256 of the DER form: short enough
    /// to read aloud when comparing the key an auditor holds with the one
    /// a checkpoint names.
    pub fn fingerprint(&self) -> String {
        hex::encode(&sha256(&[&self.to_der()])[..8])
    }

    /// Whether `signature` is this key's over `message`. ECDSA signatures
    /// are accepted with either of the two equivalent `s` values (KMS does
    /// not promise the low one).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            VerifyingKey::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify_strict(message, &s).is_ok()),
            VerifyingKey::P256(k) => p256::ecdsa::Signature::from_der(signature).is_ok_and(|s| {
                let s = s.normalize_s().unwrap_or(s);
                k.verify(message, &s).is_ok()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ed25519_signature_verifies_and_a_changed_message_or_key_does_not() {
        let key = Ed25519Key::from_seed(&KeyMaterial::generate());
        let other = Ed25519Key::from_seed(&KeyMaterial::generate());
        let sig = key.sign(b"checkpoint 1");
        let vk = key.verifying_key();
        assert!(vk.verify(b"checkpoint 1", &sig));
        assert!(!vk.verify(b"checkpoint 2", &sig));
        assert!(!other.verifying_key().verify(b"checkpoint 1", &sig));
        assert!(!vk.verify(b"checkpoint 1", &sig[..63]));
    }

    #[test]
    fn public_keys_round_trip_through_pem_and_der() {
        let vk = Ed25519Key::from_seed(&KeyMaterial::generate()).verifying_key();
        assert_eq!(VerifyingKey::from_pem(&vk.to_pem()).unwrap(), vk);
        assert_eq!(VerifyingKey::from_der(&vk.to_der()).unwrap(), vk);
        assert_eq!(vk.algorithm(), Algorithm::Ed25519);
        assert!(VerifyingKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
    }

    #[test]
    fn a_p256_signature_in_der_verifies_with_either_s() {
        use p256::ecdsa::signature::Signer as _;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let vk = VerifyingKey::from_der(&VerifyingKey::P256(*sk.verifying_key()).to_der()).unwrap();
        assert_eq!(vk.algorithm(), Algorithm::EcdsaP256Sha256);
        let sig: p256::ecdsa::Signature = sk.sign(b"checkpoint");
        assert!(vk.verify(b"checkpoint", sig.to_der().as_bytes()));
        // The same signature with s replaced by n - s.
        let (r, s) = sig.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
        assert!(vk.verify(b"checkpoint", high.to_der().as_bytes()));
        assert!(!vk.verify(b"checkpoint!", sig.to_der().as_bytes()));
    }
}
