//! Retention's months dropped after its transaction (migration 0021):
//! `pii_vault_retention` detaches the months wholly before its day, renames
//! them and queues them; `pii_vault_retention_drop_next` drops one a call,
//! on as many connections as the caller likes. Shown here as the rotator's
//! own login with plain SQL: what the queued months are to every role
//! before their drop, what a rolled-back drop leaves, what two sessions of
//! one login racing for the retention and for the drops get, that a late
//! row of a queued month is stored, and that `forget --before` finishes
//! what a stopped run left and says what another session still holds.

use chrono::{Months, NaiveDate, Utc};
use sqlx::{Connection, PgConnection};

use crate::common::app::{Bin, TestApp, ROLES, ROTATOR, WORKER};
use crate::partitions::{events, load_on, month_start, partition, partitions};
use crate::roles::denied;

/// The detached months waiting for their drop, by name.
async fn queued(app: &TestApp) -> Vec<String> {
    app.strings("SELECT name FROM retention_drops ORDER BY name")
        .await
}

/// Tables named as retention renames a detached month, queued or not.
async fn erased_tables(app: &TestApp) -> Vec<String> {
    app.strings("SELECT relname::text FROM pg_class WHERE relname LIKE 'vault\\_y%\\_erased\\_%' ORDER BY 1")
        .await
}

/// One call of the rotator's drop, as its login types it.
async fn drop_next(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT pii_vault_retention_drop_next()")
        .fetch_one(conn)
        .await
}

/// Loads `rows` events into each of `months` as the worker, on the month's
/// `day`th day, each month's users `<tag><i>-…`.
fn load_months(
    app: &TestApp,
    worker: &Bin,
    tag: &str,
    rows: usize,
    seed: u64,
    months: &[NaiveDate],
    day: u64,
) {
    for (i, m) in months.iter().enumerate() {
        let file = app.write(
            &format!("{tag}{i}.jsonl"),
            &events(&format!("{tag}{i}"), rows, seed + i as u64, None),
        );
        let stored = load_on(worker, &file, *m + chrono::Days::new(day - 1));
        assert_eq!(stored, (rows as u64, 0, 0));
    }
}

/// Vault rows dated before `day`.
async fn vault_rows_before(app: &TestApp, day: NaiveDate) -> i64 {
    app.scalar(&format!(
        "SELECT count(*) FROM vault WHERE create_date < '{day}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_queues_its_months_for_drops_that_race_roll_back_and_resume() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let rotator_login = app.login_as(ROTATOR).await;
    let rotator = app.as_login(&rotator_login);
    let this_month = month_start(Utc::now().date_naive());
    let months: Vec<NaiveDate> = (2..=4).rev().map(|k| this_month - Months::new(k)).collect();
    load_months(&app, &worker, "q", 20, 140, &months, 5);
    let keys_of = |table: String| format!("SELECT DISTINCT key_id FROM {table} ORDER BY 1");
    let sealed_by: Vec<Vec<String>> = {
        let mut v = Vec::new();
        for m in &months {
            v.push(app.strings(&keys_of(partition("vault", *m))).await);
        }
        v
    };

    // Retention as the rotator's login types it, without the drops that
    // `forget --before` runs after it (a run stopped between the two), and
    // a second session of the same login calling it meanwhile: the second
    // waits for the first to end, then finds nothing left to erase.
    let mut a = PgConnection::connect(&rotator_login.url).await.unwrap();
    let retention =
        "SELECT vault_rows, partitions_dropped FROM pii_vault_retention($1, 'retention', 'dpo')";
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    let (rows, dropped): (i64, Vec<String>) = sqlx::query_as(retention)
        .bind(months[2])
        .fetch_one(&mut a)
        .await
        .unwrap();
    let racer = {
        let url = rotator_login.url.clone();
        let day = months[2];
        tokio::spawn(async move {
            let mut b = PgConnection::connect(&url).await.unwrap();
            let got: (i64, Vec<String>) = sqlx::query_as(retention)
                .bind(day)
                .fetch_one(&mut b)
                .await
                .unwrap();
            b.close().await.unwrap();
            got
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !racer.is_finished(),
        "the second retention waits for the first"
    );
    sqlx::query("COMMIT").execute(&mut a).await.unwrap();
    assert_eq!(racer.await.unwrap(), (0, vec![]));
    assert_eq!(
        app.strings("SELECT row_count::text FROM audit_log WHERE action = 'retention' ORDER BY id")
            .await,
        ["40", "0"]
    );
    assert_eq!(rows, 40);
    assert_eq!(
        dropped,
        [partition("vault", months[0]), partition("vault", months[1])]
    );
    let record = app
        .scalar("SELECT min(id) FROM audit_log WHERE action = 'retention'")
        .await;
    let names: Vec<String> = dropped
        .iter()
        .map(|p| format!("{p}_erased_{record}"))
        .collect();
    assert_eq!(queued(&app).await, names);
    assert_eq!(erased_tables(&app).await, names);
    let left = partitions(&app, "vault").await;
    assert!(
        names.iter().chain(&dropped).all(|n| !left.contains(n)),
        "{left:?}"
    );
    assert_eq!(vault_rows_before(&app, months[2]).await, 0);
    // Before its drop a queued month is no role's to read or drop, and the
    // data keys that sealed only it are destroyed already.
    for role in ROLES {
        let store = app.store_as(role).await;
        for sql in [
            format!("SELECT count(*) FROM {}", names[0]),
            format!("DROP TABLE {}", names[1]),
            "SELECT * FROM retention_drops".to_string(),
            "DELETE FROM retention_drops".to_string(),
        ] {
            denied(store.pool(), &sql).await;
        }
    }
    for (i, keys) in sealed_by.iter().take(2).enumerate() {
        for k in keys {
            let state = app
                .strings(&format!("SELECT state FROM vault_keys WHERE id = '{k}'"))
                .await;
            assert_eq!(state, ["destroyed"], "a key of month {i}");
        }
    }
    assert_eq!(app.strings(&keys_of(names[0].clone())).await, sealed_by[0]);

    // A late row of a queued month: the month's partition is made again
    // under its own name (the queued one was renamed) and the row stored.
    let late = app.write("late.jsonl", &events("late", 3, 150, None));
    assert_eq!(
        load_on(&worker, &late, months[0] + chrono::Days::new(9)),
        (3, 0, 0)
    );
    assert!(partitions(&app, "vault").await.contains(&dropped[0]));

    // Two sessions of the rotator's login racing for the drops: each takes
    // a month the other has not, without waiting; the second finds none
    // left while the first holds its own. Rolled back, a drop leaves its
    // month queued and whole.
    let mut b = PgConnection::connect(&rotator_login.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut b)
        .await
        .unwrap();
    let first = drop_next(&mut a).await.unwrap().unwrap();
    let second = drop_next(&mut b).await.unwrap().unwrap();
    assert_ne!(first, second);
    assert_eq!(
        drop_next(&mut b).await.unwrap(),
        None,
        "the first session's month is skipped"
    );
    sqlx::query("ROLLBACK").execute(&mut b).await.unwrap();
    assert_eq!(app.count(&second).await, 20, "rolled back: still whole");
    b.close().await.unwrap();

    // The next `forget --before`, while the first session still holds its
    // month: it drops what was left free and its own month (the late one,
    // again), and says that one month is still to be dropped.
    let out = rotator.ok(&[
        "forget",
        "--before",
        &months[2].to_string(),
        "--reason",
        "retention",
    ]);
    for said in [
        "also dropped 1 month(s) that an earlier retention detached",
        "1 monthly vault partition(s) dropped whole",
        "1 detached month(s) are still to be dropped",
    ] {
        assert!(out.contains(said), "{said:?} not in: {out}");
    }
    assert_eq!(queued(&app).await, vec![first.clone()]);
    sqlx::query("COMMIT").execute(&mut a).await.unwrap();
    a.close().await.unwrap();
    assert!(queued(&app).await.is_empty());
    assert!(erased_tables(&app).await.is_empty());
    assert_eq!(vault_rows_before(&app, months[2]).await, 0);
    assert_eq!(app.count(&partition("vault", months[2])).await, 20);
    app.finish().await;
}

/// A queued month that the owner made a partition again is not dropped by
/// the rotator's call (PV013, its rows kept); detached again, it is dropped
/// by the next `forget --before`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_month_attached_again_is_not_dropped() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let rotator_login = app.login_as(ROTATOR).await;
    let rotator = app.as_login(&rotator_login);
    let month = month_start(Utc::now().date_naive()) - Months::new(3);
    let next = month + Months::new(1);
    load_months(&app, &worker, "a", 10, 160, &[month, next], 3);

    let mut conn = PgConnection::connect(&rotator_login.url).await.unwrap();
    sqlx::query("SELECT * FROM pii_vault_retention($1, 'retention', 'dpo')")
        .bind(next)
        .execute(&mut conn)
        .await
        .unwrap();
    let name = queued(&app).await.pop().unwrap();
    let bounds = format!("FOR VALUES FROM ('{month}') TO ('{next}')");
    app.exec(&format!(
        "ALTER TABLE vault ATTACH PARTITION {name} {bounds}"
    ))
    .await;
    match drop_next(&mut conn).await {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("PV013") => {}
        other => panic!("expected PV013, got {other:?}"),
    }
    assert_eq!(app.count(&name).await, 10, "a partition again: kept");
    assert_eq!(queued(&app).await, vec![name.clone()]);
    conn.close().await.unwrap();

    app.exec(&format!("ALTER TABLE vault DETACH PARTITION {name}"))
        .await;
    let before = (next + Months::new(1)).to_string();
    let out = rotator.ok(&["forget", "--before", &before, "--reason", "retention"]);
    assert!(out.contains("erased 10 vault row(s)"), "{out}");
    assert!(out.contains("also dropped 1 month(s)"), "{out}");
    assert!(queued(&app).await.is_empty());
    assert!(erased_tables(&app).await.is_empty());
    app.finish().await;
}
