//! AES-256-GCM sealing with associated data that binds a ciphertext to its row.
//!
//! Every call to [`seal`] takes a fresh 96-bit nonce from the operating
//! system's CSPRNG, drawn a few kilobytes at a time (one `getrandom` call a
//! few hundred nonces instead of one a row: the system call was about a
//! twentieth of the worker's CPU), each taken once. Random nonces are safe
//! for up to about 2^32 encryptions under one key (NIST SP 800-38D); workers
//! cap each data key far below that (see `pipeline::keys`), so a nonce is
//! never reused in practice.
//!
//! The associated data is not secret but must match on open: it names what
//! the ciphertext is (vault row, quarantined body, wrapped key), the row's
//! message id, the user id and the id of the data key. A ciphertext copied
//! into another row, another user's row, or relabelled with another key id
//! fails to decrypt instead of revealing the wrong person's data.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::envelope::KeyMaterial;

/// Length of an AES-GCM nonce in bytes (96 bits).
pub const NONCE_LEN: usize = 12;

/// Version tag at the start of every associated-data encoding; a new AAD
/// layout gets a new tag so old ciphertexts stay openable.
const AAD_TAG: &[u8] = b"pii-vault/aad/v1";

/// What a ciphertext is bound to. See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// `vault`, `quarantine` or `wrap:<purpose>`.
    pub kind: &'a str,
    pub message_id: &'a str,
    pub user_id: &'a str,
    pub key_id: &'a str,
}

impl Aad<'_> {
    /// Length-prefixed encoding, so that no two different field tuples
    /// encode to the same bytes (`("ab","c")` vs `("a","bc")`).
    pub fn encode(&self) -> Vec<u8> {
        let fields = [self.kind, self.message_id, self.user_id, self.key_id];
        let len = AAD_TAG.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(AAD_TAG);
        for f in fields {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        out
    }
}

/// A nonce and the ciphertext with its 16-byte tag appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

/// Deliberately uninformative: which of wrong key, wrong row, or tampering
/// it was is not something an attacker should learn, and none of them has a
/// value worth printing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("decryption failed: wrong key, ciphertext moved to another row, or tampered")]
    Open,
    #[error("stored nonce has {0} bytes, expected 12")]
    BadNonce(usize),
    #[error("encryption failed")]
    Seal,
}

fn cipher(key: &KeyMaterial) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.bytes()))
}

/// Nonces a thread draws from the operating system at once.
const NONCES_PER_DRAW: usize = 512;

/// A thread's drawn nonces and how many of them are taken. Per thread, so
/// no lock; a nonce's bytes are handed out once, then the position moves on.
struct NoncePool {
    bytes: Box<[u8; NONCE_LEN * NONCES_PER_DRAW]>,
    taken: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = std::cell::RefCell::new(NoncePool {
        bytes: Box::new([0u8; NONCE_LEN * NONCES_PER_DRAW]),
        taken: NONCES_PER_DRAW,
    });
}

/// A nonce never handed out before: the next unused one of this thread's
/// draw from the operating system's CSPRNG, after a new draw when all are
/// taken.
fn fresh_nonce() -> [u8; NONCE_LEN] {
    NONCES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.taken == NONCES_PER_DRAW {
            rand::rngs::OsRng.fill_bytes(&mut pool.bytes[..]);
            pool.taken = 0;
        }
        let at = pool.taken * NONCE_LEN;
        let nonce: [u8; NONCE_LEN] = pool.bytes[at..at + NONCE_LEN]
            .try_into()
            .expect("a nonce's length");
        pool.taken += 1;
        nonce
    })
}

/// Encrypts `plaintext` under `key` with a fresh random nonce.
pub fn seal(key: &KeyMaterial, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
    let nonce = fresh_nonce();
    let ciphertext = seal_raw(&cipher(key), &nonce, &aad.encode(), plaintext)?;
    Ok(Sealed { nonce, ciphertext })
}

/// A prepared cipher for sealing many rows under one key without repeating
/// the AES key schedule.
pub struct Sealer(Aes256Gcm);

impl Sealer {
    pub fn new(key: &KeyMaterial) -> Self {
        Sealer(cipher(key))
    }

    pub fn seal(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let nonce = fresh_nonce();
        let ciphertext = seal_raw(&self.0, &nonce, &aad.encode(), plaintext)?;
        Ok(Sealed { nonce, ciphertext })
    }
}

fn seal_raw(
    c: &Aes256Gcm,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    msg: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    c.encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| CryptoError::Seal)
}

/// Decrypts and authenticates; the plaintext is zeroized when dropped.
pub fn open(
    key: &KeyMaterial,
    aad: &Aad<'_>,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if nonce.len() != NONCE_LEN {
        return Err(CryptoError::BadNonce(nonce.len()));
    }
    cipher(key)
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad.encode(),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn aad<'a>(message_id: &'a str, user_id: &'a str, key_id: &'a str) -> Aad<'a> {
        Aad {
            kind: "vault",
            message_id,
            user_id,
            key_id,
        }
    }

    /// Test Case 16 of the GCM specification (McGrew & Viega), AES-256 with
    /// associated data.
    #[test]
    fn known_answer_gcm_spec_test_case_16() {
        let key = KeyMaterial::from_slice(&h(
            "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        ))
        .unwrap();
        let nonce: [u8; 12] = h("cafebabefacedbaddecaf888").try_into().unwrap();
        let aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let pt = h(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                    1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let expected = h(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                          8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
                          76fc6ece0f4e1768cddf8853bb2d551b",
        );
        let ct = seal_raw(&cipher(&key), &nonce, &aad, &pt).unwrap();
        assert_eq!(hex::encode(&ct), hex::encode(&expected));
        let back = cipher(&key)
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(back, pt);
    }

    #[test]
    fn round_trip() {
        let key = KeyMaterial::generate();
        let a = aad("m1", "u1", "k1");
        let sealed = seal(&key, &a, b"199.172.111.135").unwrap();
        assert_ne!(&sealed.ciphertext[..], b"199.172.111.135");
        let back = open(&key, &a, &sealed.nonce, &sealed.ciphertext).unwrap();
        assert_eq!(&back[..], b"199.172.111.135");
    }

    #[test]
    fn nonces_are_fresh_per_encryption() {
        let key = KeyMaterial::generate();
        let sealer = Sealer::new(&key);
        let a = aad("m1", "u1", "k1");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = sealer.seal(&a, b"same plaintext").unwrap();
            assert!(seen.insert(s.nonce), "a nonce was reused");
        }
    }

    /// Across draws and threads: every nonce handed out is new, and none is
    /// all zeros (the pool's bytes before a draw).
    #[test]
    fn pooled_nonces_are_never_handed_out_twice() {
        let per_thread = 3 * NONCES_PER_DRAW + 7;
        let drawn: Vec<[u8; NONCE_LEN]> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread).map(|_| fresh_nonce()).collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        assert_eq!(
            distinct.len(),
            4 * per_thread,
            "a nonce was handed out twice"
        );
        assert!(!distinct.contains(&[0u8; NONCE_LEN]));
    }

    #[test]
    fn flipped_bit_anywhere_fails() {
        let key = KeyMaterial::generate();
        let a = aad("m1", "u1", "k1");
        let sealed = seal(&key, &a, b"593-47-5928").unwrap();
        for i in 0..sealed.ciphertext.len() * 8 {
            let mut ct = sealed.ciphertext.clone();
            ct[i / 8] ^= 1 << (i % 8);
            assert_eq!(open(&key, &a, &sealed.nonce, &ct), Err(CryptoError::Open));
        }
        let mut nonce = sealed.nonce;
        nonce[0] ^= 1;
        assert_eq!(
            open(&key, &a, &nonce, &sealed.ciphertext),
            Err(CryptoError::Open)
        );
    }

    #[test]
    fn another_rows_associated_data_fails() {
        let key = KeyMaterial::generate();
        let sealed = seal(&key, &aad("m1", "u1", "k1"), b"10.0.0.1").unwrap();
        for other in [
            aad("m2", "u1", "k1"),
            aad("m1", "u2", "k1"),
            aad("m1", "u1", "k2"),
        ] {
            assert_eq!(
                open(&key, &other, &sealed.nonce, &sealed.ciphertext),
                Err(CryptoError::Open)
            );
        }
        let q = Aad {
            kind: "quarantine",
            ..aad("m1", "u1", "k1")
        };
        assert_eq!(
            open(&key, &q, &sealed.nonce, &sealed.ciphertext),
            Err(CryptoError::Open)
        );
    }

    #[test]
    fn wrong_key_fails() {
        let a = aad("m1", "u1", "k1");
        let sealed = seal(&KeyMaterial::generate(), &a, b"10.0.0.1").unwrap();
        assert_eq!(
            open(
                &KeyMaterial::generate(),
                &a,
                &sealed.nonce,
                &sealed.ciphertext
            ),
            Err(CryptoError::Open)
        );
    }

    #[test]
    fn truncated_inputs_are_errors_not_panics() {
        let key = KeyMaterial::generate();
        let a = aad("m1", "u1", "k1");
        assert_eq!(
            open(&key, &a, &[0u8; 5], b"x"),
            Err(CryptoError::BadNonce(5))
        );
        assert_eq!(open(&key, &a, &[0u8; 12], b""), Err(CryptoError::Open));
        assert_eq!(
            open(&key, &a, &[0u8; 12], &[0u8; 15]),
            Err(CryptoError::Open)
        );
    }

    #[test]
    fn aad_encoding_is_unambiguous() {
        assert_ne!(aad("ab", "c", "k").encode(), aad("a", "bc", "k").encode());
    }
}
