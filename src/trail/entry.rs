//! The rows of the two chains and their canonical encoding, version 1.
//!
//! The encoding is what the database hashes (migrations/postgres/functions/
//! 15_audit_chain.sql does the same in SQL, the SQLite store calls
//! [`TrailEntry::link`] in its writer) and what an auditor recomputes, so it
//! is fixed byte for byte: a version tag, then every field in order, each
//! as `0x00` (NULL) or `0x01`, its length in UTF-8 bytes (4 bytes, big
//! endian) and those bytes. Numbers are written in decimal, times in UTC as
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ`. A length before every field means no two
//! different rows encode alike, whatever their text holds.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::digest::{sha256, DIGEST_LEN};

/// The `prev_hash` of the first row of a chain that was never archived.
pub const GENESIS: [u8; DIGEST_LEN] = [0; DIGEST_LEN];

const TRAIL_V1: &[u8] = b"pii-vault/audit/v1";
const REQUEST_V1: &[u8] = b"pii-vault/request/v1";

/// The two chains: every audit row, and the reveal requests (with the
/// honeytoken count that only the owner and the auditor may read, and the
/// users each returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    Trail,
    Requests,
}

impl Chain {
    pub fn as_str(self) -> &'static str {
        match self {
            Chain::Trail => "trail",
            Chain::Requests => "requests",
        }
    }
}

/// One audit row as stored, with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailEntry {
    pub id: i64,
    #[serde(with = "canonical_time_serde")]
    pub at: DateTime<Utc>,
    /// The database login that wrote the entry (on SQLite, the operating
    /// system user that ran the command).
    pub actor: String,
    pub claimed_actor: Option<String>,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub row_count: i64,
    /// The writing transaction (Postgres; `None` on SQLite).
    pub xact: Option<i64>,
    #[serde(with = "hex_serde")]
    pub prev_hash: Vec<u8>,
    #[serde(with = "hex_serde")]
    pub hash: Vec<u8>,
}

/// One reveal request as recorded: the fields fixed when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEntry {
    pub id: i64,
    #[serde(with = "canonical_time_serde")]
    pub requested_at: DateTime<Utc>,
    pub requested_by: String,
    pub selector: String,
    pub value: String,
    pub reason: String,
    /// How many distinct users it covered.
    pub users: i64,
    /// How many of them are honeytokens (non-zero: an alarm).
    pub honeytokens: i64,
    /// The users it returned, sorted (`None`: recorded before they were).
    pub subjects: Option<Vec<String>>,
    #[serde(with = "hex_serde")]
    pub prev_hash: Vec<u8>,
    #[serde(with = "hex_serde")]
    pub hash: Vec<u8>,
}

/// A row of either chain, as the verifier walks it and the SQLite writer
/// links it.
pub trait Linked {
    fn id(&self) -> i64;
    fn prev_hash(&self) -> &[u8];
    fn hash(&self) -> &[u8];
    fn set_hashes(&mut self, prev_hash: Vec<u8>, hash: Vec<u8>);
    /// The canonical encoding of the row's fields (not its hashes).
    fn encode(&self) -> Vec<u8>;

    /// What `hash` should be: SHA-256(prev_hash ‖ encoding).
    fn expected_hash(&self) -> [u8; DIGEST_LEN] {
        link(self.prev_hash(), &self.encode())
    }

    /// Sets `prev_hash` and `hash` for a row that follows `prev` (the
    /// SQLite writer; Postgres does it in its trigger).
    fn link_after(&mut self, prev: &[u8]) {
        let hash = link(prev, &self.encode()).to_vec();
        self.set_hashes(prev.to_vec(), hash);
    }
}

/// SHA-256(prev ‖ encoding): the link from one row to the next.
pub fn link(prev: &[u8], encoding: &[u8]) -> [u8; DIGEST_LEN] {
    sha256(&[prev, encoding])
}

/// A time as the encoding writes it.
pub fn canonical_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn field(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            let len = u32::try_from(s.len()).expect("a field shorter than 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

impl Linked for TrailEntry {
    fn id(&self) -> i64 {
        self.id
    }
    fn prev_hash(&self) -> &[u8] {
        &self.prev_hash
    }
    fn hash(&self) -> &[u8] {
        &self.hash
    }
    fn set_hashes(&mut self, prev_hash: Vec<u8>, hash: Vec<u8>) {
        self.prev_hash = prev_hash;
        self.hash = hash;
    }
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.target.len() + self.reason.len());
        out.extend_from_slice(TRAIL_V1);
        field(&mut out, Some(&self.id.to_string()));
        field(&mut out, Some(&canonical_time(&self.at)));
        field(&mut out, Some(&self.actor));
        field(&mut out, self.claimed_actor.as_deref());
        field(&mut out, Some(&self.action));
        field(&mut out, Some(&self.target));
        field(&mut out, Some(&self.reason));
        field(&mut out, Some(&self.row_count.to_string()));
        field(&mut out, self.xact.map(|x| x.to_string()).as_deref());
        out
    }
}

impl Linked for RequestEntry {
    fn id(&self) -> i64 {
        self.id
    }
    fn prev_hash(&self) -> &[u8] {
        &self.prev_hash
    }
    fn hash(&self) -> &[u8] {
        &self.hash
    }
    fn set_hashes(&mut self, prev_hash: Vec<u8>, hash: Vec<u8>) {
        self.prev_hash = prev_hash;
        self.hash = hash;
    }
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(REQUEST_V1);
        field(&mut out, Some(&self.id.to_string()));
        field(&mut out, Some(&canonical_time(&self.requested_at)));
        field(&mut out, Some(&self.requested_by));
        field(&mut out, Some(&self.selector));
        field(&mut out, Some(&self.value));
        field(&mut out, Some(&self.reason));
        field(&mut out, Some(&self.users.to_string()));
        field(&mut out, Some(&self.honeytokens.to_string()));
        match &self.subjects {
            None => out.push(0),
            Some(users) => {
                out.push(1);
                let n = u32::try_from(users.len()).expect("fewer than 4 billion users");
                out.extend_from_slice(&n.to_be_bytes());
                for u in users {
                    field(&mut out, Some(u));
                }
            }
        }
        out
    }
}

mod hex_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Times as the encoding writes them (RFC 3339 when read back).
pub(crate) mod canonical_time_serde {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::canonical_time(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64) -> TrailEntry {
        TrailEntry {
            id,
            at: DateTime::parse_from_rfc3339("2026-12-06T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            actor: "alice".into(),
            claimed_actor: None,
            action: "reveal".into(),
            target: "user_id=u1".into(),
            reason: "ticket 1".into(),
            row_count: 2,
            xact: Some(77),
            prev_hash: vec![],
            hash: vec![],
        }
    }

    #[test]
    fn the_encoding_is_fixed_byte_for_byte() {
        let e = entry(5);
        let enc = e.encode();
        let mut want = b"pii-vault/audit/v1".to_vec();
        for f in [
            Some("5"),
            Some("2026-12-06T10:00:00.123456Z"),
            Some("alice"),
            None,
            Some("reveal"),
            Some("user_id=u1"),
            Some("ticket 1"),
            Some("2"),
            Some("77"),
        ] {
            match f {
                None => want.push(0),
                Some(s) => {
                    want.push(1);
                    want.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    want.extend_from_slice(s.as_bytes());
                }
            }
        }
        assert_eq!(enc, want);
    }

    #[test]
    fn every_field_and_the_previous_hash_change_the_hash() {
        let base = {
            let mut e = entry(5);
            e.link_after(&GENESIS);
            e.hash
        };
        let changes: Vec<fn(&mut TrailEntry)> = vec![
            |e| e.id = 6,
            |e| e.at += chrono::Duration::microseconds(1),
            |e| e.actor.push('x'),
            |e| e.claimed_actor = Some(String::new()),
            |e| e.action.push('x'),
            |e| e.target.push('x'),
            |e| e.reason.push('x'),
            |e| e.row_count = 3,
            |e| e.xact = None,
        ];
        for change in changes {
            let mut e = entry(5);
            change(&mut e);
            e.link_after(&GENESIS);
            assert_ne!(e.hash, base);
        }
        let mut e = entry(5);
        e.link_after(&[1; 32]);
        assert_ne!(e.hash, base);
    }

    #[test]
    fn moving_text_between_fields_changes_the_encoding() {
        let mut a = entry(1);
        a.target = "ab".into();
        a.reason = "c".into();
        let mut b = entry(1);
        b.target = "a".into();
        b.reason = "bc".into();
        assert_ne!(a.encode(), b.encode());
    }

    #[test]
    fn a_request_without_recorded_subjects_differs_from_one_with_none() {
        let r = |subjects| RequestEntry {
            id: 1,
            requested_at: Utc::now(),
            requested_by: "bob".into(),
            selector: "user_id".into(),
            value: "u1".into(),
            reason: "r".into(),
            users: 1,
            honeytokens: 0,
            subjects,
            prev_hash: vec![],
            hash: vec![],
        };
        assert_ne!(r(None).encode(), r(Some(vec![])).encode());
        assert_ne!(
            r(Some(vec!["u1".into()])).encode(),
            r(Some(vec![])).encode()
        );
    }
}
