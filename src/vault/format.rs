//! The sealed-row format: what a vault or quarantine ciphertext holds, and
//! the associated data that binds it to its row. Workers seal with it,
//! `reveal` and the rotations open and reseal with it; a change here is a
//! change to every row already stored.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::Aad;

/// The associated-data kinds; also what `rotate data-keys` reseals with.
pub const AAD_VAULT: &str = "vault";
pub const AAD_QUARANTINE: &str = "quarantine";

/// What a vault ciphertext holds: the originals exactly as sent.
#[derive(Serialize, Deserialize)]
pub struct VaultPlaintext {
    pub ip: String,
    pub device_id: String,
}

impl Drop for VaultPlaintext {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.ip.zeroize();
        self.device_id.zeroize();
    }
}

/// The same record borrowed, so that the worker seals an event's
/// originals without copying them first (field names and order are the
/// stored encoding's, as in [`VaultPlaintext`]).
#[derive(Serialize)]
struct VaultPlaintextRef<'a> {
    ip: &'a str,
    device_id: &'a str,
}

impl VaultPlaintext {
    /// The bytes that are sealed (JSON), zeroed when dropped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        Self::encode_parts(&self.ip, &self.device_id)
    }

    /// [`Self::encode`] of an IP and a device id held elsewhere.
    pub fn encode_parts(ip: &str, device_id: &str) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            serde_json::to_vec(&VaultPlaintextRef { ip, device_id })
                .expect("two strings always serialize"),
        )
    }

    /// `None` when the bytes are not a vault record.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The associated data of a vault row: a ciphertext moved to another
/// message, user or key does not open.
pub fn vault_aad<'a>(message_id: &'a str, user_id: &'a str, key_id: &'a str) -> Aad<'a> {
    Aad {
        kind: AAD_VAULT,
        message_id,
        user_id,
        key_id,
    }
}

/// The associated data of a quarantine row. A body whose user id could not
/// be salvaged is bound to the empty user id.
pub fn quarantine_aad<'a>(
    message_id: &'a str,
    user_id: Option<&'a str>,
    key_id: &'a str,
) -> Aad<'a> {
    Aad {
        kind: AAD_QUARANTINE,
        message_id,
        user_id: user_id.unwrap_or(""),
        key_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_encoding_is_kept() {
        let plain = VaultPlaintext {
            ip: "199.172.111.135".into(),
            device_id: "593-47-5928".into(),
        };
        let bytes = plain.encode();
        assert_eq!(
            &bytes[..],
            br#"{"ip":"199.172.111.135","device_id":"593-47-5928"}"#
        );
        let back = VaultPlaintext::decode(&bytes).unwrap();
        assert_eq!(
            (&*back.ip, &*back.device_id),
            ("199.172.111.135", "593-47-5928")
        );
        assert!(VaultPlaintext::decode(b"not a vault record").is_none());
        assert_eq!(
            quarantine_aad("m", None, "k").encode(),
            quarantine_aad("m", Some(""), "k").encode()
        );
        assert_ne!(
            vault_aad("m", "u", "k").encode(),
            quarantine_aad("m", Some("u"), "k").encode()
        );
    }
}
