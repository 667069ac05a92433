//! The one step where plaintext PII is handled: parse a message, tokenise
//! its IP and device id, seal the originals. What leaves this module is
//! tokens and ciphertext only.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::aead::Sealer;
use crate::crypto::{Aad, TokenField, TokenKey};
use crate::domain::{LoginEvent, Message, Rejection};
use crate::store::{LoginRow, QuarantineRow, VaultRow};

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

pub enum Protected {
    Login(LoginRow, VaultRow),
    Rejected(QuarantineRow, Rejection),
}

/// Protects one message. Never fails for bad input (that is a
/// [`Protected::Rejected`]); fails only if encryption itself fails.
pub fn protect(
    msg: &Message,
    token_key: &TokenKey,
    key_id: &str,
    sealer: &Sealer,
) -> Result<Protected, crate::crypto::CryptoError> {
    match LoginEvent::parse(&msg.body) {
        Ok(ev) => {
            let plain = Zeroizing::new(
                serde_json::to_vec(&VaultPlaintext {
                    ip: ev.ip_raw.expose().clone(),
                    device_id: ev.device_id.expose().clone(),
                })
                .expect("two strings always serialize"),
            );
            let aad = Aad {
                kind: AAD_VAULT,
                message_id: &msg.id,
                user_id: &ev.user_id,
                key_id,
            };
            let sealed = sealer.seal(&aad, &plain)?;
            let login = LoginRow {
                message_id: msg.id.clone(),
                masked_ip: token_key.token(TokenField::Ip, ev.ip.expose()).to_string(),
                masked_device_id: token_key
                    .token(TokenField::DeviceId, ev.device_id.expose())
                    .to_string(),
                user_id: ev.user_id.clone(),
                device_type: ev.device_type.clone(),
                locale: ev.locale.clone(),
                app_version: ev.app_version.clone(),
                create_date: Some(msg.sent_at.date_naive()),
            };
            let vault = VaultRow {
                message_id: msg.id.clone(),
                user_id: ev.user_id.clone(),
                key_id: key_id.to_string(),
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
            };
            Ok(Protected::Login(login, vault))
        }
        Err(why) => {
            let user_id = salvage_user_id(&msg.body);
            let aad = Aad {
                kind: AAD_QUARANTINE,
                message_id: &msg.id,
                user_id: user_id.as_deref().unwrap_or(""),
                key_id,
            };
            let sealed = sealer.seal(&aad, &msg.body)?;
            let row = QuarantineRow {
                message_id: msg.id.clone(),
                reason_code: why.code().to_string(),
                reason: why.to_string(),
                user_id,
                key_id: key_id.to_string(),
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
                received_at: msg.sent_at,
            };
            Ok(Protected::Rejected(row, why))
        }
    }
}

/// The user id of a rejected body, when it has a plausible one, so that
/// `forget --user-id` can erase that user's quarantined bodies too.
fn salvage_user_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyUser {
        user_id: Option<serde_json::Value>,
    }
    if body.len() > crate::domain::event::MAX_BODY_BYTES {
        return None;
    }
    match serde_json::from_slice::<OnlyUser>(body).ok()?.user_id? {
        serde_json::Value::String(s)
            if !s.contains('\0') && s.chars().count() <= 128 && !s.trim().is_empty() =>
        {
            Some(s)
        }
        _ => None,
    }
}
