//! Least privilege, tested: the database roles of
//! `migrations/postgres/0002_roles.sql`, each used through a login user
//! granted it, the way a deployment does (`GRANT pii_vault_worker TO
//! their_login_user`). Every role is shown doing its whole job through
//! `PgStore`, and then refused what it must not do, with SQLSTATE 42501
//! (insufficient privilege) rather than just any error: a statement that
//! failed for another reason proves nothing about privileges.
//!
//! Postgres only: skips when `PII_VAULT_TEST_PG` is unset (and fails under
//! `PII_VAULT_REQUIRE_SERVICES=1`). Login users are cluster-wide, so each
//! test names its own after its database and drops them at the end.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::fmt::Debug;
use std::process::{Command, Output};

use base64::Engine as _;
use chrono::{NaiveDate, Utc};
use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::admin::{Forgotten, Maintenance};
use pii_vault::store::postgres::PgStore;
use pii_vault::store::{
    AuditEntry, Batch, BatchOutcome, KeyState, LoginRow, QuarantineRow, Selector, Store,
    StoreError, StoredKey, VaultRow,
};
use rand::RngCore;
use sqlx::{Connection, PgConnection, PgPool};

const WORKER: &str = "pii_vault_worker";
const ANALYST: &str = "pii_vault_analyst";
const REVEALER: &str = "pii_vault_revealer";
const ROTATOR: &str = "pii_vault_rotator";
const ROLES: [&str; 4] = [WORKER, ANALYST, REVEALER, ROTATOR];

// ---------------------------------------------------------------- harness

/// A fresh, migrated database; the store of its owner (the admin of the
/// test cluster, who ran the migrations); the login users made for the test.
struct Db {
    admin_url: String,
    fresh: pg::FreshDb,
    owner: PgStore,
    users: Vec<String>,
}

impl Db {
    /// `None` (skip) without a test cluster.
    async fn new() -> Option<Db> {
        let admin_url = common::service_env("PII_VAULT_TEST_PG")?;
        let fresh = pg::FreshDb::create(&admin_url).await;
        let owner = PgStore::connect(&fresh.url).await.unwrap();
        owner.migrate().await.unwrap();
        Some(Db {
            admin_url,
            fresh,
            owner,
            users: Vec::new(),
        })
    }

    /// A new login user that is a member of `role`, made as a deployment
    /// would; returns its connection URL for this database.
    async fn login_as(&mut self, role: &str) -> String {
        let user = format!(
            "{}_{}",
            self.fresh.name,
            role.trim_start_matches("pii_vault_")
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        self.owner_exec(&format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"))
            .await;
        self.owner_exec(&format!("GRANT {role} TO {user}")).await;
        self.users.push(user.clone());
        with_user(&self.fresh.url, &user, &password)
    }

    /// Connects a login user of `role` through `PgStore`.
    async fn store_as(&mut self, role: &str) -> PgStore {
        let url = self.login_as(role).await;
        let store = PgStore::connect(&url).await.unwrap();
        store.ping().await.unwrap();
        store
    }

    async fn owner_exec(&self, sql: &str) -> u64 {
        sqlx::query(sql)
            .execute(self.owner.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .rows_affected()
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(self.owner.pool())
            .await
            .unwrap()
    }

    /// Drops the database, then the login users (roles outlive databases).
    async fn finish(self, stores: &[&PgStore]) {
        for s in stores {
            s.pool().close().await;
        }
        self.owner.pool().close().await;
        self.fresh.drop_database().await;
        let mut conn = PgConnection::connect(&self.admin_url).await.unwrap();
        for user in &self.users {
            sqlx::query(&format!("DROP ROLE IF EXISTS {user}"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        conn.close().await.ok();
    }
}

/// `url` with its user and password replaced.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let start = url.find("://").expect("a URL") + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{}{user}:{password}@{host}", &url[..start])
}

#[test]
fn with_user_replaces_only_the_userinfo() {
    assert_eq!(
        with_user("postgres://postgres@127.0.0.1:5432/t_1", "u", "p"),
        "postgres://u:p@127.0.0.1:5432/t_1"
    );
    assert_eq!(
        with_user("postgresql://a:b@h/db?sslmode=disable", "u", "p"),
        "postgresql://u:p@h/db?sslmode=disable"
    );
    assert_eq!(
        with_user("postgres://h:1/db", "u", "p"),
        "postgres://u:p@h:1/db"
    );
}

// ------------------------------------------------------------- assertions

fn is_denied(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42501"))
}

/// Runs `sql` and asserts that Postgres refused it for want of a privilege.
async fn denied(pool: &PgPool, sql: &str) {
    match sqlx::query(sql).execute(pool).await {
        Err(e) if is_denied(&e) => {}
        Err(e) => panic!("{sql}: expected permission denied (42501), got: {e}"),
        Ok(_) => panic!("{sql}: expected permission denied (42501), but it ran"),
    }
}

/// Runs `sql`, which must be allowed; returns the rows it affected.
async fn allowed(pool: &PgPool, sql: &str) -> u64 {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

/// Asserts that a store call failed for want of a privilege.
fn store_denied<T: Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Permanent(m)) if m.contains("SQLSTATE 42501") => {}
        other => panic!("{what}: expected a permission-denied error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- builders

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn new_key(id: &str, purpose: KeyPurpose, version: i64) -> StoredKey {
    StoredKey {
        id: id.into(),
        purpose,
        version,
        wrapped: WrappedKey {
            kek_id: "local:test".into(),
            blob: random_bytes(60),
        },
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    }
}

/// A token as `crypto::token` makes them: version, then a base64url tag.
fn token(version: i64) -> String {
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(32));
    format!("t{version}_{tag}")
}

/// A login (SQS-style message id) and its vault row sealed under `key_id`.
fn login(user_id: &str, key_id: &str) -> (LoginRow, VaultRow) {
    let message_id = uuid::Uuid::new_v4().to_string();
    (
        LoginRow {
            message_id: message_id.clone(),
            user_id: user_id.into(),
            device_type: "android".into(),
            masked_ip: token(1),
            masked_device_id: token(1),
            locale: Some("RU".into()),
            app_version: "2.3.0".into(),
            create_date: NaiveDate::from_ymd_opt(2024, 3, 1).unwrap(),
        },
        VaultRow {
            message_id,
            user_id: user_id.into(),
            key_id: key_id.into(),
            nonce: random_bytes(12),
            ciphertext: random_bytes(64),
        },
    )
}

fn quarantined(user_id: Option<&str>, key_id: &str) -> QuarantineRow {
    QuarantineRow {
        message_id: uuid::Uuid::new_v4().to_string(),
        reason_code: "invalid_ip".into(),
        reason: "ip: not an IP address".into(),
        user_id: user_id.map(Into::into),
        key_id: key_id.into(),
        nonce: random_bytes(12),
        ciphertext: random_bytes(90),
        received_at: Utc::now(),
    }
}

fn audit(action: &str, target: &str) -> AuditEntry {
    AuditEntry {
        actor: "oncall@test".into(),
        action: action.into(),
        target: target.into(),
        reason: "INC-4711".into(),
    }
}

/// What the owner writes before a role is tried: a data key and token key
/// v1, three logins (two of alice's, one of bob's) with vault rows, and a
/// quarantined message of each user.
struct Seeded {
    alice: Vec<(LoginRow, VaultRow)>,
}

async fn seed(owner: &PgStore) -> Seeded {
    owner
        .insert_key(&new_key("dek-1", KeyPurpose::Vault, 0))
        .await
        .unwrap();
    owner
        .insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
        .await
        .unwrap();
    let alice = vec![login("alice", "dek-1"), login("alice", "dek-1")];
    let mut logins = alice.clone();
    logins.push(login("bob", "dek-1"));
    let batch = Batch {
        logins,
        quarantined: vec![
            quarantined(Some("alice"), "dek-1"),
            quarantined(Some("bob"), "dek-1"),
        ],
        key_usage: vec![("dek-1".into(), 5)],
        token_key_id: "tok-1".into(),
    };
    let out = owner.write_batch(&batch).await.unwrap();
    assert_eq!(
        out,
        BatchOutcome {
            stored: 3,
            duplicates: 0,
            rejected: 2
        }
    );
    Seeded { alice }
}

// ------------------------------------------------------------------ roles

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_writes_batches_and_keys_but_reads_no_vault_quarantine_or_audit() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let worker = db.store_as(WORKER).await;
    let raw = worker.pool();

    // First start on an empty database: the worker creates token key v1,
    // the line-id key and its own data key, and reads them back.
    assert!(worker.current_token_key().await.unwrap().is_none());
    assert!(worker
        .insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
        .await
        .unwrap());
    // Another replica racing for v1 loses quietly.
    assert!(!worker
        .insert_key(&new_key("tok-x", KeyPurpose::Token, 1))
        .await
        .unwrap());
    assert!(worker
        .insert_key(&new_key("ids-1", KeyPurpose::LineIds, 0))
        .await
        .unwrap());
    let dek = new_key("dek-w", KeyPurpose::Vault, 0);
    assert!(worker.insert_key(&dek).await.unwrap());
    assert_eq!(
        worker.current_token_key().await.unwrap().unwrap().id,
        "tok-1"
    );
    assert_eq!(
        worker.get_key("dek-w").await.unwrap().unwrap().wrapped,
        dek.wrapped
    );
    assert_eq!(worker.list_keys().await.unwrap().len(), 3);

    // A full batch: new logins with their vault rows, a redelivery inside
    // the batch, a quarantined message, key usage, both key fences (the
    // token key is read FOR SHARE).
    let a = login("alice", "dek-w");
    let b = login("bob", "dek-w");
    let batch = Batch {
        logins: vec![a.clone(), b.clone(), a.clone()],
        quarantined: vec![quarantined(None, "dek-w")],
        key_usage: vec![("dek-w".into(), 4)],
        token_key_id: "tok-1".into(),
    };
    assert_eq!(
        worker.write_batch(&batch).await.unwrap(),
        BatchOutcome {
            stored: 2,
            duplicates: 1,
            rejected: 1
        }
    );
    // Redelivered (another replica, or after a lost ack): nothing new.
    assert_eq!(
        worker.write_batch(&batch).await.unwrap(),
        BatchOutcome {
            stored: 0,
            duplicates: 4,
            rejected: 0
        }
    );
    assert_eq!(db.count("user_logins").await, 2);
    assert_eq!(db.count("vault").await, 2);
    assert_eq!(db.count("quarantine").await, 1);
    let usage = db
        .owner
        .get_key("dek-w")
        .await
        .unwrap()
        .unwrap()
        .usage_count;
    assert_eq!(usage, 8);
    // It may see which message ids are stored (its ON CONFLICT needs that).
    allowed(raw, "SELECT message_id FROM user_logins").await;

    // It cannot change a key's state (a compromised worker could otherwise
    // re-activate a key that a rotation retired and defeat the fence); once
    // a rotation retires its data key, its next batch under it is refused.
    denied(
        raw,
        "UPDATE vault_keys SET state = 'retired' WHERE id = 'dek-w'",
    )
    .await;
    assert_eq!(
        allowed(
            db.owner.pool(),
            "UPDATE vault_keys SET state = 'retired' WHERE id = 'dek-w'"
        )
        .await,
        1
    );
    let late = Batch {
        logins: vec![login("carol", "dek-w")],
        key_usage: vec![("dek-w".into(), 1)],
        token_key_id: "tok-1".into(),
        ..Batch::default()
    };
    assert!(matches!(
        worker.write_batch(&late).await,
        Err(StoreError::KeyRetired(k)) if k == "dek-w"
    ));

    // It cannot read what it wrote, nor the tokens (with the token key it
    // holds, they could be inverted), nor the audit trail.
    for sql in [
        "SELECT * FROM vault",
        "SELECT ciphertext FROM vault",
        "SELECT * FROM quarantine",
        "SELECT message_id FROM quarantine",
        "SELECT * FROM audit_log",
        "SELECT * FROM user_logins",
        "SELECT masked_ip FROM user_logins",
    ] {
        denied(raw, sql).await;
    }
    // It changes nothing it did not just write, and nothing in the audit trail.
    for sql in [
        "UPDATE audit_log SET reason = 'nothing to see'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (actor, action, target, reason, row_count) VALUES ('w', 'reveal', 'x', 'y', 0)",
        "DELETE FROM user_logins",
        "UPDATE user_logins SET masked_ip = 'x'",
        "INSERT INTO user_logins (id, message_id) VALUES (9000000, 'planted')",
        "UPDATE vault SET key_id = key_id",
        "DELETE FROM vault",
        "DELETE FROM quarantine",
        "UPDATE vault_keys SET wrapped = NULL",
        "UPDATE vault_keys SET kek_id = 'local:evil'",
        "DELETE FROM vault_keys",
        "TRUNCATE vault",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    // Nor through the store: reveal, the audit trail, the rotator's work.
    let sel = Selector::UserId("alice".into());
    store_denied(
        worker.reveal(&sel, &audit("reveal", "user_id=alice")).await,
        "reveal",
    );
    store_denied(worker.audit_trail(10).await, "audit_trail");
    store_denied(
        worker.vault_rows_under(&["dek-w".into()], 10).await,
        "vault_rows_under",
    );
    store_denied(
        worker.forget("alice", &audit("forget", "alice")).await,
        "forget",
    );

    assert_eq!(db.count("vault").await, 2);
    assert_eq!(db.count("audit_log").await, 0);
    db.finish(&[&worker]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_reads_user_logins_and_nothing_else() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
    let analyst = db.store_as(ANALYST).await;
    let raw = analyst.pool();

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(raw)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // What analysts do with it: find duplicates by token.
    let dups: Vec<(String, i64)> = sqlx::query_as(
        "SELECT masked_ip, count(*) FROM user_logins GROUP BY masked_ip ORDER BY 2 DESC",
    )
    .fetch_all(raw)
    .await
    .unwrap();
    assert_eq!(dups.len(), 3);

    for sql in [
        "SELECT * FROM vault",
        "SELECT * FROM vault_keys",
        "SELECT * FROM quarantine",
        "SELECT * FROM audit_log",
        "INSERT INTO user_logins (message_id) VALUES ('planted')",
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) VALUES ('m', 'u', 'dek-1', '\\x00', '\\x00')",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('k', 'vault', 'local:x', now())",
        "INSERT INTO quarantine (message_id, reason_code, reason, received_at) VALUES ('m', 'r', 'r', now())",
        "INSERT INTO audit_log (actor, action, target, reason, row_count) VALUES ('a', 'reveal', 'x', 'y', 0)",
        "UPDATE user_logins SET masked_ip = 'x'",
        "DELETE FROM user_logins",
        "TRUNCATE user_logins",
        "SELECT nextval(pg_get_serial_sequence('user_logins', 'id'))",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    let sel = Selector::UserId("alice".into());
    store_denied(
        analyst
            .reveal(&sel, &audit("reveal", "user_id=alice"))
            .await,
        "reveal",
    );
    store_denied(analyst.current_token_key().await, "current_token_key");
    store_denied(analyst.audit_trail(10).await, "audit_trail");
    store_denied(
        analyst
            .write_batch(&Batch {
                logins: vec![login("eve", "dek-1")],
                ..Batch::default()
            })
            .await,
        "write_batch",
    );
    store_denied(
        analyst
            .insert_key(&new_key("k", KeyPurpose::Vault, 0))
            .await,
        "insert_key",
    );

    assert_eq!(db.count("user_logins").await, 3);
    assert_eq!(db.count("audit_log").await, 0);
    db.finish(&[&analyst]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revealer_reads_the_vault_with_an_audit_row_and_changes_nothing() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let seeded = seed(&db.owner).await;
    let revealer = db.store_as(REVEALER).await;
    let raw = revealer.pool();

    // Reveal: the rows with their sealed originals, audit row committed.
    let sel = Selector::UserId("alice".into());
    let got = revealer
        .reveal(&sel, &audit("reveal", &sel.to_string()))
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
    // The data keys to open them.
    assert!(revealer.get_key("dek-1").await.unwrap().is_some());
    assert_eq!(revealer.list_keys().await.unwrap().len(), 2);
    // And the trail (`pii-vault audit`).
    let trail = revealer.audit_trail(10).await.unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(
        (trail[0].action.as_str(), trail[0].row_count),
        ("reveal", 2)
    );

    for sql in [
        "INSERT INTO user_logins (message_id) VALUES ('planted')",
        "UPDATE user_logins SET masked_ip = 'x'",
        "UPDATE vault SET nonce = nonce",
        "DELETE FROM vault",
        "UPDATE audit_log SET reason = 'nothing to see'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (id, actor, action, target, reason, row_count) VALUES (9000000, 'a', 'reveal', 'x', 'y', 0)",
        "UPDATE vault_keys SET state = 'retired'",
        "DELETE FROM vault_keys",
        "INSERT INTO vault_keys (id, purpose, kek_id, created_at) VALUES ('k', 'vault', 'local:x', now())",
        "SELECT * FROM quarantine",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    store_denied(
        revealer
            .write_batch(&Batch {
                logins: vec![login("eve", "dek-1")],
                ..Batch::default()
            })
            .await,
        "write_batch",
    );
    store_denied(
        revealer
            .insert_key(&new_key("k", KeyPurpose::Vault, 0))
            .await,
        "insert_key",
    );
    store_denied(
        revealer.forget("alice", &audit("forget", "alice")).await,
        "forget",
    );
    store_denied(
        revealer
            .transition_keys(KeyPurpose::Vault, KeyState::Active, KeyState::Retired, "")
            .await,
        "transition_keys",
    );

    assert_eq!(db.count("vault").await, 3);
    assert_eq!(db.count("audit_log").await, 1);
    db.finish(&[&revealer]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotator_rotates_and_forgets_but_cannot_rewrite_the_audit_trail() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
    let rotator = db.store_as(ROTATOR).await;
    let raw = rotator.pool();

    // rotate data-keys: a fresh key, the old one retired, everything
    // re-sealed under the new one, the old one destroyed.
    assert!(rotator
        .insert_key(&new_key("dek-2", KeyPurpose::Vault, 0))
        .await
        .unwrap());
    let old = rotator
        .transition_keys(
            KeyPurpose::Vault,
            KeyState::Active,
            KeyState::Retired,
            "dek-2",
        )
        .await
        .unwrap();
    assert_eq!(old, ["dek-1"]);
    let vault = rotator.vault_rows_under(&old, 100).await.unwrap();
    let quarantine = rotator.quarantine_rows_under(&old, 100).await.unwrap();
    assert_eq!((vault.len(), quarantine.len()), (3, 2));
    let vault: Vec<_> = vault
        .into_iter()
        .map(|v| {
            let new = VaultRow {
                key_id: "dek-2".into(),
                nonce: random_bytes(12),
                ciphertext: random_bytes(64),
                ..v
            };
            (new, "dek-1".to_string())
        })
        .collect();
    let quarantine: Vec<_> = quarantine
        .into_iter()
        .map(|q| {
            let new = QuarantineRow {
                key_id: "dek-2".into(),
                nonce: random_bytes(12),
                ciphertext: random_bytes(90),
                ..q
            };
            (new, "dek-1".to_string())
        })
        .collect();
    assert_eq!(rotator.reseal(&vault, &quarantine).await.unwrap(), 5);
    assert_eq!(
        rotator.destroy_unreferenced_data_keys().await.unwrap(),
        ["dek-1"]
    );
    let dek1 = db.owner.get_key("dek-1").await.unwrap().unwrap();
    assert_eq!(dek1.state, KeyState::Destroyed);
    assert!(dek1.wrapped.blob.is_empty());

    // rotate kek: re-wrapped in place; retiring a data key.
    let rewrapped = WrappedKey {
        kek_id: "local:new".into(),
        blob: random_bytes(60),
    };
    rotator.update_wrapped("dek-2", &rewrapped).await.unwrap();
    assert_eq!(
        db.owner.get_key("dek-2").await.unwrap().unwrap().wrapped,
        rewrapped
    );
    rotator
        .set_key_state("dek-2", KeyState::Retired)
        .await
        .unwrap();

    // rotate token-key: v2 current, v1 retired, logins re-tokenised, v1 destroyed.
    assert!(rotator
        .insert_key(&new_key("tok-2", KeyPurpose::Token, 2))
        .await
        .unwrap());
    let retired = rotator
        .transition_keys(
            KeyPurpose::Token,
            KeyState::Active,
            KeyState::Retired,
            "tok-2",
        )
        .await
        .unwrap();
    assert_eq!(retired, ["tok-1"]);
    let stale = rotator.logins_to_retokenise(2, 0, 100).await.unwrap();
    assert_eq!(stale.len(), 3);
    let updates: Vec<_> = stale
        .iter()
        .map(|(_, l, _)| (l.message_id.clone(), token(2), token(2)))
        .collect();
    rotator.update_tokens(&updates).await.unwrap();
    assert_eq!(rotator.count_stale_tokens(2).await.unwrap(), 0);
    let destroyed = rotator
        .transition_keys(
            KeyPurpose::Token,
            KeyState::Retired,
            KeyState::Destroyed,
            "tok-2",
        )
        .await
        .unwrap();
    assert_eq!(destroyed, ["tok-1"]);
    assert_eq!(
        rotator.current_token_key().await.unwrap().unwrap().id,
        "tok-2"
    );

    // forget: alice's vault rows and quarantined body go, with an audit row.
    let f = rotator
        .forget("alice", &audit("forget", "user_id=alice"))
        .await
        .unwrap();
    assert_eq!(
        f,
        Forgotten {
            vault_rows: 2,
            quarantined: 1,
            logins_kept: 2
        }
    );
    assert_eq!(db.count("vault").await, 1);
    assert_eq!(db.count("quarantine").await, 1);
    let trail = db.owner.audit_trail(10).await.unwrap();
    assert_eq!(
        (trail.len(), trail[0].action.as_str(), trail[0].row_count),
        (1, "forget", 3)
    );

    // The audit trail is append-only for the rotator too, and not its to read.
    for sql in [
        "UPDATE audit_log SET reason = 'nothing to see'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "SELECT * FROM audit_log",
        "INSERT INTO audit_log (id, actor, action, target, reason, row_count) VALUES (9000000, 'a', 'forget', 'x', 'y', 0)",
    ] {
        denied(raw, sql).await;
    }
    store_denied(rotator.audit_trail(10).await, "audit_trail");
    // It rewrites tokens and seals, not who or what a row is about.
    for sql in [
        "UPDATE user_logins SET user_id = 'mallory'",
        "DELETE FROM user_logins",
        "INSERT INTO user_logins (message_id) VALUES ('planted')",
        "UPDATE vault SET user_id = 'mallory'",
        "UPDATE vault SET message_id = 'x'",
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) VALUES ('m', 'u', 'dek-2', '\\x00', '\\x00')",
        "UPDATE quarantine SET reason = 'fine'",
        "UPDATE vault_keys SET usage_count = 0",
        "UPDATE vault_keys SET purpose = 'token'",
        "DELETE FROM vault_keys",
        "TRUNCATE vault",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    store_denied(
        rotator
            .write_batch(&Batch {
                logins: vec![login("eve", "dek-2")],
                ..Batch::default()
            })
            .await,
        "write_batch",
    );

    assert_eq!(db.count("audit_log").await, 1);
    db.finish(&[&rotator]).await;
}

// -------------------------------------------------------------- catalogue

/// What each role holds on each table, as `has_*_privilege` sees it (a
/// column grant counts for SELECT, INSERT, UPDATE and REFERENCES). Anything
/// not listed must be absent: this catches an over-broad grant that the
/// behaviour tests above would not think to try.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    (WORKER, "user_logins", &["SELECT", "INSERT"]),
    (WORKER, "vault", &["INSERT"]),
    (WORKER, "quarantine", &["INSERT"]),
    (WORKER, "vault_keys", &["SELECT", "INSERT", "UPDATE"]),
    (WORKER, "audit_log", &[]),
    (ANALYST, "user_logins", &["SELECT"]),
    (ANALYST, "vault", &[]),
    (ANALYST, "quarantine", &[]),
    (ANALYST, "vault_keys", &[]),
    (ANALYST, "audit_log", &[]),
    (REVEALER, "user_logins", &["SELECT"]),
    (REVEALER, "vault", &["SELECT"]),
    (REVEALER, "quarantine", &[]),
    (REVEALER, "vault_keys", &["SELECT"]),
    (REVEALER, "audit_log", &["SELECT", "INSERT"]),
    (ROTATOR, "user_logins", &["SELECT", "UPDATE"]),
    (ROTATOR, "vault", &["SELECT", "UPDATE", "DELETE"]),
    (ROTATOR, "quarantine", &["SELECT", "UPDATE", "DELETE"]),
    (ROTATOR, "vault_keys", &["SELECT", "INSERT", "UPDATE"]),
    (ROTATOR, "audit_log", &["INSERT"]),
];

const PRIVILEGES: [&str; 7] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_holds_exactly_its_privileges_and_none_may_alter_the_audit_trail() {
    let Some(db) = Db::new().await else { return };
    let pool = db.owner.pool();

    let logins: Vec<(String, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname = ANY($1) ORDER BY 1",
    )
    .bind(&ROLES[..])
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(logins.len(), 4, "every role exists: {logins:?}");
    assert!(
        logins.iter().all(|(_, login)| !login),
        "group roles are NOLOGIN: {logins:?}"
    );

    for (role, table, want) in EXPECTED {
        for privilege in PRIVILEGES {
            let has: bool = sqlx::query_scalar(
                "SELECT CASE WHEN $3 IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') \
                 THEN has_any_column_privilege($1, $2, $3) ELSE has_table_privilege($1, $2, $3) END",
            )
            .bind(role)
            .bind(table)
            .bind(privilege)
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(
                has,
                want.contains(&privilege),
                "{role} {privilege} on {table}"
            );
        }
    }

    // Nobody but the owner holds UPDATE, DELETE or TRUNCATE on audit_log,
    // on the table or on any column: not PUBLIC, not any role of the cluster.
    let holders: Vec<(String, String)> = sqlx::query_as(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type \
         FROM pg_class c, aclexplode(c.relacl) a \
         WHERE c.oid = 'audit_log'::regclass AND a.grantee <> c.relowner \
           AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE') \
         UNION ALL \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type \
         FROM pg_attribute t, aclexplode(t.attacl) a \
         WHERE t.attrelid = 'audit_log'::regclass AND a.privilege_type = 'UPDATE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(holders.is_empty(), "may alter audit_log: {holders:?}");

    // PUBLIC holds nothing on pii-vault's tables, and no role can read the
    // migration bookkeeping.
    for table in [
        "user_logins",
        "vault",
        "quarantine",
        "vault_keys",
        "audit_log",
        "_sqlx_migrations",
    ] {
        let public: Option<String> = sqlx::query_scalar(
            "SELECT string_agg(a.privilege_type, ',') FROM pg_class c, aclexplode(c.relacl) a \
             WHERE c.oid = $1::regclass AND a.grantee = 0",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(public, None, "PUBLIC on {table}");
    }
    for role in ROLES {
        let any: bool =
            sqlx::query_scalar("SELECT has_any_column_privilege($1, '_sqlx_migrations', 'SELECT')")
                .bind(role)
                .fetch_one(pool)
                .await
                .unwrap();
        assert!(!any, "{role} reads _sqlx_migrations");
    }
    db.finish(&[]).await;
}

/// The documented deployment: a non-superuser that owns the database (and
/// may create roles) runs the migrations; the roles then work as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_superuser_database_owner_can_migrate_and_grant_the_roles() {
    let Some(admin_url) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let fresh = pg::FreshDb::create(&admin_url).await;
    let owner_name = format!("{}_owner", fresh.name);
    let worker_name = format!("{}_worker", fresh.name);
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    for sql in [
        format!("CREATE ROLE {owner_name} LOGIN CREATEROLE PASSWORD 'owner'"),
        format!("ALTER DATABASE {} OWNER TO {owner_name}", fresh.name),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }

    let owner = PgStore::connect(&with_user(&fresh.url, &owner_name, "owner"))
        .await
        .unwrap();
    owner.migrate().await.unwrap();
    // The owner makes the login user, as a deployment's DBA script would.
    for sql in [
        format!("CREATE ROLE {worker_name} LOGIN PASSWORD 'worker'"),
        format!("GRANT {WORKER} TO {worker_name}"),
    ] {
        sqlx::query(&sql).execute(owner.pool()).await.unwrap();
    }
    let worker = PgStore::connect(&with_user(&fresh.url, &worker_name, "worker"))
        .await
        .unwrap();
    assert!(worker
        .insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
        .await
        .unwrap());
    assert!(worker
        .insert_key(&new_key("dek-1", KeyPurpose::Vault, 0))
        .await
        .unwrap());
    let batch = Batch {
        logins: vec![login("alice", "dek-1")],
        key_usage: vec![("dek-1".into(), 1)],
        token_key_id: "tok-1".into(),
        ..Batch::default()
    };
    assert_eq!(worker.write_batch(&batch).await.unwrap().stored, 1);
    denied(worker.pool(), "SELECT * FROM vault").await;

    worker.pool().close().await;
    owner.pool().close().await;
    fresh.drop_database().await;
    for user in [&worker_name, &owner_name] {
        sqlx::query(&format!("DROP ROLE {user}"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    admin.close().await.ok();
}

// ------------------------------------------------------------- end to end

fn pii_vault(dir: &std::path::Path, database_url: &str, args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .arg("--key-dir")
        .arg(dir.join("keys"))
        .current_dir(dir)
        .env("DATABASE_URL", database_url)
        .env_remove("PII_VAULT_KMS_KEY_ID")
        .env("PII_VAULT_ACTOR", "oncall@test")
        .output()
        .unwrap()
}

/// The binary under the worker's login: `run` stores everything, `reveal`
/// is refused with a plain permission error and shows no original; the
/// revealer's login then reveals them, on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_worker_runs_but_cannot_reveal_and_the_revealer_can() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let worker_url = db.login_as(WORKER).await;
    let revealer_url = db.login_as(REVEALER).await;
    let dir = tempfile::tempdir().unwrap();

    let events = common::gen_events(&["-n", "20", "--seed", "3"]);
    std::fs::write(dir.path().join("events.jsonl"), &events).unwrap();
    let raw = common::raw_pii(&events);
    assert!(!raw.is_empty());
    let user_id = serde_json::from_str::<serde_json::Value>(events.lines().next().unwrap())
        .unwrap()["user_id"]
        .as_str()
        .unwrap()
        .to_string();

    let run = pii_vault(
        dir.path(),
        &worker_url,
        &["run", "--from-file", "events.jsonl", "--no-progress"],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "run as the worker failed:\n{stderr}");
    assert!(
        stderr.contains("20 stored, 0 duplicates, 0 rejected"),
        "{stderr}"
    );
    assert_eq!(db.count("user_logins").await, 20);
    assert_eq!(db.count("vault").await, 20);

    let reveal = [
        "reveal",
        "--user-id",
        &user_id,
        "--reason",
        "INC-4711",
        "--format",
        "json",
    ];
    let refused = pii_vault(dir.path(), &worker_url, &reveal);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "reveal as the worker succeeded:\n{stderr}"
    );
    assert!(
        stderr.contains("permission denied for table") && stderr.contains("42501"),
        "no clear permission error:\n{stderr}"
    );
    assert!(
        refused.stdout.is_empty(),
        "printed something: {:?}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert_eq!(common::leaked(&refused.stderr, &raw), Vec::<&str>::new());
    assert_eq!(db.count("audit_log").await, 0);

    let revealed = pii_vault(dir.path(), &revealer_url, &reveal);
    let stdout = String::from_utf8_lossy(&revealed.stdout);
    assert!(
        revealed.status.success(),
        "reveal as the revealer failed:\n{}",
        String::from_utf8_lossy(&revealed.stderr)
    );
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert!(stdout.contains(first["ip"].as_str().unwrap()), "{stdout}");
    assert_eq!(db.count("audit_log").await, 1);

    db.finish(&[]).await;
}
