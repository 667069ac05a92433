//! Trail entries as a SIEM takes them: JSON Lines, or ArcSight's Common
//! Event Format. Each carries its hash and the previous one, so that the
//! receiver can check that nothing was left out between two deliveries.

use serde::Serialize;

use super::entry::{canonical_time, RequestEntry, TrailEntry};

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    chain: &'static str,
    #[serde(flatten)]
    entry: &'a T,
}

/// One JSON object: `{"chain":"trail","id":…,…,"prev_hash":…,"hash":…}`.
pub fn jsonl(entry: &TrailEntry) -> String {
    serde_json::to_string(&Line {
        chain: "trail",
        entry,
    })
    .expect("an entry serialises")
}

/// A reveal request as an archive holds it: `{"chain":"requests",…}`.
pub fn request_jsonl(entry: &RequestEntry) -> String {
    serde_json::to_string(&Line {
        chain: "requests",
        entry,
    })
    .expect("a request serialises")
}

/// How loud each action is for a SIEM (CEF severity, 0–10).
fn severity(action: &str) -> u8 {
    match action {
        "audit-archive" => 8,
        "forget" | "retention" | "policy-set" => 6,
        "reveal" | "reveal-request" | "approve" | "subject-access" | "search" => 5,
        _ => 3,
    }
}

fn header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

fn ext(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// One CEF line. `version` is pii-vault's, for the header.
pub fn cef(entry: &TrailEntry, version: &str) -> String {
    let mut x = vec![
        format!("rt={}", entry.at.timestamp_millis()),
        format!("externalId={}", entry.id),
        format!("suser={}", ext(&entry.actor)),
        format!("act={}", ext(&entry.action)),
        format!("msg={}", ext(&entry.reason)),
        format!("cnt={}", entry.row_count),
        "cs1Label=target".into(),
        format!("cs1={}", ext(&entry.target)),
        "cs2Label=claimedActor".into(),
        format!("cs2={}", ext(entry.claimed_actor.as_deref().unwrap_or(""))),
        "cs3Label=hash".into(),
        format!("cs3={}", hex::encode(&entry.hash)),
        "cs4Label=prevHash".into(),
        format!("cs4={}", hex::encode(&entry.prev_hash)),
        "cs5Label=at".into(),
        format!("cs5={}", canonical_time(&entry.at)),
    ];
    if let Some(xact) = entry.xact {
        x.push("cn1Label=xact".into());
        x.push(format!("cn1={xact}"));
    }
    format!(
        "CEF:0|pii-vault|pii-vault|{}|{}|{}|{}|{}",
        header(version),
        header(&entry.action),
        header(&format!("pii-vault {}", entry.action)),
        severity(&entry.action),
        x.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn entry() -> TrailEntry {
        TrailEntry {
            id: 7,
            at: DateTime::<Utc>::from_timestamp(1_800_000_000, 5_000).unwrap(),
            actor: "bob".into(),
            claimed_actor: None,
            action: "reveal".into(),
            target: "user_id=a=b".into(),
            reason: "line one\nline|two \\ end".into(),
            row_count: 3,
            xact: Some(9),
            prev_hash: vec![1; 32],
            hash: vec![2; 32],
        }
    }

    #[test]
    fn cef_escapes_what_would_split_a_field_or_a_line() {
        let line = cef(&entry(), "0.1.0");
        assert!(line.starts_with("CEF:0|pii-vault|pii-vault|0.1.0|reveal|pii-vault reveal|5|"));
        assert!(!line.contains('\n'));
        assert!(line.contains("cs1=user_id\\=a\\=b "));
        assert!(line.contains("msg=line one\\nline|two \\\\ end "));
        assert!(line.contains(&format!("cs3={}", "02".repeat(32))));
        assert!(line.contains("externalId=7 "));
    }

    #[test]
    fn jsonl_holds_every_field_with_hashes_in_hex() {
        let v: serde_json::Value = serde_json::from_str(&jsonl(&entry())).unwrap();
        assert_eq!(v["chain"], "trail");
        assert_eq!(v["id"], 7);
        assert_eq!(v["at"], "2027-01-15T08:00:00.000005Z");
        assert_eq!(v["claimed_actor"], serde_json::Value::Null);
        assert_eq!(v["prev_hash"], "01".repeat(32));
        assert_eq!(v["xact"], 9);
    }
}
