//! Searches: the record of each `pii-vault tokenize`, written and
//! committed before the tokens are printed, under a daily limit per login,
//! with the honeytoken alarm of reveals.
//!
//! The tokens are computed by the caller (it holds the token key); the
//! store only ever sees tokens, never the value they were computed from.

use async_trait::async_trait;

use super::StoreError;

/// What a search was for: which token column its tokens belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchKind {
    Ip,
    /// An IP's /24 or /48 network (`masked_ip_net`).
    IpNet,
    DeviceId,
}

impl SearchKind {
    /// The name the record keeps (`searches.kind`).
    pub fn name(self) -> &'static str {
        match self {
            SearchKind::Ip => "ip",
            SearchKind::IpNet => "ip_net",
            SearchKind::DeviceId => "device_id",
        }
    }

    /// The `user_logins` column its tokens are compared with.
    pub fn column(self) -> &'static str {
        match self {
            SearchKind::Ip => "masked_ip",
            SearchKind::IpNet => "masked_ip_net",
            SearchKind::DeviceId => "masked_device_id",
        }
    }
}

/// Whether `t` has the exact shape of a token pii-vault makes
/// (`t<version>_` and 43 base64url characters): the store's own refusal
/// of anything else, so that a raw value can never become part of a
/// record. The same rule as `pii_vault_search_record` on Postgres.
pub fn is_token(t: &str) -> bool {
    let Some((version, mac)) = t.strip_prefix('t').and_then(|r| r.split_once('_')) else {
        return false;
    };
    !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && mac.len() == 43
        && mac
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The refusal of tokens that are not [`is_token`]: never the value.
pub const NOT_TOKENS: &str = "a search records tokens (t<version>_...), never an original value";

/// Recording searches.
#[async_trait]
pub trait Search: Send + Sync {
    /// Records a search for `tokens` (one per live token-key version,
    /// newest first) with `reason`, and commits it: an audit row of action
    /// `search` whose target is the tokens. Refused, with nothing recorded,
    /// once this login made the policy's `max_searches_per_day` searches in
    /// the last 24 hours. A search whose tokens are those of a honeytoken's
    /// logins raises the alarm (`audit --alarms`), unseen by the searcher.
    /// Returns the id of the audit row.
    async fn search_record(
        &self,
        kind: SearchKind,
        tokens: &[String],
        claimed_actor: &str,
        reason: &str,
    ) -> Result<i64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::is_token;

    #[test]
    fn only_whole_tokens_pass() {
        let mac = "A".repeat(43);
        assert!(is_token(&format!("t1_{mac}")));
        assert!(is_token(&format!("t12_{}", "-_a9".repeat(10) + "abc")));
        for bad in [
            "203.0.113.7".to_string(),
            "2001:db8::7".into(),
            "593-47-5928".into(),
            format!("t_{mac}"),
            format!("t1_{}", &mac[1..]),
            format!("t1_{mac}A"),
            format!("x1_{mac}"),
            format!("t1_{}.", &mac[1..]),
            String::new(),
        ] {
            assert!(!is_token(&bad), "{bad:?} passed");
        }
    }
}
