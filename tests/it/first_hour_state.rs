//! The first hour: commands run in the wrong place, with a mistyped path or
//! a value that is not a token. Only `run`, `migrate` and `keys init` set a
//! store up; every other command finds an existing database (and, when it
//! needs one, the key file) or says which one it looked for, creating
//! nothing. A reveal checks what it needs (its selector's shape and token
//! version, the key-encryption keys the stored keys name) before it records
//! anything.

use std::path::Path;
use std::process::Output;

use sqlx::PgPool;

use crate::common::app::{TestApp, REVEALER, WORKER};
use crate::common::aws as aws_helpers;

/// Three logins of two users; the IPs are from documentation ranges.
const EVENTS: &str = concat!(
    r#"{"user_id": "u-first", "app_version": "2.3.0", "device_type": "android", "ip": "203.0.113.7", "locale": "RU", "device_id": "593-47-5928"}"#,
    "\n",
    r#"{"user_id": "u-first", "app_version": "2.3.1", "device_type": "android", "ip": "203.0.113.7", "locale": "RU", "device_id": "593-47-5928"}"#,
    "\n",
    r#"{"user_id": "u-second", "app_version": "1.0", "device_type": "ios", "ip": "198.51.100.23", "locale": null, "device_id": "771-22-9931"}"#,
    "\n",
);

/// Every entry of `dir`, recursively, as paths relative to it; SQLite's
/// `-wal` / `-shm` files of an existing database (they come and go with its
/// connections) left out.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.display().to_string();
            if name.ends_with("-wal") || name.ends_with("-shm") {
                continue;
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_failed(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{what} must fail, exited with {}:\n{err}",
        out.status
    );
    assert!(out.stdout.is_empty(), "{what} printed to stdout");
    err
}

async fn sqlite_audit_rows(app: &TestApp) -> i64 {
    let db = app.sqlite().await;
    let n = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    n
}

#[test]
fn read_only_and_privileged_commands_in_the_wrong_directory_create_nothing() {
    let app = TestApp::embedded();
    let commands: [&[&str]; 10] = [
        &["reveal", "--user-id", "u-first", "--reason", "INC-1"],
        &["tokenize", "--ip", "198.51.100.23", "--reason", "INC-1"],
        &["reveal", "--request", "1"],
        &["audit"],
        &["audit", "verify"],
        &["keys", "list"],
        &["keys", "allowed"],
        &["policy", "show"],
        &["approve", "1", "--reason", "ok"],
        &["forget", "--user-id", "u-first", "--reason", "erasure"],
    ];
    for args in commands {
        let out = app.run(args);
        let err = assert_failed(&out, &format!("{args:?}"));
        assert!(
            err.contains("no database at sqlite:pii-vault.db")
                && err.contains("--database-url")
                && err.contains("`pii-vault run` or `pii-vault migrate` creates one"),
            "{args:?} must name the database it looked for and what to do:\n{err}"
        );
        assert_eq!(
            entries(app.dir()),
            Vec::<String>::new(),
            "{args:?} created files"
        );
    }
}

#[test]
fn a_mistyped_input_file_creates_nothing() {
    let app = TestApp::embedded();
    let out = app.run(&["run", "--from-file", "typo.jsonl", "--no-progress"]);
    let err = assert_failed(&out, "run --from-file typo.jsonl");
    assert!(
        err.contains("cannot open typo.jsonl (the input file)")
            && err.contains("nothing was created"),
        "{err}"
    );
    assert_eq!(entries(app.dir()), Vec::<String>::new());
}

#[tokio::test]
async fn a_reveal_with_the_wrong_key_dir_records_nothing_and_creates_no_key() {
    let app = TestApp::embedded();
    let input = app.write("logins.jsonl", EVENTS);
    app.ok(&["run", "--from-file", &input, "--no-progress"]);
    let before = sqlite_audit_rows(&app).await;
    let files = entries(app.dir());

    let out = app.run(&[
        "--key-dir",
        "elsewhere",
        "reveal",
        "--user-id",
        "u-first",
        "--reason",
        "INC-2",
    ]);
    let err = assert_failed(&out, "reveal --key-dir elsewhere");
    assert!(
        err.contains("no local key file at elsewhere/local-kek.key") && err.contains("--key-dir"),
        "{err}"
    );
    assert!(!err.contains("back it up"), "no key may be created: {err}");
    assert_eq!(entries(app.dir()), files, "nothing created");
    assert_eq!(sqlite_audit_rows(&app).await, before, "nothing recorded");
    // So does a search: its token key is under the same local key.
    let out = app.run(&[
        "--key-dir",
        "elsewhere",
        "tokenize",
        "--ip",
        "198.51.100.23",
        "--reason",
        "INC-2",
    ]);
    let err = assert_failed(&out, "tokenize --key-dir elsewhere");
    assert!(
        err.contains("no local key file at elsewhere/local-kek.key"),
        "{err}"
    );
    assert!(!err.contains("198.51.100.23"), "{err}");
    assert_eq!(entries(app.dir()), files, "nothing created");
    assert_eq!(sqlite_audit_rows(&app).await, before, "nothing recorded");

    // And from the right place it reveals.
    let ok = app.ok_output(&[
        "reveal",
        "--user-id",
        "u-first",
        "--reason",
        "INC-2",
        "--format",
        "json",
    ]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).lines().count(), 2);
    assert_eq!(sqlite_audit_rows(&app).await, before + 1);
}

#[tokio::test]
async fn a_value_that_is_not_a_token_is_refused_unrepeated_and_unrecorded_embedded() {
    let app = TestApp::embedded();
    let input = app.write("logins.jsonl", EVENTS);
    app.ok(&["run", "--from-file", &input, "--no-progress"]);
    let before = sqlite_audit_rows(&app).await;
    for (flag, value) in [
        ("--masked-ip", "203.0.113.7"),
        ("--masked-ip", "2001:db8::7"),
        ("--masked-device-id", "593-47-5928"),
        ("--masked-ip", "t1_short"),
    ] {
        let out = app.run(&["reveal", flag, value, "--reason", "INC-3"]);
        let err = assert_failed(&out, &format!("reveal {flag} {value}"));
        assert!(
            err.contains(flag) && err.contains("not one") && err.contains("Nothing was recorded"),
            "{err}"
        );
        assert!(!err.contains(value), "the value was repeated: {err}");
    }
    assert_eq!(sqlite_audit_rows(&app).await, before, "nothing recorded");
}

#[tokio::test]
async fn a_token_of_a_rotated_away_version_says_which_versions_there_are() {
    let app = TestApp::embedded();
    let input = app.write("logins.jsonl", EVENTS);
    app.ok(&["run", "--from-file", &input, "--no-progress"]);
    let db = app.sqlite().await;
    let old: String =
        sqlx::query_scalar("SELECT masked_ip FROM user_logins WHERE user_id = 'u-second'")
            .fetch_one(&db)
            .await
            .unwrap();
    db.close().await;
    assert!(old.starts_with("t1_"), "{old}");
    app.ok(&["rotate", "token-key", "--reason", "first hour"]);
    let before = sqlite_audit_rows(&app).await;

    let out = app.run(&["reveal", "--masked-ip", &old, "--reason", "INC-4"]);
    let err = assert_failed(&out, "reveal of a v1 token after the rotation");
    assert!(
        err.contains("token-key version 1")
            && err.contains("v2")
            && err.contains("Nothing was recorded"),
        "{err}"
    );
    assert!(!err.contains(&old), "{err}");
    assert_eq!(sqlite_audit_rows(&app).await, before, "nothing recorded");
}

#[tokio::test]
async fn a_value_that_is_not_a_token_is_refused_by_postgres_too() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // Keys under the local key file, so that no KMS is needed here.
    app.ok(&["migrate"]);
    let input = app.write("logins.jsonl", EVENTS);
    let worker = app.login_as(WORKER).await;
    app.as_login(&worker)
        .ok(&["run", "--from-file", &input, "--no-progress"]);
    let revealer = app.login_as(REVEALER).await;
    let before = app.count("audit_log").await;

    let out =
        app.as_login(&revealer)
            .run(&["reveal", "--masked-ip", "203.0.113.7", "--reason", "INC-5"]);
    let err = assert_failed(&out, "reveal --masked-ip <an IP>");
    assert!(!err.contains("203.0.113.7"), "{err}");

    // Past the CLI, with plain SQL as the revealer: the database refuses.
    let pool = PgPool::connect(&revealer.url).await.unwrap();
    for (selector, value) in [
        ("masked_ip", "203.0.113.7"),
        ("masked_device_id", "593-47-5928"),
    ] {
        let e = sqlx::query("SELECT * FROM pii_vault_reveal_request($1, $2, 'INC-5', 'me')")
            .bind(selector)
            .bind(value)
            .execute(&pool)
            .await
            .expect_err("a raw value as a token must be refused");
        let db = e.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("22023"), "{db}");
        assert!(!db.message().contains(value), "{}", db.message());
    }
    // A real token still works.
    let token: String =
        sqlx::query_scalar("SELECT masked_ip FROM user_logins WHERE user_id = 'u-second'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(app.count("audit_log").await, before, "nothing recorded");
    app.as_login(&revealer)
        .ok(&["reveal", "--masked-ip", &token, "--reason", "INC-5"]);
    assert_eq!(app.count("audit_log").await, before + 1);
    app.finish().await;
}

#[tokio::test]
async fn a_revealer_without_kms_configuration_reveals_under_the_stored_kms_key() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let kms = aws_helpers::kms().await;
    let (key_id, _) = aws_helpers::create_key(&kms).await;
    app.bin().kms(&key_id).ok(&["migrate"]);
    let input = app.write("logins.jsonl", EVENTS);
    let worker = app.login_as(WORKER).await;
    app.as_login(&worker)
        .kms(&key_id)
        .ok(&["run", "--from-file", &input, "--no-progress"]);
    let files = entries(app.dir());
    let before = app.count("audit_log").await;

    // No PII_VAULT_KMS_KEY_ID, no key file: the stored keys name their KMS key.
    let revealer = app.login_as(REVEALER).await;
    let out = app.as_login(&revealer).ok_output(&[
        "reveal",
        "--user-id",
        "u-second",
        "--reason",
        "INC-6",
        "--format",
        "json",
    ]);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["ip"], "198.51.100.23");
    assert_eq!(row["device_id"], "771-22-9931");
    let err = stderr(&out);
    assert!(
        !err.contains("back it up") && !err.contains("local:"),
        "{err}"
    );
    assert_eq!(entries(app.dir()), files, "no key file was created");
    assert_eq!(app.count("audit_log").await, before + 1);

    // With the KMS key disabled the reveal fails before it records.
    kms.disable_key().key_id(&key_id).send().await.unwrap();
    let out =
        app.as_login(&revealer)
            .run(&["reveal", "--user-id", "u-second", "--reason", "INC-7"]);
    let err = assert_failed(&out, "reveal under a disabled KMS key");
    assert!(
        err.contains("cannot be used") && err.contains("nothing was recorded"),
        "{err}"
    );
    assert_eq!(app.count("audit_log").await, before + 1, "nothing recorded");
    assert_eq!(entries(app.dir()), files);
    app.finish().await;
}
