//! Least privilege and the trust boundaries, tested: the database roles of
//! `migrations/postgres/0002_roles.sql` and `0003_trust_boundaries.sql`,
//! each used through a login user granted it, the way a deployment does
//! (`GRANT pii_vault_worker TO their_login_user`). Every role is shown doing
//! its whole job through `PgStore`, and then refused what it must not do by
//! Postgres itself, with plain SQL as a person holding that login would
//! type it: SQLSTATE 42501 (insufficient privilege) or the SQLSTATE of the
//! database rule that refuses it (PVnnn), never just any error: a statement
//! that failed for another reason proves nothing.
//!
//! Postgres only: fails when `PII_VAULT_TEST_PG` is unset (skips under
//! `PII_VAULT_SKIP_SERVICES=1`). Login users are cluster-wide, so each
//! test names its own after its database and drops them at the end.

use crate::common::seed::Owner;
use crate::common::{self, pg};

use std::fmt::Debug;
use std::process::{Command, Output};

use base64::Engine as _;
use chrono::{NaiveDate, Utc};
use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::postgres::PgStore;
use pii_vault::store::{
    Audit, Batch, BatchOutcome, Chunks, Erasure, Forgotten, Ingest, Job, JobKind, JobStart, Jobs,
    KeyState, Keys, LoginRow, QuarantineRow, Requester, Reveal, Selector, Store, StoreError,
    StoredKey, VaultRow,
};

/// The KEK the test keys claim to be wrapped under; the owner allow-lists it.
pub(crate) const TEST_KEK: &str = "local:test";
use rand::RngCore;
use sqlx::{Connection, PgConnection, PgPool};

pub(crate) const WORKER: &str = "pii_vault_worker";
pub(crate) const ANALYST: &str = "pii_vault_analyst";
pub(crate) const REVEALER: &str = "pii_vault_revealer";
pub(crate) const ROTATOR: &str = "pii_vault_rotator";
pub(crate) const ROLES: [&str; 4] = [WORKER, ANALYST, REVEALER, ROTATOR];

// ---------------------------------------------------------------- harness

/// A fresh, migrated database; the store of its owner (the admin of the
/// test cluster, who ran the migrations); the login users made for the test.
pub(crate) struct Db {
    admin_url: String,
    pub(crate) fresh: pg::FreshDb,
    pub(crate) owner: PgStore,
    users: Vec<String>,
}

impl Db {
    /// `None` (skip) without a test cluster.
    pub(crate) async fn new() -> Option<Db> {
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
    pub(crate) async fn login_as(&mut self, role: &str) -> String {
        let user = format!(
            "{}_{}_{}",
            self.fresh.name,
            self.users.len(),
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
    pub(crate) async fn store_as(&mut self, role: &str) -> PgStore {
        let url = self.login_as(role).await;
        let store = PgStore::connect(&url).await.unwrap();
        store.ping().await.unwrap();
        store
    }

    pub(crate) async fn owner_exec(&self, sql: &str) -> u64 {
        sqlx::query(sql)
            .execute(self.owner.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .rows_affected()
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(self.owner.pool())
            .await
            .unwrap()
    }

    /// Drops the database, then the login users (roles outlive databases).
    pub(crate) async fn finish(self, stores: &[&PgStore]) {
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
pub(crate) fn with_user(url: &str, user: &str, password: &str) -> String {
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

pub(crate) fn is_denied(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42501"))
}

/// Runs `sql` and asserts that Postgres refused it for want of a privilege.
pub(crate) async fn denied(pool: &PgPool, sql: &str) {
    match sqlx::query(sql).execute(pool).await {
        Err(e) if is_denied(&e) => {}
        Err(e) => panic!("{sql}: expected permission denied (42501), got: {e}"),
        Ok(_) => panic!("{sql}: expected permission denied (42501), but it ran"),
    }
}

/// Runs `sql`, which must be allowed; returns the rows it affected.
pub(crate) async fn allowed(pool: &PgPool, sql: &str) -> u64 {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

/// Runs `sql` and asserts that Postgres refused it with SQLSTATE `code`
/// (one of pii-vault's own rules, PVnnn, or a standard one).
pub(crate) async fn refused(pool: &PgPool, sql: &str, code: &str) {
    match sqlx::query(sql).execute(pool).await {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(code) => {}
        Err(e) => panic!("{sql}: expected SQLSTATE {code}, got: {e}"),
        Ok(_) => panic!("{sql}: expected SQLSTATE {code}, but it ran"),
    }
}

/// Asserts that a store call failed for want of a privilege.
pub(crate) fn store_denied<T: Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Permanent(m)) if m.contains("SQLSTATE 42501") => {}
        other => panic!("{what}: expected a permission-denied error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- builders

pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

pub(crate) fn new_key(id: &str, purpose: KeyPurpose, version: i64) -> StoredKey {
    StoredKey {
        id: id.into(),
        purpose,
        version,
        wrapped: WrappedKey {
            kek_id: TEST_KEK.into(),
            blob: random_bytes(60),
        },
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    }
}

/// A token as `crypto::token` makes them: version, then a base64url tag.
pub(crate) fn token(version: i64) -> String {
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(32));
    format!("t{version}_{tag}")
}

/// A login (SQS-style message id) and its vault row sealed under `key_id`.
pub(crate) fn login(user_id: &str, key_id: &str) -> (LoginRow, VaultRow) {
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
            create_date: NaiveDate::from_ymd_opt(2024, 3, 1),
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

pub(crate) fn quarantined(user_id: Option<&str>, key_id: &str) -> QuarantineRow {
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

/// Who asks for a privileged job in these tests, and why.
pub(crate) fn who() -> Requester {
    Requester {
        claimed_actor: "oncall@test".into(),
        reason: "INC-4711".into(),
    }
}

/// What the owner writes before a role is tried: a data key and token key
/// v1, three logins (two of alice's, one of bob's) with vault rows, and a
/// quarantined message of each user.
pub(crate) struct Seeded {
    pub(crate) alice: Vec<(LoginRow, VaultRow)>,
}

pub(crate) async fn seed(owner: &PgStore) -> Seeded {
    let raw = Owner::Pg(owner.pool());
    raw.allow_kek(TEST_KEK).await;
    assert!(
        raw.insert_key(&new_key("dek-1", KeyPurpose::Vault, 0))
            .await
    );
    assert!(
        raw.insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
            .await
    );
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
        ..Batch::default()
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

// ------------------------------------------------------------------ worker

/// A data key id as workers make them.
pub(crate) fn dek_id() -> String {
    format!("dek-{}", uuid::Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_appends_and_registers_its_own_data_keys_and_nothing_more() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
    let worker = db.store_as(WORKER).await;
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
    .fetch_one(db.owner.pool())
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
    let usage = db.owner.get_key(&dek).await.unwrap().unwrap().usage_count;
    assert_eq!(
        usage, 3,
        "2 vault rows + 1 quarantined, counted by the database"
    );

    // Retiring its own exhausted key: yes; anyone else's: no.
    assert!(!worker.retire_data_key("dek-1").await.unwrap());
    assert_eq!(
        db.owner.get_key("dek-1").await.unwrap().unwrap().state,
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

    assert_eq!(db.count("vault").await, 5);
    assert_eq!(db.count("audit_log").await, 0);
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE purpose = 'token'")
        .fetch_one(db.owner.pool())
        .await
        .unwrap();
    assert_eq!(tokens, 1);
    db.finish(&[&worker]).await;
}

/// The rotation fences are the database's: a batch sealed under a data key
/// a rotation retired, or tokenised with a token-key version that is not
/// active, is refused whoever sends it, the owner included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_rows_under_retired_or_unknown_keys() {
    let Some(db) = Db::new().await else { return };
    seed(&db.owner).await;
    let pool = db.owner.pool();
    // Token v2 made current, v1 retired, as `rotate token-key` does.
    let raw = Owner::Pg(pool);
    assert!(
        raw.insert_key(&new_key("tok-2", KeyPurpose::Token, 2))
            .await
    );
    raw.set_key_state("tok-1", KeyState::Retired).await;
    let mut stale = login("alice", "dek-1");
    stale.0.masked_ip = token(1);
    let r = db
        .owner
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
    assert_eq!(
        db.owner
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
    refused(
        pool,
        "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id) VALUES ('m1', 'u', 'plain', 't2_x')",
        "PV003",
    )
    .await;
    refused(
        pool,
        "INSERT INTO user_logins (message_id, user_id, masked_ip, masked_device_id) VALUES ('m2', 'u', 't7_x', 't7_y')",
        "PV010",
    )
    .await;
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
    db.finish(&[]).await;
}

// ----------------------------------------------------------------- analyst

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
        "SELECT wrapped FROM vault_keys",
        "SELECT * FROM quarantine",
        "SELECT * FROM audit_log",
        "SELECT * FROM kms_allowlist",
        "SELECT * FROM reveal_requests",
        "SELECT pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
        "SELECT * FROM pii_vault_reveal_fetch(1)",
        "SELECT pii_vault_register_data_key('dek-00000000-0000-0000-0000-000000000001', 'local:test', '\\x00112233445566778899aabbccddeeff')",
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
        analyst.reveal_request(&sel, "me", "why").await,
        "reveal_request",
    );
    store_denied(analyst.current_token_key().await, "current_token_key");
    store_denied(
        analyst
            .audit_trail(&pii_vault::store::AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .await,
        "audit_trail",
    );
    store_denied(
        analyst
            .write_batch(&Batch {
                logins: vec![login("eve", "dek-1")],
                ..Batch::default()
            })
            .await,
        "write_batch",
    );

    assert_eq!(db.count("user_logins").await, 3);
    assert_eq!(db.count("audit_log").await, 0);
    db.finish(&[&analyst]).await;
}

// ---------------------------------------------------------------- revealer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revealer_gets_ciphertext_only_for_a_committed_audit_row_of_its_own() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let seeded = seed(&db.owner).await;
    let revealer = db.store_as(REVEALER).await;
    let other = db.store_as(REVEALER).await;
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
    assert_eq!(db.count("audit_log").await, 0);
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
        db.owner.pool(),
        "INSERT INTO audit_log (at, actor, action, target, reason, row_count) VALUES ('2001-01-01', 'ceo', 'note', 'x', 'y', 0)",
    )
    .await;
    let (actor, year): (String, f64) = sqlx::query_as(
        "SELECT actor, extract(year FROM at)::float8 FROM audit_log WHERE action = 'note'",
    )
    .fetch_one(db.owner.pool())
    .await
    .unwrap();
    assert_ne!(actor, "ceo");
    assert!(year > 2001.0);

    assert_eq!(db.count("vault").await, 3);
    db.finish(&[&revealer, &other]).await;
}

// ----------------------------------------------------------------- rotator

/// A data key id as rotations and workers make them.
pub(crate) fn fresh_dek(kek: &str) -> StoredKey {
    StoredKey {
        wrapped: WrappedKey {
            kek_id: kek.into(),
            blob: random_bytes(60),
        },
        ..new_key(&dek_id(), KeyPurpose::Vault, 0)
    }
}

/// The rotator's whole job through `PgStore`, each write through a function
/// that checks its committed, leased job; then plain SQL, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotator_reads_and_writes_only_under_its_committed_leased_job() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
    let rotator = db.store_as(ROTATOR).await;
    let second = db.store_as(ROTATOR).await;
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
        db.owner
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
    let dek1 = db.owner.get_key("dek-1").await.unwrap().unwrap();
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
        db.owner.get_key(&dek2.id).await.unwrap().unwrap().wrapped,
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
        db.owner.get_key("tok-1").await.unwrap().unwrap().state,
        KeyState::Retired,
        "the new version is the only active one"
    );
    let stale = rotator.logins_chunk(&started, "", None, 100).await.unwrap();
    assert_eq!(stale.len(), 3);
    let last = stale.last().unwrap().1.message_id.clone();
    // Tokens of another version than the job's are refused.
    let bad: Vec<_> = stale
        .iter()
        .map(|(id, _)| (*id, token(1), token(1)))
        .collect();
    assert!(matches!(
        rotator.tokens_chunk(&started, Some((0, &last)), &bad).await,
        Err(e) if matches!(pg_code(&e), Some("PV003"))
    ));
    let updates: Vec<_> = stale
        .iter()
        .map(|(id, _)| (*id, token(2), token(2)))
        .collect();
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
            .fetch_all(db.owner.pool())
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
    db.finish(&[&rotator, &second]).await;
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
    (WORKER, "vault_keys", &["SELECT"]),
    (WORKER, "audit_log", &[]),
    (WORKER, "kms_allowlist", &["SELECT"]),
    (WORKER, "reveal_requests", &[]),
    (ANALYST, "user_logins", &["SELECT"]),
    (ANALYST, "vault", &[]),
    (ANALYST, "quarantine", &[]),
    (ANALYST, "vault_keys", &[]),
    (ANALYST, "audit_log", &[]),
    (ANALYST, "kms_allowlist", &[]),
    (ANALYST, "reveal_requests", &[]),
    (REVEALER, "user_logins", &["SELECT"]),
    (REVEALER, "vault", &[]),
    (REVEALER, "quarantine", &[]),
    (REVEALER, "vault_keys", &["SELECT"]),
    (REVEALER, "audit_log", &["SELECT"]),
    (REVEALER, "kms_allowlist", &["SELECT"]),
    (REVEALER, "reveal_requests", &[]),
    // No write of its own anywhere: rotations, erasures and key set-up go
    // through the functions of migrations/postgres/functions/.
    (ROTATOR, "user_logins", &["SELECT"]),
    (ROTATOR, "vault", &["SELECT"]),
    (ROTATOR, "quarantine", &["SELECT"]),
    (ROTATOR, "vault_keys", &["SELECT"]),
    (ROTATOR, "audit_log", &[]),
    (ROTATOR, "kms_allowlist", &["SELECT"]),
    (ROTATOR, "reveal_requests", &[]),
    (REVEALER, "reveal_policy", &["SELECT"]),
    (REVEALER, "pii_vault_pending_requests", &["SELECT"]),
    (REVEALER, "honeytokens", &[]),
    (REVEALER, "audit_alarms", &[]),
    (WORKER, "reveal_policy", &[]),
    (WORKER, "pii_vault_pending_requests", &[]),
    (WORKER, "honeytokens", &[]),
    (WORKER, "audit_alarms", &[]),
    (ANALYST, "reveal_policy", &[]),
    (ANALYST, "pii_vault_pending_requests", &[]),
    (ANALYST, "honeytokens", &[]),
    (ANALYST, "audit_alarms", &[]),
    (ROTATOR, "reveal_policy", &[]),
    (ROTATOR, "pii_vault_pending_requests", &[]),
    (ROTATOR, "honeytokens", &[]),
    (ROTATOR, "audit_alarms", &[]),
    (WORKER, "rotation_jobs", &[]),
    (WORKER, "rotation_ranges", &[]),
    (ANALYST, "rotation_jobs", &[]),
    (ANALYST, "rotation_ranges", &[]),
    (REVEALER, "rotation_jobs", &[]),
    (REVEALER, "rotation_ranges", &[]),
    (ROTATOR, "rotation_jobs", &[]),
    (ROTATOR, "rotation_ranges", &[]),
];

/// Tables no role touches directly.
const OWNER_ONLY: &[&str] = &[
    "job_leases",
    "reveal_request_rows",
    "reveal_quota",
    "honeytoken_logins",
    "reveal_requests",
    "honeytokens",
    "audit_alarms",
    "rotation_jobs",
    "rotation_ranges",
];

/// Columns holding ciphertext or wrapped keys, and who may read them
/// directly (everyone else only through the audited functions).
const SEALED_COLUMNS: &[(&str, &str, &[&str])] = &[
    ("vault", "nonce", &[]),
    ("vault", "ciphertext", &[]),
    ("quarantine", "nonce", &[]),
    ("quarantine", "ciphertext", &[]),
    ("vault_keys", "wrapped", &[WORKER, REVEALER, ROTATOR]),
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

/// Every function of the schema, and the roles that may call it. The
/// catalogue test reads the functions from `pg_proc`, not from this list:
/// a function added without a line here fails it, and so does one whose
/// EXECUTE is held by anyone else (PUBLIC included). Functions no role
/// calls are called by other functions or fire as triggers.
const FUNCTIONS: &[(&str, &[&str])] = &[
    ("pii_vault_register_data_key(text,text,bytea)", &[WORKER]),
    ("pii_vault_retire_data_key(text)", &[WORKER]),
    ("pii_vault_honeytokens_due(integer)", &[WORKER]),
    ("pii_vault_reveal_request(text,text,text,text)", &[REVEALER]),
    ("pii_vault_reveal_fetch(bigint)", &[REVEALER]),
    ("pii_vault_approve(bigint,text,text)", &[REVEALER]),
    ("pii_vault_reveal_claim(bigint,text)", &[REVEALER]),
    ("pii_vault_keys_init(text,text,bytea,text,bytea,text)", &[ROTATOR]),
    ("pii_vault_record(text,text,text,text,bigint)", &[ROTATOR]),
    ("pii_vault_job_release(bigint)", &[ROTATOR]),
    ("pii_vault_rotation_job_resume(bigint,text)", &[ROTATOR]),
    ("pii_vault_rotation_start_data_keys(bigint,text[])", &[ROTATOR]),
    (
        "pii_vault_rotation_start_token_key(bigint,text[],text,bigint,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_start_kek(bigint)", &[ROTATOR]),
    ("pii_vault_rotation_job_ranges(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_rotation_range_done(bigint,bigint,integer)", &[ROTATOR]),
    (
        "pii_vault_rotation_new_data_key(bigint,bigint,text,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_retire_key(bigint,bigint,text)", &[ROTATOR]),
    (
        "pii_vault_rotation_vault_chunk(bigint,bigint,text,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_quarantine_chunk(bigint,bigint,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_reseal(bigint,bigint,integer,text,text[],text[],text[],bytea[],bytea[])",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_logins_by_message(bigint,bigint,text,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_sweep_chunk(bigint,bigint,bigint,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_tokens(bigint,bigint,integer,text,bigint[],text[],text[])",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_rewrap(bigint,bigint,text,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_retire_data_keys(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_rotation_finish(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_forget(text,text,text)", &[ROTATOR]),
    ("pii_vault_retention(date,text,text)", &[ROTATOR]),
    ("pii_vault_retention_preview(date)", &[ROTATOR]),
    ("pii_vault_check_record(bigint,text[],interval)", &[]),
    ("pii_vault_fresh_call()", &[]),
    ("pii_vault_lease_live(job_leases)", &[]),
    ("pii_vault_check_lease(text,bigint)", &[]),
    ("pii_vault_rotation_job_check(bigint,bigint)", &[]),
    ("pii_vault_rotation_job_is(rotation_jobs,text)", &[]),
    (
        "pii_vault_rotation_job_new(bigint,text,text,text[],text[],bigint,text)",
        &[],
    ),
    (
        "pii_vault_rotation_advance(bigint,integer,text,bigint,boolean)",
        &[],
    ),
    ("pii_vault_honeytokens_among(text[])", &[]),
    ("pii_vault_destroy_unreferenced_data_keys()", &[]),
    // Trigger functions.
    ("audit_log_append_only()", &[]),
    ("pii_vault_audit_stamp()", &[]),
    ("pii_vault_policy_changed()", &[]),
    ("pii_vault_allowlist_guard()", &[]),
    ("pii_vault_keys_guard()", &[]),
    ("pii_vault_keys_no_delete()", &[]),
    ("pii_vault_fence_data_keys()", &[]),
    ("pii_vault_fence_token_keys()", &[]),
];

/// A function's signature without spaces, as both spellings compare.
fn normalize(f: &str) -> String {
    f.chars().filter(|c| !c.is_whitespace()).collect()
}

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
    for (table, column, readers) in SEALED_COLUMNS {
        for role in ROLES {
            let has: bool = sqlx::query_scalar("SELECT has_column_privilege($1, $2, $3, 'SELECT')")
                .bind(role)
                .bind(table)
                .bind(column)
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(
                has,
                readers.contains(&role),
                "{role} reads {table}.{column}"
            );
        }
    }
    // Every function of the schema, as the catalogue has them.
    let found: Vec<(String, bool, Vec<String>, Option<String>)> = sqlx::query_as(
        "SELECT p.proname || '(' || oidvectortypes(p.proargtypes) || ')', p.prosecdef, \
                coalesce(p.proconfig, '{}'), \
                (SELECT string_agg(CASE WHEN a.grantee = 0 THEN 'public' ELSE a.grantee::regrole::text END, ',' \
                                   ORDER BY 1) \
                 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
                 WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner) \
         FROM pg_proc p WHERE p.pronamespace = current_schema()::regnamespace",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let listed: Vec<String> = FUNCTIONS.iter().map(|(f, _)| normalize(f)).collect();
    let mut names: Vec<String> = found.iter().map(|f| normalize(&f.0)).collect();
    names.sort();
    let mut want = listed.clone();
    want.sort();
    assert_eq!(names, want, "the schema's functions and FUNCTIONS differ");
    for (function, definer, config, executors) in &found {
        let (_, callers) = FUNCTIONS
            .iter()
            .find(|(f, _)| normalize(f) == normalize(function))
            .expect("listed");
        assert!(definer, "{function} is SECURITY DEFINER");
        assert!(
            config
                .iter()
                .any(|c| c.starts_with("search_path=") && c.ends_with("pg_temp")),
            "{function} pins a search_path ending in pg_temp: {config:?}"
        );
        // Held by exactly the intended roles: PUBLIC and the cluster's
        // other roles included.
        let mut have: Vec<&str> = executors
            .as_deref()
            .map(|e| e.split(',').collect())
            .unwrap_or_default();
        have.sort();
        let mut intended: Vec<&str> = callers.to_vec();
        intended.sort();
        assert_eq!(have, intended, "EXECUTE on {function}");
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

    for table in OWNER_ONLY {
        for role in ROLES {
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
                assert!(!has, "{role} {privilege} on {table}");
            }
        }
    }
    // No role takes numbers from a sequence of the trail or the jobs (gaps
    // at will); the worker numbers the logins it inserts.
    let sequences: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, r.rolname::text FROM pg_class c CROSS JOIN pg_roles r \
         WHERE c.relkind = 'S' AND c.relnamespace = current_schema()::regnamespace \
           AND r.rolname = ANY($1) AND has_sequence_privilege(r.rolname, c.oid, 'USAGE')",
    )
    .bind(&ROLES[..])
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        sequences,
        [("user_logins_id_seq".to_string(), WORKER.to_string())]
    );

    // PUBLIC holds nothing on pii-vault's tables, and no role can read the
    // migration bookkeeping.
    for table in [
        "user_logins",
        "vault",
        "quarantine",
        "vault_keys",
        "audit_log",
        "kms_allowlist",
        "reveal_requests",
        "reveal_policy",
        "honeytokens",
        "audit_alarms",
        "rotation_jobs",
        "rotation_ranges",
        "job_leases",
        "reveal_request_rows",
        "reveal_quota",
        "honeytoken_logins",
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
    let raw = Owner::Pg(owner.pool());
    raw.allow_kek(TEST_KEK).await;
    assert!(
        raw.insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
            .await
    );
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
    let dek = dek_id();
    worker
        .register_data_key(
            &dek,
            &WrappedKey {
                kek_id: TEST_KEK.into(),
                blob: random_bytes(60),
            },
        )
        .await
        .unwrap();
    let batch = Batch {
        logins: vec![login("alice", &dek)],
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

pub(crate) fn pii_vault(dir: &std::path::Path, database_url: &str, args: &[&str]) -> Output {
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

pub(crate) fn ok(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{what} failed:\n{stderr}");
    stderr
}

/// The binary under each role's own login, as an operator runs it: `run`
/// as the worker; `reveal` refused to the worker and served to the
/// revealer, whose login the trail names; `audit` as the revealer;
/// `rotate` and `forget` as the rotator; a second rotation of a kind
/// refused while one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_does_each_job_under_that_roles_login() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let worker_url = db.login_as(WORKER).await;
    let revealer_url = db.login_as(REVEALER).await;
    let rotator_url = db.login_as(ROTATOR).await;
    let revealer_login = revealer_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    // The owner's migrate allow-lists the local KEK and creates the keys.
    ok(
        &pii_vault(dir.path(), &db.fresh.url, &["migrate"]),
        "migrate",
    );

    let events = common::gen_events(&["-n", "20", "--seed", "3"]);
    std::fs::write(dir.path().join("events.jsonl"), &events).unwrap();
    let raw = common::raw_pii(&events);
    assert!(!raw.is_empty());
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    let user_id = first["user_id"].as_str().unwrap().to_string();

    // A worker configured with a KEK the owner never allowed (here another
    // local key file) stops at start-up, saying why, and stores nothing.
    let stray = Command::new(common::bin())
        .args([
            "run",
            "--from-file",
            "events.jsonl",
            "--no-progress",
            "--key-dir",
        ])
        .arg(dir.path().join("other-keys"))
        .current_dir(dir.path())
        .env("DATABASE_URL", &worker_url)
        .env_remove("PII_VAULT_KMS_KEY_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&stray.stderr);
    assert!(!stray.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not on the database's KMS allow-list"),
        "{stderr}"
    );
    assert_eq!(db.count("user_logins").await, 0);

    let stderr = ok(
        &pii_vault(
            dir.path(),
            &worker_url,
            &["run", "--from-file", "events.jsonl", "--no-progress"],
        ),
        "run as the worker",
    );
    assert_eq!(common::summary(stderr.as_bytes()), (20, 0, 0), "{stderr}");
    assert_eq!(db.count("user_logins").await, 20);
    assert_eq!(db.count("vault").await, 20);
    let workers_key: (String, i64) =
        sqlx::query_as("SELECT created_by, usage_count FROM vault_keys WHERE purpose = 'vault'")
            .fetch_one(db.owner.pool())
            .await
            .unwrap();
    assert!(workers_key.0.ends_with("_worker"), "{workers_key:?}");
    assert_eq!(workers_key.1, 20);

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
        stderr.contains("permission denied for function pii_vault_reveal_request")
            && stderr.contains("42501"),
        "no clear permission error:\n{stderr}"
    );
    assert!(refused.stdout.is_empty());
    assert_eq!(common::leaked(&refused.stderr, &raw), Vec::<&str>::new());
    assert_eq!(
        db.count("audit_log").await,
        2,
        "only the owner's key set-up"
    );

    let revealed = pii_vault(dir.path(), &revealer_url, &reveal);
    ok(&revealed, "reveal as the revealer");
    let stdout = String::from_utf8_lossy(&revealed.stdout);
    assert!(stdout.contains(first["ip"].as_str().unwrap()), "{stdout}");
    let trail = pii_vault(dir.path(), &revealer_url, &["audit", "--format", "json"]);
    ok(&trail, "audit as the revealer");
    let newest: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&trail.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(newest["action"], "reveal");
    assert_eq!(newest["actor"], revealer_login.as_str());
    assert_eq!(newest["claimed_actor"], "oncall@test");

    // The rotator rotates both kinds of key and forgets a user.
    let stderr = ok(
        &pii_vault(dir.path(), &rotator_url, &["rotate", "data-keys"]),
        "rotate data-keys as the rotator",
    );
    assert!(stderr.contains("re-encrypted 20 row(s)"), "{stderr}");
    let stderr = ok(
        &pii_vault(dir.path(), &rotator_url, &["rotate", "token-key"]),
        "rotate token-key as the rotator",
    );
    assert!(
        stderr.contains("token key v2 is current; re-tokenised 20 login(s)"),
        "{stderr}"
    );
    let stderr = ok(
        &pii_vault(
            dir.path(),
            &rotator_url,
            &[
                "forget",
                "--user-id",
                &user_id,
                "--reason",
                "erasure request",
            ],
        ),
        "forget as the rotator",
    );
    assert!(stderr.contains("erased"), "{stderr}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE user_id = $1")
        .bind(&user_id)
        .fetch_one(db.owner.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    // A rotation of a kind that is already running is refused, clearly.
    let holder = PgStore::connect(&rotator_url).await.unwrap();
    let job = holder
        .begin_job(JobKind::TokenKey, "user_logins", &who(), 0)
        .await
        .unwrap();
    let busy = pii_vault(dir.path(), &rotator_url, &["rotate", "token-key"]);
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "{stderr}");
    assert!(
        stderr.contains("another rotate-token-key is running"),
        "{stderr}"
    );
    job.finish().await;
    holder.pool().close().await;

    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM audit_log ORDER BY id")
            .fetch_all(db.owner.pool())
            .await
            .unwrap();
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "allow-kek",
            "keys-init",
            "reveal",
            "rotate-data-keys",
            "rotation-done",
            "rotate-token-key",
            "rotation-done",
            "forget",
            "rotate-token-key"
        ]
    );
    assert!(
        actions[3..].iter().all(|(_, a)| a.ends_with("_rotator")),
        "{actions:?}"
    );
    db.finish(&[]).await;
}

// ------------------------------------------------------ reveal governance

pub(crate) fn pg_code(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Refused(m) => m
            .rsplit("SQLSTATE ")
            .next()
            .map(|c| c.trim_end_matches(')')),
        _ => None,
    }
}

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
    let Some(mut db) = Db::new().await else {
        return;
    };
    let shared = seed_shared_ip(&db.owner).await;
    let alice = db.store_as(REVEALER).await;
    let bob = db.store_as(REVEALER).await;
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
            .fetch_all(db.owner.pool())
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
    allowed(
        db.owner.pool(),
        &format!(
            "UPDATE reveal_requests SET requested_at = now() - interval '25 hours' WHERE id IN ({}, {})",
            stale.id, approved.id
        ),
    )
    .await;
    let late = bob.approve(stale.id, "bob", "too late").await.unwrap_err();
    assert_eq!(pg_code(&late), Some("PV006"), "{late}");
    let expired = alice.reveal_claim(approved.id, "alice").await.unwrap_err();
    assert_eq!(pg_code(&expired), Some("PV006"), "{expired}");
    db.finish(&[&alice, &bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_limit_counts_per_login_and_only_the_owner_sets_the_policy() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
    let alice = db.store_as(REVEALER).await;
    let bob = db.store_as(REVEALER).await;
    let rotator = db.store_as(ROTATOR).await;

    // Nobody but the owner changes the policy.
    for pool in [alice.pool(), rotator.pool()] {
        denied(
            pool,
            "UPDATE reveal_policy SET max_reveals_per_day = 100000",
        )
        .await;
        denied(pool, "DELETE FROM reveal_policy").await;
    }
    store_denied(alice.set_policy(None, Some(100_000)).await, "set_policy");
    let p = db.owner.set_policy(None, Some(2)).await.unwrap();
    assert_eq!((p.max_users_per_reveal, p.max_reveals_per_day), (10, 2));
    assert_eq!(alice.policy().await.unwrap(), p, "revealers may read it");
    let change: (String, String) =
        sqlx::query_as("SELECT action, target FROM audit_log WHERE action = 'policy-set'")
            .fetch_one(db.owner.pool())
            .await
            .unwrap();
    assert_eq!(
        change.1,
        "max_users_per_reveal=10 max_reveals_per_day=2 max_transaction_seconds=60"
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
    db.finish(&[&alice, &bob, &rotator]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_touching_a_honeytoken_is_served_and_raises_an_alarm_only_the_owner_sees() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    let revealer_url = db.login_as(REVEALER).await;
    let worker_url = db.login_as(WORKER).await;
    let dir = tempfile::tempdir().unwrap();
    ok(
        &pii_vault(dir.path(), &db.fresh.url, &["migrate"]),
        "migrate",
    );
    let load = |name: &str, seed: &str, n: &str| {
        let events = common::gen_events(&["-n", n, "--seed", seed]);
        std::fs::write(dir.path().join(name), &events).unwrap();
        ok(
            &pii_vault(
                dir.path(),
                &worker_url,
                &[
                    "run",
                    "--from-file",
                    name,
                    "--no-progress",
                    "--batch-size",
                    "2",
                ],
            ),
            "run as the worker",
        )
    };
    load("day1.jsonl", "1", "60");
    let stderr = ok(
        &pii_vault(
            dir.path(),
            &db.fresh.url,
            &["honeytoken", "plant", "--count", "3", "--over", "0"],
        ),
        "honeytoken plant",
    );
    assert!(stderr.contains("planted 3 honeytoken user(s)"), "{stderr}");
    let planned: i64 = sqlx::query_scalar("SELECT count(*) FROM honeytoken_logins")
        .fetch_one(db.owner.pool())
        .await
        .unwrap();
    // The next day's load carries them, one a batch, and counts only its own.
    let stderr = load("day2.jsonl", "2", "400");
    assert_eq!(common::summary(stderr.as_bytes()), (400, 0, 0), "{stderr}");
    let traps: Vec<String> = sqlx::query_scalar("SELECT user_id FROM honeytokens ORDER BY user_id")
        .fetch_all(db.owner.pool())
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
    .fetch_one(db.owner.pool())
    .await
    .unwrap();
    assert_eq!(n, planned, "every planned login written once");
    assert_eq!((tokens, sealed, by_worker), (n, n, n));

    let mut listener = sqlx::postgres::PgListener::connect(&db.fresh.url)
        .await
        .unwrap();
    listener.listen("pii_vault_alarm").await.unwrap();
    // The owner's watcher: `audit --alarms --follow` reports each new alarm
    // as an ERROR log line (and a line on stdout).
    let follow = tokio::process::Command::new(common::bin())
        .args([
            "audit",
            "--alarms",
            "--follow",
            "--format",
            "json",
            "--key-dir",
        ])
        .arg(dir.path().join("keys"))
        .current_dir(dir.path())
        .env("DATABASE_URL", &db.fresh.url)
        .env("PII_VAULT_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Give it the moment it needs to LISTEN.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

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
    let out = pii_vault(dir.path(), &revealer_url, &reveal);
    let stderr = ok(&out, "reveal of a honeytoken");
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
    let alarms = db
        .owner
        .alarms(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].request_id, request_id);
    assert!(alarms[0].actor.ends_with("_revealer"));
    let listed = ok_stdout(&pii_vault(
        dir.path(),
        &db.fresh.url,
        &["audit", "--alarms", "--format", "json"],
    ));
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
    let raw = PgStore::connect(&revealer_url).await.unwrap();
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
    let refused = pii_vault(dir.path(), &revealer_url, &["audit", "--alarms"]);
    assert!(!refused.status.success());
    raw.pool().close().await;

    // Honeytokens survive the rotations like any user.
    ok(
        &pii_vault(dir.path(), &db.fresh.url, &["rotate", "data-keys"]),
        "rotate data-keys",
    );
    ok(
        &pii_vault(dir.path(), &db.fresh.url, &["rotate", "token-key"]),
        "rotate token-key",
    );
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
         WHERE l.user_id = ANY($1) AND l.masked_ip LIKE 't2\\_%'",
    )
    .bind(&traps)
    .fetch_one(db.owner.pool())
    .await
    .unwrap();
    assert_eq!(kept, n);
    let again = pii_vault(dir.path(), &revealer_url, &reveal);
    ok(&again, "reveal after the rotations");
    assert!(String::from_utf8_lossy(&again.stdout).contains("\"ip\":\""));
    listener.unlisten_all().await.ok();
    db.finish(&[]).await;
}

pub(crate) fn ok_stdout(out: &Output) -> String {
    ok(out, "command");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The state of resumable rotations is the rotator's alone, and even the
/// rotator moves it only under a committed, locked job of its own: workers,
/// analysts and revealers are refused every table and function of it, and a
/// job's rows are read only by the login that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_jobs_are_the_rotators_alone() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await;
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
        let store = db.store_as(role).await;
        for sql in calls {
            denied(store.pool(), sql).await;
        }
        stores.push(store);
    }
    let rotator = db.store_as(ROTATOR).await;
    let other = db.store_as(ROTATOR).await;
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
    let mut all: Vec<&PgStore> = stores.iter().collect();
    all.extend([&rotator, &other]);
    db.finish(&all).await;
}

// --------------------------------------------------------------- erasure

/// Erasure is the database's to audit: the rotator has no DELETE on the
/// vault or the quarantine, only `pii_vault_forget` / `pii_vault_retention`,
/// which delete and write the audit row (actor from the database, count of
/// rows) in one transaction. Nobody else may call them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotator_erases_only_through_the_audited_functions() {
    let Some(mut db) = Db::new().await else {
        return;
    };
    seed(&db.owner).await; // alice ×2, bob ×1 on 2024-03-01; a quarantined body each
    Owner::Pg(db.owner.pool()).add_honeytokens(&["honey"]).await;
    let mut recent = login("carol", "dek-1");
    recent.0.create_date = Some(Utc::now().date_naive());
    let batch = Batch {
        logins: vec![login("honey", "dek-1"), recent],
        token_key_id: "tok-1".into(),
        ..Batch::default()
    };
    db.owner.write_batch(&batch).await.unwrap();
    let rotator = db.store_as(ROTATOR).await;
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
    assert_eq!(db.count("vault").await, 5);

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
        .fetch_all(db.owner.pool())
        .await
        .unwrap();
    assert_eq!(left, ["carol"]);
    assert_eq!(db.count("user_logins").await, 5, "masked logins stay");
    let (actor, action, target, row_count, claimed): (String, String, String, i64, String) =
        sqlx::query_as(
            "SELECT actor, action, target, row_count, claimed_actor FROM audit_log ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(db.owner.pool())
        .await
        .unwrap();
    assert_eq!(
        (
            action.as_str(),
            target.as_str(),
            row_count,
            claimed.as_str()
        ),
        ("retention", "before=2025-01-01 keys_destroyed=0", 4, "dpo")
    );
    assert!(
        actor.ends_with("_rotator"),
        "{actor}: the login, from the database"
    );

    // A rolled-back erasure leaves neither the deletion nor its record.
    let trail = db.count("audit_log").await;
    let mut tx = raw.begin().await.unwrap();
    sqlx::query("SELECT * FROM pii_vault_forget('carol', 'erasure request', 'dpo')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(db.count("vault").await, 1);
    assert_eq!(db.count("audit_log").await, trail);

    // The other roles may not erase at all.
    for role in [WORKER, ANALYST, REVEALER] {
        let other = db.store_as(role).await;
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
    assert_eq!(db.count("vault").await, 1);
    db.finish(&[&rotator]).await;
}
