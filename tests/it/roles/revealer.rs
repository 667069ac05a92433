//! The revealer: ciphertext only through a committed audit row of its own;
//! the reveal governance (two-person approval, the daily limit, a policy
//! only the owner sets) and the honeytokens.

use super::{
    allowed, denied, login, pg_code, refused, seed, store_denied, token, REVEALER, ROTATOR, WORKER,
};
use crate::common::{self, app::TestApp};

use chrono::Utc;
use pii_vault::store::postgres::PgStore;
use pii_vault::store::{Audit, Batch, Ingest, PolicyChange, Reveal, Selector, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revealer_gets_ciphertext_only_for_a_committed_audit_row_of_its_own() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let seeded = seed(app.owner()).await;
    let revealer = app.store_as(REVEALER).await;
    let other = app.store_as(REVEALER).await;
    let raw = revealer.pool();
    let login_name: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(raw)
        .await
        .unwrap();

    // No way to the ciphertext but the audited function.
    for sql in [
        "SELECT * FROM vault",
        "SELECT nonce, ciphertext FROM vault",
        "SELECT * FROM quarantine",
        "SELECT * FROM reveal_requests",
        "SELECT * FROM pii_vault_rotation_vault_chunk(1, 1, '', NULL, 10)",
        "SELECT pii_vault_record('rotate-data-keys', 'x', 'why', 'me', 0)",
    ] {
        denied(raw, sql).await;
    }

    // Request and fetch in one transaction: refused, and a ROLLBACK then
    // leaves neither a trail nor anything read.
    let mut tx = raw.begin().await.unwrap();
    let (id,): (i64,) = sqlx::query_as(
        "SELECT request_id FROM pii_vault_reveal_request('user_id', 'alice', 'INC-1', 'me')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let same_tx = sqlx::query("SELECT * FROM pii_vault_reveal_fetch($1)")
        .bind(id)
        .fetch_all(&mut *tx)
        .await;
    match same_tx {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("PV005") => {}
        other => panic!("fetch in the request's own transaction: {other:?}"),
    }
    tx.rollback().await.unwrap();
    assert_eq!(app.count("audit_log").await, 0);
    // Fetching a rolled-back request finds nothing to fetch.
    refused(
        raw,
        &format!("SELECT * FROM pii_vault_reveal_fetch({id})"),
        "PV004",
    )
    .await;

    // The way it works: record (commits), then fetch, once.
    let req = revealer
        .reveal_request(
            &Selector::UserId("alice".into()),
            "someone-else",
            "INC-4711",
        )
        .await
        .unwrap();
    assert_eq!(req.row_count, 2);
    // Another revealer's login cannot fetch it.
    assert!(matches!(
        other.reveal_fetch(req.id).await,
        Err(StoreError::Refused(m)) if m.contains("PV004")
    ));
    let got = revealer
        .reveal_fetch(req.id)
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    for (l, v) in &got {
        let (_, want) = seeded
            .alice
            .iter()
            .find(|(s, _)| s.message_id == l.message_id)
            .unwrap();
        assert_eq!(v.as_ref(), Some(want));
    }
    refused(
        raw,
        &format!("SELECT * FROM pii_vault_reveal_fetch({})", req.id),
        "PV006",
    )
    .await;

    // The trail names the login and the database's time; the client's claim
    // is kept apart; forging either is refused or overwritten.
    let trail = revealer
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].actor, login_name);
    assert_eq!(trail[0].claimed_actor.as_deref(), Some("someone-else"));
    assert_eq!(
        (trail[0].action.as_str(), trail[0].row_count),
        ("reveal", 2)
    );
    assert!((Utc::now() - trail[0].at).num_seconds().abs() < 60);
    for sql in [
        "INSERT INTO audit_log (at, actor, action, target, reason, row_count) VALUES ('2001-01-01', 'ceo', 'reveal', 'x', 'y', 0)",
        "INSERT INTO audit_log (action, target, reason, row_count) VALUES ('reveal', 'x', 'y', 0)",
        "UPDATE audit_log SET actor = 'ceo'",
        "UPDATE audit_log SET at = '2001-01-01'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "UPDATE reveal_requests SET fetched_at = NULL",
        "INSERT INTO user_logins (message_id) VALUES ('planted')",
        "UPDATE vault SET nonce = nonce",
        "UPDATE vault_keys SET state = 'retired'",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('k', 'vault', 'local:x', now())",
        "INSERT INTO kms_allowlist (kek_id) VALUES ('x')",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    // Even the owner, who may insert, cannot choose actor or time.
    allowed(
        app.pool(),
        "INSERT INTO audit_log (at, actor, action, target, reason, row_count) VALUES ('2001-01-01', 'ceo', 'note', 'x', 'y', 0)",
    )
    .await;
    let (actor, year): (String, f64) = sqlx::query_as(
        "SELECT actor, extract(year FROM at)::float8 FROM audit_log WHERE action = 'note'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_ne!(actor, "ceo");
    assert!(year > 2001.0);

    assert_eq!(app.count("vault").await, 3);
    app.finish().await;
}

// ------------------------------------------------------ reveal governance

/// Twelve users behind one shared (NAT) address: more than the default
/// policy's ten users per reveal.
async fn seed_shared_ip(owner: &PgStore) -> String {
    seed(owner).await;
    let shared = token(1);
    let logins: Vec<_> = (0..12)
        .map(|i| {
            let mut l = login(&format!("nat-user-{i}"), "dek-1");
            l.0.masked_ip = shared.clone();
            l
        })
        .collect();
    owner
        .write_batch(&Batch {
            logins,
            ..Batch::default()
        })
        .await
        .unwrap();
    shared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_reveal_needs_another_logins_approval_and_is_fetched_once() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let shared = seed_shared_ip(app.owner()).await;
    let alice = app.store_as(REVEALER).await;
    let bob = app.store_as(REVEALER).await;
    let bulk = Selector::MaskedIp(shared.clone());

    // Over the policy: a pending request, nothing to fetch.
    let req = alice.reveal_request(&bulk, "alice", "INC-9").await.unwrap();
    assert_eq!(req.status, pii_vault::store::RequestStatus::Pending);
    assert_eq!(req.row_count, 12);
    let early = alice.reveal_fetch(req.id).await.unwrap_err();
    assert_eq!(pg_code(&early), Some("PV004"), "{early}");
    refused(
        alice.pool(),
        &format!("SELECT * FROM pii_vault_reveal_fetch({})", req.id),
        "PV004",
    )
    .await;
    let unapproved = alice.reveal_claim(req.id, "alice").await.unwrap_err();
    assert_eq!(pg_code(&unapproved), Some("PV012"), "{unapproved}");

    // Approving one's own request: refused by the database, through the
    // store and in plain SQL.
    let own = alice
        .approve(req.id, "alice", "looks fine")
        .await
        .unwrap_err();
    assert_eq!(pg_code(&own), Some("PV011"), "{own}");
    refused(
        alice.pool(),
        &format!("SELECT pii_vault_approve({}, 'fine', 'me')", req.id),
        "PV011",
    )
    .await;
    // Nor can a revealer mark it approved by hand.
    denied(
        alice.pool(),
        &format!(
            "UPDATE reveal_requests SET status = 'approved' WHERE id = {}",
            req.id
        ),
    )
    .await;

    // Bob approves; only Alice may then take it, once.
    bob.approve(req.id, "bob", "INC-9 confirmed with the DPO")
        .await
        .unwrap();
    let not_his = bob.reveal_claim(req.id, "bob").await.unwrap_err();
    assert_eq!(pg_code(&not_his), Some("PV004"), "{not_his}");
    let record = alice.reveal_claim(req.id, "alice").await.unwrap();
    // A claim whose fetch never happened (KMS away, a lost connection) is
    // handed back as it was, not spent: no second audit row.
    assert_eq!(alice.reveal_claim(req.id, "alice").await.unwrap(), record);
    let rows = alice
        .reveal_fetch(record)
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|(_, v)| v.is_some()));
    let again = alice.reveal_claim(req.id, "alice").await.unwrap_err();
    assert_eq!(pg_code(&again), Some("PV006"), "{again}");
    let refetch = alice.reveal_fetch(record).await.unwrap_err();
    assert_eq!(pg_code(&refetch), Some("PV006"), "{refetch}");

    // Every step is on the record, under the login that took it.
    let trail: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM audit_log ORDER BY id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    let steps: Vec<(&str, bool)> = trail
        .iter()
        .map(|(a, who)| (a.as_str(), who.ends_with("_revealer")))
        .collect();
    assert_eq!(
        steps,
        [
            ("reveal-request", true),
            ("approve", true),
            ("reveal", true)
        ]
    );
    assert_ne!(trail[0].1, trail[1].1, "requester and approver differ");
    assert_eq!(trail[0].1, trail[2].1);

    // A request older than 24 hours can be neither approved nor fetched.
    let stale = alice
        .reveal_request(&bulk, "alice", "INC-10")
        .await
        .unwrap();
    let approved = alice
        .reveal_request(&bulk, "alice", "INC-11")
        .await
        .unwrap();
    bob.approve(approved.id, "bob", "ok").await.unwrap();
    // Backdated behind the triggers' back (a request's time is fixed once
    // recorded, and chained).
    let mut tx = app.pool().begin().await.unwrap();
    for sql in [
        "SET LOCAL session_replication_role = replica".to_string(),
        format!(
            "UPDATE reveal_requests SET requested_at = now() - interval '25 hours' WHERE id IN ({}, {})",
            stale.id, approved.id
        ),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let late = bob.approve(stale.id, "bob", "too late").await.unwrap_err();
    assert_eq!(pg_code(&late), Some("PV006"), "{late}");
    let expired = alice.reveal_claim(approved.id, "alice").await.unwrap_err();
    assert_eq!(pg_code(&expired), Some("PV006"), "{expired}");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_limit_counts_per_login_and_only_the_owner_sets_the_policy() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let alice = app.store_as(REVEALER).await;
    let bob = app.store_as(REVEALER).await;
    let rotator = app.store_as(ROTATOR).await;

    // Nobody but the owner changes the policy.
    for pool in [alice.pool(), rotator.pool()] {
        denied(
            pool,
            "UPDATE reveal_policy SET max_reveals_per_day = 100000",
        )
        .await;
        denied(pool, "DELETE FROM reveal_policy").await;
    }
    let change = |day: i64| PolicyChange {
        max_reveals_per_day: Some(day),
        ..PolicyChange::default()
    };
    store_denied(alice.set_policy(&change(100_000)).await, "set_policy");
    let p = app.owner().set_policy(&change(2)).await.unwrap();
    assert_eq!((p.max_users_per_reveal, p.max_reveals_per_day), (10, 2));
    assert_eq!(alice.policy().await.unwrap(), p, "revealers may read it");
    let change: (String, String) =
        sqlx::query_as("SELECT action, target FROM audit_log WHERE action = 'policy-set'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        change.1,
        "max_users_per_reveal=10 max_reveals_per_day=2 max_transaction_seconds=60 max_searches_per_day=200"
    );

    let sel = Selector::UserId("alice".into());
    use pii_vault::store::RequestStatus::{Granted, Pending};
    for want in [Granted, Granted, Pending] {
        let r = alice.reveal_request(&sel, "alice", "daily").await.unwrap();
        assert_eq!(r.status, want);
    }
    // Bob's count is his own.
    assert_eq!(
        bob.reveal_request(&sel, "bob", "daily")
            .await
            .unwrap()
            .status,
        Granted
    );
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_touching_a_honeytoken_is_served_and_raises_an_alarm_only_the_owner_sees() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let revealer_login = app.login_as(REVEALER).await;
    let revealer = app.as_login(&revealer_login);
    let worker = app.as_login(&app.login_as(WORKER).await);
    app.ok(&["migrate"]);
    let load = |name: &str, seed: &str, n: &str| {
        app.write(name, &common::gen_events(&["-n", n, "--seed", seed]));
        worker.ok(&[
            "run",
            "--from-file",
            name,
            "--no-progress",
            "--batch-size",
            "2",
        ])
    };
    load("day1.jsonl", "1", "60");
    let stderr = app.ok(&["honeytoken", "plant", "--count", "3", "--over", "0"]);
    assert!(stderr.contains("planted 3 honeytoken user(s)"), "{stderr}");
    let planned: i64 = sqlx::query_scalar("SELECT count(*) FROM honeytoken_logins")
        .fetch_one(app.pool())
        .await
        .unwrap();
    // The next day's load carries them, one a batch, and counts only its own.
    let stderr = load("day2.jsonl", "2", "400");
    assert_eq!(common::summary(stderr.as_bytes()), (400, 0, 0), "{stderr}");
    let traps: Vec<String> = sqlx::query_scalar("SELECT user_id FROM honeytokens ORDER BY user_id")
        .fetch_all(app.pool())
        .await
        .unwrap();
    assert_eq!(traps.len(), 3);
    // Their rows look like any other: tokens of the current version, sealed
    // originals under the worker's data key, the day's date.
    let (n, tokens, sealed, by_worker): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE l.masked_ip LIKE 't1\\_%' AND l.masked_device_id LIKE 't1\\_%'), \
         count(v.message_id), count(*) FILTER (WHERE k.created_by LIKE '%\\_worker') \
         FROM user_logins l LEFT JOIN vault v ON v.message_id = l.message_id \
         LEFT JOIN vault_keys k ON k.id = v.key_id WHERE l.user_id = ANY($1)",
    )
    .bind(&traps)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(n, planned, "every planned login written once");
    assert_eq!((tokens, sealed, by_worker), (n, n, n));

    let mut listener = sqlx::postgres::PgListener::connect(app.url())
        .await
        .unwrap();
    listener.listen("pii_vault_alarm").await.unwrap();
    // The owner's watcher: `audit --alarms --follow` reports each new alarm
    // as an ERROR log line (and a line on stdout).
    let follow = app
        .bin()
        .env("PII_VAULT_LOG_FORMAT", "json")
        .spawn(&["audit", "--alarms", "--follow", "--format", "json"]);
    // Wait until it listens: a session of the binary whose last statement
    // was its LISTEN (the test's own listener sets no application name).
    common::wait_until(
        std::time::Duration::from_secs(60),
        "audit --follow to LISTEN",
        || async {
            let listening = app
                .scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = 'pii-vault' \
                       AND query LIKE 'LISTEN %pii_vault_alarm%'",
                )
                .await;
            (listening > 0).then_some(())
        },
    )
    .await;

    // The revealer is served as for any user, and told nothing.
    let reveal = [
        "reveal",
        "--user-id",
        &traps[0],
        "--reason",
        "fishing",
        "--format",
        "json",
    ];
    let out = revealer.ok_output(&reveal);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().count() >= 1 && stdout.contains("\"ip\":\""),
        "{stdout}"
    );
    for word in ["alarm", "honeytoken", "ALARM"] {
        assert!(!stderr.contains(word), "the revealer is told: {stderr}");
    }

    // The owner is: a NOTIFY with the request id, an alarm row.
    let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("no NOTIFY pii_vault_alarm within 10 s")
        .unwrap();
    let request_id: i64 = note.payload().parse().unwrap();
    let alarms = app
        .owner()
        .alarms(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].request_id, request_id);
    assert!(alarms[0].actor.ends_with("_revealer"));
    let listed = String::from_utf8(
        app.ok_output(&["audit", "--alarms", "--format", "json"])
            .stdout,
    )
    .unwrap();
    assert!(listed.contains("\"action\":\"alarm\""), "{listed}");
    assert!(
        listed.contains(&format!("\"request_id\":{request_id}")),
        "{listed}"
    );
    let pid = follow.id().expect("running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let watched = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        follow.wait_with_output(),
    )
    .await
    .expect("the watcher did not stop")
    .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
    );
    assert!(
        out.contains(&format!("\"request_id\":{request_id}")),
        "{out}\n{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("\"level\":\"ERROR\"") && l.contains("ALARM")),
        "no ERROR line: {err}"
    );

    // The revealer cannot see that it tripped anything: no alarm table, no
    // honeytoken list, and its trail has no entry for it, nor a gap.
    let raw = PgStore::connect(&revealer_login.url).await.unwrap();
    for sql in [
        "SELECT * FROM audit_alarms",
        "SELECT * FROM honeytokens",
        "SELECT count(*) FROM honeytokens",
    ] {
        denied(raw.pool(), sql).await;
    }
    let ids: Vec<(i64, String)> = sqlx::query_as("SELECT id, action FROM audit_log ORDER BY id")
        .fetch_all(raw.pool())
        .await
        .unwrap();
    assert!(ids.iter().all(|(_, a)| a != "alarm"), "{ids:?}");
    assert!(
        ids.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "gaps in the trail's ids: {ids:?}"
    );
    let refused = revealer.run(&["audit", "--alarms"]);
    assert!(!refused.status.success());
    raw.pool().close().await;

    // Honeytokens survive the rotations like any user.
    app.ok(&["rotate", "data-keys"]);
    app.ok(&["rotate", "token-key"]);
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
         WHERE l.user_id = ANY($1) AND l.masked_ip LIKE 't2\\_%'",
    )
    .bind(&traps)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(kept, n);
    let again = revealer.ok_output(&reveal);
    assert!(String::from_utf8_lossy(&again.stdout).contains("\"ip\":\""));
    listener.unlisten_all().await.ok();
    app.finish().await;
}
