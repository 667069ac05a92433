//! The worker: appends logins and registers its own data keys, and is
//! refused everything else; the database's own fences on what any writer,
//! the owner included, may append.

use super::{
    allowed, dek_id, denied, login, new_key, quarantined, random_bytes, refused, seed, token,
    TEST_KEK, WORKER,
};
use crate::common::app::TestApp;
use crate::common::seed::Owner;

use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::{Batch, BatchOutcome, Ingest, KeyState, Keys, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_appends_and_registers_its_own_data_keys_and_nothing_more() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let worker = app.store_as(WORKER).await;
    let raw = worker.pool();

    // Its job: read the token key, register its own data key (time, author,
    // state, version set by the database), write batches under it.
    assert_eq!(
        worker.current_token_key().await.unwrap().unwrap().id,
        "tok-1"
    );
    let dek = dek_id();
    let wrapped = WrappedKey {
        kek_id: TEST_KEK.into(),
        blob: random_bytes(60),
    };
    worker.register_data_key(&dek, &wrapped).await.unwrap();
    let (state, version, by, age): (String, i64, String, f64) = sqlx::query_as(
        "SELECT state, version, created_by, extract(epoch FROM now() - created_at)::float8 \
         FROM vault_keys WHERE id = $1",
    )
    .bind(&dek)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), version), ("active", 0));
    assert!(by.ends_with("_worker"), "created_by {by}");
    assert!(age.abs() < 60.0, "created_at set by the database: {age}");

    let a = login("alice", &dek);
    let b = login("bob", &dek);
    let batch = Batch {
        logins: vec![a.clone(), b.clone(), a.clone()],
        quarantined: vec![quarantined(None, &dek)],
        key_usage: vec![(dek.clone(), 4)],
        token_key_id: "tok-1".into(),
        ..Batch::default()
    };
    assert_eq!(
        worker.write_batch(&batch).await.unwrap(),
        BatchOutcome {
            stored: 2,
            duplicates: 1,
            rejected: 1
        }
    );
    // Redelivered: nothing new, and the database counts only what it stored.
    assert_eq!(worker.write_batch(&batch).await.unwrap().stored, 0);
    let usage = app
        .owner()
        .get_key(&dek)
        .await
        .unwrap()
        .unwrap()
        .usage_count;
    assert_eq!(
        usage, 3,
        "2 vault rows + 1 quarantined, counted by the database"
    );

    // Retiring its own exhausted key: yes; anyone else's: no.
    assert!(!worker.retire_data_key("dek-1").await.unwrap());
    assert_eq!(
        app.owner().get_key("dek-1").await.unwrap().unwrap().state,
        KeyState::Active
    );
    assert!(worker.retire_data_key(&dek).await.unwrap());
    // Its next batch under that key is refused by the database.
    let late = Batch {
        logins: vec![login("carol", &dek)],
        ..Batch::default()
    };
    assert!(matches!(
        worker.write_batch(&late).await,
        Err(StoreError::KeyRetired(k)) if k == dek
    ));
    // An unknown key id is told apart from a retired one.
    let unknown = Batch {
        logins: vec![login("carol", "dek-00000000-0000-0000-0000-000000000000")],
        ..Batch::default()
    };
    assert!(matches!(
        worker.write_batch(&unknown).await,
        Err(StoreError::UnknownKey(_))
    ));

    // Plain SQL: no key of its choosing, no state changes, no other KEK.
    refused(
        raw,
        "SELECT pii_vault_register_data_key('dek-00000000-0000-0000-0000-000000000001', 'arn:aws:kms:us-east-1:666:key/evil', '\\x00112233445566778899aabbccddeeff')",
        "PV002",
    )
    .await;
    refused(
        raw,
        "SELECT pii_vault_register_data_key('tok-9', 'local:test', '\\x00112233445566778899aabbccddeeff')",
        "22023",
    )
    .await;
    for sql in [
        // A token key whose value it knows: every later token invertible.
        "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at) \
         VALUES ('tok-99', 'token', 99, 'local:test', '\\x00', 'active', now())",
        "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at) \
         VALUES ('tok-100', 'token', 100, 'local:test', NULL, 'destroyed', now())",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('ids-9', 'line-ids', 'local:test', now())",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('dek-x', 'vault', 'arn:aws:kms:us-east-1:666:key/evil', now())",
        "UPDATE vault_keys SET state = 'active'",
        "UPDATE vault_keys SET state = 'retired' WHERE id = 'dek-1'",
        "UPDATE vault_keys SET kek_id = 'arn:aws:kms:us-east-1:666:key/evil'",
        "UPDATE vault_keys SET usage_count = 0",
        "DELETE FROM vault_keys",
        "INSERT INTO kms_allowlist (kek_id) VALUES ('arn:aws:kms:us-east-1:666:key/evil')",
        // Ciphertext and tokens: not even what it wrote.
        "SELECT * FROM vault",
        "SELECT ciphertext FROM vault",
        "SELECT * FROM quarantine",
        "SELECT message_id FROM quarantine",
        "SELECT * FROM user_logins",
        "SELECT masked_ip FROM user_logins",
        "SELECT * FROM audit_log",
        "SELECT * FROM reveal_requests",
        "SELECT * FROM pii_vault_reveal_fetch(1)",
        "SELECT pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
        "SELECT pii_vault_record('forget', 'x', 'why', 'me', 0)",
        "SELECT * FROM pii_vault_rotation_vault_chunk(1, 1, '', NULL, 10)",
        "UPDATE audit_log SET reason = 'nothing to see'",
        "DELETE FROM audit_log",
        "INSERT INTO audit_log (actor, action, target, reason, row_count) VALUES ('w', 'reveal', 'x', 'y', 0)",
        "DELETE FROM user_logins",
        "UPDATE user_logins SET masked_ip = 'x'",
        "UPDATE vault SET key_id = key_id",
        "DELETE FROM vault",
        "TRUNCATE vault",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    // It may see which message ids are stored (its ON CONFLICT needs that).
    allowed(raw, "SELECT message_id FROM user_logins").await;

    assert_eq!(app.count("vault").await, 5);
    assert_eq!(app.count("audit_log").await, 0);
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE purpose = 'token'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(tokens, 1);
    app.finish().await;
}

/// The rotation fences are the database's: a batch sealed under a data key
/// a rotation retired, or tokenised with a token-key version that is not
/// active, is refused whoever sends it, the owner included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_rows_under_retired_or_unknown_keys() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let pool = app.pool();
    // Token v2 made current, v1 retired, as `rotate token-key` does.
    let raw = Owner::Pg(pool);
    assert!(
        raw.insert_key(&new_key("tok-2", KeyPurpose::Token, 2))
            .await
    );
    raw.set_key_state("tok-1", KeyState::Retired).await;
    let mut stale = login("alice", "dek-1");
    stale.0.masked_ip = token(1);
    let r = app
        .owner()
        .write_batch(&Batch {
            logins: vec![stale],
            ..Batch::default()
        })
        .await;
    assert!(
        matches!(&r, Err(StoreError::KeyRetired(k)) if k == "tok-1"),
        "{r:?}"
    );
    let mut fresh = login("alice", "dek-1");
    fresh.0.masked_ip = token(2);
    fresh.0.masked_device_id = token(2);
    fresh.0.masked_ip_net = Some(token(2));
    assert_eq!(
        app.owner()
            .write_batch(&Batch {
                logins: vec![fresh],
                ..Batch::default()
            })
            .await
            .unwrap()
            .stored,
        1
    );
    // Plain SQL, as the owner: a token without a version, one of an unknown
    // version, a vault row under a retired key, a key brought back.
    for (sql, code) in [
        (
            "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id) VALUES ('m1', 'u', 'plain', 't2_x')",
            "PV003",
        ),
        (
            "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id) VALUES ('m2', 'u', 't7_x', 't7_y')",
            "PV010",
        ),
        // The network token is fenced like the other two.
        (
            "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id, masked_ip_net) \
             VALUES ('m4', 'u', 't2_x', 't2_y', 't7_z')",
            "PV010",
        ),
        (
            "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id, masked_ip_net) \
             VALUES ('m5', 'u', 't2_x', 't2_y', 'plain')",
            "PV003",
        ),
    ] {
        refused(pool, sql, code).await;
    }
    raw.set_key_state("dek-1", KeyState::Retired).await;
    refused(
        pool,
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) VALUES ('m3', 'u', 'dek-1', '\\x00', '\\x00')",
        "PV001",
    )
    .await;
    refused(
        pool,
        "UPDATE vault_keys SET state = 'active' WHERE id = 'dek-1'",
        "PV009",
    )
    .await;
    refused(
        pool,
        "UPDATE vault_keys SET version = 7 WHERE id = 'tok-2'",
        "PV009",
    )
    .await;
    refused(
        pool,
        "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped) VALUES ('tok-0', 'token', 1, 'local:test', '\\x00')",
        "PV009",
    )
    .await;
    refused(
        pool,
        "INSERT INTO vault_keys (id, purpose, kek_id, wrapped) VALUES ('dek-evil', 'vault', 'arn:aws:kms:us-east-1:666:key/evil', '\\x00')",
        "PV002",
    )
    .await;
    refused(pool, "DELETE FROM kms_allowlist", "PV008").await;
    // A destroyed key loses its wrapped form, whatever the statement says.
    allowed(
        pool,
        "UPDATE vault_keys SET state = 'destroyed', wrapped = '\\x01' WHERE id = 'tok-1'",
    )
    .await;
    let wrapped: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT wrapped FROM vault_keys WHERE id = 'tok-1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(wrapped, None);
    app.finish().await;
}
