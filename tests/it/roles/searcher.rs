//! The searcher: records searches through `pii_vault_search_record` and
//! reads the wrapped token keys, nothing else; and the function itself,
//! refused to every other role, racing sessions and rolled-back calls.

use super::{denied, seed, ANALYST, AUDITOR, REVEALER, ROTATOR, SEARCHER, WORKER};
use crate::common::app::TestApp;

use sqlx::PgPool;

/// A token of the shape pii-vault makes.
fn token(c: char) -> String {
    format!("t1_{}", c.to_string().repeat(43))
}

fn call(
    tokens: &[String],
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
    sqlx::query_scalar("SELECT pii_vault_search_record('ip', $1, 'FRAUD-1', 'me')")
        .bind(tokens.to_vec())
}

/// The SQLSTATE of a statement that must fail.
async fn sqlstate(pool: &PgPool, sql: &str) -> String {
    match sqlx::query(sql).execute(pool).await {
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().to_string(),
        Err(e) => panic!("{sql}: {e}"),
        Ok(_) => panic!("{sql}: it ran"),
    }
}

/// With plain SQL, a searcher login reads no data, no token, no trail and
/// cannot reveal; it records a search and learns nothing back but the
/// record's id. Every other role is refused the search function.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_searcher_records_searches_and_reads_nothing_else() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    let searcher = app.store_as(SEARCHER).await;
    let raw = searcher.pool();

    for sql in [
        "SELECT * FROM vault",
        "SELECT * FROM user_logins",
        "SELECT masked_ip FROM user_logins",
        "SELECT * FROM quarantine",
        "SELECT * FROM audit_log",
        "SELECT * FROM reveal_requests",
        "SELECT * FROM searches",
        "SELECT * FROM honeytokens",
        "SELECT * FROM honeytoken_logins",
        "SELECT * FROM audit_alarms",
        "SELECT * FROM reveal_policy",
        "SELECT * FROM reveal_quota",
        "SELECT * FROM pii_vault_pending_requests",
        "SELECT pii_vault_reveal_request('user_id', 'alice', 'why', 'me')",
        "SELECT * FROM pii_vault_reveal_fetch(1)",
        "SELECT pii_vault_reveal_claim(1, 'me')",
        "SELECT pii_vault_approve(1, 'why', 'me')",
        "SELECT pii_vault_quarantine_show_request('m', 'why', 'me')",
        "SELECT * FROM pii_vault_quarantine_show_fetch(1)",
        "SELECT pii_vault_honeytokens_among(ARRAY['alice'])",
        "INSERT INTO searches (record, kind, tokens, requested_by, requested_at) VALUES (1, 'ip', '{}', 'x', now())",
        "INSERT INTO audit_log (actor, action, target, reason, row_count) VALUES ('a', 'search', 'x', 'y', 0)",
        "INSERT INTO reveal_quota (login, last_at) VALUES ('x', now())",
        "UPDATE vault_keys SET state = 'active'",
        "INSERT INTO kms_allowlist (kek_id) VALUES ('local:evil')",
        "CREATE TABLE stash (x text)",
    ] {
        denied(raw, sql).await;
    }
    // What it reads: the wrapped token keys and the allow-list.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE purpose = 'token'")
        .fetch_one(raw)
        .await
        .unwrap();
    assert_eq!(keys, 1);

    // A search records one audit row and hands back only its id.
    let id = call(&[token('A')]).fetch_one(raw).await.unwrap();
    let (action, target, actor): (String, String, String) =
        sqlx::query_as("SELECT action, target, actor FROM audit_log WHERE id = $1")
            .bind(id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(action, "search");
    assert_eq!(target, format!("masked_ip={}", token('A')));
    assert!(actor.ends_with("_searcher"), "{actor}");
    // Never an original: a raw IP or device id, or anything not a whole
    // token, is refused before anything is written (22023).
    for bad in [
        "198.51.100.23",
        "593-47-5928",
        "t1_short",
        "t1_x' OR '1'='1",
    ] {
        match call(&[bad.to_string()]).fetch_one(raw).await {
            Err(sqlx::Error::Database(db)) => {
                assert_eq!(db.code().as_deref(), Some("22023"), "{bad}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        sqlstate(
            raw,
            "SELECT pii_vault_search_record('user_id', ARRAY['t1_x'], 'why', 'me')"
        )
        .await,
        "22023"
    );
    assert_eq!(
        sqlstate(
            raw,
            &format!(
                "SELECT pii_vault_search_record('ip', ARRAY['{}'], ' ', 'me')",
                token('B')
            )
        )
        .await,
        "22023"
    );

    // Every other role: refused by Postgres (42501).
    for role in [WORKER, ANALYST, REVEALER, ROTATOR, AUDITOR] {
        let other = app.store_as(role).await;
        match call(&[token('C')]).fetch_one(other.pool()).await {
            Err(sqlx::Error::Database(db)) => {
                assert_eq!(db.code().as_deref(), Some("42501"), "{role}: {db}")
            }
            other => panic!("{role} searched: {other:?}"),
        }
    }
    assert_eq!(app.count("searches").await, 1);
    app.finish().await;
}

/// A search recorded in a transaction that rolls back leaves nothing, and
/// gave the searcher nothing it could use (the function computes no token
/// and returns only the record's id). Two sessions of one login racing at
/// the limit: the second waits for the first and is then refused (PV018),
/// so no more than the limit are ever recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_search_leaves_nothing_and_racing_sessions_cannot_pass_the_limit() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    seed(app.owner()).await;
    app.exec("UPDATE reveal_policy SET max_searches_per_day = 1")
        .await;
    let searcher = app.store_as(SEARCHER).await;
    let pool = searcher.pool();

    // Rolled back: no record, no count against the limit.
    let mut tx = pool.begin().await.unwrap();
    let id: i64 = call(&[token('A')]).fetch_one(&mut *tx).await.unwrap();
    assert!(id > 0);
    tx.rollback().await.unwrap();
    assert_eq!(app.count("searches").await, 0);
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'search'")
            .await,
        0
    );

    // Two sessions of one login at a limit of 1.
    let mut first = pool.begin().await.unwrap();
    call(&[token('B')]).fetch_one(&mut *first).await.unwrap();
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move { call(&[token('C')]).fetch_one(&pool).await })
    };
    // It waits on the login's quota row while the first is open.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second search did not wait for the first"
    );
    first.commit().await.unwrap();
    match second.await.unwrap() {
        Err(sqlx::Error::Database(db)) => assert_eq!(db.code().as_deref(), Some("PV018"), "{db}"),
        other => panic!("the second search passed the limit: {other:?}"),
    }
    assert_eq!(app.count("searches").await, 1);
    // Under REPEATABLE READ the second fails instead of counting from an
    // old snapshot.
    app.exec("UPDATE reveal_policy SET max_searches_per_day = 2")
        .await;
    let mut a = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *a)
        .await
        .unwrap();
    let mut b = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *b)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut *b).await.unwrap();
    call(&[token('D')]).fetch_one(&mut *a).await.unwrap();
    let racing = tokio::spawn(async move {
        let r = call(&[token('E')]).fetch_one(&mut *b).await;
        (r, b)
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    a.commit().await.unwrap();
    let (r, b) = racing.await.unwrap();
    match r {
        Err(sqlx::Error::Database(db)) => assert_eq!(db.code().as_deref(), Some("40001"), "{db}"),
        other => panic!("a second search from an old snapshot passed: {other:?}"),
    }
    b.rollback().await.unwrap();
    assert_eq!(app.count("searches").await, 2);
    app.finish().await;
}
