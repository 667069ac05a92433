//! The one step where plaintext PII is handled: parse a message, tokenise
//! its IP and device id, seal the originals. What leaves this module is
//! tokens and ciphertext only.

use serde::Deserialize;

use crate::crypto::aead::Sealer;
use crate::crypto::{Token, TokenField, TokenKey};
use crate::domain::{LoginEvent, Message, Rejection};
use crate::store::{LoginRow, QuarantineRow, SourceLine, VaultRow};
use crate::vault::{quarantine_aad, vault_aad, VaultPlaintext};

pub enum Protected {
    Login(LoginRow, VaultRow),
    Rejected(QuarantineRow, Rejection),
}

/// Protects one message. Never fails for bad input (that is a
/// [`Protected::Rejected`]); fails only if encryption itself fails.
pub fn protect(
    msg: &Message,
    token_key: &TokenKey,
    network_tokens: bool,
    key_id: &str,
    sealer: &Sealer,
) -> Result<Protected, crate::crypto::CryptoError> {
    match LoginEvent::parse(&msg.body) {
        Ok(ev) => {
            let plain = VaultPlaintext::encode_parts(ev.ip_raw.expose(), ev.device_id.expose());
            let aad = vault_aad(&msg.id, &ev.user_id, key_id);
            let sealed = sealer.seal(&aad, &plain)?;
            let masked_ip = token_key.token(TokenField::Ip, ev.ip.expose());
            let masked_device_id = token_key.token(TokenField::DeviceId, ev.device_id.expose());
            let masked_ip_net = network_tokens
                .then(|| token_key.token(TokenField::IpNet, ev.ip.network().expose()));
            // The event's own strings move into the rows (a copy each was
            // a measurable share of the worker's allocations).
            let vault = VaultRow {
                message_id: msg.id.clone(),
                user_id: ev.user_id.clone(),
                key_id: key_id.to_string(),
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
            };
            let login = LoginRow {
                message_id: msg.id.clone(),
                masked_ip: masked_ip.into_string(),
                masked_device_id: masked_device_id.into_string(),
                masked_ip_net: masked_ip_net.map(Token::into_string),
                user_id: ev.user_id,
                device_type: ev.device_type,
                locale: ev.locale,
                app_version: ev.app_version,
                create_date: Some(msg.sent_at.date_naive()),
                line: msg
                    .source
                    .clone()
                    .zip(msg.line)
                    .map(|(source, line)| SourceLine { source, line }),
            };
            Ok(Protected::Login(login, vault))
        }
        Err(why) => {
            let user_id = salvage_user_id(&msg.body);
            let aad = quarantine_aad(&msg.id, user_id.as_deref(), key_id);
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
                source: msg.source.as_deref().map(str::to_string),
                line: msg.line.and_then(|l| i64::try_from(l).ok()),
            };
            Ok(Protected::Rejected(row, why))
        }
    }
}

/// The user id of a rejected body, when one can be recovered, so that
/// `forget --user-id` can erase that user's quarantined bodies too: a
/// string or an integer `user_id` of a JSON body, or, in a body that is not
/// valid JSON (truncated, a stray byte), the text after the first
/// `"user_id":`.
fn salvage_user_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyUser {
        user_id: Option<serde_json::Value>,
    }
    if body.len() > crate::domain::event::MAX_BODY_BYTES {
        return None;
    }
    let found = match serde_json::from_slice::<OnlyUser>(body) {
        Ok(only) => match only.user_id? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return None,
        },
        Err(_) => scan_user_id(body)?,
    };
    (!found.contains('\0') && found.chars().count() <= 128 && !found.trim().is_empty())
        .then_some(found)
}

/// `"user_id": "…"` or `"user_id": 123` in text that does not parse as a
/// whole; simple escapes only (a user id with a `\"` in it is not salvaged).
fn scan_user_id(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let rest = &text[text.find("\"user_id\"")? + "\"user_id\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted.find('"')?;
        let id = &quoted[..end];
        (!id.contains('\\')).then(|| id.to_string())
    } else {
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        (!digits.is_empty()).then_some(digits)
    }
}

#[cfg(test)]
mod tests {
    use super::salvage_user_id;

    #[test]
    fn user_ids_are_salvaged_from_rejected_bodies_where_they_can_be() {
        let got = |b: &str| salvage_user_id(b.as_bytes());
        assert_eq!(
            got(r#"{"user_id": "u-1", "ip": "x"}"#).as_deref(),
            Some("u-1")
        );
        assert_eq!(
            got(r#"{"user_id": 4711, "ip": 7}"#).as_deref(),
            Some("4711")
        );
        assert_eq!(
            got(r#"{"user_id": "u-2", "ip": "1.2.3.4", "device"#).as_deref(),
            Some("u-2")
        );
        assert_eq!(
            got(r#"{"ip": "1.2.3.4", "user_id":  99 , "x""#).as_deref(),
            Some("99")
        );
        assert_eq!(got(r#"{"user_id": 1.5}"#), None);
        assert_eq!(got(r#"{"user_id": null}"#), None);
        assert_eq!(got(r#"{"user_id": "  "}"#), None);
        assert_eq!(got("not json at all"), None);
        assert_eq!(
            got(&format!(r#"{{"user_id": "{}"}}"#, "u".repeat(129))),
            None
        );
    }
}
