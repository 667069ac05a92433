//! Trust boundaries, round two: what an adversary holding one role's login
//! tried with plain SQL, the catalog and the statistics views, controlling
//! its own transactions, and what the database now answers. One test per
//! finding; each asserts the exact SQLSTATE of a refusal, or, where the
//! point is what a session can observe, compares the observations.
//!
//! Postgres only. Each test starts from a
//! [`TestApp`](crate::common::app::TestApp) (a migrated database, logins
//! per role); the owner's `seed` and the refusal assertions are `roles`'.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use pii_vault::store::postgres::PgStore;
use pii_vault::store::{Batch, Chunks, Erasure, Ingest, JobKind, JobStart, Jobs, Reveal};
use sqlx::{Connection, PgConnection, Row};

use crate::common::app::TestApp;
use crate::common::seed::Owner;
use crate::common::{self};
use crate::roles::{
    denied, login, refused, seed, seed_on, who, ANALYST, REVEALER, ROTATOR, SEARCHER, WORKER,
};

/// Two logins each for `users`, written by the owner under the seed's keys.
async fn logins_of(owner: &PgStore, users: &[&str]) {
    let logins = users
        .iter()
        .flat_map(|u| [login(u, "dek-1"), login(u, "dek-1")])
        .collect();
    owner
        .write_batch(&Batch {
            logins,
            token_key_id: "tok-1".into(),
            ..Batch::default()
        })
        .await
        .unwrap();
}

/// Runs `sql` on `conn` and asserts that it fails with SQLSTATE `code`.
async fn refused_on(conn: &mut PgConnection, sql: &str, code: &str) {
    match sqlx::query(sql).execute(&mut *conn).await {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(code) => {}
        Err(e) => panic!("{sql}: expected SQLSTATE {code}, got: {e}"),
        Ok(_) => panic!("{sql}: expected SQLSTATE {code}, but it ran"),
    }
}

/// What a session can see of its own open transaction.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    answer: (i64, String),
    /// What the request added to the session's table statistics.
    stats: BTreeMap<String, Vec<i64>>,
    /// pg_locks of this backend: lock type, relation, mode, granted.
    locks: Vec<(String, String, String, bool)>,
    /// pg_stat_xact_user_functions (empty unless track_functions is on).
    functions: Vec<(String, i64)>,
    xid_assigned: bool,
}

/// A session's own table statistics: pg_stat_xact_user_tables, every
/// counter, by table. (On PostgreSQL 15 these also hold what earlier
/// transactions of the session did until it is flushed, so what a request
/// adds is the difference across it.)
async fn own_stats(tx: &mut PgConnection) -> BTreeMap<String, Vec<i64>> {
    let rows = sqlx::query(
        "SELECT relname::text, coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0), \
                coalesce(idx_tup_fetch, 0), n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd \
         FROM pg_stat_xact_user_tables",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                (1..9).map(|i| r.get::<i64, _>(i)).collect(),
            )
        })
        .collect()
}

/// Item 1: requests a reveal of `user` in a transaction, looks at what the
/// session can see, and rolls back.
async fn probe(conn: &mut PgConnection, user: &str) -> Observed {
    let mut tx = conn.begin().await.unwrap();
    let before = own_stats(&mut tx).await;
    let answer: (i64, String) = sqlx::query_as(
        "SELECT row_count, status FROM pii_vault_reveal_request('user_id', $1, 'probe', 'me')",
    )
    .bind(user)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let after = own_stats(&mut tx).await;
    let stats = after
        .into_iter()
        .map(|(t, a)| {
            let b = before.get(&t).cloned().unwrap_or_else(|| vec![0; a.len()]);
            let d = a.iter().zip(&b).map(|(x, y)| x - y).collect();
            (t, d)
        })
        .collect();
    let locks: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT locktype, coalesce(relation::regclass::text, ''), mode, granted FROM pg_locks \
         WHERE pid = pg_backend_pid() AND locktype NOT IN ('virtualxid', 'transactionid') \
         ORDER BY 1, 2, 3",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let functions: Vec<(String, i64)> =
        sqlx::query_as("SELECT funcname::text, calls FROM pg_stat_xact_user_functions ORDER BY 1")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    let xid_assigned: bool = sqlx::query_scalar("SELECT txid_current_if_assigned() IS NOT NULL")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    Observed {
        answer,
        stats,
        locks,
        functions,
        xid_assigned,
    }
}

/// Item 1: a revealer that requests a reveal and looks before it commits
/// (its own statistics, its locks, the rows its request says it covers,
/// whether it took a transaction id) sees the same for a honeytoken as for
/// a real user with as many logins; rolled back, it left no trace either
/// way; committed, both notify alike, and only the owner learns which one
/// was a trap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revealers_session_sees_the_same_for_a_honeytoken_as_for_a_real_user() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    logins_of(app.owner(), &["honey", "carol"]).await;
    Owner::Pg(app.pool())
        .add_honeytokens(&["honey", "ghost-1", "ghost-2"])
        .await;
    let url = app.login_as(REVEALER).await.url;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The login's first request creates its quota row; later ones update it.
    sqlx::query("SELECT * FROM pii_vault_reveal_request('user_id', 'bob', 'warm-up', 'me')")
        .execute(&mut conn)
        .await
        .unwrap();
    // A probe of someone else first: the session's caches are then warm
    // for every probe compared.
    probe(&mut conn, "alice").await;
    let trail = app.count("audit_log").await;

    let mut honey = Vec::new();
    let mut carol = Vec::new();
    for _ in 0..3 {
        honey.push(probe(&mut conn, "honey").await);
        carol.push(probe(&mut conn, "carol").await);
    }
    assert_eq!(honey[0].answer, (2, "granted".to_string()));
    assert_eq!(
        honey[0].stats.get("reveal_request_rows").map(|c| c[4]),
        Some(2),
        "the probe must see what the request wrote: {:?}",
        honey[0].stats
    );
    for (h, c) in honey.iter().zip(&carol) {
        assert_eq!(h, c, "what the session sees differs for a honeytoken");
    }
    // Rolled back: no entry, no alarm, nothing to find later.
    assert_eq!(app.count("audit_log").await, trail);
    assert_eq!(app.count("audit_alarms").await, 0);

    // Committed: each notifies once, alike; only the owner sees the alarm.
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen("pii_vault_alarm").await.unwrap();
    let mut ids = Vec::new();
    for user in ["honey", "carol"] {
        let id: i64 = sqlx::query_scalar(
            "SELECT request_id FROM pii_vault_reveal_request('user_id', $1, 'why', 'me')",
        )
        .bind(user)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a NOTIFY for every request")
            .unwrap();
        assert_eq!(note.payload(), id.to_string());
        ids.push(id);
    }
    let seen: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT action, reason, row_count FROM audit_log WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(seen[0], seen[1]);
    let alarms: Vec<i64> = sqlx::query_scalar("SELECT request_id FROM audit_alarms")
        .fetch_all(app.pool())
        .await
        .unwrap();
    assert_eq!(alarms, [ids[0]]);
    for sql in [
        "SELECT * FROM audit_alarms",
        "SELECT honeytokens FROM reveal_requests",
        "SELECT * FROM honeytokens",
    ] {
        match sqlx::query(sql).execute(&mut conn).await {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {}
            other => panic!("{sql}: expected 42501, got {other:?}"),
        }
    }
    conn.close().await.ok();
    listener.unlisten_all().await.ok();
    app.finish().await;
}

/// What a searcher's session sees of a search it records and rolls back.
async fn search_probe(conn: &mut PgConnection, token: &str) -> Observed {
    let mut tx = conn.begin().await.unwrap();
    let before = own_stats(&mut tx).await;
    let id: i64 =
        sqlx::query_scalar("SELECT pii_vault_search_record('ip', ARRAY[$1], 'probe', 'me')")
            .bind(token)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let after = own_stats(&mut tx).await;
    let stats = after
        .into_iter()
        .map(|(t, a)| {
            let b = before.get(&t).cloned().unwrap_or_else(|| vec![0; a.len()]);
            (t, a.iter().zip(&b).map(|(x, y)| x - y).collect())
        })
        .collect();
    let locks: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT locktype, coalesce(relation::regclass::text, ''), mode, granted FROM pg_locks \
         WHERE pid = pg_backend_pid() AND locktype NOT IN ('virtualxid', 'transactionid') \
         ORDER BY 1, 2, 3",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let functions: Vec<(String, i64)> =
        sqlx::query_as("SELECT funcname::text, calls FROM pg_stat_xact_user_functions ORDER BY 1")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    Observed {
        // The record's id differs from call to call; that it is one is
        // what the session learns.
        answer: (i64::from(id > 0), String::new()),
        stats,
        locks,
        functions,
        xid_assigned: true,
    }
}

/// A searcher that searches for a honeytoken's token and looks before it
/// commits (its own statistics, locks, the answer) sees the same as for a
/// real user's token carried by as many logins; rolled back, no trace;
/// committed, both notify alike and only the owner sees the alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_searchers_session_sees_the_same_for_a_honeytokens_token_as_for_a_real_one() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let (honey_ip, carol_ip, other_ip) = (
        format!("t1_{}", "H".repeat(43)),
        format!("t1_{}", "C".repeat(43)),
        format!("t1_{}", "O".repeat(43)),
    );
    let logins = [
        ("honey", &honey_ip),
        ("carol", &carol_ip),
        ("dave", &other_ip),
    ]
    .into_iter()
    .flat_map(|(u, ip)| {
        (0..2).map(move |_| {
            let mut l = login(u, "dek-1");
            l.0.masked_ip = ip.clone();
            l
        })
    })
    .collect();
    app.owner()
        .write_batch(&Batch {
            logins,
            token_key_id: "tok-1".into(),
            ..Batch::default()
        })
        .await
        .unwrap();
    Owner::Pg(app.pool())
        .add_honeytokens(&["honey", "ghost-1", "ghost-2"])
        .await;
    let url = app.login_as(SEARCHER).await.url;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The login's quota row exists, and the session's caches are warm.
    sqlx::query("SELECT pii_vault_search_record('ip', ARRAY[$1], 'warm-up', 'me')")
        .bind(&other_ip)
        .execute(&mut conn)
        .await
        .unwrap();
    search_probe(&mut conn, &other_ip).await;
    let trail = app.count("audit_log").await;
    for _ in 0..3 {
        let honey = search_probe(&mut conn, &honey_ip).await;
        let carol = search_probe(&mut conn, &carol_ip).await;
        assert_eq!(
            honey.stats.get("searches").map(|c| c[4]),
            Some(1),
            "the probe must see what the search wrote: {:?}",
            honey.stats
        );
        assert_eq!(
            honey, carol,
            "what the session sees differs for a honeytoken"
        );
    }
    assert_eq!(app.count("audit_log").await, trail);
    assert_eq!(app.count("audit_alarms").await, 0);

    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen("pii_vault_alarm").await.unwrap();
    let mut ids = Vec::new();
    for token in [&honey_ip, &carol_ip] {
        let id: i64 =
            sqlx::query_scalar("SELECT pii_vault_search_record('ip', ARRAY[$1], 'why', 'me')")
                .bind(token)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a NOTIFY for every search")
            .unwrap();
        assert_eq!(note.payload(), id.to_string());
        ids.push(id);
    }
    let alarms: Vec<i64> = sqlx::query_scalar("SELECT request_id FROM audit_alarms")
        .fetch_all(app.pool())
        .await
        .unwrap();
    assert_eq!(alarms, [ids[0]]);
    for sql in [
        "SELECT * FROM audit_alarms",
        "SELECT honeytokens FROM searches",
        "SELECT * FROM honeytokens",
        "SELECT * FROM audit_log",
    ] {
        refused_on(&mut conn, sql, "42501").await;
    }
    conn.close().await.ok();
    listener.unlisten_all().await.ok();
    app.finish().await;
}

/// A login as an analyst reads it: xmin, message id, user id, device
/// type, locale, app version, date.
type AnalystRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
);

/// Lines of events whose every attribute is unusual, with user ids of a
/// shape of their own: what the honeytokens must then look like.
fn unusual_events(n: usize, salt: u32) -> String {
    (0..n)
        .map(|i| {
            let u = 1000 + (i as u32 * 7 + salt) % 40;
            serde_json::json!({
                "user_id": format!("cust-00{u:04}"),
                "app_version": "7.7.7",
                "device_type": "tablet",
                "ip": format!("203.0.113.{}", (i as u32 + salt) % 250 + 1),
                "locale": "XX",
                "device_id": format!("{:03}-{:02}-{:04}", 100 + i % 900, 10 + i % 90, 1000 + i),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Item 2: planted users cannot be told apart from real ones by what an
/// analyst or a revealer reads: their rows share transactions (xmin) with
/// real rows, carry the real rows' dates, device types, locales and app
/// versions, user ids of the real ids' shape, message ids of the batch's
/// shape, and are sealed under the workers' data keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honeytokens_look_like_the_real_users_around_them() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let worker = app.as_login(&app.login_as(WORKER).await);
    let analyst = app.login_as(ANALYST).await.url;
    let revealer = app.login_as(REVEALER).await.url;
    app.ok(&["migrate"]);
    let load = |name: &str, text: &str| {
        app.write(name, text);
        worker.ok(&[
            "run",
            "--from-file",
            name,
            "--no-progress",
            "--batch-size",
            "3",
        ])
    };
    load("first.jsonl", &unusual_events(120, 0));
    app.ok(&["honeytoken", "plant", "--count", "4", "--over", "0"]);
    let planned: i64 = sqlx::query_scalar("SELECT count(*) FROM honeytoken_logins")
        .fetch_one(app.pool())
        .await
        .unwrap();
    load(
        "second.jsonl",
        &unusual_events(3 * planned as usize + 30, 3),
    );

    let traps: HashSet<String> = sqlx::query_scalar("SELECT user_id FROM honeytokens")
        .fetch_all(app.pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    // What the analyst reads.
    let as_analyst = PgStore::connect(&analyst).await.unwrap();
    let rows: Vec<AnalystRow> = sqlx::query_as(
        "SELECT xmin::text, message_id, user_id::text, device_type::text, locale::text, app_version, \
                create_date::text FROM user_logins",
    )
    .fetch_all(as_analyst.pool())
    .await
    .unwrap();
    let (fake, real): (Vec<_>, Vec<_>) = rows.iter().partition(|r| traps.contains(&r.2));
    assert_eq!(fake.len() as i64, planned, "every planned login written");
    let real_xmins: HashSet<&str> = real.iter().map(|r| r.0.as_str()).collect();
    let real_dates: HashSet<&str> = real.iter().map(|r| r.6.as_str()).collect();
    let shape = |id: &str| {
        id.len() == 11 && id.starts_with("cust-00") && id[5..].bytes().all(|b| b.is_ascii_digit())
    };
    for (xmin, message_id, user_id, device, locale, version, date) in &fake {
        assert!(
            real_xmins.contains(xmin.as_str()),
            "a planted row in a transaction of its own"
        );
        assert_eq!(
            (device.as_str(), locale.as_deref(), version.as_str()),
            ("tablet", Some("XX"), "7.7.7")
        );
        assert!(real_dates.contains(date.as_str()), "{date}");
        assert!(shape(user_id), "{user_id}");
        assert!(
            message_id.starts_with("line-") && message_id.len() == 37,
            "{message_id}"
        );
    }
    // What the revealer reads of the keys: every data key is a worker's.
    let as_revealer = PgStore::connect(&revealer).await.unwrap();
    let makers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT created_by FROM vault_keys WHERE purpose = 'vault'")
            .fetch_all(as_revealer.pool())
            .await
            .unwrap();
    assert!(makers.iter().all(|m| m.ends_with("_worker")), "{makers:?}");
    // And every key that seals a planted row seals real rows too.
    let alone: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT v.key_id) FROM vault v JOIN honeytokens h ON h.user_id = v.user_id \
         WHERE NOT EXISTS (SELECT 1 FROM vault r WHERE r.key_id = v.key_id \
                           AND r.user_id NOT IN (SELECT user_id FROM honeytokens))",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(alone, 0);
    as_analyst.pool().close().await;
    as_revealer.pool().close().await;
    app.finish().await;
}

/// Item 3: eight sessions of one login that request at once, each holding
/// its transaction open a while before it commits, are granted no more
/// than the daily limit; under REPEATABLE READ the latecomers fail with a
/// serialization error instead of counting from an old snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_limit_holds_against_concurrent_sessions_of_one_login() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    app.exec("UPDATE reveal_policy SET max_reveals_per_day = 4")
        .await;
    for isolation in ["READ COMMITTED", "REPEATABLE READ"] {
        let login = app.login_as(REVEALER).await;
        let url = login.url.clone();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let mut conn = PgConnection::connect(&url).await.unwrap();
                    sqlx::query(&format!("BEGIN ISOLATION LEVEL {isolation}"))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
                    let status = sqlx::query_scalar::<_, String>(
                        "SELECT status FROM pii_vault_reveal_request('user_id', 'alice', 'race', 'me')",
                    )
                    .fetch_one(&mut conn)
                    .await;
                    let out = match status {
                        Ok(s) => {
                            sqlx::query("SELECT pg_sleep(1)")
                                .execute(&mut conn)
                                .await
                                .unwrap();
                            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
                            s
                        }
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40001") => {
                            "serialization failure".to_string()
                        }
                        Err(e) => panic!("{e}"),
                    };
                    conn.close().await.ok();
                    out
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            match t.await.unwrap().as_str() {
                "granted" => granted += 1,
                "pending" => {}
                "serialization failure" => assert_eq!(isolation, "REPEATABLE READ"),
                other => panic!("{other}"),
            }
        }
        if isolation == "READ COMMITTED" {
            assert_eq!(granted, 4, "exactly the limit, the rest pending");
        } else {
            assert!((1..=4).contains(&granted), "{granted}");
        }
        let committed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reveal_requests WHERE requested_by = $1 AND status = 'granted'",
        )
        .bind(&login.name)
        .fetch_one(app.pool())
        .await
        .unwrap();
        assert_eq!(committed, granted);
    }
    app.finish().await;
}

/// Item 4: the rotator's own login cannot erase or corrupt originals, keys,
/// tokens or the allow-list with plain SQL: every direct write is refused
/// (42501), and what it may do goes through functions that want its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotator_cannot_erase_or_corrupt_originals_with_plain_sql() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let rotator = app.store_as(ROTATOR).await;
    for sql in [
        "UPDATE vault_keys SET state = 'destroyed' WHERE purpose = 'vault'",
        "UPDATE vault_keys SET wrapped = '\\x00' WHERE id = 'dek-1'",
        "UPDATE vault_keys SET kek_id = 'local:test' WHERE id = 'dek-1'",
        "INSERT INTO vault_keys (id, purpose, kek_id, wrapped) VALUES ('dek-x', 'vault', 'local:test', '\\x00')",
        "INSERT INTO kms_allowlist (kek_id) VALUES ('arn:aws:kms:us-east-1:666:key/evil')",
        "UPDATE vault SET key_id = 'dek-1', nonce = '\\x00', ciphertext = '\\x00'",
        "UPDATE quarantine SET ciphertext = '\\x00'",
        "UPDATE user_logins SET masked_ip = 't1_x', masked_device_id = 't1_y'",
    ] {
        denied(rotator.pool(), sql).await;
    }
    // Without a job, the functions refuse too.
    refused(
        rotator.pool(),
        "SELECT pii_vault_rotation_rewrap(1, 1, 'dek-1', 'local:test', '\\x00112233445566778899aabbccddeeff')",
        "PV011",
    )
    .await;
    refused(
        rotator.pool(),
        "SELECT pii_vault_rotation_finish(1, 1)",
        "PV011",
    )
    .await;
    let originals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault v JOIN vault_keys k ON k.id = v.key_id WHERE k.state = 'active'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(originals, 3);
    app.finish().await;
}

/// Item 5: a record shaped like an erasure cannot be written without the
/// erasure: `pii_vault_record` records rotations only (22023), and nothing
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotator_cannot_record_an_erasure_that_did_not_happen() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let rotator = app.store_as(ROTATOR).await;
    for action in ["forget", "retention", "keys-init", "allow-kek", "reveal"] {
        refused(
            rotator.pool(),
            &format!("SELECT pii_vault_record('{action}', 'user_id=alice', 'ticket 42', NULL, 3)"),
            "22023",
        )
        .await;
    }
    assert_eq!(app.count("audit_log").await, 0);
    assert_eq!(app.count("vault").await, 3);
    app.finish().await;
}

/// Item 6: ciphertext comes out only under an open job whose lease the
/// caller's record holds. The old readers are gone (42883); advisory locks
/// count for nothing; an old record of a job whose lease went is refused
/// (PV007), and a new record that did not take the job over is too (PV011). No other role can take or block a rotation's lease: an
/// analyst, a worker and a revealer holding every advisory lock the old
/// versions used do not stop a rotation, and cannot touch the leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertext_is_read_only_under_a_leased_job_that_no_other_role_can_block() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // This month's: the in-place readers leave closed months to their rewrite.
    seed_on(app.owner(), Some(chrono::Utc::now().date_naive())).await;
    // One rotator login, two sessions: the store's and a raw one.
    let url = app.login_as(ROTATOR).await.url;
    let rotator = PgStore::connect(&url).await.unwrap();
    let mut raw = PgConnection::connect(&url).await.unwrap();
    refused_on(
        &mut raw,
        "SELECT * FROM pii_vault_rotation_vault_rows(1, ARRAY['dek-1'], '', 10)",
        "42883",
    )
    .await;
    refused_on(
        &mut raw,
        "SELECT * FROM pii_vault_rotation_logins(1, 2, 0, 10)",
        "42883",
    )
    .await;

    // The analyst holds the advisory locks a rotation once took; no other
    // role can touch the leases.
    let mut blockers = Vec::new();
    for role in [ANALYST, WORKER, REVEALER] {
        let mut c = PgConnection::connect(&app.login_as(role).await.url)
            .await
            .unwrap();
        if role == ANALYST {
            for kind in 1..=3 {
                sqlx::query(&format!("SELECT pg_advisory_lock(1347835904, {kind})"))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
        for sql in [
            "SELECT * FROM job_leases",
            "UPDATE job_leases SET record = NULL",
            "SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)",
            "SELECT pii_vault_job_release(1)",
        ] {
            refused_on(&mut c, sql, "42501").await;
        }
        blockers.push(c);
    }
    let job = rotator
        .begin_job(JobKind::DataKeys, "vault, quarantine", &who(), 3)
        .await
        .expect("no other role can block a rotation");
    let started = rotator
        .start_job(
            &job,
            JobStart::DataKeys {
                bounds: &["".into()],
            },
        )
        .await
        .unwrap();
    let read = |record: i64| {
        format!(
            "SELECT * FROM pii_vault_rotation_vault_chunk({record}, {}, '', NULL, 10)",
            started.id
        )
    };
    assert_eq!(
        rotator
            .vault_chunk(&started, "", None, 10)
            .await
            .unwrap()
            .len(),
        3
    );
    // Another session of the same login, with a record of its own while
    // the lease is held: refused its record, and no ciphertext.
    refused_on(
        &mut raw,
        "SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)",
        "PV007",
    )
    .await;
    let first = job.record;
    job.finish().await; // the lease goes; the job stays open
                        // The committed record of the last run (the advisory locks it once
                        // took are held by the other roles above, to no effect): not a lease.
    refused_on(&mut raw, &read(first), "PV007").await;
    // A record of its own (with the lease), which has not taken the job over.
    let mine: i64 =
        sqlx::query_scalar("SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)")
            .fetch_one(&mut raw)
            .await
            .unwrap();
    refused_on(&mut raw, &read(mine), "PV011").await;
    for c in blockers {
        c.close().await.ok();
    }
    raw.close().await.ok();
    app.finish().await;
}

/// Item 7: the time on the record is the call's, not the transaction's
/// start, and a call in a transaction held open longer than the policy
/// allows is refused (PV014), for the revealer and the rotator alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_on_the_record_are_the_calls_own_and_old_transactions_are_refused() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let mut revealer = PgConnection::connect(&app.login_as(REVEALER).await.url)
        .await
        .unwrap();
    let mut rotator = PgConnection::connect(&app.login_as(ROTATOR).await.url)
        .await
        .unwrap();

    let mut tx = revealer.begin().await.unwrap();
    let began: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_sleep(1.5)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT request_id FROM pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (at, requested): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT a.at, r.requested_at FROM audit_log a JOIN reveal_requests r ON r.id = a.id WHERE a.id = $1",
        )
        .bind(id)
        .fetch_one(app.pool())
        .await
        .unwrap();
    for t in [at, requested] {
        assert!(
            (t - began).num_milliseconds() >= 1500,
            "stamped {t}, the transaction began {began}"
        );
    }

    app.exec("UPDATE reveal_policy SET max_transaction_seconds = 1")
        .await;
    for (conn, sql) in [
        (
            &mut revealer,
            "SELECT * FROM pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
        ),
        (
            &mut rotator,
            "SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)",
        ),
    ] {
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        sqlx::query("SELECT pg_sleep(1.2)")
            .execute(&mut *conn)
            .await
            .unwrap();
        refused_on(conn, sql, "PV014").await;
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
        // In a fresh transaction, the same call passes.
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    revealer.close().await.ok();
    rotator.close().await.ok();
    app.finish().await;
}

/// Item 8: a reveal hands out the logins its request covered when it was
/// recorded: a login stored later needs a new request. A fetch whose
/// transaction rolls back can be made again (no write outlives its
/// transaction's rollback) and hands out the same rows; once committed,
/// never again (PV006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_hands_out_the_rows_fixed_when_it_was_recorded() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let seeded = seed(app.owner()).await;
    let mut conn = PgConnection::connect(&app.login_as(REVEALER).await.url)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT request_id FROM pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    logins_of(app.owner(), &["alice"]).await; // two more of alice's, after the request
    let fetch = "SELECT message_id FROM pii_vault_reveal_fetch($1) ORDER BY 1";
    let mut want: Vec<String> = seeded
        .alice
        .iter()
        .map(|(l, _)| l.message_id.clone())
        .collect();
    want.sort();
    let mut tx = conn.begin().await.unwrap();
    let first: Vec<String> = sqlx::query_scalar(fetch)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(first, want);
    let mut tx = conn.begin().await.unwrap();
    let again: Vec<String> = sqlx::query_scalar(fetch)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        again, want,
        "the same rows, the later logins not among them"
    );
    refused_on(
        &mut conn,
        &format!("SELECT * FROM pii_vault_reveal_fetch({id})"),
        "PV006",
    )
    .await;
    conn.close().await.ok();
    app.finish().await;
}

/// Item 9: a NOTIFY anyone may send names no alarm; revealer and rotator
/// take no numbers from the trail's sequence; forgetting a honeytoken's
/// originals leaves the trap armed; even the owner cannot truncate the
/// policy or the allow-list. (The trigger functions' hardening is checked
/// with every other function in `roles::catalogue::each_role_holds_exactly_…`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smaller_holes_stay_closed() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    logins_of(app.owner(), &["honey"]).await;
    Owner::Pg(app.pool()).add_honeytokens(&["honey"]).await;
    let owner = app.pool().clone();
    refused(&owner, "TRUNCATE reveal_policy", "PV009").await;
    refused(&owner, "TRUNCATE kms_allowlist", "PV008").await;

    let revealer_url = app.login_as(REVEALER).await.url;
    let rotator = app.store_as(ROTATOR).await;
    let revealer = PgStore::connect(&revealer_url).await.unwrap();
    for pool in [revealer.pool(), rotator.pool()] {
        denied(
            pool,
            "SELECT nextval(pg_get_serial_sequence('audit_log', 'id'))",
        )
        .await;
    }

    // The owner's watcher, listening.
    let mut follow = app
        .bin()
        .env("PII_VAULT_LOG_FORMAT", "json")
        .spawn(&["audit", "--alarms", "--follow", "--format", "json"]);
    common::wait_until(Duration::from_secs(30), "the watcher to LISTEN", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query ILIKE 'LISTEN%pii_vault_alarm%'",
        )
        .fetch_one(&owner)
        .await
        .unwrap();
        (n > 0).then_some(())
    })
    .await;
    // A forged notification, then a forget of the honeytoken's originals,
    // then a real reveal of it.
    let analyst = app.store_as(ANALYST).await;
    sqlx::query("NOTIFY pii_vault_alarm, '424242'")
        .execute(analyst.pool())
        .await
        .unwrap();
    let forgot = rotator.forget("honey", &who()).await.unwrap();
    assert_eq!(forgot.vault_rows, 2);
    let request = revealer
        .reveal_request(
            &pii_vault::store::Selector::UserId("honey".into()),
            "me",
            "why",
        )
        .await
        .unwrap();
    // The watcher handles notifications in order: once it prints the
    // reveal's alarm, it has dealt with the forged one.
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let wanted = format!("\"request_id\":{}", request.id);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            assert!(!line.contains("424242"), "{line}");
            if line.contains(&wanted) {
                return;
            }
        }
        panic!("the watcher ended without the alarm");
    })
    .await
    .expect("the watcher printed no alarm for the honeytoken's reveal");
    let pid = follow.id().expect("running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let watched = tokio::time::timeout(Duration::from_secs(10), follow.wait_with_output())
        .await
        .expect("the watcher did not stop")
        .unwrap();
    let err = String::from_utf8_lossy(&watched.stderr);
    let alarms: Vec<&str> = err.lines().filter(|l| l.contains("ALARM")).collect();
    assert_eq!(alarms.len(), 1, "{err}");
    assert!(
        alarms[0].contains("\"level\":\"ERROR\"") && alarms[0].contains(&format!("{}", request.id)),
        "the honeytoken's reveal, its originals forgotten, is an alarm: {err}"
    );
    for s in [&revealer, &analyst] {
        s.pool().close().await;
    }
    app.finish().await;
}
