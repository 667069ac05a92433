//! Key rotation and erasure on the embedded default, with a worker consuming
//! while the rotations run.

use crate::common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pii_vault::domain::CanonicalIp;
use sqlx::sqlite::SqlitePoolOptions;

fn cmd(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(common::bin())
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("PII_VAULT_KMS_KEY_ID")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Events from small pools of IPs, devices and users, so values repeat
/// across the chunks fed before, during and after each rotation.
fn events(seed: u64, n: usize) -> String {
    common::gen_events(&[
        "-n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
        "--ips",
        "40",
        "--devices",
        "40",
        "--users",
        "30",
    ])
}

/// Reveals every user and checks the originals, and that tokens are one
/// version and consistent: equal values, equal tokens; different values,
/// different tokens.
fn check_reveals(dir: &Path, input: &str) -> usize {
    let mut want: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for l in input.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        want.entry(v["user_id"].as_str().unwrap().into())
            .or_default()
            .push((
                v["ip"].as_str().unwrap().into(),
                v["device_id"].as_str().unwrap().into(),
            ));
    }
    let (mut ip_tok, mut tok_ip, mut versions) = (
        HashMap::new(),
        HashMap::new(),
        std::collections::HashSet::new(),
    );
    let mut rows = 0;
    for (user, originals) in &want {
        let out = cmd(
            dir,
            &[
                "reveal",
                "--user-id",
                user,
                "--reason",
                "rotation test",
                "--format",
                "json",
            ],
        );
        let mut got: Vec<(String, String)> = vec![];
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (ip, dev) = (
                v["ip"].as_str().expect("original ip").to_string(),
                v["device_id"].as_str().unwrap().to_string(),
            );
            let mip = v["masked_ip"].as_str().unwrap().to_string();
            versions.insert(mip.split('_').next().unwrap().to_string());
            let canon = CanonicalIp::parse(&ip).unwrap().expose().to_string();
            assert_eq!(
                ip_tok.entry(canon.clone()).or_insert(mip.clone()),
                &mip,
                "one IP, two tokens"
            );
            assert_eq!(
                tok_ip.entry(mip).or_insert(canon.clone()),
                &canon,
                "one token, two IPs"
            );
            got.push((ip, dev));
            rows += 1;
        }
        let mut expected = originals.clone();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "originals of {user}");
    }
    assert_eq!(
        versions.len(),
        1,
        "tokens of several versions: {versions:?}"
    );
    rows
}

#[tokio::test]
async fn rotations_while_a_worker_consumes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // This test reveals every user after every step: more than a day's
    // worth of reveals under the default policy.
    cmd(
        dir.path(),
        &["policy", "set", "--max-reveals-per-day", "100000"],
    );
    let chunks: Vec<String> = (0..4).map(|i| events(100 + i, 150)).collect();
    let all: String = chunks.concat();

    let mut worker = Command::new(common::bin())
        .args([
            "run",
            "--from-file",
            "-",
            "--source-id",
            "stream",
            "--batch-size",
            "20",
        ])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = worker.stdin.take().unwrap();
    let db = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "sqlite:{}?mode=rwc",
            dir.path().join("pii-vault.db").display()
        ))
        .await
        .unwrap();
    let rotations: [&[&str]; 3] = [
        &["rotate", "data-keys"],
        &["rotate", "token-key"],
        &["rotate", "data-keys"],
    ];
    let mut fed = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        // Half of the chunk, committed before the rotation starts (waited
        // for, not slept on); the other half fed while it runs, in a thread,
        // so worker and rotation overlap; then the next chunk, which the
        // worker can only commit under the new keys: its old ones were
        // retired, so it must notice.
        let lines: Vec<String> = chunk.lines().map(str::to_string).collect();
        let (before, during) = lines.split_at(lines.len() / 2);
        stdin
            .write_all((before.join("\n") + "\n").as_bytes())
            .unwrap();
        stdin.flush().unwrap();
        fed += before.len() as i64;
        wait_for_logins(&db, fed).await;
        match rotations.get(i) {
            Some(r) => {
                let writer = std::thread::spawn({
                    let during = during.join("\n") + "\n";
                    move || {
                        stdin.write_all(during.as_bytes()).unwrap();
                        stdin.flush().unwrap();
                        stdin
                    }
                });
                cmd(dir.path(), r);
                stdin = writer.join().unwrap();
            }
            None => {
                stdin
                    .write_all((during.join("\n") + "\n").as_bytes())
                    .unwrap();
                stdin.flush().unwrap();
            }
        }
        fed += during.len() as i64;
        wait_for_logins(&db, fed).await;
    }
    drop(stdin);
    let out = worker.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // The worker noticed both rotations by itself (the commit fence), not by luck.
    assert!(log.contains("data key retired by a rotation"), "{log}");
    assert!(
        log.contains("token key rotated; switching to the new version"),
        "{log}"
    );
    assert_eq!(common::summary(&out.stderr), (600, 0, 0), "{log}");

    // A final token rotation and data-key rotation with the worker stopped.
    cmd(dir.path(), &["rotate", "token-key"]);
    cmd(dir.path(), &["rotate", "data-keys"]);

    assert_eq!(check_reveals(dir.path(), &all), 600);

    let dangling: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault v JOIN vault_keys k ON k.id = v.key_id WHERE k.state = 'destroyed' OR k.wrapped IS NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(dangling, 0, "vault rows refer to destroyed keys");
    let destroyed_with_blob: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault_keys WHERE state = 'destroyed' AND wrapped IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        destroyed_with_blob, 0,
        "a destroyed key kept its wrapped material"
    );
    let destroyed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE state = 'destroyed'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        destroyed >= 3,
        "old data and token keys should be destroyed, found {destroyed}"
    );
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't3\\_%' ESCAPE '\\'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(stale, 0);

    // Re-running the same input (same source id) after the rotations
    // stores nothing new: every line is a duplicate.
    let input = dir.path().join("all.jsonl");
    std::fs::write(&input, &all).unwrap();
    let again = cmd(
        dir.path(),
        &["run", "--from-file", "all.jsonl", "--source-id", "stream"],
    );
    assert_eq!(common::summary(&again.stderr), (0, 600, 0));
    db.close().await;
}

/// Waits (up to a minute) until `user_logins` holds `n` rows.
async fn wait_for_logins(db: &sqlx::SqlitePool, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
            .fetch_one(db)
            .await
            .unwrap_or(0);
        if have >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker committed {have} of {n} logins within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn forget_erases_originals_but_keeps_masked_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = events(7, 120);
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    cmd(dir.path(), &["run", "--from-file", "in.jsonl"]);
    let first: serde_json::Value = serde_json::from_str(input.lines().next().unwrap()).unwrap();
    let user = first["user_id"].as_str().unwrap();

    let before = cmd(
        dir.path(),
        &[
            "reveal",
            "--user-id",
            user,
            "--reason",
            "before",
            "--format",
            "json",
        ],
    );
    let n = String::from_utf8_lossy(&before.stdout).lines().count();
    assert!(n >= 1);
    let f = cmd(
        dir.path(),
        &[
            "forget",
            "--user-id",
            user,
            "--reason",
            "erasure request 42",
        ],
    );
    assert!(String::from_utf8_lossy(&f.stderr).contains(&format!("erased {n} vault row(s)")));
    // Counted in the database, not taken from the product's own message.
    let db = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "sqlite:{}",
            dir.path().join("pii-vault.db").display()
        ))
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let db = db.clone();
        let user = user.to_string();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(user)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM vault WHERE user_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM quarantine WHERE user_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM user_logins WHERE user_id = $1").await,
        n as i64
    );
    let others: i64 = sqlx::query_scalar("SELECT count(*) FROM vault")
        .fetch_one(&db)
        .await
        .unwrap();
    let all_valid = input.lines().count() as i64;
    assert_eq!(
        others,
        all_valid - n as i64,
        "other users' vault rows must stay"
    );
    db.close().await;

    let after = cmd(
        dir.path(),
        &[
            "reveal",
            "--user-id",
            user,
            "--reason",
            "after",
            "--format",
            "json",
        ],
    );
    for line in String::from_utf8_lossy(&after.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v["ip"].is_null() && v["device_id"].is_null(),
            "forgotten originals came back"
        );
        assert!(
            v["masked_ip"].as_str().unwrap().starts_with("t1_"),
            "masked rows should stay"
        );
    }
    assert_eq!(String::from_utf8_lossy(&after.stdout).lines().count(), n);
    assert!(String::from_utf8_lossy(&after.stderr).contains("no recoverable originals"));

    // Other users are untouched, and forget is on the audit trail.
    let other = input
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["user_id"] != first["user_id"])
        .unwrap();
    let o = cmd(
        dir.path(),
        &[
            "reveal",
            "--user-id",
            other["user_id"].as_str().unwrap(),
            "--reason",
            "x",
            "--format",
            "json",
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(other["device_id"].as_str().unwrap()));
    let audit = cmd(dir.path(), &["audit", "--format", "json"]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("\"action\":\"forget\""));
    assert!(String::from_utf8_lossy(&audit.stdout).contains("erasure request 42"));
}

fn cmd_any(dir: &Path, args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("PII_VAULT_KMS_KEY_ID")
        .output()
        .unwrap()
}

/// A row a rotation cannot open (here: its ciphertext tampered with) is
/// named and skipped; everything else is rotated, the key the bad row needs
/// is kept, and the exit status says something was skipped. Every job is
/// in the audit trail before it ran.
#[tokio::test]
async fn rotations_skip_and_report_rows_they_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let input = events(11, 60);
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    let out = cmd(
        dir.path(),
        &["run", "--from-file", "in.jsonl", "--no-progress"],
    );
    let (stored, _, _) = common::summary(&out.stderr);
    assert!(stored > 10, "{stored}");

    let url = format!("sqlite:{}", dir.path().join("pii-vault.db").display());
    let db = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let victim: String =
        sqlx::query_scalar("SELECT message_id FROM vault ORDER BY message_id LIMIT 1 OFFSET 3")
            .fetch_one(&db)
            .await
            .unwrap();
    sqlx::query("UPDATE vault SET ciphertext = zeroblob(length(ciphertext)) WHERE message_id = $1")
        .bind(&victim)
        .execute(&db)
        .await
        .unwrap();
    let old_key: String = sqlx::query_scalar("SELECT key_id FROM vault WHERE message_id = $1")
        .bind(&victim)
        .fetch_one(&db)
        .await
        .unwrap();

    let out = cmd_any(
        dir.path(),
        &["rotate", "data-keys", "--reason", "quarterly"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("re-encrypted {} row(s)", stored - 1)),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 sealed row(s) could not be opened") && stderr.contains(&victim),
        "{stderr}"
    );
    assert!(common::leaked(&out.stderr, &common::raw_pii(&input)).is_empty());
    // Every other row moved; the bad one stays under its old key, which is
    // kept (retired, not destroyed), so nothing more was lost.
    let under_old: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE key_id = $1")
        .bind(&old_key)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(under_old, 1);
    let state: String = sqlx::query_scalar("SELECT state FROM vault_keys WHERE id = $1")
        .bind(&old_key)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(state, "retired");

    // Token rotation: the same row cannot be re-tokenised; the rest are,
    // and the old token key stays retired rather than destroyed.
    let out = cmd_any(dir.path(), &["rotate", "token-key"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("re-tokenised {} login(s)", stored - 1))
            && stderr.contains(&victim),
        "{stderr}"
    );
    let v1: String =
        sqlx::query_scalar("SELECT state FROM vault_keys WHERE purpose = 'token' AND version = 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(v1, "retired");
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't2\\_%' ESCAPE '\\'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(stale, 1);

    let actions: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT action, reason, row_count FROM audit_log WHERE action LIKE 'rotate-%' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(actions.len(), 2);
    assert_eq!(
        (actions[0].0.as_str(), actions[0].1.as_str(), actions[0].2),
        ("rotate-data-keys", "quarterly", stored as i64)
    );
    assert_eq!(
        (actions[1].0.as_str(), actions[1].1.as_str()),
        ("rotate-token-key", "scheduled key rotation")
    );
    db.close().await;
}
