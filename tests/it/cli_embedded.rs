//! The embedded default end to end, through the binary, as a new user runs
//! it: a JSON Lines file into an SQLite file with a local key file, then
//! reveal. Each test proves one security property of the design.

use crate::common::{self, app::TestApp};

use std::collections::{HashMap, HashSet};
use std::process::Output;

use pii_vault::domain::CanonicalIp;
use sqlx::Row;

const SAMPLE: &str = include_str!("../../samples/logins.jsonl");

/// The malformed lines of `samples/logins.jsonl` (204 lines), 0-based,
/// pinned by reading the file, not derived from the parser under test:
/// over-long user ids (18, 25, 46, 130), NUL characters (33, 173), an IP
/// that is a number (48), JSON arrays (71, 190, 197, 202), IPs that are no
/// IPs (73, 199, 203).
const SAMPLE_MALFORMED: [usize; 14] = [
    18, 25, 33, 46, 48, 71, 73, 130, 173, 190, 197, 199, 202, 203,
];

/// The lines of `text` not listed in `malformed`, as JSON values.
fn valid_of(text: &str, malformed: &[usize]) -> Vec<serde_json::Value> {
    text.lines()
        .enumerate()
        .filter(|(i, _)| !malformed.contains(i))
        .map(|(_, l)| serde_json::from_str(l).unwrap())
        .collect()
}

fn valid_lines(text: &str) -> Vec<serde_json::Value> {
    assert_eq!(
        text, SAMPLE,
        "valid_lines is for the sample; use gen_events_recorded"
    );
    assert_eq!(SAMPLE.lines().count(), 204);
    valid_of(text, &SAMPLE_MALFORMED)
}

#[tokio::test]
async fn sample_file_runs_idempotently_and_stores_no_plaintext_pii() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", SAMPLE);
    let first = app.ok_output(&["run", "--from-file", &input]);
    let lines = SAMPLE.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    let valid = valid_lines(SAMPLE).len() as u64;
    assert_eq!(common::summary(&first.stderr), (valid, 0, lines - valid));
    assert!(
        lines - valid >= 7,
        "the sample should carry malformed lines"
    );

    let second = app.ok_output(&["run", "--from-file", &input]);
    assert_eq!(
        common::summary(&second.stderr),
        (0, lines, 0),
        "a second run must add nothing"
    );

    let raw = common::raw_pii(SAMPLE);
    assert!(raw.len() > 50);
    let leaks = common::leaked(&common::files_bytes(app.dir(), "pii-vault.db"), &raw);
    assert!(
        leaks.is_empty(),
        "database holds plaintext PII: {} values",
        leaks.len()
    );
    for out in [&first, &second] {
        let leaks = common::leaked(&[&out.stdout[..], &out.stderr[..]].concat(), &raw);
        assert!(
            leaks.is_empty(),
            "run output holds plaintext PII: {} values",
            leaks.len()
        );
    }

    let db = app.sqlite().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n as u64, valid);
    let q: i64 = sqlx::query_scalar("SELECT count(*) FROM quarantine")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(q as u64, lines - valid);
}

#[tokio::test]
async fn tokens_join_equal_values_and_separate_different_ones() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", SAMPLE);
    app.ok_output(&["run", "--from-file", &input]);
    let users: HashSet<String> = valid_lines(SAMPLE)
        .iter()
        .map(|v| v["user_id"].as_str().unwrap().to_string())
        .collect();
    let (mut ip_to_tok, mut tok_to_ip) = (HashMap::new(), HashMap::new());
    let (mut dev_to_tok, mut tok_to_dev) = (HashMap::new(), HashMap::new());
    let mut rows = 0;
    for u in &users {
        let out = app.ok_output(&[
            "reveal",
            "--user-id",
            u,
            "--reason",
            "token test",
            "--format",
            "json",
        ]);
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ip = CanonicalIp::parse(v["ip"].as_str().unwrap())
                .unwrap()
                .expose()
                .to_string();
            let (dev, mip, mdev) = (
                v["device_id"].as_str().unwrap().to_string(),
                v["masked_ip"].as_str().unwrap().to_string(),
                v["masked_device_id"].as_str().unwrap().to_string(),
            );
            assert_eq!(
                ip_to_tok.entry(ip.clone()).or_insert(mip.clone()),
                &mip,
                "one IP, two tokens"
            );
            assert_eq!(
                tok_to_ip.entry(mip).or_insert(ip.clone()),
                &ip,
                "one IP token, two IPs"
            );
            assert_eq!(
                dev_to_tok.entry(dev.clone()).or_insert(mdev.clone()),
                &mdev,
                "one device, two tokens"
            );
            assert_eq!(
                tok_to_dev.entry(mdev).or_insert(dev.clone()),
                &dev,
                "one device token, two devices"
            );
            rows += 1;
        }
    }
    assert_eq!(rows, valid_lines(SAMPLE).len());
}

const GOOD: &str = r#"{"user_id": "u-good", "app_version": "2.3.0", "device_type": "android", "ip": "203.0.113.77", "locale": "RU", "device_id": "771-22-9931"}"#;

#[tokio::test]
async fn each_kind_of_malformed_line_is_quarantined_with_its_reason() {
    let app = TestApp::embedded();
    let long_user = format!(
        r#"{{"user_id": "{}", "app_version": "1", "device_type": "ios", "ip": "203.0.113.9", "device_id": "555-11-2222"}}"#,
        "u".repeat(129)
    );
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not valid JSON"),
        (r#"["203.0.113.9", "555-11-2222"]"#.into(), "JSON array"),
        (r#"{"user_id": "u1", "app_version": "1", "device_type": "ios", "device_id": "555-11-2222"}"#.into(), "`ip` is missing"),
        (r#"{"user_id": "u1", "app_version": "1", "device_type": "ios", "ip": "203.0.113.999", "device_id": "555-11-2222"}"#.into(), "not an IPv4 or IPv6"),
        (long_user, "longer than 128"),
        (r#"{"user_id": "u1", "app_version": "1", "device_type": "ios", "ip": "203.0.113.9", "device_id": "555-11\u0000-2222"}"#.into(), "NUL"),
        (r#"{"user_id": "u1", "app_version": "1", "device_type": "ios", "ip": 3405803785, "device_id": "555-11-2222"}"#.into(), "`ip` must be a string"),
    ];
    let mut text = String::new();
    for (line, _) in &cases {
        text.push_str(
            GOOD.replace("u-good", &format!("u-good-{}", text.len()))
                .as_str(),
        );
        text.push('\n');
        text.push_str(line);
        text.push('\n');
    }
    let input = app.write("bad.jsonl", &text);
    let out = app.ok_output(&["run", "--from-file", &input]);
    assert_eq!(
        common::summary(&out.stderr),
        (cases.len() as u64, 0, cases.len() as u64)
    );

    let db = app.sqlite().await;
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM quarantine")
        .fetch_all(&db)
        .await
        .unwrap();
    for (_, want) in &cases {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no reason containing {want:?} in {reasons:?}"
        );
    }
    for r in &reasons {
        assert!(
            !r.contains("203.0.113") && !r.contains("555-11"),
            "reason quotes a value: {r}"
        );
    }
    // The log names the line of each rejection so the user can find it.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line=2") || err.contains("line: 2") || err.contains("\"line\":2"),
        "{err}"
    );
    // Quarantined bodies are sealed, not stored in clear.
    let raw = vec![
        "555-11-2222".to_string(),
        "203.0.113.9".to_string(),
        "203.0.113.77".to_string(),
    ];
    assert!(common::leaked(&common::files_bytes(app.dir(), "pii-vault.db"), &raw).is_empty());
}

#[tokio::test]
async fn no_audit_row_means_nothing_is_revealed() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &format!("{GOOD}\n"));
    app.ok_output(&["run", "--from-file", &input]);
    let db = app.sqlite().await;
    sqlx::query("CREATE TRIGGER block_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit down'); END")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let out = app.run(&[
        "reveal",
        "--user-id",
        "u-good",
        "--reason",
        "incident 7",
        "--format",
        "json",
    ]);
    assert!(!out.status.success());
    let all = [&out.stdout[..], &out.stderr[..]].concat();
    assert!(common::leaked(&all, &["203.0.113.77".into(), "771-22-9931".into()]).is_empty());
    assert!(out.stdout.is_empty());

    let db = app.sqlite().await;
    sqlx::query("DROP TRIGGER block_audit")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        "u-good",
        "--reason",
        "incident 7",
        "--format",
        "json",
        "--actor",
        "alice",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ip"], "203.0.113.77");
    assert_eq!(v["device_id"], "771-22-9931");
    let audit = app.ok_output(&["audit", "--format", "json"]);
    let newest = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let a: serde_json::Value = serde_json::from_str(&newest).unwrap();
    assert_eq!(
        (
            a["action"].as_str(),
            a["claimed_actor"].as_str(),
            a["reason"].as_str(),
            a["row_count"].as_i64()
        ),
        (Some("reveal"), Some("alice"), Some("incident 7"), Some(1))
    );
    // The actor is the store's own account of who ran it, not the claim.
    assert_ne!(a["actor"].as_str(), Some("alice"));
}

#[tokio::test]
async fn ciphertexts_swapped_between_rows_do_not_decrypt() {
    let app = TestApp::embedded();
    let other = GOOD
        .replace("u-good", "u-other")
        .replace("203.0.113.77", "198.51.100.5")
        .replace("771-22-9931", "123-45-6789");
    let input = app.write("in.jsonl", &format!("{GOOD}\n{other}\n"));
    app.ok_output(&["run", "--from-file", &input]);
    let db = app.sqlite().await;
    let rows = sqlx::query("SELECT message_id, nonce, ciphertext FROM vault ORDER BY user_id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (me, them) in [(0, 1), (1, 0)] {
        sqlx::query("UPDATE vault SET nonce = $1, ciphertext = $2 WHERE message_id = $3")
            .bind(rows[them].get::<Vec<u8>, _>("nonce"))
            .bind(rows[them].get::<Vec<u8>, _>("ciphertext"))
            .bind(rows[me].get::<String, _>("message_id"))
            .execute(&db)
            .await
            .unwrap();
    }
    db.close().await;
    for user in ["u-good", "u-other"] {
        let out = app.run(&[
            "reveal",
            "--user-id",
            user,
            "--reason",
            "swap test",
            "--format",
            "json",
        ]);
        assert!(
            !out.status.success(),
            "a swapped ciphertext decrypted for {user}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("decryption failed"), "{err}");
        let all = [&out.stdout[..], &out.stderr[..]].concat();
        assert!(common::leaked(
            &all,
            &[
                "203.0.113.77".into(),
                "198.51.100.5".into(),
                "123-45-6789".into()
            ]
        )
        .is_empty());
    }
}

#[tokio::test]
async fn every_encryption_has_its_own_nonce_and_keys_are_stored_wrapped() {
    let app = TestApp::embedded();
    // The same event many times: equal plaintexts, which must still get distinct nonces.
    let text: String = (0..300).map(|_| format!("{GOOD}\n")).collect();
    let input = app.write("same.jsonl", &text);
    app.ok_output(&["run", "--from-file", &input]);
    app.ok_output(&["run", "--from-file", &app.write("s.jsonl", SAMPLE)]);
    let db = app.sqlite().await;
    let nonces: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT nonce FROM vault UNION ALL SELECT nonce FROM quarantine")
            .fetch_all(&db)
            .await
            .unwrap();
    let distinct: HashSet<&Vec<u8>> = nonces.iter().collect();
    assert!(nonces.len() > 400);
    assert_eq!(distinct.len(), nonces.len(), "a nonce was reused");
    let cts: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT ciphertext FROM vault WHERE user_id = 'u-good'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        cts.iter().collect::<HashSet<_>>().len(),
        300,
        "equal plaintexts gave equal ciphertexts"
    );
    // Wrapped keys are 12-byte nonce + 32-byte key + 16-byte tag, never the bare 32 bytes.
    let wrapped: Vec<Vec<u8>> = sqlx::query_scalar("SELECT wrapped FROM vault_keys")
        .fetch_all(&db)
        .await
        .unwrap();
    assert!(wrapped.iter().all(|w| w.len() == 60));
}

#[tokio::test]
async fn reveal_by_token_and_helpful_errors() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &format!("{GOOD}\n"));
    app.ok_output(&["run", "--from-file", &input]);
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        "u-good",
        "--reason",
        "r",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_ip = app.ok_output(&[
        "reveal",
        "--masked-ip",
        v["masked_ip"].as_str().unwrap(),
        "--reason",
        "r",
        "--format",
        "json",
    ]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&by_ip.stdout).unwrap()["device_id"],
        "771-22-9931"
    );
    let by_dev = app.ok_output(&[
        "reveal",
        "--masked-device-id",
        v["masked_device_id"].as_str().unwrap(),
        "--reason",
        "r",
        "--format",
        "json",
    ]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&by_dev.stdout).unwrap()["ip"],
        "203.0.113.77"
    );
    let table = app.ok_output(&["reveal", "--user-id", "u-good", "--reason", "r"]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(
        t.contains("203.0.113.77")
            && t.contains("771-22-9931")
            && t.lines().next().unwrap().contains("device_id")
    );

    let none = app.ok_output(&["reveal", "--user-id", "nobody", "--reason", "r"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("no logins match"));
    let missing = app.run(&["run", "--from-file", "does-not-exist.jsonl"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open does-not-exist.jsonl"));
    let no_reason = app.run(&["reveal", "--user-id", "u-good"]);
    assert!(!no_reason.status.success());
    assert!(String::from_utf8_lossy(&no_reason.stderr).contains("--reason"));
}

/// A masked IP shared by thousands of logins reveals every one of them,
/// opened, as JSON lines and as a table, however many rows pass before the
/// table's widths are fixed; a wider cell late in the table is printed
/// whole, and the audit row counts what was revealed.
#[tokio::test]
async fn a_reveal_of_an_ip_shared_by_thousands_prints_every_original() {
    const N: usize = 3000;
    let app = TestApp::embedded();
    let device = |i: usize| {
        if i == N - 1 {
            format!("a-device-id-longer-than-any-before-it-{i}")
        } else {
            format!("dev-{i:05}")
        }
    };
    let mut input = String::new();
    for i in 0..N {
        input.push_str(
            &serde_json::json!({
                "user_id": format!("u-crowd-{}", i % 7),
                "app_version": "2.3.0",
                "device_type": "web",
                "ip": "198.51.100.7",
                "locale": null,
                "device_id": device(i),
            })
            .to_string(),
        );
        input.push('\n');
    }
    let input = app.write("crowd.jsonl", &input);
    let out = app.ok_output(&["run", "--from-file", &input]);
    assert_eq!(common::summary(&out.stderr), (N as u64, 0, 0));
    let token: String = sqlx::query_scalar("SELECT DISTINCT masked_ip FROM user_logins")
        .fetch_one(&app.sqlite().await)
        .await
        .unwrap();

    let want: HashSet<(String, String)> = (0..N)
        .map(|i| (format!("u-crowd-{}", i % 7), device(i)))
        .collect();
    let json = app.ok_output(&[
        "reveal",
        "--masked-ip",
        &token,
        "--reason",
        "INC-crowd",
        "--format",
        "json",
    ]);
    let lines: Vec<serde_json::Value> = String::from_utf8(json.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), N);
    let got: HashSet<(String, String)> = lines
        .iter()
        .map(|v| {
            assert_eq!(v["ip"], "198.51.100.7");
            assert_eq!(v["masked_ip"], token.as_str());
            (
                v["user_id"].as_str().unwrap().to_string(),
                v["device_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(got == want, "the revealed originals differ from the input");
    let stderr = String::from_utf8_lossy(&json.stderr);
    assert!(
        stderr.contains(&format!("revealed {N} login(s)")),
        "{stderr}"
    );

    let table = app.ok_output(&["reveal", "--masked-ip", &token, "--reason", "INC-crowd"]);
    let text = String::from_utf8(table.stdout).unwrap();
    let rows: Vec<&str> = text.lines().skip(2).collect();
    assert_eq!(rows.len(), N);
    assert!(text.lines().next().unwrap().starts_with("user_id"));
    let in_table: HashSet<(String, String)> = rows
        .iter()
        .map(|r| {
            let cells: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(cells[2], "198.51.100.7", "{r}");
            (cells[0].to_string(), cells[3].to_string())
        })
        .collect();
    assert!(
        in_table == want,
        "the table's originals differ from the input"
    );

    let counted: Vec<i64> =
        sqlx::query_scalar("SELECT row_count FROM audit_log WHERE action = 'reveal' ORDER BY id")
            .fetch_all(&app.sqlite().await)
            .await
            .unwrap();
    assert_eq!(counted, vec![N as i64, N as i64]);
}

#[tokio::test]
async fn stdin_input_and_the_key_file_is_private() {
    use std::io::Write;
    let app = TestApp::embedded();
    let mut child = app
        .command(&["run", "--from-file", "-", "--source-id", "stdin-test"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{GOOD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(common::summary(&out.stderr), (1, 0, 0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not for production"),
        "no local-key warning: {err}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(app.path("keys/local-kek.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// A key wrapped under a key-encryption key that is not on the allow-list is
/// refused by reveal with a clear error that names the key, not its KEK or
/// any value; with the KEK allowed again, the same reveal works.
#[tokio::test]
async fn reveal_refuses_keys_under_a_kek_off_the_allow_list() {
    let app = TestApp::embedded();
    let input = app.write(
        "in.jsonl",
        r#"{"user_id": "u-kek", "app_version": "1.0", "device_type": "ios", "ip": "198.51.100.23", "locale": "EN", "device_id": "555-12-3456"}
"#,
    );
    app.ok_output(&["run", "--from-file", &input, "--no-progress"]);
    let db = app.sqlite().await;
    let allowed: Vec<String> = sqlx::query_scalar("SELECT kek_id FROM kms_allowlist")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        allowed.len(),
        1,
        "the local KEK, allow-listed by the first run"
    );
    sqlx::query("DELETE FROM kms_allowlist")
        .execute(&db)
        .await
        .unwrap();
    let out = app.run(&[
        "reveal",
        "--user-id",
        "u-kek",
        "--reason",
        "test",
        "--format",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is wrapped under a key-encryption key that is not on the KMS allow-list"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let all = [&out.stdout[..], &out.stderr[..]].concat();
    assert!(common::leaked(&all, &["198.51.100.23".into(), "555-12-3456".into()]).is_empty());
    assert!(
        !stderr.contains(&allowed[0]),
        "the error names the KEK: {stderr}"
    );

    sqlx::query("INSERT INTO kms_allowlist (kek_id) VALUES ($1)")
        .bind(&allowed[0])
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        "u-kek",
        "--reason",
        "test",
        "--format",
        "json",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.51.100.23"));
}

/// On the embedded default the policy and the honeytokens work: a reveal
/// over the policy becomes a request (exit status 3) that the same user
/// cannot approve; a honeytoken's reveal is served and leaves an alarm.
#[tokio::test]
async fn policy_and_honeytokens_on_the_embedded_default() {
    let app = TestApp::embedded();
    let shared = r#""ip": "198.51.100.7", "locale": "EN""#;
    let input = app.write(
        "in.jsonl",
        &format!(
            "{{\"user_id\": \"u-1\", \"app_version\": \"1.0\", \"device_type\": \"ios\", {shared}, \"device_id\": \"111-22-3333\"}}\n\
             {{\"user_id\": \"u-2\", \"app_version\": \"1.0\", \"device_type\": \"ios\", {shared}, \"device_id\": \"444-55-6666\"}}\n"
        ),
    );
    app.ok_output(&["run", "--from-file", &input, "--no-progress"]);
    let out = app.ok_output(&["policy", "set", "--max-users-per-reveal", "1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains('1'));
    let shown = app.ok_output(&["policy", "show", "--format", "json"]);
    let p: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        (
            p["max_users_per_reveal"].as_i64(),
            p["max_reveals_per_day"].as_i64()
        ),
        (Some(1), Some(50))
    );

    let db = app.sqlite().await;
    let token: String = sqlx::query_scalar("SELECT masked_ip FROM user_logins LIMIT 1")
        .fetch_one(&db)
        .await
        .unwrap();
    let out = app.run(&[
        "reveal",
        "--masked-ip",
        &token,
        "--reason",
        "bulk",
        "--format",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // Nothing revealed: stdout holds the request, for a script.
    let pending: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pending["status"], "pending_approval");
    assert_eq!(pending["revealed"], 0);
    assert!(
        stderr.contains("pii-vault approve") && stderr.contains("Nothing was revealed"),
        "{stderr}"
    );
    let id: i64 = sqlx::query_scalar("SELECT id FROM reveal_requests WHERE status = 'pending'")
        .fetch_one(&db)
        .await
        .unwrap();
    let own = app.run(&["approve", &id.to_string(), "--reason", "me"]);
    let stderr = String::from_utf8_lossy(&own.stderr);
    assert!(!own.status.success());
    assert!(
        stderr.contains("another login must approve it") && stderr.contains("Postgres"),
        "{stderr}"
    );
    let early = app.run(&["reveal", "--request", &id.to_string()]);
    assert!(!early.status.success());
    assert!(early.stdout.is_empty());

    // Honeytokens: planted, written by the next run among its events (its
    // summary counts only what the file held), served on reveal, recorded
    // as an alarm.
    let out = app.ok_output(&["honeytoken", "plant", "--count", "2", "--over", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("planted 2 honeytoken user(s)"));
    let more = app.write(
        "more.jsonl",
        // (A user id of another shape than u-N: the honeytokens' ids are
        // u-N too, and one could be this one.)
        "{\"user_id\": \"late-3\", \"app_version\": \"1.0\", \"device_type\": \"ios\", \"ip\": \"198.51.100.9\", \"locale\": \"EN\", \"device_id\": \"777-88-9999\"}\n",
    );
    let run = app.ok_output(&["run", "--from-file", &more, "--no-progress"]);
    assert_eq!(common::summary(&run.stderr), (1, 0, 0));
    let planted: Vec<(String, String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT l.message_id, l.create_date, l.device_type, l.locale, l.app_version FROM user_logins l \
         JOIN honeytokens h ON h.user_id = l.user_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    // One a batch (this run is one batch); the other waits for the next.
    assert_eq!(planted.len(), 1, "{planted:?}");
    let trap: String = sqlx::query_scalar(
        "SELECT h.user_id FROM honeytokens h JOIN user_logins l ON l.user_id = h.user_id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let today = chrono::Utc::now().date_naive().to_string();
    for (id, date, device, locale, version) in &planted {
        assert!(id.starts_with("line-") && id.len() == 37, "{id}");
        assert_eq!(
            (
                date.as_str(),
                device.as_str(),
                locale.as_deref(),
                version.as_str()
            ),
            (today.as_str(), "ios", Some("EN"), "1.0")
        );
    }
    db.close().await;
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        &trap,
        "--reason",
        "curious",
        "--format",
        "json",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ip\":\""));
    let alarms = app.ok_output(&["audit", "--alarms", "--format", "json"]);
    let a: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&alarms.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(a["action"], "alarm");
    assert_eq!(a["target"], format!("user_id={trap}"));
    // --since and --actor narrow the trail.
    let none = app.ok_output(&["audit", "--since", "2999-01-01", "--format", "json"]);
    assert!(none.stdout.is_empty());
    let mine = app.ok_output(&["audit", "--actor", "nobody-at-all", "--format", "json"]);
    assert!(mine.stdout.is_empty());
    let all = app.ok_output(&["audit", "--since", "2000-01-01", "--format", "json"]);
    assert!(String::from_utf8_lossy(&all.stdout).lines().count() >= 4);
}

/// The next day's export with the same lines is not a redelivery: both
/// files are stored in full, and re-running either stores nothing new.
/// Standard input needs a source id.
#[tokio::test]
async fn identical_files_are_both_stored_and_reruns_add_nothing() {
    let app = TestApp::embedded();
    let gen = common::gen_events_recorded(&["-n", "30", "--seed", "21"]);
    let events = gen.text.clone();
    let valid = gen.valid().len() as u64;
    assert!(valid > 0);
    app.write("day1.jsonl", &events);
    app.write("day2.jsonl", &events);
    let run = |f: &str| {
        common::summary(
            &app.ok_output(&["run", "--from-file", f, "--no-progress"])
                .stderr,
        )
    };
    let first = run("day1.jsonl");
    assert_eq!(first.0, valid);
    let second = run("day2.jsonl");
    assert_eq!(
        second.0, valid,
        "the second file's identical lines must be stored"
    );
    assert_eq!(run("day1.jsonl").0, 0);
    assert_eq!(run("day2.jsonl").0, 0);
    let db = app.sqlite().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n as u64, 2 * valid);
    db.close().await;

    // A different source id for the same file is another input.
    let out = app.ok_output(&[
        "run",
        "--from-file",
        "day1.jsonl",
        "--source-id",
        "replay-1",
        "--no-progress",
    ]);
    assert_eq!(common::summary(&out.stderr).0, valid);

    let stdin = app.run(&["run", "--from-file", "-", "--no-progress"]);
    assert!(!stdin.status.success());
    assert!(String::from_utf8_lossy(&stdin.stderr).contains("needs --source-id"));
}

/// `forget --before`: a dry run counts, a date in the future or not a date
/// is refused with a clear message, and the real run erases every original
/// before the day (the sample's rows are all from today), keeps the masked
/// rows and leaves one audit row with the count.
#[tokio::test]
async fn retention_erases_originals_before_a_day_through_the_binary() {
    let app = TestApp::embedded();
    let input = app.write("logins.jsonl", SAMPLE);
    app.ok_output(&["run", "--from-file", &input]);
    let tomorrow = (chrono::Utc::now().date_naive() + chrono::Days::new(1))
        .format("%Y-%m-%d")
        .to_string();
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).to_string();

    let none = app.ok_output(&["forget", "--before", "2024-01-01", "--dry-run"]);
    assert!(
        stderr(&none).contains("would erase 0 vault row(s) and 0 quarantined"),
        "{}",
        stderr(&none)
    );
    let all = app.ok_output(&["forget", "--before", &tomorrow, "--dry-run"]);
    assert!(
        stderr(&all).contains("would erase 190 vault row(s) and 14 quarantined"),
        "{}",
        stderr(&all)
    );
    for (args, says) in [
        (
            vec!["forget", "--before", "2999-01-01", "--reason", "r"],
            "in the future",
        ),
        (
            vec!["forget", "--before", "2024-13-01", "--reason", "r"],
            "YYYY-MM-DD",
        ),
        (vec!["forget", "--before", &tomorrow], "--reason"),
        (
            vec![
                "forget",
                "--before",
                &tomorrow,
                "--user-id",
                "u",
                "--reason",
                "r",
            ],
            "cannot be used with",
        ),
        (vec!["forget", "--reason", "r"], "--user-id"),
    ] {
        let out = app.run(&args);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }

    let done = app.ok_output(&[
        "forget",
        "--before",
        &tomorrow,
        "--reason",
        "retention: 0 days",
    ]);
    assert!(
        stderr(&done).contains("erased 190 vault row(s) and 14 quarantined"),
        "{}",
        stderr(&done)
    );
    let db = app.sqlite().await;
    let count = |t: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {t}"))
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("vault").await, 0);
    assert_eq!(count("quarantine").await, 0);
    assert_eq!(count("user_logins").await, 190);
    let (action, target, rows): (String, String, i64) =
        sqlx::query_as("SELECT action, target, row_count FROM audit_log ORDER BY id DESC LIMIT 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (action.as_str(), target, rows),
        (
            "retention",
            // The worker retired its data key when its run ended; with every
            // row it sealed erased, retention destroys it.
            format!("before={tomorrow} keys_destroyed=1"),
            204
        )
    );
}
