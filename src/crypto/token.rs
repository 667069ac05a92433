//! Deterministic keyed tokens for the analyst table.
//!
//! `masked_ip` and `masked_device_id` must let analysts `GROUP BY` and join
//! (equal originals give equal tokens) without letting anyone who sees the
//! table recover the originals. A plain hash fails the second part: the IPv4
//! space is 2^32 values and can be hashed through in minutes. HMAC-SHA256
//! under a secret token key makes every guess cost a query to someone who
//! holds the key.
//!
//! Token layout: `t<version>_<base64url(HMAC-SHA256(key, label ‖ value))>`.
//! The label is per field (`pii-vault/token/v1/ip\0`), so the same string as
//! an IP and as a device id gives unrelated tokens; the version prefix shows
//! which token key made it, so a rotation is visible in the data.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt::Write as _;

use super::envelope::KeyMaterial;

type HmacSha256 = Hmac<Sha256>;

/// The fields that are tokenised, each with its own domain-separation label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenField {
    Ip,
    DeviceId,
    /// The /24 or /48 network of the IP (`masked_ip_net`).
    IpNet,
}

impl TokenField {
    fn label(self) -> &'static [u8] {
        match self {
            TokenField::Ip => b"pii-vault/token/v1/ip\0",
            TokenField::DeviceId => b"pii-vault/token/v1/device_id\0",
            TokenField::IpNet => b"pii-vault/token/v1/ip-net\0",
        }
    }
}

/// A token as stored in `user_logins`. Not secret, but only meaningful to
/// whoever holds the token key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The token-key version a stored token was made with, if it has the
    /// pii-vault shape.
    pub fn version_of(token: &str) -> Option<u32> {
        let rest = token.strip_prefix('t')?;
        let (v, mac) = rest.split_once('_')?;
        (mac.len() == 43).then_some(())?;
        v.parse().ok()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A versioned token key with its HMAC key schedule computed once.
pub struct TokenKey {
    version: u32,
    mac: HmacSha256,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey(v{}, [redacted])", self.version)
    }
}

impl TokenKey {
    pub fn new(version: u32, key: &KeyMaterial) -> Self {
        let mac = HmacSha256::new_from_slice(key.bytes()).expect("HMAC accepts any key length");
        TokenKey { version, mac }
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The token of `value` (already canonicalised by the caller) as `field`.
    pub fn token(&self, field: TokenField, value: &str) -> Token {
        let mut m = self.mac.clone();
        m.update(field.label());
        m.update(value.as_bytes());
        let tag = m.finalize().into_bytes();
        // One allocation of the token's final size (a row makes two or
        // three tokens: formatting them was a few percent of the worker).
        let mut out = String::with_capacity(TOKEN_MAX_LEN);
        write!(out, "t{}_", self.version).expect("writing to a String does not fail");
        URL_SAFE_NO_PAD.encode_string(tag, &mut out);
        Token(out)
    }

    /// A stable, keyed identifier for line `line_no`, with content `line`,
    /// of the input named `source`: running the same input twice gives the
    /// same ids (idempotency), another input's identical line a different
    /// one (the next day's export is not a redelivery of today's), and,
    /// being keyed, the id reveals nothing about the PII in the line.
    pub fn line_id(&self, source: &str, line_no: u64, line: &[u8]) -> String {
        let mut m = self.mac.clone();
        if source.is_empty() {
            // The ids of earlier versions, which knew no source: kept so
            // that a file loaded by one of them can be re-run idempotently.
            m.update(b"pii-vault/line-id/v1\0");
        } else {
            m.update(b"pii-vault/line-id/v2\0");
            m.update(&(source.len() as u64).to_be_bytes());
            m.update(source.as_bytes());
        }
        m.update(&line_no.to_be_bytes());
        m.update(line);
        let tag = m.finalize().into_bytes();
        let mut hex_id = [0u8; 32];
        hex::encode_to_slice(&tag[..16], &mut hex_id).expect("32 hex digits for 16 bytes");
        let mut out = String::with_capacity(5 + hex_id.len());
        out.push_str("line-");
        out.push_str(std::str::from_utf8(&hex_id).expect("hex digits are ASCII"));
        out
    }
}

/// `t`, a version of up to 10 digits, `_` and 43 base64 characters.
const TOKEN_MAX_LEN: usize = 1 + 10 + 1 + 43;

/// A short public identifier of a key (first 8 bytes of an HMAC of a fixed
/// label), used to name local KEKs without revealing anything about them.
pub fn fingerprint(key: &KeyMaterial) -> String {
    let mut m = HmacSha256::new_from_slice(key.bytes()).expect("HMAC accepts any key length");
    m.update(b"pii-vault/fingerprint/v1");
    hex::encode(&m.finalize().into_bytes()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mac(key: &[u8], data: &[u8]) -> String {
        let mut m = HmacSha256::new_from_slice(key).unwrap();
        m.update(data);
        hex::encode(m.finalize().into_bytes())
    }

    /// RFC 4231 test cases 1, 2 and 6 (HMAC-SHA256 column).
    #[test]
    fn known_answer_rfc4231() {
        assert_eq!(
            mac(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            mac(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            mac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// Pins the token layout: key = 32 bytes 0x01..=0x20, version 1,
    /// HMAC-SHA256(key, "pii-vault/token/v1/ip\0" ‖ "192.0.2.1"), base64url.
    /// Computed independently with Python's `hmac` module.
    #[test]
    fn known_answer_token_layout() {
        let bytes: Vec<u8> = (1..=32).collect();
        let key = TokenKey::new(1, &KeyMaterial::from_slice(&bytes).unwrap());
        assert_eq!(
            key.token(TokenField::Ip, "192.0.2.1").as_str(),
            TOKEN_VECTOR
        );
        assert_eq!(Token::version_of(TOKEN_VECTOR), Some(1));
    }
    const TOKEN_VECTOR: &str = "t1_B1YfNDXLW2c28IroQuACnO1qKTMKCQfDYSsWBmOIm0E";

    #[test]
    fn version_is_visible() {
        let k = KeyMaterial::generate();
        let t1 = TokenKey::new(1, &k).token(TokenField::Ip, "10.0.0.1");
        let t7 = TokenKey::new(7, &k).token(TokenField::Ip, "10.0.0.1");
        assert!(t1.as_str().starts_with("t1_"));
        assert!(t7.as_str().starts_with("t7_"));
        assert_eq!(Token::version_of(t7.as_str()), Some(7));
        assert!(t1.as_str().len() <= 256);
    }

    proptest! {
        #[test]
        fn deterministic(v in ".{0,64}") {
            let k = KeyMaterial::generate();
            let a = TokenKey::new(1, &k);
            let b = TokenKey::new(1, &KeyMaterial::from_slice(k.bytes()).unwrap());
            prop_assert_eq!(a.token(TokenField::Ip, &v), b.token(TokenField::Ip, &v));
            prop_assert_eq!(a.token(TokenField::DeviceId, &v), b.token(TokenField::DeviceId, &v));
        }

        #[test]
        fn fields_are_domain_separated(v in ".{0,64}") {
            let k = TokenKey::new(1, &KeyMaterial::generate());
            prop_assert_ne!(k.token(TokenField::Ip, &v), k.token(TokenField::DeviceId, &v));
        }

        #[test]
        fn different_values_different_tokens(a in ".{0,32}", b in ".{0,32}") {
            prop_assume!(a != b);
            let k = TokenKey::new(1, &KeyMaterial::generate());
            prop_assert_ne!(k.token(TokenField::Ip, &a), k.token(TokenField::Ip, &b));
        }

        #[test]
        fn different_keys_different_tokens(v in ".{0,32}") {
            let a = TokenKey::new(1, &KeyMaterial::generate());
            let b = TokenKey::new(1, &KeyMaterial::generate());
            prop_assert_ne!(a.token(TokenField::Ip, &v), b.token(TokenField::Ip, &v));
        }
    }

    #[test]
    fn line_ids_are_per_source_and_the_empty_source_keeps_the_old_ids() {
        let k = TokenKey::new(1, &KeyMaterial::from_slice(&[9; 32]).unwrap());
        let line = b"{\"user_id\": \"u\"}";
        assert_eq!(
            k.line_id("day1.jsonl", 3, line),
            k.line_id("day1.jsonl", 3, line)
        );
        assert_ne!(
            k.line_id("day1.jsonl", 3, line),
            k.line_id("day2.jsonl", 3, line)
        );
        assert_ne!(
            k.line_id("day1.jsonl", 3, line),
            k.line_id("day1.jsonl", 4, line)
        );
        // Length-prefixed: the source cannot bleed into the line number.
        assert_ne!(k.line_id("a", 1, line), k.line_id("a\0", 1, line));
        // v1, as earlier versions computed it: HMAC(label || line_no || line).
        let mut v1 = b"pii-vault/line-id/v1\0".to_vec();
        v1.extend_from_slice(&3u64.to_be_bytes());
        v1.extend_from_slice(line);
        let want = format!("line-{}", &mac(&[9; 32], &v1)[..32]);
        assert_eq!(k.line_id("", 3, line), want);
    }
}
