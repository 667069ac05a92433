//! `pii-vault quarantine list|show|replay`, on the embedded default and on
//! Postgres under each role's own login.
//!
//! What a replay can store is what the current parser accepts. No parser
//! rule can be relaxed inside a test, so the messages "rejected by an older,
//! stricter version" are made the only honest way there is: valid bodies
//! quarantined through the store API (sealed under a worker's data key
//! exactly as `pipeline::protect` seals a reject), beside the lines that
//! this version really rejects (from the generator, whose manifest says
//! which). A replay must store the former once each, and leave the latter.

use std::collections::BTreeMap;

use chrono::Utc;
use pii_vault::crypto::KeyWrapper;
use pii_vault::kms::local::LocalKek;
use pii_vault::store::{Batch, QuarantineRow, Store};
use pii_vault::vault::quarantine_aad;

use crate::common::app::{TestApp, ANALYST, REVEALER, ROTATOR, WORKER};
use crate::common::{self, Generated};

/// A body every version accepts, for the rows an older version rejected.
fn legacy_body(n: usize) -> String {
    format!(
        r#"{{"user_id": "legacy-{n}", "app_version": "2.3.{n}", "device_type": "android", "ip": "198.51.100.{n}", "locale": "DE", "device_id": "900-00-{n:04}"}}"#
    )
}

/// Quarantines `n` valid bodies as an older version would have (reason
/// `legacy_rule`), through `store`, sealed under a fresh data key wrapped
/// by the key file in `key_dir`. Returns their message ids.
async fn quarantine_legacy(store: &dyn Store, key_dir: &std::path::Path, n: usize) -> Vec<String> {
    let kek = LocalKek::open_or_create(key_dir).unwrap();
    let wrapper: &dyn KeyWrapper = &kek;
    let lease = pii_vault::pipeline::keys::new_data_key(store, wrapper)
        .await
        .unwrap();
    let mut batch = Batch::default();
    for i in 1..=n {
        let id = format!("legacy-msg-{i}");
        let user = format!("legacy-{i}");
        let sealed = lease
            .sealer
            .seal(
                &quarantine_aad(&id, Some(&user), &lease.id),
                legacy_body(i).as_bytes(),
            )
            .unwrap();
        batch.quarantined.push(QuarantineRow {
            message_id: id,
            reason_code: "legacy_rule".into(),
            reason: "app_version: rejected by an older version".into(),
            user_id: Some(user),
            key_id: lease.id.clone(),
            nonce: sealed.nonce.to_vec(),
            ciphertext: sealed.ciphertext,
            received_at: Utc::now(),
            source: None,
            line: None,
        });
    }
    batch.key_usage = vec![(lease.id.clone(), n as i64)];
    let out = store.write_batch(&batch).await.unwrap();
    assert_eq!(out.rejected, n as u64);
    batch
        .quarantined
        .iter()
        .map(|q| q.message_id.clone())
        .collect()
}

fn listed(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The generator's malformed lines by line number (1-based), the file
/// written as `logins.jsonl`.
fn malformed_by_line(gen: &Generated) -> BTreeMap<i64, String> {
    let lines = gen.lines();
    gen.malformed
        .iter()
        .map(|&i| (i as i64 + 1, lines[i].to_string()))
        .collect()
}

fn stored_of(stderr: &str) -> u64 {
    let at = stderr
        .find(" stored,")
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    stderr[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

/// The file rejects as `list --format json` shows them: their source and
/// line kept, no body, no value of one.
fn check_listing(entries: &[serde_json::Value], gen: &Generated, raw: &[String], out: &[u8]) {
    let want = malformed_by_line(gen);
    let got: BTreeMap<i64, &serde_json::Value> = entries
        .iter()
        .filter(|e| e["source"] == "logins.jsonl")
        .map(|e| (e["line"].as_i64().unwrap(), e))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "every rejected line, by its number"
    );
    for e in got.values() {
        assert!(
            e["message_id"].as_str().unwrap().starts_with("line-"),
            "{e}"
        );
        assert!(!e["reason_code"].as_str().unwrap().is_empty());
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "line",
                "message_id",
                "reason",
                "reason_code",
                "received_at",
                "source"
            ],
            "no body, key or user id"
        );
    }
    assert!(
        common::leaked(out, raw).is_empty(),
        "a value in the listing"
    );
}

#[tokio::test]
async fn embedded_list_show_and_replay_exactly_once() {
    let app = TestApp::embedded();
    let gen = common::gen_events_recorded(&["-n", "200", "--malformed-pct", "10", "--seed", "23"]);
    let input = app.write("logins.jsonl", &gen.text);
    let raw = common::raw_pii(&gen.text);
    let (stored, _, rejected) =
        common::summary(&app.ok_output(&["run", "--from-file", &input]).stderr);
    assert_eq!(
        (stored, rejected),
        (gen.valid().len() as u64, gen.malformed.len() as u64)
    );

    let out = app.ok_output(&["quarantine", "list", "--format", "json"]);
    let entries = listed(&out.stdout);
    assert_eq!(entries.len(), gen.malformed.len());
    check_listing(&entries, &gen, &raw, &out.stdout);

    // Filters: by reason code, by time.
    let code = entries[0]["reason_code"].as_str().unwrap().to_string();
    let same = entries
        .iter()
        .filter(|e| e["reason_code"] == code.as_str())
        .count();
    let out = app.ok_output(&["quarantine", "list", "--reason", &code, "--format", "json"]);
    assert_eq!(listed(&out.stdout).len(), same);
    let out = app.ok_output(&[
        "quarantine",
        "list",
        "--since",
        "2999-01-01",
        "--format",
        "json",
    ]);
    assert!(listed(&out.stdout).is_empty());
    let table = app.ok_output(&["quarantine", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("logins.jsonl"));

    // Show: the body exactly as it was in the file, after its audit row.
    let (line, body) = malformed_by_line(&gen).into_iter().next().unwrap();
    let id = entries.iter().find(|e| e["line"] == line).unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = app.ok_output(&[
        "quarantine",
        "show",
        &id,
        "--reason",
        "INC-23: why rejected",
    ]);
    assert_eq!(out.stdout, format!("{body}\n").into_bytes());
    let db = app.sqlite().await;
    let (action, target, reason): (String, String, String) =
        sqlx::query_as("SELECT action, target, reason FROM audit_log ORDER BY id DESC LIMIT 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (action.as_str(), target, reason.as_str()),
        (
            "quarantine-show",
            format!("message_id={id}"),
            "INC-23: why rejected"
        )
    );
    // A show without a reason is refused by the command line.
    assert!(!app.run(&["quarantine", "show", &id]).status.success());
    drop(db);

    // Replay: what an older version rejected is stored once; what this one
    // rejects stays.
    let store = pii_vault::store::connect(&app.sqlite_url()).await.unwrap();
    let legacy = quarantine_legacy(&*store, &app.path("keys"), 3).await;
    drop(store);
    let err = app.ok(&["quarantine", "replay", "--all"]);
    assert_eq!(stored_of(&err), 3, "{err}");
    assert!(
        err.contains(&format!("{} still rejected", gen.malformed.len())),
        "{err}"
    );
    let err = app.ok(&["quarantine", "replay", "--all"]);
    assert_eq!(stored_of(&err), 0, "a second replay stores nothing: {err}");
    let err = app.ok(&["quarantine", "replay", &legacy[0]]);
    assert_eq!(stored_of(&err), 0, "{err}");

    let db = app.sqlite().await;
    let logins: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(logins, gen.valid().len() as i64 + 3);
    let replayed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
         WHERE l.message_id LIKE 'legacy-msg-%'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        replayed, 3,
        "under their original message ids, with their originals"
    );
    drop(db);
    let out = app.ok_output(&["quarantine", "list", "--format", "json"]);
    let entries = listed(&out.stdout);
    assert_eq!(
        entries.len(),
        gen.malformed.len(),
        "the replayed ones are gone"
    );
    check_listing(&entries, &gen, &raw, &out.stdout);

    // The replayed logins reveal with their originals.
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        "legacy-2",
        "--reason",
        "check",
        "--format",
        "json",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.51.100.2"));

    // The same file again: nothing new, nothing quarantined twice.
    let (stored, dups, rejected) =
        common::summary(&app.ok_output(&["run", "--from-file", &input]).stderr);
    assert_eq!((stored, rejected), (0, 0), "dups {dups}");

    // A show counts against the reveal policy's daily limit, with reveals:
    // one show and one reveal so far today.
    app.ok(&["policy", "set", "--max-reveals-per-day", "3"]);
    app.ok(&["quarantine", "show", &id, "--reason", "third"]);
    let out = app.run(&["quarantine", "show", &id, "--reason", "fourth"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daily limit"), "{err}");
    assert!(out.stdout.is_empty(), "nothing shown over the limit");
    let out = app.run(&["reveal", "--user-id", "legacy-1", "--reason", "over"]);
    assert_eq!(out.status.code(), Some(3), "a reveal over the limit waits");
    app.ok(&["audit", "verify"]);
}

#[tokio::test]
async fn postgres_roles_list_show_and_replay() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.login_as(WORKER).await;
    let analyst = app.login_as(ANALYST).await;
    let revealer = app.login_as(REVEALER).await;
    let rotator = app.login_as(ROTATOR).await;

    let gen = common::gen_events_recorded(&["-n", "120", "--malformed-pct", "10", "--seed", "7"]);
    let input = app.write("logins.jsonl", &gen.text);
    let raw = common::raw_pii(&gen.text);
    app.as_login(&worker).ok(&["run", "--from-file", &input]);

    // List: any operator's login; no body.
    for login in [&worker, &revealer, &rotator] {
        let out = app
            .as_login(login)
            .ok_output(&["quarantine", "list", "--format", "json"]);
        let entries = listed(&out.stdout);
        assert_eq!(entries.len(), gen.malformed.len());
        check_listing(&entries, &gen, &raw, &out.stdout);
    }
    let out = app.as_login(&analyst).run(&["quarantine", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("42501"));

    // Show: the revealer only.
    let (line, body) = malformed_by_line(&gen).into_iter().next().unwrap();
    let id: String = sqlx::query_scalar(
        "SELECT message_id FROM quarantine WHERE source = 'logins.jsonl' AND line = $1",
    )
    .bind(line)
    .fetch_one(app.pool())
    .await
    .unwrap();
    for login in [&worker, &analyst, &rotator] {
        let out = app
            .as_login(login)
            .run(&["quarantine", "show", &id, "--reason", "INC-23"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("42501"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = app
        .as_login(&revealer)
        .ok_output(&["quarantine", "show", &id, "--reason", "INC-23"]);
    assert_eq!(out.stdout, format!("{body}\n").into_bytes());
    let (actor, target): (String, String) = sqlx::query_as(
        "SELECT actor, target FROM audit_log WHERE action = 'quarantine-show' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        (actor, target),
        (revealer.name.clone(), format!("message_id={id}"))
    );

    // Plain SQL as each role's own login: no body without a committed
    // audit row; no body at all for the others.
    for login in [&worker, &analyst, &revealer, &rotator] {
        let pool = sqlx::PgPool::connect(&login.url).await.unwrap();
        crate::roles::denied(&pool, "SELECT ciphertext FROM quarantine").await;
        if login.name != revealer.name {
            crate::roles::denied(&pool, "SELECT * FROM pii_vault_quarantine_show_fetch(1)").await;
            crate::roles::denied(
                &pool,
                "SELECT pii_vault_quarantine_show_request('x', 'r', 'a')",
            )
            .await;
        }
        if login.name != rotator.name {
            crate::roles::denied(&pool, "SELECT * FROM pii_vault_quarantine_replay_fetch(1)").await;
        }
        pool.close().await;
    }
    {
        let pool = sqlx::PgPool::connect(&analyst.url).await.unwrap();
        crate::roles::denied(&pool, "SELECT * FROM pii_vault_quarantine_list").await;
        pool.close().await;
    }
    {
        // The revealer's request and fetch in one transaction: refused, the
        // audit row is not committed yet.
        let pool = sqlx::PgPool::connect(&revealer.url).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let rid: i64 =
            sqlx::query_scalar("SELECT pii_vault_quarantine_show_request($1, 'INC-23', 'me')")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let e = sqlx::query("SELECT * FROM pii_vault_quarantine_show_fetch($1)")
            .bind(rid)
            .fetch_all(&mut *tx)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("PV005")),
            "{e}"
        );
        drop(tx);
        pool.close().await;
    }

    // Replay: the rotator; a worker cannot.
    let worker_store = pii_vault::store::postgres::PgStore::connect(&worker.url)
        .await
        .unwrap();
    let legacy = quarantine_legacy(&worker_store, &app.path("keys"), 4).await;
    worker_store.pool().close().await;
    let out = app
        .as_login(&worker)
        .run(&["quarantine", "replay", "--all"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("42501"));
    let err = app
        .as_login(&rotator)
        .ok(&["quarantine", "replay", "--all"]);
    assert_eq!(stored_of(&err), 4, "{err}");
    let err = app
        .as_login(&rotator)
        .ok(&["quarantine", "replay", "--all"]);
    assert_eq!(stored_of(&err), 0, "{err}");
    let err = app
        .as_login(&rotator)
        .ok(&["quarantine", "replay", &legacy[1]]);
    assert_eq!(stored_of(&err), 0, "{err}");
    assert_eq!(
        app.count("user_logins").await,
        gen.valid().len() as i64 + 4,
        "exactly once"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM vault WHERE message_id LIKE 'legacy-msg-%'")
            .await,
        4
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM quarantine WHERE replayed_at IS NULL")
            .await,
        gen.malformed.len() as i64
    );
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM quarantine WHERE replayed_at IS NOT NULL AND ciphertext IS NULL"
        )
        .await,
        4,
        "replayed rows keep only their ids"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'quarantine-replay'")
            .await,
        3
    );
    // The replays' data keys are retired when they end.
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM vault_keys WHERE state = 'active' AND created_by = '{}'",
            rotator.name
        ))
        .await,
        0
    );
    // A worker redelivering what was replayed (the same file) adds nothing.
    let (stored, _, rejected) = common::summary(
        &app.as_login(&worker)
            .ok_output(&["run", "--from-file", &input])
            .stderr,
    );
    assert_eq!((stored, rejected), (0, 0));
    app.ok(&["audit", "verify"]);
    app.finish().await;
}

/// Two replays of the same messages, the second storing after the first
/// did (as two `quarantine replay --all` run at once do): the second skips
/// what the first took (neither stored nor "already stored" by it);
/// nothing is stored twice, neither fails.
async fn replays_side_by_side_store_each_message_once(
    writer: &dyn Store,
    store: &dyn Store,
    key_dir: &std::path::Path,
) {
    use pii_vault::crypto::KeyPurpose;
    use pii_vault::store::{LoginRow, VaultRow};
    let ids = quarantine_legacy(writer, key_dir, 4).await;
    let kek = LocalKek::open_or_create(key_dir).unwrap();
    let mut requests = Vec::new();
    for _ in 0..2 {
        let (_material, wrapped) = kek.generate(KeyPurpose::Vault).await.unwrap();
        let key_id = format!("dek-{}", uuid::Uuid::new_v4());
        let request = store
            .replay_request(None, &key_id, &wrapped, "oncall@test", "fixed the parser")
            .await
            .unwrap();
        assert_eq!(request.row_count, 4);
        requests.push((request.record, key_id));
    }
    let rows = |key_id: &str| -> Vec<(LoginRow, VaultRow)> {
        ids.iter()
            .map(|id| {
                let login = LoginRow {
                    message_id: id.clone(),
                    user_id: format!("user-of-{id}"),
                    device_type: "android".into(),
                    masked_ip: format!("t1_{}", "a".repeat(43)),
                    masked_device_id: format!("t1_{}", "b".repeat(43)),
                    masked_ip_net: None,
                    locale: None,
                    app_version: "2.3.0".into(),
                    create_date: None,
                    line: None,
                };
                let vault = VaultRow::of(&login, key_id.to_string(), vec![0; 12], vec![1; 40]);
                (login, vault)
            })
            .collect()
    };
    // Both fetched before either stored.
    for (record, _) in &requests {
        assert_eq!(store.replay_fetch(*record).await.unwrap().len(), 4);
    }
    let first = store
        .replay_store(requests[0].0, &rows(&requests[0].1))
        .await
        .unwrap();
    assert_eq!((first.stored, first.already), (4, 0));
    let second = store
        .replay_store(requests[1].0, &rows(&requests[1].1))
        .await
        .unwrap();
    assert_eq!((second.stored, second.already), (0, 0));
    for (record, _) in &requests {
        store.replay_finish(*record).await.unwrap();
    }
}

#[tokio::test]
async fn embedded_replays_side_by_side_store_each_message_once() {
    let app = TestApp::embedded();
    app.ok(&["migrate"]);
    let store = pii_vault::store::sqlite::SqliteStore::connect(&app.sqlite_url())
        .await
        .unwrap();
    replays_side_by_side_store_each_message_once(&store, &store, &app.path("keys")).await;
    let db = app.sqlite().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replays_side_by_side_store_each_message_once() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // The owner's migrate allow-lists the local key file of the app's dir.
    app.ok(&["migrate"]);
    let rotator = app.store_as(ROTATOR).await;
    let worker = app.store_as(WORKER).await;
    replays_side_by_side_store_each_message_once(&worker, &rotator, &app.path("keys")).await;
    assert_eq!(app.count("user_logins").await, 4);
    app.finish().await;
}

/// A show whose data key cannot be unwrapped (here: its wrapped bytes
/// damaged, as a KMS that refuses would leave it) prints nothing, and the
/// trail says so: the show is recorded, never fetched.
#[tokio::test]
async fn a_show_whose_key_cannot_be_unwrapped_shows_nothing_and_stays_unfetched() {
    let app = TestApp::embedded();
    let gen = common::gen_events_recorded(&["-n", "40", "--malformed-pct", "20", "--seed", "31"]);
    let input = app.write("logins.jsonl", &gen.text);
    app.ok(&["run", "--from-file", &input]);
    let out = app.ok_output(&["quarantine", "list", "--format", "json"]);
    let id = listed(&out.stdout)[0]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let db = app.sqlite().await;
    sqlx::query(
        "UPDATE vault_keys SET wrapped = zeroblob(length(wrapped)) \
         WHERE id = (SELECT key_id FROM quarantine WHERE message_id = $1)",
    )
    .bind(&id)
    .execute(&db)
    .await
    .unwrap();
    let out = app.run(&["quarantine", "show", &id, "--reason", "INC-31"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("nothing was shown"), "{stderr}");
    let (shows, fetched): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(fetched_at) FROM quarantine_reveals")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((shows, fetched), (1, 0));
}

/// A data subject's ledger (`audit subject`) lists each showing of a
/// quarantined body of theirs, fetched or not, and still does after the
/// user was forgotten (which clears the quarantined row's user id).
async fn the_ledger_lists_quarantine_shows(app: &TestApp) {
    let gen = common::gen_events_recorded(&["-n", "60", "--malformed-pct", "30", "--seed", "37"]);
    let input = app.write("logins.jsonl", &gen.text);
    app.ok(&["run", "--from-file", &input]);
    let out = app.ok_output(&["quarantine", "list", "--format", "json"]);
    let entries = listed(&out.stdout);
    // A reject whose user id could be salvaged from its body.
    let (id, user) = entries
        .iter()
        .find_map(|e| {
            let line = e["line"].as_i64()? as usize;
            let body: serde_json::Value = serde_json::from_str(gen.lines()[line - 1]).ok()?;
            let user = body.get("user_id")?.as_str()?.to_string();
            (user.len() < 100).then(|| (e["message_id"].as_str().unwrap().to_string(), user))
        })
        .expect("a reject with a user id");
    app.ok(&["quarantine", "show", &id, "--reason", "INC-37"]);
    let ledger = |when: &str| -> Vec<serde_json::Value> {
        let out = app.ok_output(&[
            "audit",
            "subject",
            "--user-id",
            &user,
            "--reason",
            when,
            "--format",
            "json",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let shows = |entries: &[serde_json::Value]| -> Vec<serde_json::Value> {
        entries
            .iter()
            .filter(|e| e["action"] == "quarantine-show")
            .cloned()
            .collect()
    };
    let before = shows(&ledger("DSAR-1"));
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["message_ids"], serde_json::json!([id]));
    assert_eq!(before[0]["row_count"], 1);
    app.ok(&["forget", "--user-id", &user, "--reason", "DSAR-2 erasure"]);
    let after = ledger("DSAR-3");
    assert_eq!(shows(&after), before, "{after:?}");
    assert!(after.iter().any(|e| e["action"] == "forget"), "{after:?}");
}

#[tokio::test]
async fn embedded_the_ledger_lists_quarantine_shows() {
    let app = TestApp::embedded();
    the_ledger_lists_quarantine_shows(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_ledger_lists_quarantine_shows() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    the_ledger_lists_quarantine_shows(&app).await;
    app.finish().await;
}
