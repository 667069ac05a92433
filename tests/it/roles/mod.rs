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
//! One module per role (`worker`, `analyst`, `revealer` with the reveal
//! governance and the honeytokens, `rotator` with rotation jobs and
//! erasure), the privilege catalogue (`catalogue`), and the binary under
//! each role's login (`binary`). This module holds what they share: the
//! owner's seed, row builders, and the assertions on refusals.
//!
//! Postgres only: fails when `PII_VAULT_TEST_PG` is unset (skips under
//! `PII_VAULT_SKIP_SERVICES=1`). Each test starts from a
//! [`TestApp`](crate::common::app::TestApp): a fresh migrated database,
//! whose login users are named after it and dropped at the end.

mod analyst;
mod binary;
mod catalogue;
mod prefix;
mod revealer;
mod rewrite;
mod rotator;
mod searcher;
mod worker;

use crate::common::seed::Owner;

use std::fmt::Debug;

use base64::Engine as _;
use chrono::{NaiveDate, Utc};
use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::postgres::PgStore;
use pii_vault::store::{
    Batch, BatchOutcome, Ingest, KeyState, LoginRow, QuarantineRow, Requester, StoreError,
    StoredKey, VaultRow,
};
use rand::RngCore;
use sqlx::PgPool;

pub(crate) use crate::common::app::{ANALYST, AUDITOR, REVEALER, ROLES, ROTATOR, SEARCHER, WORKER};

/// The KEK the test keys claim to be wrapped under; the owner allow-lists it.
pub(crate) const TEST_KEK: &str = "local:test";

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

/// The SQLSTATE of a refusal by one of the database's rules.
pub(crate) fn pg_code(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Refused(m) => m
            .rsplit("SQLSTATE ")
            .next()
            .map(|c| c.trim_end_matches(')')),
        _ => None,
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
            masked_ip_net: Some(token(1)),
            locale: Some("RU".into()),
            app_version: "2.3.0".into(),
            create_date: NaiveDate::from_ymd_opt(2024, 3, 1),
            line: None,
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
        source: None,
        line: None,
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
    seed_on(owner, None).await
}

/// [`seed`], the logins dated `day` instead (this month's: rotations
/// update the open partitions in place and rewrite the closed ones).
pub(crate) async fn seed_on(owner: &PgStore, day: Option<NaiveDate>) -> Seeded {
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
    let dated = |(mut l, v): (LoginRow, VaultRow)| {
        if day.is_some() {
            l.create_date = day;
        }
        (l, v)
    };
    let alice = vec![
        dated(login("alice", "dek-1")),
        dated(login("alice", "dek-1")),
    ];
    let mut logins = alice.clone();
    logins.push(dated(login("bob", "dek-1")));
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

/// A data key id as workers make them.
pub(crate) fn dek_id() -> String {
    format!("dek-{}", uuid::Uuid::new_v4())
}

/// A data key as rotations and workers make them, under `kek`.
pub(crate) fn fresh_dek(kek: &str) -> StoredKey {
    StoredKey {
        wrapped: WrappedKey {
            kek_id: kek.into(),
            blob: random_bytes(60),
        },
        ..new_key(&dek_id(), KeyPurpose::Vault, 0)
    }
}
