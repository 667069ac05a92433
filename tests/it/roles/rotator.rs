//! The rotator: rotations and erasures, each write through a function that
//! checks its committed, leased job (or audits the erasure in the same
//! transaction); the state of resumable rotations is its alone.

use super::{
    denied, fresh_dek, login, new_key, pg_code, random_bytes, refused, seed, seed_on, token, who,
    ANALYST, REVEALER, ROTATOR, TEST_KEK, WORKER,
};
use crate::common::app::TestApp;
use crate::common::seed::Owner;

use chrono::Utc;
use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::{
    Batch, Chunks, Erasure, Forgotten, Ingest, Job, JobKind, JobStart, Jobs, KeyState, Keys,
    NewTokens, QuarantineRow, StoreError, StoredKey, VaultRow,
};

/// The rotator's whole job through `PgStore`, each write through a function
/// that checks its committed, leased job; then plain SQL, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotator_reads_and_writes_only_under_its_committed_leased_job() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // This month's: the in-place functions rotate the open partitions.
    seed_on(app.owner(), Some(Utc::now().date_naive())).await;
    let rotator = app.store_as(ROTATOR).await;
    let second = app.store_as(ROTATOR).await;
    let raw = rotator.pool();

    for sql in [
        "SELECT nonce FROM vault",
        "SELECT ciphertext FROM quarantine",
        "SELECT * FROM pii_vault_reveal_fetch(1)",
        "INSERT INTO audit_log (action, target, reason, row_count) VALUES ('forget', 'x', 'y', 0)",
    ] {
        denied(raw, sql).await;
    }
    // Without a record of its own, or with one not committed yet: nothing.
    refused(
        raw,
        "SELECT * FROM pii_vault_rotation_job_resume(123, 'rotate-data-keys')",
        "PV004",
    )
    .await;
    let mut tx = raw.begin().await.unwrap();
    let id: i64 =
        sqlx::query_scalar("SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 3)")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let early = sqlx::query("SELECT pii_vault_rotation_start_data_keys($1, ARRAY[''])")
        .bind(id)
        .fetch_all(&mut *tx)
        .await;
    assert!(
        matches!(&early, Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("PV005")),
        "{early:?}"
    );
    // The lease was taken in that transaction: rolled back with it.
    tx.rollback().await.unwrap();

    // ------------------------------------------------------- data keys
    let job = rotator
        .begin_job(JobKind::DataKeys, "vault, quarantine", &who(), 5)
        .await
        .unwrap();
    // A second rotation of the same kind is refused while the first runs,
    // through the store and through plain SQL; another kind is not.
    assert!(matches!(
        second.begin_job(JobKind::DataKeys, "vault", &who(), 0).await,
        Err(StoreError::Busy(m)) if m.contains("rotate-data-keys")
    ));
    refused(
        second.pool(),
        "SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)",
        "PV007",
    )
    .await;
    second
        .begin_job(JobKind::TokenKey, "user_logins", &who(), 0)
        .await
        .unwrap()
        .finish()
        .await;

    let record = job.record;
    let started = rotator
        .start_job(
            &job,
            JobStart::DataKeys {
                bounds: &["".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(started.old_keys, ["dek-1"], "the active key is the old set");
    let dek2 = fresh_dek(TEST_KEK);
    rotator.job_new_data_key(&started, &dek2).await.unwrap();
    let ranges = rotator.job_ranges(&started).await.unwrap();
    let tables: Vec<&str> = ranges.iter().map(|r| r.table.as_str()).collect();
    assert_eq!(tables, ["vault", "quarantine"]);
    let vault = rotator.vault_chunk(&started, "", None, 100).await.unwrap();
    let quarantine = rotator.quarantine_chunk(&started, "", 100).await.unwrap();
    assert_eq!((vault.len(), quarantine.len()), (3, 2));
    // A row goes under a key the job made, from a key of its old set, or not at all.
    refused(
        raw,
        &format!(
            "SELECT pii_vault_rotation_reseal({record}, {}, 0, 'z', ARRAY['{}'], ARRAY['dek-1'], ARRAY['dek-1'], \
             ARRAY['\\x00'::bytea], ARRAY['\\x00'::bytea])",
            started.id, vault[0].message_id
        ),
        "PV011",
    )
    .await;
    refused(
        raw,
        &format!(
            "SELECT pii_vault_rotation_reseal({record}, {}, 0, 'z', ARRAY['{}'], ARRAY['{}'], ARRAY['{}'], \
             ARRAY['\\x00'::bytea], ARRAY['\\x00'::bytea])",
            started.id, vault[0].message_id, dek2.id, dek2.id
        ),
        "PV011",
    )
    .await;
    let resealed: Vec<_> = vault
        .iter()
        .map(|v| {
            let new = VaultRow {
                key_id: dek2.id.clone(),
                nonce: random_bytes(12),
                ciphertext: random_bytes(64),
                ..v.clone()
            };
            (new, "dek-1".to_string())
        })
        .collect();
    let last = resealed.last().unwrap().0.message_id.clone();
    assert_eq!(
        rotator
            .reseal_chunk(&started, 0, &last, &resealed, &[])
            .await
            .unwrap(),
        3
    );
    let q: Vec<_> = quarantine
        .iter()
        .map(|q| {
            let new = QuarantineRow {
                key_id: dek2.id.clone(),
                nonce: random_bytes(12),
                ciphertext: random_bytes(90),
                ..q.clone()
            };
            (new, "dek-1".to_string())
        })
        .collect();
    let last = q.last().unwrap().0.message_id.clone();
    assert_eq!(
        rotator
            .reseal_chunk(&started, 1, &last, &[], &q)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        app.owner()
            .get_key(&dek2.id)
            .await
            .unwrap()
            .unwrap()
            .usage_count,
        5,
        "the database counts re-sealed rows"
    );
    for no in [0, 1] {
        rotator.range_done(&started, no).await.unwrap();
    }
    // The database destroys what nothing is sealed under, and records it.
    assert_eq!(rotator.finish_job(&started).await.unwrap(), ["dek-1"]);
    let dek1 = app.owner().get_key("dek-1").await.unwrap().unwrap();
    assert_eq!(dek1.state, KeyState::Destroyed);
    assert!(dek1.wrapped.blob.is_empty());
    job.finish().await;
    // The lease went with the job: the next rotation may start.
    second
        .begin_job(JobKind::DataKeys, "vault", &who(), 0)
        .await
        .unwrap()
        .finish()
        .await;

    // ------------------------------------------------------------- kek
    // Only under the KMS key its record names, which the job allow-lists.
    let job = rotator
        .begin_job(JobKind::Kek, "local:new", &who(), 2)
        .await
        .unwrap();
    let kek = rotator.start_job(&job, JobStart::Kek).await.unwrap();
    assert_eq!(kek.kek_target.as_deref(), Some("local:new"));
    assert!(rotator
        .allowed_keks()
        .await
        .unwrap()
        .contains(&"local:new".to_string()));
    let under = |kek: &str| WrappedKey {
        kek_id: kek.into(),
        blob: random_bytes(60),
    };
    assert!(matches!(
        rotator.rewrap_key(&kek, &dek2.id, &under("local:other")).await,
        Err(e) if matches!(pg_code(&e), Some("PV011"))
    ));
    let rewrapped = under("local:new");
    assert!(rotator
        .rewrap_key(&kek, &dek2.id, &rewrapped)
        .await
        .unwrap());
    assert_eq!(
        app.owner()
            .get_key(&dek2.id)
            .await
            .unwrap()
            .unwrap()
            .wrapped,
        rewrapped
    );
    // Not finished while a key (tok-1) is under another KMS key.
    assert!(matches!(
        rotator.finish_job(&kek).await,
        Err(e) if matches!(pg_code(&e), Some("PV011"))
    ));
    assert!(rotator
        .rewrap_key(&kek, "tok-1", &under("local:new"))
        .await
        .unwrap());
    assert!(rotator.finish_job(&kek).await.unwrap().is_empty());
    job.finish().await;

    // ------------------------------------------------------- token key
    let job = rotator
        .begin_job(JobKind::TokenKey, "user_logins", &who(), 3)
        .await
        .unwrap();
    let tok2 = StoredKey {
        id: format!("tok-{}", uuid::Uuid::new_v4()),
        ..new_key("x", KeyPurpose::Token, 2)
    };
    let started = rotator
        .start_job(
            &job,
            JobStart::TokenKey {
                bounds: &["".into()],
                key: &tok2,
            },
        )
        .await
        .unwrap();
    assert_eq!(started.token_version, Some(2));
    assert_eq!(
        app.owner().get_key("tok-1").await.unwrap().unwrap().state,
        KeyState::Retired,
        "the new version is the only active one"
    );
    let stale = rotator.logins_chunk(&started, "", None, 100).await.unwrap();
    assert_eq!(stale.len(), 3);
    let last = stale.last().unwrap().1.message_id.clone();
    // Tokens of another version than the job's are refused, a network
    // token's too.
    let tokens = |id: i64, ip: i64, dev: i64, net: i64| NewTokens {
        id,
        masked_ip: token(ip),
        masked_device_id: token(dev),
        masked_ip_net: Some(token(net)),
    };
    for (ip, dev, net) in [(1, 1, 1), (2, 2, 1), (2, 1, 2)] {
        let bad: Vec<_> = stale
            .iter()
            .map(|(id, _)| tokens(*id, ip, dev, net))
            .collect();
        assert!(matches!(
            rotator.tokens_chunk(&started, Some((0, &last)), &bad).await,
            Err(e) if matches!(pg_code(&e), Some("PV003"))
        ));
    }
    let updates: Vec<_> = stale.iter().map(|(id, _)| tokens(*id, 2, 2, 2)).collect();
    assert_eq!(
        rotator
            .tokens_chunk(&started, Some((0, &last)), &updates)
            .await
            .unwrap(),
        3
    );
    assert_eq!(rotator.count_stale_tokens(2).await.unwrap(), 0);
    rotator.range_done(&started, 0).await.unwrap();
    assert_eq!(rotator.finish_job(&started).await.unwrap(), ["tok-1"]);
    job.finish().await;

    // forget: audited in the same transaction.
    let f = rotator.forget("alice", &who()).await.unwrap();
    assert_eq!(
        f,
        Forgotten {
            vault_rows: 2,
            quarantined: 1,
            logins_kept: 2
        }
    );
    let actions: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT action, target, row_count FROM audit_log ORDER BY id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    let actions: Vec<(&str, i64)> = actions.iter().map(|(a, _, n)| (a.as_str(), *n)).collect();
    assert_eq!(
        actions,
        [
            ("rotate-data-keys", 5),
            ("rotate-token-key", 0),
            ("rotation-done", 5),
            ("rotate-data-keys", 0),
            ("rotate-kek", 2),
            ("rotation-done", 2),
            ("rotate-token-key", 3),
            ("rotation-done", 3),
            ("forget", 3)
        ]
    );

    // Plain SQL: no write of its own to keys, ciphertext, tokens, the
    // allow-list or the trail, and no record shaped like an erasure.
    for sql in [
        "UPDATE vault_keys SET state = 'destroyed' WHERE purpose = 'vault'",
        "UPDATE vault_keys SET wrapped = NULL",
        "UPDATE vault_keys SET kek_id = 'local:test'",
        "INSERT INTO vault_keys (id, purpose, kek_id, wrapped) VALUES ('dek-x', 'vault', 'local:test', '\\x00')",
        "INSERT INTO kms_allowlist (kek_id) VALUES ('arn:aws:kms:us-east-1:666:key/evil')",
        "UPDATE vault SET key_id = key_id",
        "UPDATE vault SET nonce = nonce, ciphertext = ciphertext",
        "UPDATE quarantine SET ciphertext = ciphertext",
        "UPDATE user_logins SET masked_ip = masked_ip",
        "UPDATE user_logins SET user_id = 'mallory'",
        "DELETE FROM user_logins",
        "UPDATE audit_log SET reason = 'nothing to see'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "SELECT * FROM audit_log",
        "SELECT nextval(pg_get_serial_sequence('audit_log', 'id'))",
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) VALUES ('m', 'u', 'dek-2', '\\x00', '\\x00')",
        "UPDATE vault_keys SET usage_count = 0",
        "DELETE FROM vault_keys",
        "TRUNCATE vault",
        "SELECT * FROM job_leases",
        "UPDATE job_leases SET record = NULL",
        "SELECT pii_vault_rotation_advance(1, 0, 'z', 1, true)",
        "SELECT pii_vault_destroy_unreferenced_data_keys()",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    for action in [
        "forget",
        "retention",
        "keys-init",
        "allow-kek",
        "policy-set",
    ] {
        refused(
            raw,
            &format!("SELECT pii_vault_record('{action}', 'user_id=alice', 'ticket 42', NULL, 3)"),
            "22023",
        )
        .await;
    }
    app.finish().await;
}

/// The state of resumable rotations is the rotator's alone, and even the
/// rotator moves it only under a committed, locked job of its own: workers,
/// analysts and revealers are refused every table and function of it, and a
/// job's rows are read only by the login that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_jobs_are_the_rotators_alone() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    // This month's: the in-place functions rotate the open partitions.
    seed_on(app.owner(), Some(Utc::now().date_naive())).await;
    let calls = [
        "SELECT * FROM rotation_jobs",
        "SELECT * FROM rotation_ranges",
        "INSERT INTO rotation_jobs (kind, started_by, held_by) VALUES ('rotate-data-keys', 1, 1)",
        "UPDATE rotation_ranges SET done = true",
        "UPDATE job_leases SET record = NULL",
        "SELECT pii_vault_rotation_job_check(1, 1)",
        "SELECT pii_vault_rotation_advance(1, 0, 'z', 1, true)",
        "SELECT * FROM pii_vault_rotation_job_resume(1, 'rotate-data-keys')",
        "SELECT pii_vault_rotation_start_data_keys(1, ARRAY[''])",
        "SELECT pii_vault_rotation_start_kek(1)",
        "SELECT * FROM pii_vault_rotation_job_ranges(1, 1)",
        "SELECT pii_vault_rotation_new_data_key(1, 1, 'dek-x', 'local:test', '\\x00')",
        "SELECT pii_vault_rotation_range_done(1, 1, 0)",
        "SELECT pii_vault_rotation_finish(1, 1)",
        "SELECT * FROM pii_vault_rotation_vault_chunk(1, 1, '', NULL, 10)",
        "SELECT * FROM pii_vault_rotation_quarantine_chunk(1, 1, '', 10)",
        "SELECT * FROM pii_vault_rotation_logins_by_message(1, 1, '', NULL, 10)",
        "SELECT * FROM pii_vault_rotation_sweep_chunk(1, 1, 0, 10)",
        "SELECT pii_vault_record('rotate-data-keys', 'vault', 'why', 'me', 0)",
        "SELECT pii_vault_job_release(1)",
    ];
    // What the rotator itself may not do either: the tables, and the
    // functions that only other functions call.
    let not_even_the_rotator = 7;
    let mut stores = vec![];
    for role in [WORKER, ANALYST, REVEALER] {
        let store = app.store_as(role).await;
        for sql in calls {
            denied(store.pool(), sql).await;
        }
        stores.push(store);
    }
    let rotator = app.store_as(ROTATOR).await;
    let other = app.store_as(ROTATOR).await;
    for sql in &calls[..not_even_the_rotator] {
        denied(rotator.pool(), sql).await;
    }
    // Without a record of its own: refused.
    refused(
        rotator.pool(),
        "SELECT * FROM pii_vault_rotation_job_resume(123, 'rotate-data-keys')",
        "PV004",
    )
    .await;

    let job = rotator
        .begin_job(JobKind::DataKeys, "vault, quarantine", &who(), 5)
        .await
        .unwrap();
    let started = rotator
        .start_job(
            &job,
            JobStart::DataKeys {
                bounds: &["".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(
        started.old_keys,
        ["dek-1"],
        "the active key was retired and is the old set"
    );
    let chunk = rotator.vault_chunk(&started, "", None, 100).await.unwrap();
    assert_eq!(chunk.len(), 3);
    // Another rotator login cannot use this job's record, nor move its
    // cursors with a record of its own kind while the job's lock is held.
    let stolen = sqlx::query("SELECT * FROM pii_vault_rotation_vault_chunk($1, $2, '', NULL, 10)")
        .bind(job.record)
        .bind(started.id)
        .fetch_all(other.pool())
        .await;
    assert!(
        matches!(&stolen, Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("PV004")),
        "{stolen:?}"
    );
    // A finished range cannot be moved again; a bogus job is refused.
    rotator.range_done(&started, 0).await.unwrap();
    assert!(matches!(
        rotator.range_done(&started, 0).await,
        Err(e) if matches!(pg_code(&e), Some("PV011"))
    ));
    assert!(matches!(
        rotator
            .vault_chunk(
                &Job {
                    id: started.id + 100,
                    ..started.clone()
                },
                "",
                None,
                10
            )
            .await,
        Err(e) if matches!(pg_code(&e), Some("PV011"))
    ));
    // Only one open job per kind; the next run takes it over.
    let twice = rotator
        .start_job(
            &job,
            JobStart::DataKeys {
                bounds: &["".into()],
            },
        )
        .await;
    assert!(
        matches!(&twice, Err(StoreError::Permanent(m)) if m.contains("23505")),
        "{twice:?}"
    );
    let record = job.record;
    job.finish().await;
    // Once the lock is gone, the old record reads nothing any more.
    refused(
        rotator.pool(),
        &format!(
            "SELECT * FROM pii_vault_rotation_vault_chunk({record}, {}, '', NULL, 10)",
            started.id
        ),
        "PV007",
    )
    .await;
    let again = rotator
        .begin_job(JobKind::DataKeys, "vault, quarantine", &who(), 5)
        .await
        .unwrap();
    let resumed = rotator
        .resume_job(&again)
        .await
        .unwrap()
        .expect("the open job");
    assert_eq!(resumed.id, started.id);
    assert_eq!(resumed.old_keys, ["dek-1"]);
    again.finish().await;
    drop(stores);
    app.finish().await;
}

// --------------------------------------------------------------- erasure

/// Erasure is the database's to audit: the rotator has no DELETE on the
/// vault or the quarantine, only `pii_vault_forget` / `pii_vault_retention`,
/// which delete and write the audit row (actor from the database, count of
/// rows) in one transaction. Nobody else may call them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotator_erases_only_through_the_audited_functions() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await; // alice ×2, bob ×1 on 2024-03-01; a quarantined body each
    Owner::Pg(app.pool()).add_honeytokens(&["honey"]).await;
    let mut recent = login("carol", "dek-1");
    recent.0.create_date = Some(Utc::now().date_naive());
    let batch = Batch {
        logins: vec![login("honey", "dek-1"), recent],
        token_key_id: "tok-1".into(),
        ..Batch::default()
    };
    app.owner().write_batch(&batch).await.unwrap();
    let rotator = app.store_as(ROTATOR).await;
    let raw = rotator.pool();

    for sql in [
        "DELETE FROM vault",
        "DELETE FROM vault WHERE user_id = 'alice'",
        "DELETE FROM quarantine",
        "TRUNCATE vault",
        "TRUNCATE quarantine",
        "UPDATE vault SET create_date = '1999-01-01'",
        "SELECT create_date FROM vault",
        "SELECT * FROM honeytokens",
    ] {
        denied(raw, sql).await;
    }
    refused(
        raw,
        "SELECT * FROM pii_vault_retention('2999-01-01', 'why', 'me')",
        "PV013",
    )
    .await;
    refused(
        raw,
        "SELECT * FROM pii_vault_retention('2025-01-01', ' ', 'me')",
        "PV013",
    )
    .await;
    refused(
        raw,
        "SELECT * FROM pii_vault_forget('alice', '', 'me')",
        "PV013",
    )
    .await;
    assert_eq!(app.count("vault").await, 5);

    // Plain SQL, as the rotator's login would type it.
    let (vault_rows, quarantined): (i64, i64) =
        sqlx::query_as("SELECT * FROM pii_vault_retention_preview('2025-01-01')")
            .fetch_one(raw)
            .await
            .unwrap();
    assert_eq!(
        (vault_rows, quarantined),
        (4, 0),
        "carol's login is not old enough"
    );
    let (vault_rows, quarantined, undated, destroyed): (i64, i64, i64, Vec<String>) =
        sqlx::query_as(
            "SELECT * FROM pii_vault_retention('2025-01-01', 'retention: 12 months', 'dpo')",
        )
        .fetch_one(raw)
        .await
        .unwrap();
    assert_eq!((vault_rows, quarantined, undated), (4, 0, 0));
    assert!(destroyed.is_empty(), "dek-1 is active: {destroyed:?}");
    // The honeytoken's originals go too (kept, they would be the only ones
    // left before the day: a rotator could list them); its user id stays a
    // trap.
    let left: Vec<String> = sqlx::query_scalar("SELECT user_id FROM vault ORDER BY user_id")
        .fetch_all(app.pool())
        .await
        .unwrap();
    assert_eq!(left, ["carol"]);
    assert_eq!(app.count("user_logins").await, 5, "masked logins stay");
    let (actor, action, target, row_count, claimed): (String, String, String, i64, String) =
        sqlx::query_as(
            "SELECT actor, action, target, row_count, claimed_actor FROM audit_log ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        (
            action.as_str(),
            target.as_str(),
            row_count,
            claimed.as_str()
        ),
        // The worker made the old logins' month its partition; wholly
        // before the day, it was dropped rather than deleted from.
        (
            "retention",
            "before=2025-01-01 keys_destroyed=0 partitions_dropped=1",
            4,
            "dpo"
        )
    );
    assert!(
        actor.ends_with("_rotator"),
        "{actor}: the login, from the database"
    );

    // A rolled-back erasure leaves neither the deletion nor its record.
    let trail = app.count("audit_log").await;
    let mut tx = raw.begin().await.unwrap();
    sqlx::query("SELECT * FROM pii_vault_forget('carol', 'erasure request', 'dpo')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(app.count("vault").await, 1);
    assert_eq!(app.count("audit_log").await, trail);

    // The other roles may not erase at all.
    for role in [WORKER, ANALYST, REVEALER] {
        let other = app.store_as(role).await;
        for sql in [
            "SELECT * FROM pii_vault_retention('2025-01-01', 'why', 'me')",
            "SELECT * FROM pii_vault_retention_preview('2025-01-01')",
            "SELECT * FROM pii_vault_forget('carol', 'why', 'me')",
            "DELETE FROM vault",
        ] {
            denied(other.pool(), sql).await;
        }
        other.pool().close().await;
    }
    assert_eq!(app.count("vault").await, 1);
    app.finish().await;
}
