//! Parsing a message body into a [`LoginEvent`], or a value-free [`Rejection`].
//!
//! serde's own error messages quote the offending input (`invalid type:
//! string "199.172.111.135", expected …`), which would put PII into logs and
//! the quarantine table. So serde only ever sees the body as a bag of
//! optional JSON values, its messages are discarded, and every rule is
//! checked here with an error that names the field and never its value.

use serde::Deserialize;
use serde_json::Value;

use super::ip::CanonicalIp;
use super::pii::Pii;

/// Largest body accepted. A login event is a few hundred bytes; SQS allows
/// 256 KiB, so anything near that is junk or an attack.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Deepest JSON nesting accepted (an event is flat).
pub const MAX_DEPTH: usize = 16;

const MAX_USER_ID: usize = 128;
const MAX_DEVICE_ID: usize = 256;
const MAX_SHORT: usize = 32;
const MAX_IP_TEXT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    UserId,
    Ip,
    DeviceId,
    DeviceType,
    AppVersion,
    Locale,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::UserId => "user_id",
            Field::Ip => "ip",
            Field::DeviceId => "device_id",
            Field::DeviceType => "device_type",
            Field::AppVersion => "app_version",
            Field::Locale => "locale",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message was rejected. The text names fields and limits, never
/// values, so it is safe to log, to count, and to store in clear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("body is not valid UTF-8")]
    NotUtf8,
    #[error("body is not valid JSON")]
    NotJson,
    #[error("JSON is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("body is a JSON {0}, expected an object")]
    NotObject(&'static str),
    #[error("body has a duplicate or malformed key")]
    Malformed,
    #[error("field `{0}` is missing")]
    Missing(Field),
    #[error("field `{0}` must be {1}")]
    WrongType(Field, &'static str),
    #[error("field `{0}` is empty")]
    Empty(Field),
    #[error("field `{0}` is longer than {1} characters")]
    TooLong(Field, usize),
    #[error("field `{0}` contains a NUL character")]
    Nul(Field),
    #[error("field `ip` is not an IPv4 or IPv6 address")]
    InvalidIp,
}

impl Rejection {
    /// A short stable code for metrics labels and the quarantine table.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge => "too_large",
            Rejection::NotUtf8 => "not_utf8",
            Rejection::NotJson => "not_json",
            Rejection::TooDeep => "too_deep",
            Rejection::NotObject(_) => "not_object",
            Rejection::Malformed => "malformed",
            Rejection::Missing(_) => "missing_field",
            Rejection::WrongType(..) => "wrong_type",
            Rejection::Empty(_) => "empty_field",
            Rejection::TooLong(..) => "too_long",
            Rejection::Nul(_) => "nul_character",
            Rejection::InvalidIp => "invalid_ip",
        }
    }

    /// Every code, for pre-registering metrics.
    pub const CODES: &'static [&'static str] = &[
        "too_large",
        "not_utf8",
        "not_json",
        "too_deep",
        "not_object",
        "malformed",
        "missing_field",
        "wrong_type",
        "empty_field",
        "too_long",
        "nul_character",
        "invalid_ip",
    ];
}

/// A login event that passed every input rule.
#[derive(Debug, Clone)]
pub struct LoginEvent {
    pub user_id: String,
    /// The `ip` exactly as sent (kept in the vault).
    pub ip_raw: Pii<String>,
    /// The canonical form (tokenised).
    pub ip: CanonicalIp,
    pub device_id: Pii<String>,
    pub device_type: String,
    pub app_version: String,
    pub locale: Option<String>,
}

/// Serde sees every field as an optional raw value; unknown keys are
/// skipped without being stored.
#[derive(Deserialize)]
struct RawEvent {
    user_id: Option<Value>,
    ip: Option<Value>,
    device_id: Option<Value>,
    device_type: Option<Value>,
    app_version: Option<Value>,
    locale: Option<Value>,
}

impl LoginEvent {
    pub fn parse(body: &[u8]) -> Result<LoginEvent, Rejection> {
        if body.len() > MAX_BODY_BYTES {
            return Err(Rejection::TooLarge);
        }
        let text = std::str::from_utf8(body).map_err(|_| Rejection::NotUtf8)?;
        check_depth(text.as_bytes())?;
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            return Err(match serde_json::from_str::<Value>(text) {
                Ok(Value::Array(_)) => Rejection::NotObject("array"),
                Ok(Value::String(_)) => Rejection::NotObject("string"),
                Ok(Value::Number(_)) => Rejection::NotObject("number"),
                Ok(Value::Bool(_)) => Rejection::NotObject("boolean"),
                Ok(Value::Null) => Rejection::NotObject("null"),
                Ok(Value::Object(_)) | Err(_) => Rejection::NotJson,
            });
        }
        let raw: RawEvent = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                Rejection::Malformed
            } else {
                Rejection::NotJson
            }
        })?;

        let user_id = required_string(raw.user_id, Field::UserId, MAX_USER_ID)?;
        let ip_raw = required_string(raw.ip, Field::Ip, MAX_IP_TEXT)?;
        let ip = CanonicalIp::parse(&ip_raw).ok_or(Rejection::InvalidIp)?;
        let device_id = required_string(raw.device_id, Field::DeviceId, MAX_DEVICE_ID)?;
        let device_type = required_string(raw.device_type, Field::DeviceType, MAX_SHORT)?;
        let app_version = match raw.app_version {
            Some(Value::Number(n)) => n.to_string(),
            other => required_string(other, Field::AppVersion, MAX_SHORT)?,
        };
        check_text(&app_version, Field::AppVersion, MAX_SHORT)?;
        let locale = match raw.locale {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                check_text(&s, Field::Locale, MAX_SHORT)?;
                Some(s)
            }
            Some(_) => return Err(Rejection::WrongType(Field::Locale, "a string or null")),
        };
        Ok(LoginEvent {
            user_id,
            ip_raw: Pii::new(ip_raw),
            ip,
            device_id: Pii::new(device_id),
            device_type,
            app_version,
            locale,
        })
    }
}

impl LoginEvent {
    /// An IP address given on its own (`tokenize --ip`), under the rules an
    /// event's `ip` passes, in the canonical form its token is made of: a
    /// value the worker stored gets the token it stored.
    pub fn parse_ip(raw: &str) -> Result<CanonicalIp, Rejection> {
        check_text(raw, Field::Ip, MAX_IP_TEXT)?;
        CanonicalIp::parse(raw).ok_or(Rejection::InvalidIp)
    }

    /// A device id given on its own (`tokenize --device-id`), under the
    /// rules an event's `device_id` passes; kept as given, as the worker
    /// keeps it.
    pub fn parse_device_id(raw: &str) -> Result<Pii<String>, Rejection> {
        check_text(raw, Field::DeviceId, MAX_DEVICE_ID)?;
        Ok(Pii::new(raw.to_string()))
    }
}

fn required_string(v: Option<Value>, field: Field, max: usize) -> Result<String, Rejection> {
    match v {
        None | Some(Value::Null) => Err(Rejection::Missing(field)),
        Some(Value::String(s)) => {
            // Zeroize a rejected PII string on the way out; an accepted
            // one is moved out (no copy left behind to zeroize).
            let mut s = zeroize::Zeroizing::new(s);
            check_text(&s, field, max)?;
            Ok(std::mem::take(&mut *s))
        }
        Some(_) => Err(Rejection::WrongType(
            field,
            if field == Field::AppVersion {
                "a string or a number"
            } else {
                "a string"
            },
        )),
    }
}

fn check_text(s: &str, field: Field, max: usize) -> Result<(), Rejection> {
    if s.contains('\0') {
        return Err(Rejection::Nul(field));
    }
    if s.trim().is_empty() {
        return Err(Rejection::Empty(field));
    }
    if s.chars().count() > max {
        return Err(Rejection::TooLong(field, max));
    }
    Ok(())
}

/// Rejects deep nesting before serde builds anything, so a body of ten
/// thousand `[` costs one linear scan and no recursion.
fn check_depth(bytes: &[u8]) -> Result<(), Rejection> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Rejection::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae", "app_version": "2.3.0",
        "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928"}"#;

    fn with(key: &str, value: &str) -> String {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(GOOD).unwrap();
        if value == "<absent>" {
            v.remove(key);
        } else {
            v.insert(key.into(), serde_json::from_str(value).unwrap());
        }
        serde_json::to_string(&v).unwrap()
    }

    fn reject(body: &str) -> Rejection {
        LoginEvent::parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_the_design_example() {
        let e = LoginEvent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(e.user_id, "424cdd21-063a-43a7-b91b-7ca1a833afae");
        assert_eq!(e.ip.expose(), "199.172.111.135");
        assert_eq!(e.device_id.expose(), "593-47-5928");
        assert_eq!(e.app_version, "2.3.0");
        assert_eq!(e.locale.as_deref(), Some("RU"));
    }

    #[test]
    fn numeric_app_version_and_null_locale_and_extra_keys() {
        let e = LoginEvent::parse(with("app_version", "230").as_bytes()).unwrap();
        assert_eq!(e.app_version, "230");
        let e = LoginEvent::parse(with("locale", "null").as_bytes()).unwrap();
        assert_eq!(e.locale, None);
        let e = LoginEvent::parse(with("locale", "<absent>").as_bytes()).unwrap();
        assert_eq!(e.locale, None);
        assert!(LoginEvent::parse(with("extra", r#"{"a":[1,2]}"#).as_bytes()).is_ok());
    }

    #[test]
    fn each_rule_has_its_reason() {
        assert_eq!(reject("not json"), Rejection::NotJson);
        assert_eq!(reject("{\"user_id\": "), Rejection::NotJson);
        assert_eq!(reject("[1,2]"), Rejection::NotObject("array"));
        assert_eq!(reject("\"x\""), Rejection::NotObject("string"));
        assert_eq!(
            reject(&with("ip", "<absent>")),
            Rejection::Missing(Field::Ip)
        );
        assert_eq!(
            reject(&with("device_id", "null")),
            Rejection::Missing(Field::DeviceId)
        );
        assert_eq!(reject(&with("ip", "\"300.1.1.1\"")), Rejection::InvalidIp);
        assert_eq!(
            reject(&with("ip", "12345")),
            Rejection::WrongType(Field::Ip, "a string")
        );
        assert_eq!(
            reject(&with("user_id", &format!("\"{}\"", "u".repeat(129)))),
            Rejection::TooLong(Field::UserId, 128)
        );
        assert_eq!(
            reject(&with("device_id", "\"59\\u000047\"")),
            Rejection::Nul(Field::DeviceId)
        );
        assert_eq!(
            reject(&with("device_type", "\"\"")),
            Rejection::Empty(Field::DeviceType)
        );
        assert_eq!(
            reject(&with("locale", "7")),
            Rejection::WrongType(Field::Locale, "a string or null")
        );
        assert_eq!(
            reject(&with("app_version", "[1]")),
            Rejection::WrongType(Field::AppVersion, "a string or a number")
        );
        assert_eq!(
            reject(&format!("{}{}", "[".repeat(1_000), "]".repeat(1_000))),
            Rejection::TooDeep
        );
        assert_eq!(reject(&" ".repeat(MAX_BODY_BYTES + 1)), Rejection::TooLarge);
        assert_eq!(
            LoginEvent::parse(b"{\"ip\": \"\xff\"}").unwrap_err(),
            Rejection::NotUtf8
        );
        assert_eq!(
            reject(r#"{"ip":"1.1.1.1","ip":"2.2.2.2"}"#),
            Rejection::Malformed
        );
    }

    #[test]
    fn reasons_never_contain_values() {
        let secret_ip = "\"199.172.111.135x\"";
        for body in [
            with("ip", secret_ip),
            with("ip", "[\"199.172.111.135\"]"),
            with("device_id", "593475928"),
        ] {
            let msg = reject(&body).to_string();
            assert!(!msg.contains("199.172") && !msg.contains("593"), "{msg}");
        }
    }

    #[test]
    fn debug_of_an_event_redacts_pii() {
        let e = LoginEvent::parse(GOOD.as_bytes()).unwrap();
        let dbg = format!("{e:?}");
        assert!(
            !dbg.contains("199.172.111.135") && !dbg.contains("593-47-5928"),
            "{dbg}"
        );
    }
}
