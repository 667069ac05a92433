//! Reveals: recorded (and committed) before anything is read, under the
//! reveal policy, with a second person for what goes over it.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, Stream, StreamExt, TryStreamExt};

use super::{LoginRow, StoreError, VaultRow};

/// Which logins a reveal asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    UserId(String),
    MaskedIp(String),
    MaskedDeviceId(String),
}

impl Selector {
    /// The `user_logins` column a stored selector name stands for: the only
    /// names ever put into SQL as a column.
    pub fn column_named(name: &str) -> Option<&'static str> {
        ["user_id", "masked_ip", "masked_device_id"]
            .into_iter()
            .find(|c| *c == name)
    }

    /// Whether a token selector's value has the shape of a token
    /// (`t<version>_` and base64url characters; a user id selector always
    /// passes): the store's own refusal of a raw IP or device id, which
    /// would otherwise be kept in the audit target. The same rule as
    /// `pii_vault_reveal_request` on Postgres.
    pub fn is_token_shaped(&self) -> bool {
        let value = match self {
            Selector::UserId(_) => return true,
            Selector::MaskedIp(v) | Selector::MaskedDeviceId(v) => v,
        };
        let Some((version, mac)) = value
            .strip_prefix('t')
            .and_then(|rest| rest.split_once('_'))
        else {
            return false;
        };
        !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_digit())
            && !mac.is_empty()
            && mac
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    /// The refusal of a selector that is not [`Self::is_token_shaped`]:
    /// never the value.
    pub const NOT_A_TOKEN: &'static str =
        "a reveal by masked_ip or masked_device_id takes a token (t<version>_...), not an original value";

    /// The `user_logins` column it selects on, and the value.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Selector::UserId(v) => ("user_id", v),
            Selector::MaskedIp(v) => ("masked_ip", v),
            Selector::MaskedDeviceId(v) => ("masked_device_id", v),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::UserId(v) => write!(f, "user_id={v}"),
            Selector::MaskedIp(v) => write!(f, "masked_ip={v}"),
            Selector::MaskedDeviceId(v) => write!(f, "masked_device_id={v}"),
        }
    }
}

/// A reveal recorded in the audit trail, not yet fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevealRequest {
    /// The id of its audit row.
    pub id: i64,
    /// Logins matching the selector when it was recorded.
    pub row_count: i64,
    pub status: RequestStatus,
}

/// Where a reveal request stands under the reveal policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    /// Within the policy: may be fetched now.
    Granted,
    /// Over the policy: waits for another login's approval.
    Pending,
    /// Approved by another login: the requester may claim and fetch it once.
    Approved,
}

impl RequestStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "granted" => Some(RequestStatus::Granted),
            "pending" => Some(RequestStatus::Pending),
            "approved" => Some(RequestStatus::Approved),
            _ => None,
        }
    }
}

/// The reveal policy: limits checked by the store when a reveal is recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevealPolicy {
    pub max_users_per_reveal: i64,
    pub max_reveals_per_day: i64,
    /// Searches (`tokenize`) one login may make in 24 hours; over it they
    /// are refused.
    pub max_searches_per_day: i64,
    pub changed_at: DateTime<Utc>,
    pub changed_by: String,
}

/// The limits a `policy set` changes; `None` keeps one as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub max_users_per_reveal: Option<i64>,
    pub max_reveals_per_day: Option<i64>,
    pub max_searches_per_day: Option<i64>,
}

/// A login with its sealed originals as a reveal returns it: `None` where
/// the originals were erased (or never existed, for legacy rows).
pub type RevealedRow = (LoginRow, Option<VaultRow>);

/// The rows of a reveal, as they come from the database: a reveal of a
/// token shared by many logins is opened and printed row by row, so its
/// size never has to fit in memory.
///
/// Made by [`RevealedRows::start`], which has already read the first row:
/// a refusal by the database (not committed, already fetched, not this
/// login's) is the error of [`Reveal::reveal_fetch`] itself, not of a later
/// item.
pub struct RevealedRows<'a>(BoxStream<'a, Result<RevealedRow, StoreError>>);

impl<'a> RevealedRows<'a> {
    /// Reads the first item of `rows`, so that an error before any row is
    /// returned here.
    pub async fn start(
        mut rows: BoxStream<'a, Result<RevealedRow, StoreError>>,
    ) -> Result<RevealedRows<'a>, StoreError> {
        match rows.next().await {
            None => Ok(RevealedRows(stream::empty().boxed())),
            Some(first) => {
                let first = first?;
                Ok(RevealedRows(
                    stream::once(async { Ok(first) }).chain(rows).boxed(),
                ))
            }
        }
    }

    /// All rows at once, for callers that know the reveal is small.
    pub async fn collect_all(self) -> Result<Vec<RevealedRow>, StoreError> {
        self.0.try_collect().await
    }
}

impl Stream for RevealedRows<'_> {
    type Item = Result<RevealedRow, StoreError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for RevealedRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevealedRows")
    }
}

/// Asking for originals, and the policy that governs it.
#[async_trait]
pub trait Reveal: Send + Sync {
    /// Step one of a reveal: writes and commits its audit row (action
    /// `reveal`, the selector as target, the count of matching logins) and
    /// fixes the logins it covers.
    async fn reveal_request(
        &self,
        selector: &Selector,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<RevealRequest, StoreError>;

    /// Step two: the logins of a committed reveal request with their sealed
    /// originals, streamed. On Postgres the database refuses a request that
    /// is not this login's, not committed, already fetched or older than an
    /// hour.
    async fn reveal_fetch<'a>(&'a self, request_id: i64) -> Result<RevealedRows<'a>, StoreError>;

    /// The data keys the rows of a committed reveal request are sealed
    /// under, without fetching it: the request stays unfetched. A reveal
    /// unwraps these first, so that a key it cannot unwrap (KMS away) fails
    /// it before the fetch marks it fetched. The same checks as
    /// [`Reveal::reveal_fetch`] apply.
    async fn reveal_keys(&self, request_id: i64) -> Result<Vec<String>, StoreError>;

    /// Approves another login's pending request (the second person).
    async fn approve(
        &self,
        request_id: i64,
        claimed_actor: &str,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// The requester's claim on an approved request: a `reveal` audit row
    /// of its own, committed; its id is then passed to
    /// [`Reveal::reveal_fetch`]. Once per request, within 24 hours; a claim
    /// not fetched yet is handed back.
    async fn reveal_claim(&self, request_id: i64, claimed_actor: &str) -> Result<i64, StoreError>;

    async fn policy(&self) -> Result<RevealPolicy, StoreError>;

    /// Changes the reveal policy (owner only on Postgres; the database
    /// writes the audit row). `None` keeps a limit as it is.
    async fn set_policy(&self, change: &PolicyChange) -> Result<RevealPolicy, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::Selector;

    #[test]
    fn only_token_shaped_values_pass_as_token_selectors() {
        let ip = |v: &str| Selector::MaskedIp(v.into()).is_token_shaped();
        let dev = |v: &str| Selector::MaskedDeviceId(v.into()).is_token_shaped();
        assert!(ip("t1_abcDEF-_09") && dev("t12_x"));
        for raw in [
            "203.0.113.7",
            "2001:db8::7",
            "::ffff:203.0.113.7",
            "593-47-5928",
            "t_abc",
            "t1_",
            "x1_abc",
            "t1_a.b",
            "t1_a b",
            "",
        ] {
            assert!(!ip(raw) && !dev(raw), "{raw:?} passed");
        }
        assert!(Selector::UserId("203.0.113.7".into()).is_token_shaped());
    }
}
