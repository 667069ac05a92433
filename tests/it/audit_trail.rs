//! The verifiable audit trail on Postgres, end to end: rows chained by the
//! database itself, checkpoints signed by the auditor's login and kept in a
//! file, and `audit verify` finding each kind of tampering that the schema
//! owner or a superuser can do behind the triggers' back
//! (`session_replication_role = replica`, triggers disabled): the right row
//! and the right reason, exit status 4; an untouched trail, exit 0.
//!
//! Also: the auditor's and the revealer's reach over the chains in plain
//! SQL, concurrent writers, the SIEM export, the data subject's ledger and
//! the archive. The KMS-signed checkpoint is in `aws.rs`.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use sqlx::PgPool;

use crate::common::app::{Login, TestApp, AUDITOR, REVEALER, ROTATOR};
use crate::roles::{denied, refused};

/// The token the shared address of three users has in the seed.
const SHARED_IP: &str = "t1_sharedaddress";

/// A database with logins, a trail (owner notes, reveal requests by a
/// revealer login, an erasure) and an auditor login.
struct Seeded {
    app: TestApp,
    auditor: Login,
    revealer: PgPool,
}

async fn seeded() -> Option<Seeded> {
    let app = TestApp::postgres().await?;
    // u1, u2, u3 share an address; u4 is alone. (Tokens of no stored key:
    // the key checks are off for the seed, which the reveal requests do
    // not need.)
    replica(
        &app,
        &["INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date) \
           SELECT 'm' || g, 'u' || (1 + g % 4), 'ios', \
                  CASE WHEN g % 4 = 3 THEN 't1_alone' ELSE 't1_sharedaddress' END, 't1_dev' || g, 'en', '1.0', \
                  date '2026-01-01' + g FROM generate_series(0, 11) g"],
    )
    .await;
    app.exec(
        "INSERT INTO audit_log (action, target, reason, row_count) \
         SELECT 'note', 'n=' || g, 'seed', 0 FROM generate_series(1, 6) g",
    )
    .await;
    let revealer = app.login_as(REVEALER).await;
    let revealer = PgPool::connect(&revealer.url).await.unwrap();
    for (selector, value) in [
        ("user_id", "u1"),
        ("masked_ip", SHARED_IP),
        ("user_id", "u4"),
        ("masked_device_id", "t1_dev5"),
    ] {
        sqlx::query("SELECT * FROM pii_vault_reveal_request($1, $2, 'ticket 9', 'analyst@test')")
            .bind(selector)
            .bind(value)
            .execute(&revealer)
            .await
            .unwrap();
    }
    app.exec(
        "INSERT INTO audit_log (action, target, reason, row_count) \
         SELECT 'note', 'm=' || g, 'seed', 0 FROM generate_series(1, 6) g",
    )
    .await;
    let auditor = app.login_as(AUDITOR).await;
    Some(Seeded {
        app,
        auditor,
        revealer,
    })
}

impl Seeded {
    fn checkpoints(&self) -> PathBuf {
        self.app.path("checkpoints.jsonl")
    }

    fn checkpoint(&self) {
        let out = self.checkpoints();
        self.app.as_login(&self.auditor).ok(&[
            "audit",
            "checkpoint",
            "--out",
            out.to_str().unwrap(),
        ]);
    }

    /// `audit verify --checkpoints FILE --format json`: its exit status and
    /// report.
    fn verify(&self) -> (i32, Value) {
        let out = self.checkpoints();
        self.verify_with(&["--checkpoints", out.to_str().unwrap()])
    }

    fn verify_with(&self, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["audit", "verify", "--format", "json"];
        args.extend_from_slice(extra);
        let o = self.app.as_login(&self.auditor).run(&args);
        report(&o)
    }

    /// Runs `sqls` as the superuser with triggers off for the session.
    async fn tamper(&self, sqls: &[&str]) {
        replica(&self.app, sqls).await;
    }

    /// The id of the `n`-th audit row (from 0), oldest first.
    async fn nth_id(&self, n: i64) -> i64 {
        self.app
            .scalar(&format!(
                "SELECT id FROM audit_log ORDER BY id OFFSET {n} LIMIT 1"
            ))
            .await
    }

    async fn finish(self) {
        self.revealer.close().await;
        self.app.finish().await;
    }
}

/// Runs `sqls` in one transaction as the superuser, with every ordinary
/// trigger (the chains', the append-only guards, foreign keys) off.
async fn replica(app: &TestApp, sqls: &[&str]) {
    let mut tx = app.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in sqls {
        sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    tx.commit().await.unwrap();
}

fn report(o: &Output) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap_or(-1), v)
}

/// The first finding: (problem, chain, id, checkpoint).
fn first(v: &Value) -> (String, Option<String>, Option<i64>, Option<i64>) {
    let f = &v["findings"][0];
    (
        f["problem"].as_str().unwrap_or_default().to_string(),
        f["chain"].as_str().map(str::to_string),
        f["id"].as_i64(),
        f["checkpoint"].as_i64(),
    )
}

fn tampered(status: i32, v: &Value) {
    assert_eq!(status, 4, "a tampered trail exits 4: {v}");
    assert_eq!(v["intact"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_trail_verifies_against_its_checkpoints() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'later', 'seed', 0)").await;
    s.checkpoint();
    let (status, v) = s.verify();
    assert_eq!(status, 0, "{v}");
    assert_eq!(v["intact"], true);
    assert_eq!(v["checkpoints"], 2);
    let rows = s.app.count("audit_log").await;
    assert_eq!(v["trail"]["rows"], rows);
    assert_eq!(v["requests"]["rows"], 4);
    // The human form says so too.
    let cp = s.checkpoints();
    let text = s.app.as_login(&s.auditor).ok_output(&[
        "audit",
        "verify",
        "--checkpoints",
        cp.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("intact:"), "{stdout}");
    // The database's copies agree with the file.
    let (status, v) = s.verify_with(&[]);
    assert_eq!(status, 0, "{v}");
    assert_eq!(v["checkpoints_from"], "the database");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_field_is_named_by_its_row() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    let id = s.nth_id(3).await;
    s.tamper(&[&format!(
        "UPDATE audit_log SET reason = 'nothing to see' WHERE id = {id}"
    )])
    .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        ("row-changed".into(), Some("trail".into()), Some(id), None)
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_middle_row_is_named_by_the_row_after_the_gap() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    let gone = s.nth_id(2).await;
    let after = s.nth_id(3).await;
    s.tamper(&[&format!("DELETE FROM audit_log WHERE id = {gone}")])
        .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        (
            "row-removed".into(),
            Some("trail".into()),
            Some(after),
            None
        )
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_rows_deleted_after_a_checkpoint_show_against_the_shipped_file() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    let head = s.app.scalar("SELECT max(id) FROM audit_log").await;
    let keep = s.nth_id(s.app.count("audit_log").await - 4).await;
    // A careful owner: the last three rows gone, the chain's head and the
    // database's copy of the checkpoint made to match.
    s.tamper(&[
        &format!("DELETE FROM audit_log WHERE id > {keep}"),
        &format!(
            "UPDATE audit_chain SET head_id = a.id, head_hash = a.hash, count = count - 3 \
             FROM audit_log a WHERE a.id = {keep} AND chain = 'trail'"
        ),
        "DELETE FROM audit_checkpoints",
    ])
    .await;
    // What the database holds agrees with itself now…
    let (status, v) = s.verify_with(&[]);
    assert_eq!(status, 0, "{v}");
    // …but not with the checkpoint shipped out of its reach.
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        ("tail-cut".into(), Some("trail".into()), Some(head), Some(1))
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_row_is_named_as_inserted() {
    let Some(s) = seeded().await else { return };
    // An id left free by a rolled-back write.
    let mut tx = s.app.pool().begin().await.unwrap();
    let free: i64 = sqlx::query_scalar(
        "INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'x', 'x', 0) RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'after the gap', 'seed', 0)").await;
    s.checkpoint();
    // The forger links it to the row before and makes up the rest.
    s.tamper(&[&format!(
        "INSERT INTO audit_log (id, at, actor, action, target, reason, row_count, prev_hash, hash) \
         SELECT {free}, now(), 'alice', 'approve', 'request 1', 'forged approval', 0, \
                (SELECT hash FROM audit_log WHERE id < {free} ORDER BY id DESC LIMIT 1), sha256('forged')"
    )])
    .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        (
            "row-inserted".into(),
            Some("trail".into()),
            Some(free),
            None
        )
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_ids_are_reordered_rows() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    let a = s.nth_id(1).await;
    let b = s.nth_id(2).await;
    s.tamper(&[
        &format!("UPDATE audit_log SET id = -1 WHERE id = {a}"),
        &format!("UPDATE audit_log SET id = {a} WHERE id = {b}"),
        &format!("UPDATE audit_log SET id = {b} WHERE id = -1"),
    ])
    .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        ("rows-reordered".into(), Some("trail".into()), Some(a), None)
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_checkpoint_line_is_forged_and_a_dropped_one_missing() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'later', 'seed', 0)").await;
    s.checkpoint();
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'later', 'seed', 0)").await;
    s.checkpoint();
    let path = s.checkpoints();
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert_eq!(lines.len(), 3);
    // Replaced: the second line claims fewer rows.
    let mut c2: Value = serde_json::from_str(lines[1]).unwrap();
    c2["trail"]["count"] = Value::from(c2["trail"]["count"].as_i64().unwrap() - 1);
    std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], c2, lines[2])).unwrap();
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(v["findings"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(first(&v), ("checkpoint-forged".into(), None, None, Some(2)));
    // Dropped.
    std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        ("checkpoint-missing".into(), None, None, Some(3))
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_alarm_breaks_the_requests_chain() {
    let Some(s) = seeded().await else { return };
    s.app
        .exec("INSERT INTO honeytokens (user_id) VALUES ('u4')")
        .await;
    sqlx::query("SELECT * FROM pii_vault_reveal_request('user_id', 'u4', 'probe', 'x')")
        .execute(&s.revealer)
        .await
        .unwrap();
    let alarm = s.app.scalar("SELECT max(id) FROM audit_alarms").await;
    s.checkpoint();
    s.tamper(&[&format!(
        "UPDATE reveal_requests SET honeytokens = 0 WHERE id = {alarm}"
    )])
    .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        (
            "row-changed".into(),
            Some("requests".into()),
            Some(alarm),
            None
        )
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_chain_in_id_order() {
    let Some(s) = seeded().await else { return };
    let mut pools = Vec::new();
    for _ in 0..4 {
        let login = s.app.login_as(REVEALER).await;
        pools.push(PgPool::connect(&login.url).await.unwrap());
    }
    let tasks: Vec<_> = pools
        .iter()
        .cloned()
        .map(|pool| {
            tokio::spawn(async move {
                for i in 0..10 {
                    // Each in its own transaction, with a pause inside so
                    // that the others queue on the chain's head.
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query(
                        "SELECT * FROM pii_vault_reveal_request('user_id', $1, 'ticket', 'x')",
                    )
                    .bind(format!("u{}", 1 + i % 4))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    sqlx::query("SELECT pg_sleep(0.01)")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    s.checkpoint();
    let (status, v) = s.verify();
    assert_eq!(status, 0, "{v}");
    assert_eq!(v["requests"]["rows"], 4 + 40);
    for p in pools {
        p.close().await;
    }
    s.finish().await;
}

/// What the auditor's login may do with plain SQL, and what the others may
/// not see of the chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_reads_the_trail_and_nothing_of_the_data() {
    let Some(s) = seeded().await else { return };
    let auditor = PgPool::connect(&s.auditor.url).await.unwrap();
    for sql in [
        "SELECT count(*) FROM audit_log",
        "SELECT hash FROM reveal_requests",
        "SELECT * FROM audit_chain",
        "SELECT * FROM audit_alarms",
        "SELECT * FROM erasure_subjects",
        "SELECT * FROM audit_checkpoints",
    ] {
        crate::roles::allowed(&auditor, sql).await;
    }
    for sql in [
        "SELECT * FROM user_logins",
        "SELECT message_id FROM vault",
        "SELECT * FROM vault_keys",
        "SELECT * FROM quarantine",
        "SELECT * FROM honeytokens",
        "SELECT * FROM reveal_request_rows",
        "INSERT INTO audit_checkpoints VALUES (1, now(), '{}', 'me', now())",
        "UPDATE audit_chain SET count = 0",
        "SELECT * FROM pii_vault_archive_plan(now())",
        "SELECT pii_vault_audit_archive(1, 1, 'r', 'a')",
        "SELECT * FROM pii_vault_reveal_request('user_id', 'u1', 'r', 'a')",
    ] {
        denied(&auditor, sql).await;
    }
    // A checkpoint copy that does not fit is refused by the database.
    refused(
        &auditor,
        "SELECT pii_vault_checkpoint_store(5, now(), '{\"seq\": 5}')",
        "PV015",
    )
    .await;
    refused(
        &auditor,
        "SELECT pii_vault_checkpoint_store(1, now(), '{\"seq\": 1, \"prev_sig\": null, \"trail\": {\"head_id\": 1, \"head_hash\": \"00\"}, \"requests\": {\"head_id\": 0}}')",
        "PV015",
    )
    .await;
    // The revealer reads the trail, not the requests' chain (whose hashes
    // could be tested for a honeytoken) nor the heads.
    for sql in [
        "SELECT hash FROM reveal_requests",
        "SELECT honeytokens FROM reveal_requests",
        "SELECT * FROM audit_chain",
        "SELECT * FROM erasure_subjects",
    ] {
        denied(&s.revealer, sql).await;
    }
    crate::roles::allowed(&s.revealer, "SELECT prev_hash, hash FROM audit_log").await;
    // Nobody rewrites a request's recorded fields, the owner included
    // (short of switching the triggers off).
    refused(
        s.app.pool(),
        "UPDATE reveal_requests SET honeytokens = honeytokens + 1",
        "PV009",
    )
    .await;
    refused(s.app.pool(), "DELETE FROM audit_log", "PV009").await;
    refused(s.app.pool(), "DELETE FROM reveal_requests", "PV009").await;
    auditor.close().await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_every_entry_after_a_cursor_and_says_where_it_stopped() {
    let Some(s) = seeded().await else { return };
    let bin = s.app.as_login(&s.auditor);
    let o = bin.ok_output(&["audit", "export", "--after-id", "0"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as i64, s.app.count("audit_log").await);
    for pair in lines.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "entries join up");
        assert!(pair[1]["id"].as_i64() > pair[0]["id"].as_i64());
    }
    let last = lines.last().unwrap()["id"].as_i64().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("last id written: {last}")),
        "{stderr}"
    );
    // Resumed from there: nothing new; then one new entry.
    let o = bin.ok_output(&["audit", "export", "--after-id", &last.to_string()]);
    assert!(o.stdout.is_empty());
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'new', 'seed', 0)").await;
    let o = bin.ok_output(&[
        "audit",
        "export",
        "--after-id",
        &last.to_string(),
        "--format",
        "cef",
    ]);
    let cef = String::from_utf8_lossy(&o.stdout);
    assert_eq!(cef.lines().count(), 1, "{cef}");
    assert!(cef.starts_with("CEF:0|pii-vault|pii-vault|"), "{cef}");
    assert!(cef.contains(&format!(
        "cs4={}",
        lines.last().unwrap()["hash"].as_str().unwrap()
    )));

    // --follow: new entries as they come.
    let mut child = bin.spawn(&[
        "audit",
        "export",
        "--after-id",
        &last.to_string(),
        "--follow",
        "--poll",
        "1s",
    ]);
    let stdout = child.stdout.take().unwrap();
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt as _;
    reader.read_line(&mut line).await.unwrap();
    assert!(line.contains("\"target\":\"new\""), "{line}");
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'newer', 'seed', 0)").await;
    line.clear();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reader.read_line(&mut line),
    )
    .await
    .expect("--follow writes the new entry")
    .unwrap();
    assert!(line.contains("\"target\":\"newer\""), "{line}");
    child.kill().await.ok();
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_ledger_lists_every_reveal_and_erasure_that_touched_the_user() {
    let Some(s) = seeded().await else { return };
    // Erasures: u2 forgotten, then retention before a date that takes u3's
    // oldest login (the vault rows are what erasures delete).
    s.tamper(&[
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext, create_date) \
         SELECT message_id, user_id, 'k', '\\x00', '\\x00', create_date FROM user_logins",
    ])
    .await;
    let rotator = s.app.login_as(ROTATOR).await;
    let rotator = PgPool::connect(&rotator.url).await.unwrap();
    sqlx::query("SELECT * FROM pii_vault_forget('u2', 'erasure request 5', 'dpo')")
        .execute(&rotator)
        .await
        .unwrap();
    sqlx::query("SELECT * FROM pii_vault_retention('2026-01-04', 'retention', 'cron')")
        .execute(&rotator)
        .await
        .unwrap();
    let bin = s.app.as_login(&s.auditor);
    let ledger = |user: &str| -> Vec<Value> {
        let o = bin.ok_output(&[
            "audit",
            "subject",
            "--user-id",
            user,
            "--reason",
            "GDPR request 77",
            "--format",
            "json",
        ]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // u2 was never selected by its user id: the shared address's reveal
    // and a device's returned it; then it was forgotten.
    let u2 = ledger("u2");
    let actions: Vec<(&str, Option<&str>)> = u2
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["selector"].as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("reveal", Some("masked_ip")),
            ("reveal", Some("masked_device_id")),
            ("forget", None)
        ],
        "{u2:?}"
    );
    assert_eq!(u2[0]["row_count"], 3, "u2's logins at the shared address");
    assert_eq!(u2[0]["reason"], "ticket 9");
    assert_eq!(u2[0]["status"], "granted");
    assert!(u2[0]["fetched_at"].is_null(), "recorded, never fetched");
    assert!(u2[0].get("value").is_none(), "no token in the ledger");
    // u3: the same reveal, and the retention that took its oldest login.
    let u3 = ledger("u3");
    let actions: Vec<&str> = u3.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["reveal", "retention"], "{u3:?}");
    assert_eq!(u3[1]["row_count"], 1);
    // u1: its own reveal, the shared address's, and the retention.
    let u1 = ledger("u1");
    let actions: Vec<&str> = u1.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["reveal", "reveal", "retention"], "{u1:?}");
    // Nobody else's.
    assert!(ledger("nobody").is_empty());
    // Each look is on the trail.
    assert_eq!(
        s.app
            .scalar("SELECT count(*) FROM audit_log WHERE action = 'subject-access'")
            .await,
        4
    );
    rotator.close().await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_moves_old_entries_out_and_both_halves_still_verify() {
    let Some(s) = seeded().await else { return };
    s.checkpoint();
    // Entries and requests before now, except what is still in use: the
    // seed's reveal requests are recent and unfetched, so the archive
    // stops before the first of them.
    sqlx::query("UPDATE reveal_requests SET fetched_at = now()")
        .execute(s.app.pool())
        .await
        .unwrap();
    let owner = s.app.owner_login().await;
    let archive = s.app.path("archive-1.jsonl");
    let cp = s.checkpoints();
    let before = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    s.app.as_login(&owner).ok(&[
        "audit",
        "archive",
        "--before",
        &before,
        "--out",
        archive.to_str().unwrap(),
        "--checkpoints",
        cp.to_str().unwrap(),
        "--reason",
        "retention: 12 months",
    ]);
    // Only the archive's own row is left, and the trail says who archived.
    assert_eq!(s.app.count("audit_log").await, 1);
    assert_eq!(s.app.count("reveal_requests").await, 0);
    let action: Vec<String> = s.app.strings("SELECT action FROM audit_log").await;
    assert_eq!(action, ["audit-archive"]);
    // The rows left verify from the archive's signed end…
    let (status, v) = s.verify();
    assert_eq!(status, 0, "{v}");
    // …and the archive on its own.
    let (status, v) = s.verify_with(&["--archive", archive.to_str().unwrap()]);
    assert_eq!(status, 0, "{v}");
    assert!(v["trail"]["rows"].as_i64().unwrap() >= 13, "{v}");
    // An edited archive does not.
    let text = std::fs::read_to_string(&archive).unwrap();
    std::fs::write(&archive, text.replacen("ticket 9", "ticket 8", 1)).unwrap();
    let (status, v) = s.verify_with(&["--archive", archive.to_str().unwrap()]);
    tampered(status, &v);
    // Rows removed from the start with the base moved to match: no signed
    // checkpoint names the new start.
    s.app.exec("INSERT INTO audit_log (action, target, reason, row_count) VALUES ('note', 'a', 'seed', 0), ('note', 'b', 'seed', 0)").await;
    let first_id = s.app.scalar("SELECT min(id) FROM audit_log").await;
    s.tamper(&[
        &format!(
            "UPDATE audit_chain SET base_id = a.id, base_hash = a.hash, base_count = base_count + 1 \
             FROM audit_log a WHERE a.id = {first_id} AND chain = 'trail'"
        ),
        &format!("DELETE FROM audit_log WHERE id = {first_id}"),
    ])
    .await;
    let (status, v) = s.verify();
    tampered(status, &v);
    assert_eq!(first(&v).0, "start-unanchored", "{v}");
    s.finish().await;
}

// ------------------------------------------------------ embedded default

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_writer_chains_the_trail_and_verify_finds_an_edit() {
    let app = TestApp::embedded();
    let events = app.write(
        "events.jsonl",
        &crate::common::gen_events(&["--count", "20", "--seed", "7"]),
    );
    let bin = app.bin();
    bin.ok(&["run", "--from-file", &events]);
    let event: Value = serde_json::from_str(
        std::fs::read_to_string(app.path(&events))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let user = event["user_id"].as_str().unwrap();
    bin.ok(&["reveal", "--user-id", user, "--reason", "ticket 3"]);
    bin.ok(&[
        "audit",
        "subject",
        "--user-id",
        user,
        "--reason",
        "GDPR request 4",
    ]);
    let cp = app.path("checkpoints.jsonl");
    bin.ok(&["audit", "checkpoint", "--out", cp.to_str().unwrap()]);
    assert!(app.path("keys/audit-signing.pub").exists());
    let verify = || {
        report(&bin.run(&[
            "audit",
            "verify",
            "--checkpoints",
            cp.to_str().unwrap(),
            "--format",
            "json",
        ]))
    };
    let (status, v) = verify();
    assert_eq!(status, 0, "{v}");
    assert!(v["trail"]["rows"].as_i64().unwrap() >= 3, "{v}");
    assert_eq!(v["requests"]["rows"], 1);
    // The ledger on SQLite lists the reveal.
    let o = bin.ok_output(&[
        "audit",
        "subject",
        "--user-id",
        user,
        "--reason",
        "GDPR request 4",
        "--format",
        "json",
    ]);
    let ledger: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0]["selector"], "user_id");
    // The file's owner edits a row (the guard trigger dropped first).
    let pool = app.sqlite().await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM audit_log WHERE action = 'reveal'")
        .fetch_one(&pool)
        .await
        .unwrap();
    for sql in [
        "DROP TRIGGER audit_log_no_update",
        "UPDATE audit_log SET reason = 'routine' WHERE action = 'reveal'",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let (status, v) = verify();
    tampered(status, &v);
    assert_eq!(
        first(&v),
        ("row-changed".into(), Some("trail".into()), Some(id), None)
    );
}

// ------------------------------------------------------------------ KMS

/// A Python with `cryptography`: the one LocalStack runs from
/// (`scripts/services.sh` installs it), or `PII_VAULT_TEST_PYTHON`.
fn python() -> PathBuf {
    std::env::var_os("PII_VAULT_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/localstack/bin/python")
        })
}

/// An implementation of the checkpoint format and the chain's encoding
/// written from SECURITY.md, not from pii-vault's code: checks the last
/// checkpoint's ECDSA signature with the public key, then recomputes every
/// exported entry's hash and that the last one is the checkpoint's head.
const INDEPENDENT_CHECK: &str = r#"
import base64, hashlib, json, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

cp_path, key_path, export_path = sys.argv[1:4]
c = json.loads(open(cp_path).read().splitlines()[-1])
msg = ("pii-vault/checkpoint/v1\n"
       f"seq={c['seq']}\nkind={c['kind']}\nat={c['at']}\n"
       f"trail={c['trail']['head_id']}:{c['trail']['head_hash']}:{c['trail']['count']}\n"
       f"requests={c['requests']['head_id']}:{c['requests']['head_hash']}:{c['requests']['count']}\n"
       f"prev_sig={c['prev_sig'] or '-'}\nkey={c['key']}\nalg={c['alg']}\n").encode()
key = serialization.load_der_public_key(open(key_path, "rb").read())
sig = base64.b64decode(c["sig"])
key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
try:
    key.verify(sig, msg.replace(b"seq=", b"seq=9"), ec.ECDSA(hashes.SHA256()))
    sys.exit("a changed checkpoint verified")
except InvalidSignature:
    pass

def field(v):
    if v is None:
        return b"\x00"
    b = str(v).encode()
    return b"\x01" + len(b).to_bytes(4, "big") + b

prev = bytes(32)
last = None
for line in open(export_path):
    e = json.loads(line)
    assert bytes.fromhex(e["prev_hash"]) == prev, f"entry {e['id']} does not link"
    enc = b"pii-vault/audit/v1" + b"".join(field(e[k]) for k in
          ["id", "at", "actor", "claimed_actor", "action", "target", "reason", "row_count", "xact"])
    h = hashlib.sha256(prev + enc).digest()
    assert h.hex() == e["hash"], f"entry {e['id']}: hash differs"
    prev, last = h, e["id"]
assert last == c["trail"]["head_id"] and prev.hex() == c["trail"]["head_hash"], "head differs"
print("verified", last)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_signed_checkpoint_verifies_with_an_independent_implementation() {
    use aws_sdk_kms::types::{KeySpec, KeyUsageType};
    if crate::common::aws::endpoint().is_none() {
        return;
    }
    let kms = crate::common::aws::kms().await;
    let created = kms
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .description("pii-vault checkpoint test key")
        .send()
        .await
        .expect("CreateKey ECC_NIST_P256");
    let arn = created.key_metadata.unwrap().arn.unwrap();
    let app = TestApp::embedded();
    let bin = app.bin();
    // `audit` reads an existing database; `migrate` makes the embedded one.
    bin.ok(&["migrate"]);
    bin.ok(&[
        "audit",
        "subject",
        "--user-id",
        "u1",
        "--reason",
        "GDPR request 1",
    ]);
    bin.ok(&[
        "audit",
        "subject",
        "--user-id",
        "u2",
        "--reason",
        "GDPR request 2",
    ]);
    let cp = app.path("checkpoints.jsonl");
    bin.ok(&[
        "audit",
        "checkpoint",
        "--signing-key-id",
        &arn,
        "--out",
        cp.to_str().unwrap(),
    ]);
    let line = std::fs::read_to_string(&cp).unwrap();
    let c: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(c["alg"], "ecdsa-p256-sha256");
    assert_eq!(c["key"], arn.as_str());
    let export = app.path("export.jsonl");
    let o = bin.ok_output(&["audit", "export", "--after-id", "0"]);
    std::fs::write(&export, &o.stdout).unwrap();
    // The public key as KMS hands it out.
    let der = kms
        .get_public_key()
        .key_id(&arn)
        .send()
        .await
        .expect("GetPublicKey")
        .public_key
        .unwrap()
        .into_inner();
    let key = app.path("checkpoint-key.der");
    std::fs::write(&key, &der).unwrap();
    let py = std::process::Command::new(python())
        .args(["-c", INDEPENDENT_CHECK])
        .args([&cp, &key, &export])
        .output()
        .expect("python with cryptography (.cache/localstack, or PII_VAULT_TEST_PYTHON)");
    assert!(
        py.status.success(),
        "independent check: {}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    // pii-vault's own verify, with the key from KMS and from the file.
    for extra in [
        vec!["--signing-key-id", arn.as_str()],
        vec!["--public-key", key.to_str().unwrap()],
    ] {
        let mut args = vec![
            "audit",
            "verify",
            "--checkpoints",
            cp.to_str().unwrap(),
            "--format",
            "json",
        ];
        args.extend(extra);
        let (status, v) = report(&bin.run(&args));
        assert_eq!(status, 0, "{v}");
        assert_eq!(v["checkpoints"], 1);
    }
    // A symmetric key is refused with a clear message.
    let (_, symmetric) = crate::common::aws::create_key(&kms).await;
    let o = bin.run(&["audit", "checkpoint", "--signing-key-id", &symmetric]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ECC_NIST_P256"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
