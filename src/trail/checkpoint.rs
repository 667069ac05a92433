//! Checkpoints: a signed statement of where both chains stood at a time,
//! chained to the previous checkpoint by its signature, written as one JSON
//! line to be shipped out of the database owner's reach (a file on another
//! host, S3 with object lock, a SIEM).
//!
//! What is signed is not the JSON (whose spacing and key order a tool
//! might change in transit) but [`Checkpoint::signed_bytes`], a fixed text
//! built from its fields:
//!
//! ```text
//! pii-vault/checkpoint/v1
//! seq=7
//! kind=head
//! at=2026-12-06T10:00:00.123456Z
//! trail=1200:<head hash, hex>:1200
//! requests=1187:<head hash, hex>:31
//! prev_sig=<previous checkpoint's signature, base64, or ->
//! key=<key id>
//! alg=ed25519
//! ```
//!
//! (`trail=HEAD_ID:HEAD_HASH:COUNT`, each line ending in `\n`.)

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::entry::canonical_time;
use crate::crypto::signing::VerifyingKey;

/// Where one chain stood: its newest row and how many rows it has had
/// since it began (archived ones included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub head_id: i64,
    /// Hex; the chain's genesis value (64 zeros) for an empty chain.
    pub head_hash: String,
    pub count: i64,
}

/// `head`: the chains' heads when it was made; `archive`: the end of an
/// archived stretch (`pii-vault audit archive`), where the rows the
/// database still holds begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Head,
    Archive,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Head => "head",
            Kind::Archive => "archive",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// 1 for the first checkpoint of a database, then one more each time.
    pub seq: i64,
    pub kind: Kind,
    /// The database's clock when the heads were read.
    #[serde(with = "super::entry::canonical_time_serde")]
    pub at: DateTime<Utc>,
    pub trail: Head,
    pub requests: Head,
    /// The previous checkpoint's `sig` (`None` for seq 1).
    pub prev_sig: Option<String>,
    /// The signing key: a KMS key ARN, or `local:ed25519:<fingerprint>`.
    pub key: String,
    /// `ed25519` or `ecdsa-p256-sha256`.
    pub alg: String,
    /// Base64 of the signature over [`Checkpoint::signed_bytes`].
    #[serde(default)]
    pub sig: String,
}

/// A checkpoint line that is not one.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: not a pii-vault checkpoint ({reason})")]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

impl Checkpoint {
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "pii-vault/checkpoint/v1\nseq={}\nkind={}\nat={}\ntrail={}:{}:{}\nrequests={}:{}:{}\nprev_sig={}\nkey={}\nalg={}\n",
            self.seq,
            self.kind.as_str(),
            canonical_time(&self.at),
            self.trail.head_id,
            self.trail.head_hash,
            self.trail.count,
            self.requests.head_id,
            self.requests.head_hash,
            self.requests.count,
            self.prev_sig.as_deref().unwrap_or("-"),
            self.key,
            self.alg,
        )
        .into_bytes()
    }

    pub fn set_signature(&mut self, sig: &[u8]) {
        self.sig = base64::engine::general_purpose::STANDARD.encode(sig);
    }

    /// Whether `key` signed this checkpoint as it stands.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        if self.alg != key.algorithm().as_str() {
            return false;
        }
        base64::engine::general_purpose::STANDARD
            .decode(&self.sig)
            .is_ok_and(|sig| key.verify(&self.signed_bytes(), &sig))
    }

    /// The JSON line, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint serialises")
    }

    /// `line_no` (from 1) names the line in the error.
    pub fn parse(line: &str, line_no: usize) -> Result<Self, BadLine> {
        serde_json::from_str(line).map_err(|e| BadLine {
            line: line_no,
            reason: e.to_string(),
        })
    }
}

/// Every checkpoint of a file of JSON lines, in file order. Other lines
/// (entries of an archive) are skipped; a line that names itself a
/// checkpoint but does not parse is an error.
pub fn read_lines(text: &str) -> Result<Vec<Checkpoint>, BadLine> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || !is_checkpoint_line(line) {
            continue;
        }
        out.push(Checkpoint::parse(line, i + 1)?);
    }
    Ok(out)
}

/// A checkpoint has a `seq` and a `sig`; trail entries and requests do not.
fn is_checkpoint_line(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .is_some_and(|v| v.get("seq").is_some() && v.get("sig").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::signing::Ed25519Key;
    use crate::crypto::KeyMaterial;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            seq: 1,
            kind: Kind::Head,
            at: DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
            trail: Head {
                head_id: 3,
                head_hash: "ab".repeat(32),
                count: 3,
            },
            requests: Head {
                head_id: 2,
                head_hash: "cd".repeat(32),
                count: 1,
            },
            prev_sig: None,
            key: "local:ed25519:0011".into(),
            alg: "ed25519".into(),
            sig: String::new(),
        }
    }

    #[test]
    fn a_signed_line_round_trips_and_any_changed_field_breaks_the_signature() {
        let key = Ed25519Key::from_seed(&KeyMaterial::generate());
        let mut c = checkpoint();
        c.set_signature(&key.sign(&c.signed_bytes()));
        let parsed = Checkpoint::parse(&c.to_line(), 1).unwrap();
        assert_eq!(parsed, c);
        assert!(parsed.signed_by(&key.verifying_key()));
        let edits: Vec<fn(&mut Checkpoint)> = vec![
            |c| c.seq = 2,
            |c| c.kind = Kind::Archive,
            |c| c.at += chrono::Duration::microseconds(1),
            |c| c.trail.head_id = 4,
            |c| c.trail.count = 2,
            |c| c.requests.head_hash = "ce".repeat(32),
            |c| c.prev_sig = Some("AA==".into()),
            |c| c.key = "local:ed25519:0012".into(),
        ];
        for edit in edits {
            let mut forged = parsed.clone();
            edit(&mut forged);
            assert!(!forged.signed_by(&key.verifying_key()));
        }
    }

    #[test]
    fn read_lines_skips_entries_and_reports_a_broken_checkpoint_by_line() {
        let c = checkpoint().to_line();
        let text = format!("{{\"chain\":\"trail\",\"id\":1}}\n\n{c}\n");
        assert_eq!(read_lines(&text).unwrap().len(), 1);
        let broken = format!("{c}\n{{\"seq\":\"x\",\"sig\":\"\"}}\n");
        assert_eq!(read_lines(&broken).unwrap_err().line, 2);
    }
}
