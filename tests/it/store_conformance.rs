//! One behaviour, two stores: every check here is written once against
//! `dyn Store` and run on SQLite and on Postgres (`sqlite::…` and
//! `postgres::…` tests), so the embedded default and the production store
//! cannot drift apart. Postgres tests fail when `PII_VAULT_TEST_PG` is unset
//! (and skip under `PII_VAULT_SKIP_SERVICES=1`).
//!
//! The store never decrypts, so nonces and ciphertexts are random bytes: what
//! matters is that each comes back attached to the right row.

use crate::common::app::TestApp;
use crate::common::seed::Owner;
use crate::common::{self, pg};

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::postgres::PgStore;
use pii_vault::store::sqlite::SqliteStore;
use pii_vault::store::{
    Batch, BatchOutcome, Erasure, Ingest, JobKind, KeyState, LoginRow, PolicyChange, QuarantineRow,
    Requester, Retained, SearchKind, Selector, Store, StoreError, StoredKey, VaultRow,
};
use rand::RngCore;
use sqlx::{PgPool, SqlitePool};

/// A store under test, as `dyn Store`, plus a raw connection to its
/// database for the few checks that need SQL outside the trait (row
/// counts, tampering attempts).
///
/// Why this stays beside [`TestApp`]: every check here is one function over
/// `dyn Store` run on both backends, so it needs the store as a trait
/// object, and raw SQL on whichever pool is under it. The fixture gives
/// each flavour typed for its backend (the Postgres owner's `PgStore`, or
/// the embedded directory); `Harness` is only that pair on top of it: the
/// database, its migration and its cleanup are the fixture's.
struct Harness {
    app: TestApp,
    store: Arc<dyn Store>,
    url: String,
    raw: Raw,
}

enum Raw {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

enum OwnerPool {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl OwnerPool {
    fn as_owner(&self) -> Owner<'_> {
        match self {
            OwnerPool::Sqlite(p) => Owner::Sqlite(p),
            OwnerPool::Pg(p) => Owner::Pg(p),
        }
    }
}

impl Harness {
    /// The embedded fixture's SQLite file, migrated by a `SqliteStore`.
    async fn sqlite() -> Harness {
        let app = TestApp::embedded();
        let url = app.sqlite_url();
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Owner::Sqlite(store.pool()).allow_kek(KEK).await;
        let raw = Raw::Sqlite(store.pool().clone());
        Harness {
            app,
            store: Arc::new(store),
            url,
            raw,
        }
    }

    /// The Postgres fixture's owner store; `None` (skip) without a test
    /// cluster.
    async fn postgres() -> Option<Harness> {
        let app = TestApp::postgres().await?;
        Owner::Pg(app.pool()).allow_kek(KEK).await;
        Some(Harness {
            store: app.owner_arc(),
            url: app.url().to_string(),
            raw: Raw::Pg(app.pool().clone()),
            app,
        })
    }

    async fn finish(self) {
        if let Raw::Sqlite(p) = &self.raw {
            p.close().await;
        }
        self.app.finish().await;
    }

    async fn exec(&self, sql: &str) -> Result<u64, sqlx::Error> {
        Ok(match &self.raw {
            Raw::Sqlite(p) => sqlx::query(sql).execute(p).await?.rows_affected(),
            Raw::Pg(p) => sqlx::query(sql).execute(p).await?.rows_affected(),
        })
    }

    /// The owner of the database, for what a test sets up directly.
    fn owner(&self) -> Owner<'_> {
        match &self.raw {
            Raw::Sqlite(p) => Owner::Sqlite(p),
            Raw::Pg(p) => Owner::Pg(p),
        }
    }

    async fn insert_key(&self, key: &StoredKey) -> bool {
        self.owner().insert_key(key).await
    }

    /// A clone of the owner's pool, for tasks of their own.
    fn owner_pool(&self) -> OwnerPool {
        match &self.raw {
            Raw::Sqlite(p) => OwnerPool::Sqlite(p.clone()),
            Raw::Pg(p) => OwnerPool::Pg(p.clone()),
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query_scalar(&sql).fetch_one(p).await.unwrap(),
            Raw::Pg(p) => sqlx::query_scalar(&sql).fetch_one(p).await.unwrap(),
        }
    }
}

/// Instantiates each named `async fn(&Harness)` once per store.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::Harness::sqlite().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(h) = super::Harness::postgres().await else { return };
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

conformance!(
    ping_answers,
    migrate_twice_is_a_no_op,
    write_batch_stores_and_counts_redeliveries_as_duplicates,
    large_batches_store_each_new_login_once_and_never_restore_an_erased_original,
    quarantine_counts_and_dedups,
    key_usage_accumulates,
    retired_keys_fence_the_batch,
    failed_batch_writes_nothing_and_names_no_value,
    keys_round_trip_and_the_current_token_key_is_the_newest_active,
    token_version_race_has_one_winner,
    reveal_finds_rows_by_each_selector_and_audits_each_call,
    reveal_returns_logins_without_a_vault_row,
    audit_log_is_append_only,
    a_reveal_request_is_fetched_once,
    a_reveals_keys_are_named_without_fetching_it,
    a_reveal_of_a_token_shared_by_thousands_streams_every_row_once,
    keys_only_go_under_an_allowed_kek,
    a_job_of_a_kind_runs_once_at_a_time,
    retention_erases_originals_before_a_day_and_keeps_logins,
    a_search_is_recorded_limited_and_alarmed,
);

// ---------------------------------------------------------------- builders

const KEK: &str = "local:test";

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 3, d).unwrap()
}

fn key(id: &str, purpose: KeyPurpose, version: i64, state: KeyState, created: i64) -> StoredKey {
    StoredKey {
        id: id.into(),
        purpose,
        version,
        wrapped: WrappedKey {
            kek_id: KEK.into(),
            blob: random_bytes(60),
        },
        state,
        created_at: at(created),
        usage_count: 0,
    }
}

fn data_key(id: &str) -> StoredKey {
    key(id, KeyPurpose::Vault, 0, KeyState::Active, 0)
}

/// A login and its vault row, sealed (notionally) under `key_id`.
fn login(
    message_id: &str,
    user_id: &str,
    ip: &str,
    device: &str,
    d: u32,
    key_id: &str,
) -> (LoginRow, VaultRow) {
    (
        LoginRow {
            message_id: message_id.into(),
            user_id: user_id.into(),
            device_type: "android".into(),
            masked_ip: ip.into(),
            masked_device_id: device.into(),
            masked_ip_net: None,
            locale: if d.is_multiple_of(2) {
                Some("RU".into())
            } else {
                None
            },
            app_version: "2.3.0".into(),
            create_date: Some(day(d)),
            line: None,
        },
        VaultRow {
            message_id: message_id.into(),
            user_id: user_id.into(),
            key_id: key_id.into(),
            nonce: random_bytes(12),
            ciphertext: random_bytes(48),
        },
    )
}

fn quarantined(message_id: &str, user_id: Option<&str>, key_id: &str) -> QuarantineRow {
    QuarantineRow {
        message_id: message_id.into(),
        reason_code: "invalid_ip".into(),
        reason: "ip: not an IP address".into(),
        user_id: user_id.map(Into::into),
        key_id: key_id.into(),
        nonce: random_bytes(12),
        ciphertext: random_bytes(80),
        received_at: at(5),
        source: None,
        line: None,
    }
}

fn outcome(stored: u64, duplicates: u64, rejected: u64) -> BatchOutcome {
    BatchOutcome {
        stored,
        duplicates,
        rejected,
    }
}

/// Both steps of a reveal, as `pii-vault reveal` takes them.
async fn reveal(
    store: &dyn Store,
    sel: &Selector,
    claimed_actor: &str,
    reason: &str,
) -> Vec<(LoginRow, Option<VaultRow>)> {
    let req = store
        .reveal_request(sel, claimed_actor, reason)
        .await
        .unwrap();
    let rows = store
        .reveal_fetch(req.id)
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap();
    assert_eq!(req.row_count, rows.len() as i64);
    rows
}

/// Key fields as stored; the time is the database's own, not the caller's.
fn assert_same_key(got: &StoredKey, want: &StoredKey) {
    assert_eq!(got.id, want.id);
    assert_eq!(got.purpose, want.purpose);
    assert_eq!(got.version, want.version);
    if want.state == KeyState::Destroyed {
        assert!(
            got.wrapped.blob.is_empty(),
            "a destroyed key keeps no wrapped form"
        );
    } else {
        assert_eq!(got.wrapped, want.wrapped);
    }
    assert_eq!(got.state, want.state);
    assert!(
        (Utc::now() - got.created_at).num_seconds().abs() < 60,
        "{}",
        got.created_at
    );
    assert_eq!(got.usage_count, want.usage_count);
}

async fn reveal_user(h: &Harness, user: &str) -> Vec<(LoginRow, Option<VaultRow>)> {
    reveal(
        &*h.store,
        &Selector::UserId(user.into()),
        "analyst@test",
        "test",
    )
    .await
}

/// The keys most checks write under: data key `k1` and token key v1.
async fn seed_keys(h: &Harness) {
    h.insert_key(&data_key("k1")).await;
    h.insert_key(&key("tok-1", KeyPurpose::Token, 1, KeyState::Active, 0))
        .await;
}

// ------------------------------------------------------------------ checks

async fn ping_answers(h: &Harness) {
    h.store.ping().await.unwrap();
}

async fn migrate_twice_is_a_no_op(h: &Harness) {
    seed_keys(h).await;
    h.store.migrate().await.unwrap();
    // A second process (another replica starting) migrates the same database.
    let other = pii_vault::store::connect(&h.url).await.unwrap();
    other.migrate().await.unwrap();
    other.ping().await.unwrap();
    let keys = other.list_keys().await.unwrap();
    assert_eq!(keys.len(), 2, "migrating again must keep the data");
}

async fn write_batch_stores_and_counts_redeliveries_as_duplicates(h: &Harness) {
    seed_keys(h).await;
    let first = Batch {
        logins: vec![
            login("m-1", "alice", "t1_ipA", "t1_devA", 3, "k1"),
            login("m-2", "alice", "t1_ipB", "t1_devA", 4, "k1"),
            login("m-3", "bob", "t1_ipC", "t1_devB", 5, "k1"),
        ],
        ..Batch::default()
    };
    assert_eq!(h.store.write_batch(&first).await.unwrap(), outcome(3, 0, 0));

    // The redelivery carries fresh nonces and ciphertexts (each protection
    // seals anew); the originals must stay. It keeps its date, as a
    // redelivered message does (SQS SentTimestamp, a file line's first
    // load): on Postgres the date picks the monthly partition.
    let again = Batch {
        logins: first
            .logins
            .iter()
            .map(|(l, v)| {
                let mut r = login(&l.message_id, &l.user_id, "x", "y", 9, &v.key_id);
                r.0.create_date = l.create_date;
                r
            })
            .collect(),
        ..Batch::default()
    };
    assert_eq!(h.store.write_batch(&again).await.unwrap(), outcome(0, 3, 0));

    // Old and new mixed, and a message delivered twice within one batch.
    let m4 = login("m-4", "bob", "t1_ipC", "t1_devB", 6, "k1");
    let mixed = Batch {
        logins: vec![
            first.logins[0].clone(),
            m4.clone(),
            first.logins[2].clone(),
            m4.clone(),
        ],
        ..Batch::default()
    };
    assert_eq!(h.store.write_batch(&mixed).await.unwrap(), outcome(1, 3, 0));

    assert_eq!(h.count("user_logins").await, 4);
    assert_eq!(h.count("vault").await, 4);
    let alice = reveal_user(h, "alice").await;
    let want: Vec<_> = first.logins[..2]
        .iter()
        .map(|(l, v)| (l.clone(), Some(v.clone())))
        .collect();
    assert_eq!(alice, want);
    let bob = reveal_user(h, "bob").await;
    assert_eq!(
        bob,
        vec![
            (first.logins[2].0.clone(), Some(first.logins[2].1.clone())),
            (m4.0, Some(m4.1))
        ]
    );

    // After redeliveries a new batch is stored whole, and so is the one
    // after it; a redelivery of that one again adds nothing. (Postgres
    // switches between its COPY lane and its ON CONFLICT lane here.)
    for (i, id) in ["m-5", "m-6", "m-7"].iter().enumerate() {
        let b = Batch {
            logins: vec![login(id, "carol", "t1_ipD", "t1_devD", 7, "k1")],
            ..Batch::default()
        };
        assert_eq!(
            h.store.write_batch(&b).await.unwrap(),
            outcome(1, 0, 0),
            "{id}"
        );
        assert_eq!(
            h.store.write_batch(&b).await.unwrap(),
            outcome(0, 1, 0),
            "{id} again"
        );
        assert_eq!(h.count("vault").await, 5 + i as i64);
    }
    assert_eq!(h.count("user_logins").await, 7);
}

/// A batch larger than a store writes in one go, of a size that is no round
/// number, mixing new logins, redelivered ones and one sent twice: each new
/// login is stored once with its own vault row, and a login whose original
/// was erased since (as `forget` does) comes back as a duplicate without it.
async fn large_batches_store_each_new_login_once_and_never_restore_an_erased_original(h: &Harness) {
    seed_keys(h).await;
    let rows: Vec<_> = (0..203)
        .map(|i| {
            login(
                &format!("m-{i:03}"),
                &format!("u-{}", i % 7),
                &format!("t1_ip{}", i % 11),
                &format!("t1_dev{}", i % 13),
                3,
                "k1",
            )
        })
        .collect();
    let first = Batch {
        logins: rows[..120].to_vec(),
        ..Batch::default()
    };
    assert_eq!(
        h.store.write_batch(&first).await.unwrap(),
        outcome(120, 0, 0)
    );
    h.exec("DELETE FROM vault WHERE message_id < 'm-010'")
        .await
        .unwrap();

    let mut again = rows.clone();
    again.insert(130, rows[150].clone());
    let second = Batch {
        logins: again,
        ..Batch::default()
    };
    assert_eq!(
        h.store.write_batch(&second).await.unwrap(),
        outcome(83, 121, 0)
    );
    assert_eq!(h.count("user_logins").await, 203);
    assert_eq!(h.count("vault").await, 193);

    let mut stored = Vec::new();
    for u in 0..7 {
        stored.extend(reveal_user(h, &format!("u-{u}")).await);
    }
    stored.sort_by(|a, b| a.0.message_id.cmp(&b.0.message_id));
    let want: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, (l, v))| (l.clone(), (i >= 10).then(|| v.clone())))
        .collect();
    assert_eq!(stored, want);
}

async fn quarantine_counts_and_dedups(h: &Harness) {
    seed_keys(h).await;
    let batch = Batch {
        logins: vec![login("m-1", "alice", "t1_ipA", "t1_devA", 3, "k1")],
        quarantined: vec![
            quarantined("q-1", Some("alice"), "k1"),
            quarantined("q-2", None, "k1"),
        ],
        ..Batch::default()
    };
    assert_eq!(h.store.write_batch(&batch).await.unwrap(), outcome(1, 0, 2));
    assert_eq!(h.store.write_batch(&batch).await.unwrap(), outcome(0, 3, 0));

    let repeat_inside = Batch {
        quarantined: vec![
            quarantined("q-3", None, "k1"),
            quarantined("q-3", None, "k1"),
            quarantined("q-1", None, "k1"),
        ],
        ..Batch::default()
    };
    assert_eq!(
        h.store.write_batch(&repeat_inside).await.unwrap(),
        outcome(0, 2, 1)
    );
    assert_eq!(h.count("quarantine").await, 3);
    assert_eq!(
        h.count("user_logins").await,
        1,
        "a rejected message never reaches user_logins"
    );
}

async fn key_usage_accumulates(h: &Harness) {
    seed_keys(h).await;
    h.insert_key(&data_key("k2")).await;
    // What the pipeline sends: the rows sealed under each key, and their
    // count (on Postgres the database counts them itself).
    let first = Batch {
        logins: vec![
            login("m-1", "alice", "t1_ipA", "t1_devA", 3, "k1"),
            login("m-2", "alice", "t1_ipA", "t1_devA", 3, "k1"),
        ],
        quarantined: vec![quarantined("q-1", None, "k1")],
        key_usage: vec![("k1".into(), 3)],
        ..Batch::default()
    };
    h.store.write_batch(&first).await.unwrap();
    let second = Batch {
        logins: vec![
            login("m-3", "bob", "t1_ipB", "t1_devB", 4, "k1"),
            login("m-4", "bob", "t1_ipB", "t1_devB", 4, "k2"),
        ],
        quarantined: vec![quarantined("q-2", None, "k2")],
        key_usage: vec![("k1".into(), 1), ("k2".into(), 2)],
        ..Batch::default()
    };
    h.store.write_batch(&second).await.unwrap();
    assert_eq!(h.store.get_key("k1").await.unwrap().unwrap().usage_count, 4);
    assert_eq!(h.store.get_key("k2").await.unwrap().unwrap().usage_count, 2);
}

async fn retired_keys_fence_the_batch(h: &Harness) {
    h.insert_key(&data_key("k1")).await;
    h.insert_key(&key("k-old", KeyPurpose::Vault, 0, KeyState::Retired, 1))
        .await;
    // Tokens carry their key's version; the batch names the key it used.
    h.insert_key(&key("tok-1", KeyPurpose::Token, 1, KeyState::Retired, 2))
        .await;
    h.insert_key(&key("tok-2", KeyPurpose::Token, 2, KeyState::Active, 3))
        .await;

    let under = |data: &str, version: u32| Batch {
        logins: vec![login(
            "m-1",
            "alice",
            &format!("t{version}_ipA"),
            &format!("t{version}_devA"),
            3,
            data,
        )],
        key_usage: vec![(data.to_string(), 1)],
        token_key_id: format!("tok-{version}"),
        ..Batch::default()
    };
    match h.store.write_batch(&under("k-old", 2)).await {
        Err(StoreError::KeyRetired(k)) => assert_eq!(k, "k-old"),
        other => panic!("a retired data key must fence the batch, got {other:?}"),
    }
    match h.store.write_batch(&under("k1", 1)).await {
        Err(StoreError::KeyRetired(k)) => assert_eq!(k, "tok-1"),
        other => panic!("a retired token key must fence the batch, got {other:?}"),
    }
    assert_eq!(h.count("user_logins").await, 0);
    assert_eq!(
        h.store.get_key("k1").await.unwrap().unwrap().usage_count,
        0,
        "a fenced batch counts no usage"
    );

    assert_eq!(
        h.store.write_batch(&under("k1", 2)).await.unwrap(),
        outcome(1, 0, 0)
    );
    assert_eq!(h.store.get_key("k1").await.unwrap().unwrap().usage_count, 1);
}

async fn failed_batch_writes_nothing_and_names_no_value(h: &Harness) {
    seed_keys(h).await;
    // The second vault row names a key that does not exist: the statement
    // fails (SQLite: its foreign key; Postgres: the data-key fence) after
    // the first row and the logins were written.
    let batch = Batch {
        logins: vec![
            login("m-ok", "alice", "t1_ipAAAA", "t1_devAAAA", 3, "k1"),
            login(
                "m-bad",
                "bob-7f3a",
                "t1_ipBBBB",
                "t1_devBBBB",
                4,
                "missing-key-9c1d",
            ),
        ],
        quarantined: vec![quarantined("q-1", None, "k1")],
        key_usage: vec![("k1".into(), 1)],
        ..Batch::default()
    };
    let err = h
        .store
        .write_batch(&batch)
        .await
        .expect_err("a vault row under an unknown key must fail");
    assert!(
        !err.is_transient(),
        "a constraint violation is not worth a retry: {err}"
    );
    let text = format!("{err} {err:?}");
    // Row values only: a key id is not one (the fence names the key it
    // refused, so that an operator can find it).
    for value in ["m-bad", "bob-7f3a", "t1_ipBBBB", "t1_devBBBB"] {
        assert!(
            !text.contains(value),
            "error text quotes a row value: {text}"
        );
    }
    assert_eq!(h.count("user_logins").await, 0);
    assert_eq!(h.count("vault").await, 0);
    assert_eq!(h.count("quarantine").await, 0);
    assert_eq!(h.store.get_key("k1").await.unwrap().unwrap().usage_count, 0);
}

async fn keys_round_trip_and_the_current_token_key_is_the_newest_active(h: &Harness) {
    assert!(h.store.current_token_key().await.unwrap().is_none());
    assert!(h.store.list_keys().await.unwrap().is_empty());

    // The database sets creation times, so keys are listed in the order
    // they were stored (token versions only go up).
    let keys = [
        key("tok-1", KeyPurpose::Token, 1, KeyState::Active, 10),
        key("tok-2", KeyPurpose::Token, 2, KeyState::Active, 20),
        key("dek-a", KeyPurpose::Vault, 0, KeyState::Active, 30),
        key("dek-b", KeyPurpose::Vault, 0, KeyState::Active, 30),
        key("tok-3", KeyPurpose::Token, 3, KeyState::Retired, 40),
        key("line", KeyPurpose::LineIds, 0, KeyState::Active, 50),
        key("dek-x", KeyPurpose::Vault, 0, KeyState::Destroyed, 60),
    ];
    for k in &keys {
        assert!(h.insert_key(k).await, "{} should be new", k.id);
    }
    assert!(
        !h.insert_key(&keys[3]).await,
        "the same id twice must not insert"
    );

    for k in &keys {
        assert_same_key(&h.store.get_key(&k.id).await.unwrap().unwrap(), k);
    }
    assert!(h.store.get_key("nope").await.unwrap().is_none());

    let current = h.store.current_token_key().await.unwrap().unwrap();
    assert_same_key(&current, &keys[1]);

    let mut listed: Vec<String> = h
        .store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["dek-a", "dek-b", "dek-x", "line", "tok-1", "tok-2", "tok-3"]
    );
}

async fn token_version_race_has_one_winner(h: &Harness) {
    assert!(
        h.insert_key(&key("tok-a", KeyPurpose::Token, 1, KeyState::Active, 1))
            .await
    );
    assert!(
        !h.insert_key(&key("tok-b", KeyPurpose::Token, 1, KeyState::Active, 2))
            .await
    );
    assert!(h.store.get_key("tok-b").await.unwrap().is_none());

    // Set-ups racing each other all try to store version 2: the unique
    // index on token versions lets exactly one of them win.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let owner = h.owner_pool();
            tokio::spawn(async move {
                owner
                    .as_owner()
                    .insert_key(&key(
                        &format!("tok-v2-{i}"),
                        KeyPurpose::Token,
                        2,
                        KeyState::Active,
                        3,
                    ))
                    .await
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
    let v2 = h
        .store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.version == 2)
        .count();
    assert_eq!(v2, 1);
    assert_eq!(
        h.store.current_token_key().await.unwrap().unwrap().version,
        2
    );

    // The uniqueness is for token versions only: data keys all carry 0.
    assert!(h.insert_key(&data_key("dek-1")).await);
    assert!(h.insert_key(&data_key("dek-2")).await);

    // What the product does: `migrate` / `keys init`, twice at once, store
    // one token key between them and say so once.
    let fresh = |id: &str, purpose, version| StoredKey {
        id: format!("{id}-{}", uuid::Uuid::new_v4()),
        ..key("x", purpose, version, KeyState::Active, 0)
    };
    let (a, b) = (
        fresh("ids", KeyPurpose::LineIds, 0),
        fresh("ids", KeyPurpose::LineIds, 0),
    );
    let (first, second) = tokio::join!(
        h.store.init_keys(KEK, None, Some(&a), "me"),
        h.store.init_keys(KEK, None, Some(&b), "me")
    );
    let made = [first, second]
        .into_iter()
        .filter_map(|r| match r {
            Ok(done) => Some(done.line_id_key),
            // Postgres: the loser of the race may see the winner's row
            // only once it commits, as a serialization failure.
            Err(e) if e.is_transient() => None,
            Err(e) => panic!("{e}"),
        })
        .filter(|made| *made)
        .count();
    assert_eq!(made, 1);
}

async fn reveal_finds_rows_by_each_selector_and_audits_each_call(h: &Harness) {
    seed_keys(h).await;
    // Message ids sort against the dates, so the order checked is by date.
    let a_late = login("m-a", "alice", "t1_ipShared", "t1_devA", 9, "k1");
    let a_early = login("m-b", "alice", "t1_ipA", "t1_devA", 2, "k1");
    let b = login("m-c", "bob", "t1_ipShared", "t1_devB", 5, "k1");
    let batch = Batch {
        logins: vec![a_late.clone(), a_early.clone(), b.clone()],
        ..Batch::default()
    };
    h.store.write_batch(&batch).await.unwrap();
    let with_vault = |r: &(LoginRow, VaultRow)| (r.0.clone(), Some(r.1.clone()));

    let cases = [
        (
            Selector::UserId("alice".into()),
            vec![with_vault(&a_early), with_vault(&a_late)],
        ),
        (
            Selector::MaskedIp("t1_ipShared".into()),
            vec![with_vault(&b), with_vault(&a_late)],
        ),
        (
            Selector::MaskedDeviceId("t1_devB".into()),
            vec![with_vault(&b)],
        ),
        (Selector::UserId("nobody".into()), vec![]),
    ];
    for (n, (selector, want)) in cases.iter().enumerate() {
        let before = Utc::now() - chrono::Duration::seconds(60);
        let claimed = format!("analyst-{n}");
        let reason = format!("ticket #{n}");
        let got = reveal(&*h.store, selector, &claimed, &reason).await;
        assert_eq!(&got, want, "reveal {selector}");

        let trail = h
            .store
            .audit_trail(&pii_vault::store::AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            trail.len(),
            n + 1,
            "each reveal writes exactly one audit row"
        );
        let last = &trail[0];
        assert_eq!(
            (
                last.claimed_actor.as_deref(),
                last.action.as_str(),
                last.target.as_str(),
                last.reason.as_str()
            ),
            (
                Some(claimed.as_str()),
                "reveal",
                selector.to_string().as_str(),
                reason.as_str()
            )
        );
        // Who, by the database's account: never what the client claimed.
        assert!(!last.actor.is_empty() && last.actor != claimed);
        assert_eq!(last.row_count, want.len() as i64);
        assert!(last.at > before && last.at < Utc::now() + chrono::Duration::seconds(60));
    }
    let trail = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 2, "the limit applies");
    assert!(trail[0].id > trail[1].id, "newest first");
}

async fn reveal_returns_logins_without_a_vault_row(h: &Harness) {
    seed_keys(h).await;
    // Rows whose originals were erased (or that never had any) have no
    // vault row; they are still shown, with nothing to decrypt, and an
    // unknown date stays unknown (not 1970-01-01).
    h.exec(
        "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale, \
         app_version, create_date) VALUES ('old-1', 'carol', 'ios', 't1_ab', 't1_cd', NULL, '1.0', '2020-01-02'), \
         ('old-2', 'carol', 'ios', 't1_ab', 't1_cd', NULL, '1.0', NULL)",
    )
    .await
    .unwrap();
    let got = reveal_user(h, "carol").await;
    assert_eq!(got.len(), 2);
    let by_id = |id: &str| got.iter().find(|(l, _)| l.message_id == id).unwrap();
    assert_eq!(
        by_id("old-1").0.create_date,
        NaiveDate::from_ymd_opt(2020, 1, 2)
    );
    assert_eq!(by_id("old-2").0.create_date, None);
    assert!(got.iter().all(|(_, v)| v.is_none()));
}

async fn a_reveal_request_is_fetched_once(h: &Harness) {
    seed_keys(h).await;
    let batch = Batch {
        logins: vec![login("m-1", "alice", "t1_ipA", "t1_devA", 3, "k1")],
        ..Batch::default()
    };
    h.store.write_batch(&batch).await.unwrap();
    let sel = Selector::UserId("alice".into());
    let req = h.store.reveal_request(&sel, "me", "INC-1").await.unwrap();
    assert_eq!(req.row_count, 1);
    let rows = h.store.reveal_fetch(req.id).await.unwrap();
    assert_eq!(rows.collect_all().await.unwrap().len(), 1);
    match h.store.reveal_fetch(req.id).await {
        Err(StoreError::Refused(m)) => assert!(m.contains("already fetched"), "{m}"),
        other => panic!("a second fetch must be refused, got {other:?}"),
    }
    assert!(matches!(
        h.store.reveal_fetch(req.id + 1000).await,
        Err(StoreError::Refused(_))
    ));
}

/// The data keys of a request's rows, named before its fetch (a reveal
/// unwraps them first): asking leaves the request unfetched; once fetched,
/// refused like a second fetch.
async fn a_reveals_keys_are_named_without_fetching_it(h: &Harness) {
    seed_keys(h).await;
    h.insert_key(&data_key("k2")).await;
    let batch = Batch {
        logins: vec![
            login("m-1", "alice", "t1_ipA", "t1_devA", 3, "k1"),
            login("m-2", "alice", "t1_ipB", "t1_devB", 4, "k2"),
            login("m-3", "alice", "t1_ipC", "t1_devC", 5, "k2"),
            login("m-4", "bob", "t1_ipD", "t1_devD", 5, "k2"),
        ],
        ..Batch::default()
    };
    h.store.write_batch(&batch).await.unwrap();
    let sel = Selector::UserId("alice".into());
    let req = h.store.reveal_request(&sel, "me", "INC-1").await.unwrap();
    for _ in 0..2 {
        let mut keys = h.store.reveal_keys(req.id).await.unwrap();
        keys.sort();
        assert_eq!(keys, ["k1", "k2"]);
    }
    let rows = h.store.reveal_fetch(req.id).await.unwrap();
    assert_eq!(rows.collect_all().await.unwrap().len(), 3);
    match h.store.reveal_keys(req.id).await {
        Err(StoreError::Refused(m)) => assert!(m.contains("already fetched"), "{m}"),
        other => panic!("the keys of a fetched request must be refused, got {other:?}"),
    }
    assert!(matches!(
        h.store.reveal_keys(req.id + 1000).await,
        Err(StoreError::Refused(_))
    ));
}

/// A token shared by thousands of logins comes back as a stream: every
/// login once, with its own vault row, in date order, as many as the audit
/// row counted; rows of other tokens stay out.
async fn a_reveal_of_a_token_shared_by_thousands_streams_every_row_once(h: &Harness) {
    use futures::StreamExt;
    seed_keys(h).await;
    const SHARED: usize = 3000;
    let crowd: Vec<(LoginRow, VaultRow)> = (0..SHARED)
        .map(|i| {
            login(
                &format!("m-{i:05}"),
                &format!("user-{}", i % 5),
                "t1_ipCrowd",
                &format!("t1_dev{i}"),
                (i % 28 + 1) as u32,
                "k1",
            )
        })
        .collect();
    let others: Vec<(LoginRow, VaultRow)> = (0..50)
        .map(|i| login(&format!("o-{i}"), "user-1", "t1_ipElse", "t1_devX", 4, "k1"))
        .collect();
    for chunk in crowd.chunks(700).chain([others.as_slice()]) {
        let batch = Batch {
            logins: chunk.to_vec(),
            ..Batch::default()
        };
        h.store.write_batch(&batch).await.unwrap();
    }

    let sel = Selector::MaskedIp("t1_ipCrowd".into());
    let req = h
        .store
        .reveal_request(&sel, "me", "INC-crowd")
        .await
        .unwrap();
    assert_eq!(req.row_count, SHARED as i64);
    let mut want: std::collections::HashMap<&str, &VaultRow> = crowd
        .iter()
        .map(|(l, v)| (l.message_id.as_str(), v))
        .collect();
    let mut rows = h.store.reveal_fetch(req.id).await.unwrap();
    let mut last_date = None;
    let mut n = 0;
    while let Some(row) = rows.next().await {
        let (login, vault) = row.unwrap();
        assert_eq!(login.masked_ip, "t1_ipCrowd");
        let expected = want
            .remove(login.message_id.as_str())
            .unwrap_or_else(|| panic!("{} came back twice or is not shared", login.message_id));
        assert_eq!(vault.as_ref(), Some(expected));
        assert!(last_date <= login.create_date, "rows come in date order");
        last_date = login.create_date;
        n += 1;
    }
    assert_eq!(n, SHARED);
    assert!(want.is_empty());
    drop(rows);
    let again = h.store.reveal_fetch(req.id).await;
    assert!(
        matches!(&again, Err(StoreError::Refused(_))),
        "a streamed request is fetched once: {again:?}"
    );
}

async fn keys_only_go_under_an_allowed_kek(h: &Harness) {
    let mut k = data_key("k-evil");
    k.wrapped.kek_id = "arn:aws:kms:us-east-1:666:key/evil".into();
    let token = StoredKey {
        id: format!("tok-{}", uuid::Uuid::new_v4()),
        ..key("x", KeyPurpose::Token, 1, KeyState::Active, 0)
    };
    // The set-up itself puts its KEK on the list, and records it; a key
    // under any other KEK is refused.
    assert!(matches!(
        h.store
            .init_keys(&k.wrapped.kek_id, Some(&token), None, "me")
            .await,
        Ok(done) if done.kek_added && done.token_key
    ));
    let mut other = data_key("k-other");
    other.wrapped.kek_id = "arn:aws:kms:us-east-1:666:key/other".into();
    assert!(matches!(
        h.store
            .register_data_key("dek-00000000-0000-0000-0000-000000000002", &other.wrapped)
            .await,
        Err(StoreError::KekNotAllowed(_))
    ));
    let trail: Vec<String> = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(trail, ["keys-init", "allow-kek"]);
    k.wrapped.kek_id = "arn:aws:kms:us-east-1:666:key/evil2".into();
    assert!(matches!(
        h.store
            .register_data_key("dek-00000000-0000-0000-0000-000000000001", &k.wrapped)
            .await,
        Err(StoreError::KekNotAllowed(_))
    ));
    h.owner().allow_kek(&k.wrapped.kek_id).await;
    assert!(h.insert_key(&k).await);
    assert!(h
        .store
        .allowed_keks()
        .await
        .unwrap()
        .contains(&k.wrapped.kek_id));
}

async fn a_job_of_a_kind_runs_once_at_a_time(h: &Harness) {
    let who = Requester {
        claimed_actor: "rotator@test".into(),
        reason: "test".into(),
    };
    let job = h
        .store
        .begin_job(JobKind::DataKeys, "vault", &who, 0)
        .await
        .unwrap();
    assert!(matches!(
        h.store.begin_job(JobKind::DataKeys, "vault", &who, 0).await,
        Err(StoreError::Busy(_))
    ));
    let other = h
        .store
        .begin_job(JobKind::TokenKey, "vault", &who, 0)
        .await
        .unwrap();
    job.finish().await;
    other.finish().await;
    h.store
        .begin_job(JobKind::DataKeys, "vault", &who, 0)
        .await
        .unwrap()
        .finish()
        .await;
    let trail = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 3, "a refused job leaves no record");
}

/// Asserts that a statement was refused by the audit trail's append-only
/// rule (PV009): the SQLSTATE on Postgres, the trigger's message on SQLite.
fn assert_append_only(result: Result<u64, sqlx::Error>, what: &str) {
    match result {
        Err(sqlx::Error::Database(db)) => assert!(
            db.code().as_deref() == Some("PV009") || db.message().starts_with("PV009 "),
            "{what}: refused, but not by the append-only rule: {:?} {}",
            db.code(),
            db.message()
        ),
        other => panic!("{what}: {other:?}, not the append-only refusal (PV009)"),
    }
}

async fn audit_log_is_append_only(h: &Harness) {
    reveal_user(h, "alice").await;
    let before = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(before.len(), 1);

    assert_append_only(
        h.exec("UPDATE audit_log SET reason = 'nothing to see'")
            .await,
        "UPDATE",
    );
    assert_append_only(h.exec("DELETE FROM audit_log").await, "DELETE");

    let after = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].reason, before[0].reason);
    assert_eq!(after[0].id, before[0].id);
}

/// A token of the shape pii-vault makes, `t<version>_` and 43 characters.
fn whole_token(version: u32, c: char) -> String {
    format!("t{version}_{}", c.to_string().repeat(43))
}

/// A search: an audit row holding the tokens and the reason; refused with
/// nothing recorded over the daily limit (200 by default) and for anything
/// that is not a token; a honeytoken's token raises the alarm.
async fn a_search_is_recorded_limited_and_alarmed(h: &Harness) {
    seed_keys(h).await;
    let (trap_ip, real_ip) = (whole_token(1, 'T'), whole_token(1, 'R'));
    let batch = Batch {
        logins: vec![
            login("m-a", "alice", &real_ip, "t1_devA", 2, "k1"),
            login("m-t", "trap", &trap_ip, "t1_devT", 3, "k1"),
        ],
        ..Batch::default()
    };
    h.store.write_batch(&batch).await.unwrap();
    h.owner().add_honeytokens(&["trap"]).await;
    assert_eq!(h.store.policy().await.unwrap().max_searches_per_day, 200);

    let tokens = vec![whole_token(2, 'N'), real_ip.clone()];
    let id = h
        .store
        .search_record(SearchKind::Ip, &tokens, "analyst@test", "FRAUD-1")
        .await
        .unwrap();
    let trail = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let e = trail.iter().find(|e| e.id == id).expect("its audit row");
    assert_eq!(e.action, "search");
    assert_eq!(e.target, format!("masked_ip={}", tokens.join(",")));
    assert_eq!((e.reason.as_str(), e.row_count), ("FRAUD-1", 0));
    let no_alarm = pii_vault::store::AuditFilter {
        limit: 10,
        ..Default::default()
    };
    assert!(h.store.alarms(&no_alarm).await.unwrap().is_empty());

    // Anything that is not a whole token is refused, nothing recorded.
    for bad in ["198.51.100.23", "593-47-5928", "t1_short"] {
        let err = h
            .store
            .search_record(SearchKind::DeviceId, &[bad.to_string()], "a", "why")
            .await
            .expect_err("a raw value");
        assert!(!err.to_string().contains(bad), "{err}");
    }
    assert_eq!(h.count("searches").await, 1);

    // A honeytoken's token: recorded as any search, and an alarm.
    let trapped = h
        .store
        .search_record(
            SearchKind::Ip,
            std::slice::from_ref(&trap_ip),
            "analyst@test",
            "FRAUD-2",
        )
        .await
        .unwrap();
    let alarms = h.store.alarms(&no_alarm).await.unwrap();
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].request_id, trapped);
    assert_eq!(alarms[0].target, format!("masked_ip={trap_ip}"));

    // The limit: two made, a limit of three allows one more.
    h.store
        .set_policy(&PolicyChange {
            max_searches_per_day: Some(3),
            ..PolicyChange::default()
        })
        .await
        .unwrap();
    h.store
        .search_record(SearchKind::DeviceId, &[whole_token(1, 'D')], "a", "why")
        .await
        .unwrap();
    let err = h
        .store
        .search_record(SearchKind::DeviceId, &[whole_token(1, 'D')], "a", "why")
        .await
        .expect_err("over the limit");
    assert!(
        matches!(&err, StoreError::OverLimit(m) if m.contains("daily limit of 3 searches")),
        "{err:?}"
    );
    assert_eq!(h.count("searches").await, 3);
}

// ---------------------------------------------------------- Postgres only

#[tokio::test]
async fn postgres_audit_log_cannot_be_truncated() {
    let Some(h) = Harness::postgres().await else {
        return;
    };
    reveal_user(&h, "alice").await;
    // Plain TRUNCATE is refused before any trigger runs, since other tables
    // refer to the trail (0A000); with CASCADE it gets past that check,
    // and the append-only trigger refuses it.
    match h.exec("TRUNCATE audit_log").await {
        Err(sqlx::Error::Database(db)) => assert_eq!(
            db.code().as_deref(),
            Some("0A000"),
            "TRUNCATE: {}",
            db.message()
        ),
        other => panic!("TRUNCATE: {other:?}"),
    }
    assert_append_only(
        h.exec("TRUNCATE audit_log CASCADE").await,
        "TRUNCATE CASCADE",
    );
    assert_eq!(h.count("audit_log").await, 1);
    h.finish().await;
}

/// The foreign keys from `vault` and `quarantine` are gone (the fences
/// refuse an unknown or inactive key, once per statement); what they also
/// did, keep a named key's row from being deleted, is a guard that holds
/// for the owner too: no key row is ever deleted or truncated.
#[tokio::test]
async fn postgres_key_rows_are_never_deleted_even_by_the_owner() {
    let Some(h) = Harness::postgres().await else {
        return;
    };
    seed_keys(&h).await;
    let before = h.count("vault_keys").await;
    assert!(before > 0);
    for sql in [
        "DELETE FROM vault_keys",
        "DELETE FROM vault_keys WHERE id = 'k1'",
        "TRUNCATE vault_keys",
        "TRUNCATE vault_keys CASCADE",
    ] {
        let err = h.exec(sql).await.expect_err(sql);
        let code = err
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("PV009"), "{sql}: {err}");
    }
    assert_eq!(h.count("vault_keys").await, before);
    // A vault row under a key that is not stored is refused by the fence,
    // with no foreign key behind it.
    let err = h
        .store
        .write_batch(&Batch {
            logins: vec![login("m-x", "alice", "t1_ipAAAA", "t1_devAAAA", 3, "nope")],
            key_usage: vec![("k1".into(), 1)],
            ..Batch::default()
        })
        .await
        .expect_err("an unknown data key");
    assert!(matches!(err, StoreError::UnknownKey(_)), "{err:?}");
    assert_eq!(h.count("vault").await, 0);
    h.finish().await;
}

#[tokio::test]
async fn postgres_unreachable_server_is_a_transient_error() {
    // Port 1 on loopback: nothing listens there (refused, or dropped and
    // then cut off by the connect timeout); needs no test cluster.
    match PgStore::connect("postgres://postgres@127.0.0.1:1/postgres").await {
        Err(e) => assert!(e.is_transient(), "{e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// The analysts' pre-existing table, as the legacy DDL made it.
const LEGACY_DDL: &str = "CREATE TABLE user_logins (
    user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
    masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)";

#[tokio::test]
async fn postgres_migration_converts_the_legacy_table_in_place() {
    let Some(admin) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let db = pg::FreshDb::create(&admin).await;
    let raw = PgPool::connect(&db.url).await.unwrap();
    sqlx::query(LEGACY_DDL).execute(&raw).await.unwrap();
    let legacy = [
        (
            "u-1",
            "android",
            "md5:1",
            "md5:a",
            Some("RU"),
            Some(230),
            "2019-05-01",
        ),
        (
            "u-1",
            "ios",
            "md5:2",
            "md5:a",
            None,
            Some(231),
            "2019-05-02",
        ),
        (
            "u-2",
            "android",
            "md5:3",
            "md5:b",
            Some("EN"),
            None,
            "2019-05-03",
        ),
    ];
    for (user, dev_type, ip, dev, locale, version, date) in legacy {
        sqlx::query(
            "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale, app_version, \
             create_date) VALUES ($1, $2, $3, $4, $5, $6, $7::date)",
        )
        .bind(user)
        .bind(dev_type)
        .bind(ip)
        .bind(dev)
        .bind(locale)
        .bind(version)
        .bind(date)
        .execute(&raw)
        .await
        .unwrap();
    }

    let store = PgStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();

    let ty: String = sqlx::query_scalar(
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'user_logins' AND column_name = 'app_version'",
    )
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(ty, "text");

    type Kept = (
        i64,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        NaiveDate,
    );
    let rows: Vec<Kept> = sqlx::query_as(
        "SELECT id, message_id, user_id, masked_ip, locale, app_version, create_date FROM user_logins ORDER BY masked_ip",
    )
    .fetch_all(&raw)
    .await
    .unwrap();
    assert_eq!(rows.len(), legacy.len(), "every legacy row is kept");
    for (row, want) in rows.iter().zip(&legacy) {
        assert_eq!(row.2, want.0);
        assert_eq!(row.3, want.2);
        assert_eq!(row.4.as_deref(), want.4);
        assert_eq!(row.5, want.5.map(|v: i32| v.to_string()));
        assert_eq!(row.6.to_string(), want.6);
        assert_eq!(row.1, format!("legacy-{}", row.0));
    }
    assert_eq!(rows[0].5.as_deref(), Some("230"));

    // The converted table takes new writes, ids continue after the legacy
    // rows, and the legacy rows can be revealed (with nothing to decrypt).
    let owner = Owner::Pg(store.pool());
    owner.allow_kek(KEK).await;
    owner.insert_key(&data_key("k1")).await;
    owner
        .insert_key(&key("tok-1", KeyPurpose::Token, 1, KeyState::Active, 0))
        .await;
    let new = login("m-new", "u-1", "t1_ipA", "t1_devA", 3, "k1");
    let batch = Batch {
        logins: vec![new.clone()],
        ..Batch::default()
    };
    assert_eq!(store.write_batch(&batch).await.unwrap(), outcome(1, 0, 0));
    assert_eq!(store.write_batch(&batch).await.unwrap(), outcome(0, 1, 0));
    let got = reveal(&store, &Selector::UserId("u-1".into()), "me", "legacy").await;
    assert_eq!(got.len(), 3);
    assert!(got[..2]
        .iter()
        .all(|(l, v)| l.message_id.starts_with("legacy-") && v.is_none()));
    assert_eq!(got[2], (new.0, Some(new.1)));
    let max_legacy = rows.iter().map(|r| r.0).max().unwrap();
    let new_id: i64 = sqlx::query_scalar("SELECT id FROM user_logins WHERE message_id = 'm-new'")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert!(new_id > max_legacy);

    raw.close().await;
    store.pool().close().await;
    db.drop_database().await;
}

// ------------------------------------------------------------ SQLite only

/// `forget` leaves no copy of the erased ciphertexts in the SQLite files:
/// `secure_delete` zeroes freed space, and the write-ahead log (which keeps
/// the page images from before the delete) is checkpointed and truncated.
/// Bob's ciphertext, still wanted, is found: the scan can see ciphertexts.
#[tokio::test]
async fn sqlite_forget_leaves_no_copy_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("store.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let owner = Owner::Sqlite(store.pool());
    owner.allow_kek(KEK).await;
    owner.insert_key(&data_key("k1")).await;
    owner
        .insert_key(&key("tok-1", KeyPurpose::Token, 1, KeyState::Active, 0))
        .await;
    let alice: Vec<_> = (0..20)
        .map(|i| login(&format!("m-a{i}"), "alice", "t1_ipA", "t1_devA", 3, "k1"))
        .collect();
    let bob = login("m-b", "bob", "t1_ipB", "t1_devB", 3, "k1");
    let mut logins = alice.clone();
    logins.push(bob.clone());
    let batch = Batch {
        logins,
        key_usage: vec![("k1".into(), 21)],
        ..Batch::default()
    };
    store.write_batch(&batch).await.unwrap();
    let before = common::files_bytes(dir.path(), "store.db");
    assert!(
        before
            .windows(alice[0].1.ciphertext.len())
            .any(|w| w == alice[0].1.ciphertext.as_slice()),
        "the scan must see a stored ciphertext"
    );

    let audit = Requester {
        claimed_actor: "dpo@test".into(),
        reason: "erasure request".into(),
    };
    assert_eq!(store.forget("alice", &audit).await.unwrap().vault_rows, 20);
    let after = common::files_bytes(dir.path(), "store.db");
    for (_, v) in &alice {
        assert!(
            !after
                .windows(v.ciphertext.len())
                .any(|w| w == v.ciphertext.as_slice()),
            "an erased ciphertext is still in the SQLite files"
        );
    }
    assert!(after
        .windows(bob.1.ciphertext.len())
        .any(|w| w == bob.1.ciphertext.as_slice()));
    store.pool().close().await;
}

/// `forget --before`: every original of a login before the day goes, with
/// one audit row that counts them; the masked logins stay. Honeytokens go
/// like everyone (keeping theirs would single them out to a rotator, as the
/// only originals left before the day); their user ids, and so the alarm,
/// stay. Retired data keys left with nothing to open are destroyed.
async fn retention_erases_originals_before_a_day_and_keeps_logins(h: &Harness) {
    seed_keys(h).await;
    h.insert_key(&key("k-old", KeyPurpose::Vault, 0, KeyState::Active, 0))
        .await;
    h.owner().add_honeytokens(&["honey"]).await;
    let batch = Batch {
        logins: vec![
            login("m-1", "alice", "t1_ipA", "t1_devA", 1, "k-old"),
            login("m-2", "bob", "t1_ipB", "t1_devB", 2, "k1"),
            login("m-3", "honey", "t1_ipC", "t1_devC", 1, "k1"),
            login("m-4", "alice", "t1_ipA", "t1_devA", 20, "k1"),
        ],
        // Received in 2023, before the day.
        quarantined: vec![quarantined("q-1", Some("alice"), "k1")],
        ..Batch::default()
    };
    assert_eq!(h.store.write_batch(&batch).await.unwrap(), outcome(4, 0, 1));
    h.owner().set_key_state("k-old", KeyState::Retired).await;

    assert_eq!(h.store.count_older_than(day(3)).await.unwrap(), (3, 1));
    assert_eq!(h.store.count_older_than(day(1)).await.unwrap(), (0, 1));
    let audit = Requester {
        claimed_actor: "dpo@test".into(),
        reason: "retention: 12 months".into(),
    };
    let erased = h.store.retention(day(3), &audit).await.unwrap();
    assert_eq!(
        erased,
        Retained {
            vault_rows: 3,
            quarantined: 1,
            undated_kept: 0,
            keys_destroyed: vec!["k-old".into()],
            partitions_dropped: vec![],
            earlier_drops_finished: 0,
            drops_left: 0,
        }
    );
    assert_eq!(h.count("vault").await, 1);
    assert_eq!(h.count("quarantine").await, 0);
    assert_eq!(h.count("user_logins").await, 4);
    assert_eq!(h.store.count_older_than(day(3)).await.unwrap(), (0, 0));
    assert_eq!(
        h.store.get_key("k-old").await.unwrap().unwrap().state,
        KeyState::Destroyed
    );

    let trail = h
        .store
        .audit_trail(&pii_vault::store::AuditFilter {
            limit: 1,
            since: None,
            actor: None,
        })
        .await
        .unwrap();
    assert_eq!(trail[0].action, "retention");
    assert_eq!(trail[0].target, "before=2024-03-03 keys_destroyed=1");
    assert_eq!(trail[0].row_count, 4);
    assert_eq!(trail[0].claimed_actor.as_deref(), Some("dpo@test"));

    // alice's older login lost its originals, the later one kept them.
    let alice = reveal_user(h, "alice").await;
    let kept: Vec<_> = alice
        .iter()
        .map(|(l, v)| (l.message_id.as_str(), v.is_some()))
        .collect();
    assert_eq!(kept, [("m-1", false), ("m-4", true)]);
    // The honeytoken lost its originals too, and is still a trap.
    assert!(reveal_user(h, "honey").await[0].1.is_none());
    let alarms = h
        .store
        .alarms(&pii_vault::store::AuditFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(alarms.len(), 1);
}
