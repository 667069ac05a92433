//! Month ledgers (migration 0020): a month of the vault settled (its rows
//! counted by user once) keeps exact counts through late rows, forget, a
//! rotation's rewrite and the retention that cuts it; retention hands the
//! counts of the months it drops to its record; and a worker reaches the
//! ledgers only through the one function that settles the next month.

use std::time::Duration;

use chrono::{Months, NaiveDate, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::common::app::{Login, TestApp, ROTATOR, WORKER};
use crate::common::wait_until;
use crate::partitions::{events, load_on, month_start, partition};
use crate::roles::denied;

/// Rows of the open ledgers that differ from the vault counted by user
/// now, and ledgers whose total differs from their month's rows.
async fn ledger_errors(app: &TestApp) -> i64 {
    app.scalar(
        "WITH ledger AS (SELECT l.id, u.user_id, u.rows FROM vault_month_users u \
                         JOIN vault_month_ledgers l ON l.id = u.ledger WHERE l.erased_by IS NULL), \
              actual AS (SELECT l.id, v.user_id, count(*) AS rows FROM vault v \
                         JOIN vault_month_ledgers l ON l.erased_by IS NULL \
                          AND v.create_date >= l.lo AND v.create_date < l.hi GROUP BY 1, 2) \
         SELECT (SELECT count(*) FROM (TABLE ledger EXCEPT TABLE actual) a) \
              + (SELECT count(*) FROM (TABLE actual EXCEPT TABLE ledger) b) \
              + (SELECT count(*) FROM vault_month_ledgers l WHERE l.erased_by IS NULL AND l.rows <> \
                 (SELECT count(*) FROM vault v WHERE v.create_date >= l.lo AND v.create_date < l.hi))",
    )
    .await
}

/// One `pii_vault_month_settle_next()` call on `conn`: the month settled.
async fn settle_next<'e>(conn: impl sqlx::PgExecutor<'e>) -> Option<NaiveDate> {
    sqlx::query_scalar("SELECT pii_vault_month_settle_next()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Settles every month that is due, as `pool`'s login; returns the months.
async fn settle_all(pool: &PgPool) -> Vec<NaiveDate> {
    let mut months = Vec::new();
    while let Some(m) = settle_next(pool).await {
        months.push(m);
    }
    months
}

async fn pool_of(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}

/// The vault partitions that carry the trigger counting late rows.
async fn counted_partitions(app: &TestApp) -> Vec<String> {
    app.strings(
        "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'vault_month_ledger' ORDER BY 1",
    )
    .await
}

/// Waits until no session of `login` is left: a worker that exits leaves
/// a settling it started to finish on the server (and commit), and while
/// one runs, another session's `settle_next` answers "nothing".
async fn sessions_ended(app: &TestApp, login: &str) {
    wait_until(
        Duration::from_secs(30),
        "the loads' sessions to end",
        || async {
            let n = app
                .scalar(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{login}'"
                ))
                .await;
            (n == 0).then_some(())
        },
    )
    .await;
}

/// A migrated database and a worker's login that loaded three past months
/// of 100 logins each ("span" in every one) on their 10th, once the loads'
/// background settling is over (whatever it did).
struct Loaded {
    app: TestApp,
    login: Login,
    months: Vec<NaiveDate>,
}

async fn loaded() -> Option<Loaded> {
    let app = TestApp::postgres().await?;
    app.ok(&["migrate"]);
    let login = app.login_as(WORKER).await;
    let bin = app.as_login(&login);
    let this_month = month_start(Utc::now().date_naive());
    let months: Vec<NaiveDate> = (2..=4).rev().map(|k| this_month - Months::new(k)).collect();
    for (i, m) in months.iter().enumerate() {
        let file = app.write(
            &format!("m{i}.jsonl"),
            &events(&format!("m{i}"), 100, 90 + i as u64, Some("span")),
        );
        assert_eq!(load_on(&bin, &file, *m + chrono::Days::new(9)), (100, 0, 0));
    }
    sessions_ended(&app, &login.name).await;
    Some(Loaded { app, login, months })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_months_stay_exact_and_retention_hands_their_counts_to_its_record() {
    let Some(Loaded { app, login, months }) = loaded().await else {
        return;
    };
    let worker = app.as_login(&login);
    let rotator = app.as_login(&app.login_as(ROTATOR).await);
    let pool = pool_of(&login.url).await;
    settle_all(&pool).await;
    // Every month that ended 15 days ago or more is settled: the three.
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM vault_month_ledgers WHERE erased_by IS NULL AND rows = 100"
        )
        .await,
        3
    );
    let mut expected: Vec<String> = months.iter().map(|m| partition("vault", *m)).collect();
    assert_eq!(counted_partitions(&app).await, expected);
    assert_eq!(ledger_errors(&app).await, 0);

    // Late rows into a settled month (a backfill loaded on its 20th): the
    // month's trigger counts them.
    let late = app.write("late.jsonl", &events("late", 50, 99, Some("span")));
    assert_eq!(
        load_on(&worker, &late, months[1] + chrono::Days::new(19)),
        (50, 0, 0)
    );
    assert_eq!(ledger_errors(&app).await, 0);
    assert_eq!(
        app.scalar(&format!(
            "SELECT u.rows FROM vault_month_users u JOIN vault_month_ledgers l ON l.id = u.ledger \
             WHERE l.lo = '{}' AND u.user_id = 'span'",
            months[1]
        ))
        .await,
        2
    );

    // forget --user-id takes the user's rows off every settled month.
    rotator.ok(&["forget", "--user-id", "m0-7", "--reason", "GDPR 17"]);
    assert_eq!(ledger_errors(&app).await, 0);
    assert_eq!(
        app.scalar("SELECT count(*) FROM vault_month_users WHERE user_id = 'm0-7'")
            .await,
        0
    );

    // A rotation rewrites the past months into new tables: each new table
    // gets the trigger back, and late rows are still counted.
    rotator.ok(&["rotate", "data-keys", "--reason", "ledger test"]);
    assert_eq!(counted_partitions(&app).await, expected);
    let later = app.write("later.jsonl", &events("later", 20, 98, Some("span")));
    assert_eq!(
        load_on(&worker, &later, months[1] + chrono::Days::new(20)),
        (20, 0, 0)
    );
    assert_eq!(ledger_errors(&app).await, 0);

    // Retention before the 20th of the last of the three: the first two
    // months are dropped, the third is cut (all its rows are of the 10th).
    let before = months[2] + chrono::Days::new(19);
    let erased: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT user_id, count(*) FROM vault WHERE create_date < '{before}' GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap();
    let total: i64 = erased.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 100 + 100 + 50 + 20 + 100 - 1);
    let out = rotator.ok(&[
        "forget",
        "--before",
        &before.to_string(),
        "--reason",
        "retention",
    ]);
    assert!(
        out.contains(&format!("erased {total} vault row(s)")),
        "{out}"
    );
    let (record, audited): (i64, i64) =
        sqlx::query_as("SELECT id, row_count FROM audit_log WHERE action = 'retention'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(audited, total);
    // The subject ledger names each user with exactly the rows erased.
    let ledger: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, rows FROM erasure_subjects WHERE record = $1 ORDER BY 1")
            .bind(record)
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(ledger, erased);
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM vault_month_ledgers WHERE erased_by = {record}"
        ))
        .await,
        2
    );
    // The cut month stays settled, now with nothing in it.
    expected.drain(..2);
    assert_eq!(counted_partitions(&app).await, expected);
    assert_eq!(ledger_errors(&app).await, 0);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_settles_months_only_through_its_function() {
    let Some(Loaded { app, login, months }) = loaded().await else {
        return;
    };
    // Whatever the loads' background settling did, start from none.
    app.exec("DELETE FROM vault_month_users").await;
    app.exec("DELETE FROM vault_month_ledgers").await;
    for p in counted_partitions(&app).await {
        app.exec(&format!("DROP TRIGGER vault_month_ledger ON {p}"))
            .await;
    }
    let pool = pool_of(&login.url).await;
    let first = partition("vault", months[0]);
    for sql in [
        "SELECT count(*) FROM vault_month_ledgers".to_string(),
        "SELECT count(*) FROM vault_month_users".to_string(),
        "SELECT count(*) FROM erasure_subject_rows".to_string(),
        "INSERT INTO vault_month_users VALUES (1, 'u', 1)".to_string(),
        "UPDATE vault_month_ledgers SET rows = 0".to_string(),
        format!(
            "SELECT pii_vault_month_settle('{first}', '{}', '{}')",
            months[0], months[1]
        ),
        format!(
            "SELECT pii_vault_month_ledger_take('{}', ARRAY['span'], ARRAY[1::bigint])",
            months[0]
        ),
        format!(
            "SELECT pii_vault_month_ledger_arm('{first}', '{}')",
            months[0]
        ),
    ] {
        denied(&pool, &sql).await;
    }

    // Rolled back: nothing of it stays, no ledger and no trigger.
    let mut a = pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *a).await.unwrap();
    assert_eq!(settle_next(&mut *a).await, Some(months[0]));
    // What the session sees before it rolls back: its own transaction's
    // statistics give the month's number of users (the rows settling
    // inserted), nothing the worker did not write itself.
    let seen: i64 = sqlx::query_scalar(
        "SELECT n_tup_ins FROM pg_stat_xact_user_tables WHERE relname = 'vault_month_users'",
    )
    .fetch_one(&mut *a)
    .await
    .unwrap();
    let users = app
        .scalar(&format!("SELECT count(DISTINCT user_id) FROM {first}"))
        .await;
    assert_eq!(seen, users);
    sqlx::query("ROLLBACK").execute(&mut *a).await.unwrap();
    assert_eq!(app.count("vault_month_ledgers").await, 0);
    assert!(counted_partitions(&app).await.is_empty());

    // Two sessions of the login: while one settles, the other is told
    // "nothing" at once (it does not wait), and settles the next after.
    sqlx::query("BEGIN").execute(&mut *a).await.unwrap();
    assert_eq!(settle_next(&mut *a).await, Some(months[0]));
    let mut b = pool.acquire().await.unwrap();
    assert_eq!(settle_next(&mut *b).await, None);
    sqlx::query("COMMIT").execute(&mut *a).await.unwrap();
    assert_eq!(settle_next(&mut *b).await, Some(months[1]));
    drop((a, b));
    assert_eq!(settle_all(&pool).await, vec![months[2]]);
    assert_eq!(ledger_errors(&app).await, 0);
    pool.close().await;
    app.finish().await;
}
