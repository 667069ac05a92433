//! Every cryptographic primitive pii-vault uses, and nothing else.
//!
//! This is the only module that touches `aes-gcm`, `hmac`, `sha2`,
//! `ed25519-dalek` and `p256`, so a reviewer can audit the whole
//! cryptographic surface here:
//!
//! - [`token`]: deterministic keyed tokens (HMAC-SHA256) for `masked_ip` and
//!   `masked_device_id`, domain-separated per field and tagged with the key
//!   version.
//! - [`aead`]: AES-256-GCM sealing with a fresh random 96-bit nonce per call,
//!   and the associated data that binds a ciphertext to its row.
//! - [`envelope`]: 256-bit key material held in `secrecy` types, wrapped keys
//!   as stored, and the [`envelope::KeyWrapper`] boundary that KMS plugs into.
//! - [`digest`]: SHA-256, the link of the audit chains.
//! - [`signing`]: Ed25519 and ECDSA P-256 signatures over audit checkpoints,
//!   and the [`signing::Signer`] boundary that KMS plugs into.

pub mod aead;
pub mod digest;
pub mod envelope;
pub mod signing;
pub mod token;

pub use aead::{Aad, CryptoError, Sealed};
pub use envelope::{KeyMaterial, KeyPurpose, KeyWrapper, WrapError, WrappedKey};
pub use token::{Token, TokenField, TokenKey};
