//! Rotations that rewrite closed partitions (migration 0018,
//! functions/45_rewrite.sql): each closed month of `vault` (data keys) or
//! `user_logins` (token key) is copied into a new table and swapped in,
//! while this month's partition is updated in place; a run killed between
//! two swaps resumes; a worker writing late rows into a closed month
//! during the rewrite loses none (`race.rs`: nor one whose write meets the
//! swap's locks; `skipped.rs`: rows it cannot open).

mod race;
mod skipped;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use chrono::{Datelike, Months, NaiveDate, Utc};

use crate::common;
use crate::common::app::{Bin, Login, TestApp, ROTATOR, WORKER};
use crate::rotation::reveal_and_check;

/// Events from small pools of IPs, devices and users, so that tokens repeat
/// across months.
pub(super) fn events(seed: u64, n: usize) -> String {
    common::gen_events(&[
        "-n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
        "--ips",
        "25",
        "--devices",
        "25",
        "--users",
        "20",
    ])
}

/// The database's loaded state: its events, the closed months' partition
/// suffixes (oldest first) and this month's.
pub(super) struct Loaded {
    pub(super) app: TestApp,
    pub(super) worker: Login,
    pub(super) input: String,
    pub(super) closed: Vec<String>,
    /// A day of each closed month.
    pub(super) days: Vec<NaiveDate>,
    pub(super) open: String,
}

pub(super) fn suffix(d: NaiveDate) -> String {
    format!("y{}m{:02}", d.year(), d.month())
}

/// Loads `text` as the worker on `day` (its clock set to that day).
pub(super) fn load(bin: &Bin, app: &TestApp, text: &str, day: NaiveDate) {
    let name = format!("events-{}.jsonl", uuid::Uuid::new_v4().simple());
    let file = app.write(&name, text);
    bin.env("PII_VAULT_CLOCK", &day.to_string()).ok(&[
        "run",
        "--from-file",
        &file,
        "--no-progress",
    ]);
}

/// 60 events in each of three closed months and 60 in this month.
pub(super) async fn loaded() -> Option<Loaded> {
    let app = TestApp::postgres().await?;
    app.ok(&["migrate"]);
    app.ok(&["policy", "set", "--max-reveals-per-day", "100000"]);
    let worker = app.login_as(WORKER).await;
    let today = Utc::now().date_naive();
    let this_month = today.with_day(1).unwrap();
    let mut input = String::new();
    let mut closed = Vec::new();
    let mut days = Vec::new();
    for (i, back) in [3u32, 2, 1].into_iter().enumerate() {
        let day = (this_month - Months::new(back)).with_day(10).unwrap();
        let text = events(700 + i as u64, 60);
        load(&app.as_login(&worker), &app, &text, day);
        input.push_str(&text);
        closed.push(suffix(day));
        days.push(day);
    }
    let text = events(710, 60);
    load(&app.as_login(&worker), &app, &text, today);
    input.push_str(&text);
    Some(Loaded {
        app,
        worker,
        input,
        closed,
        days,
        open: suffix(today),
    })
}

/// Each partition of `table` with its oid.
pub(super) async fn oids(app: &TestApp, table: &str) -> BTreeMap<String, i64> {
    sqlx::query_as(&format!(
        "SELECT inhrelid::regclass::text, inhrelid::oid::bigint FROM pg_inherits \
         WHERE inhparent = '{table}'::regclass"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Rows per partition of `table`.
pub(super) async fn counts(app: &TestApp, table: &str) -> BTreeMap<String, i64> {
    sqlx::query_as(&format!(
        "SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// What the statistics say about the rewritten partitions of `table` and
/// the one updated in place, and who may use them. The rewritten ones were
/// only ever inserted into: once the rotator's sessions have flushed their
/// statistics (when they end; the inserts counted prove it), they show no
/// dead tuple, update or delete. This month's shows its updates.
pub(super) async fn check_rewritten(app: &TestApp, table: &str, closed: &[String], open: &str) {
    let rows = counts(app, table).await;
    for s in closed {
        let p = format!("{table}_{s}");
        let want = rows[&p];
        let stats = format!(
            "SELECT n_tup_ins, n_tup_upd, n_tup_del, n_dead_tup FROM pg_stat_user_tables \
             WHERE relid = '{p}'::regclass"
        );
        let got: (i64, i64, i64, i64) = common::wait_until(
            Duration::from_secs(30),
            "the rotator's statistics to be flushed",
            || async {
                let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
                    .execute(app.pool())
                    .await;
                let got: (i64, i64, i64, i64) =
                    sqlx::query_as(&stats).fetch_one(app.pool()).await.unwrap();
                (got.0 >= want).then_some(got)
            },
        )
        .await;
        assert_eq!(got, (want, 0, 0, 0), "{p}: inserted only, no dead tuples");
        // Nobody but the owner holds anything on it, PUBLIC included.
        let others = app
            .scalar(&format!(
                "SELECT count(*) FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a \
                 WHERE c.oid = '{p}'::regclass AND a.grantee <> c.relowner"
            ))
            .await;
        assert_eq!(others, 0, "privileges on {p}");
    }
    // Flushed by other sessions of the rotator, maybe later.
    let p = format!("{table}_{open}");
    let updated =
        format!("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = '{p}'::regclass");
    common::wait_until(
        Duration::from_secs(30),
        "this month's updates in place",
        || async { (app.scalar(&updated).await > 0).then_some(()) },
    )
    .await;
    let left = app
        .scalar(
            "SELECT count(*) FROM pg_class \
             WHERE relnamespace = current_schema()::regnamespace AND relname LIKE '%\\_rewrite'",
        )
        .await;
    assert_eq!(left, 0, "no new table left behind");
}

/// Asserts which partitions of `table` changed oid from `before` to now:
/// exactly the closed ones.
pub(super) async fn check_oids(
    app: &TestApp,
    table: &str,
    before: &BTreeMap<String, i64>,
    closed: &[String],
) {
    let after = oids(app, table).await;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (p, oid) in before {
        let rewritten = closed.iter().any(|s| *p == format!("{table}_{s}"));
        assert_eq!(after[p] != *oid, rewritten, "{p} rewritten: {rewritten}");
    }
}

pub(super) async fn rotator(app: &TestApp) -> (Bin, Login) {
    let login = app.login_as(ROTATOR).await;
    (app.as_login(&login), login)
}

/// Vault data keys not destroyed.
async fn live_data_keys(app: &TestApp) -> Vec<String> {
    app.strings(
        "SELECT id FROM vault_keys WHERE purpose = 'vault' AND state <> 'destroyed' ORDER BY 1",
    )
    .await
}

/// After `rotate data-keys`: nothing under the keys of before, which are
/// destroyed; every user revealed as loaded.
async fn check_data_keys_done(app: &TestApp, old: &[String], input: &str) {
    let old = format!("'{{{}}}'", old.join(","));
    let under_old = app
        .scalar(&format!(
            "SELECT count(*) FROM vault WHERE key_id = ANY ({old}::text[])"
        ))
        .await;
    assert_eq!(under_old, 0, "rows still under an old key");
    let kept = app
        .scalar(&format!(
            "SELECT count(*) FROM vault_keys WHERE id = ANY ({old}::text[]) AND state <> 'destroyed'"
        ))
        .await;
    assert_eq!(kept, 0, "old data keys destroyed");
    let (rows, _) = reveal_and_check(app, input);
    assert_eq!(rows, input.lines().count());
    let (all, distinct) = (
        app.scalar("SELECT count(*) FROM vault").await,
        app.scalar("SELECT count(DISTINCT message_id) FROM vault")
            .await,
    );
    assert_eq!(
        (all, distinct),
        (rows as i64, rows as i64),
        "every row once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_data_keys_rewrites_closed_months_and_updates_this_one_in_place() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let (vault, logins) = (oids(app, "vault").await, oids(app, "user_logins").await);
    let rows = counts(app, "vault").await;
    let old = live_data_keys(app).await;
    let (bin, _) = rotator(app).await;
    bin.ok(&["rotate", "data-keys", "--reason", "rewrite test"]);

    check_oids(app, "vault", &vault, &l.closed).await;
    check_oids(app, "user_logins", &logins, &[]).await;
    assert_eq!(counts(app, "vault").await, rows);
    check_data_keys_done(app, &old, &l.input).await;
    check_rewritten(app, "vault", &l.closed, &l.open).await;
    l.app.finish().await;
}

/// Login message ids grouped by `column`'s token, each group sorted: the
/// same groups under any token-key version.
pub(super) async fn groups(app: &TestApp, column: &str) -> Vec<Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT {column}::text, message_id FROM user_logins"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap();
    for (token, id) in rows {
        by.entry(token).or_default().push(id);
    }
    let mut out: Vec<Vec<String>> = by
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_token_key_rewrites_closed_months_and_keeps_every_grouping() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let (vault, logins) = (oids(app, "vault").await, oids(app, "user_logins").await);
    let rows = counts(app, "user_logins").await;
    let columns = ["masked_ip", "masked_device_id", "masked_ip_net"];
    let mut before = Vec::new();
    for c in columns {
        before.push(groups(app, c).await);
    }
    let (bin, _) = rotator(app).await;
    bin.ok(&["rotate", "token-key", "--reason", "rewrite test"]);

    check_oids(app, "user_logins", &logins, &l.closed).await;
    check_oids(app, "vault", &vault, &[]).await;
    assert_eq!(counts(app, "user_logins").await, rows);
    for (c, want) in columns.iter().zip(&before) {
        assert_eq!(&groups(app, c).await, want, "logins grouped by {c}");
    }
    let stale = app
        .scalar(
            "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't2\\_%' \
             OR masked_device_id NOT LIKE 't2\\_%' OR masked_ip_net NOT LIKE 't2\\_%'",
        )
        .await;
    assert_eq!(stale, 0, "every token is of v2");
    let destroyed = app
        .scalar("SELECT count(*) FROM vault_keys WHERE purpose = 'token' AND version = 1 AND state = 'destroyed'")
        .await;
    assert_eq!(destroyed, 1, "v1 destroyed");
    let (n, versions) = reveal_and_check(app, &l.input);
    assert_eq!(n, l.input.lines().count());
    assert_eq!(versions, ["t2".to_string()].into());
    check_rewritten(app, "user_logins", &l.closed, &l.open).await;
    l.app.finish().await;
}

/// Waits until a session of `login` waits for a lock on `relation`.
pub(super) async fn waits_on(app: &TestApp, login: &Login, relation: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_locks k JOIN pg_stat_activity a ON a.pid = k.pid \
         WHERE NOT k.granted AND k.relation = '{relation}'::regclass AND a.usename = '{}'",
        login.name
    );
    common::wait_until(Duration::from_secs(60), "the rotator to wait", || async {
        (app.scalar(&sql).await > 0).then_some(())
    })
    .await;
}

pub(super) async fn rewrite_states(app: &TestApp) -> Vec<String> {
    app.strings("SELECT partition || ' ' || state FROM rotation_rewrites ORDER BY hi")
        .await
}

/// Holds SHARE UPDATE EXCLUSIVE on `table`'s second closed month, which
/// its swap's SHARE lock waits behind (reading the partition does not):
/// its name, and the transaction that holds the lock until it ends.
pub(super) async fn hold_second_month(
    l: &Loaded,
    table: &str,
) -> (String, sqlx::Transaction<'static, sqlx::Postgres>) {
    let second = format!("{table}_{}", l.closed[1]);
    let mut hold = l.app.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {second} IN SHARE UPDATE EXCLUSIVE MODE"
    ))
    .execute(&mut *hold)
    .await
    .unwrap();
    (second, hold)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_killed_between_two_swaps_resumes_and_loses_nothing() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let vault = oids(app, "vault").await;
    let rows = counts(app, "vault").await;
    let old = live_data_keys(app).await;
    let (bin, login) = rotator(app).await;
    // With one partition at a time, the first month is swapped by the time
    // the second's swap waits, the second filled and indexed, the third not
    // started.
    let (second, hold) = hold_second_month(&l, "vault").await;
    let mut child = bin
        .command(&["rotate", "data-keys", "--jobs", "1", "--reason", "killed"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    waits_on(app, &login, &second).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // A killed client's waiting statement would still run once the lock is
    // free: end its session as the server would on a lost connection.
    app.exec(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
        login.name
    ))
    .await;
    hold.rollback().await.unwrap();
    let states = rewrite_states(app).await;
    assert_eq!(
        states,
        [
            format!("vault_{} swapped", l.closed[0]),
            format!("vault_{} indexed", l.closed[1]),
            format!("vault_{} pending", l.closed[2]),
        ]
    );
    let first = format!("vault_{}", l.closed[0]);
    let swapped = oids(app, "vault").await[&first];
    assert_ne!(swapped, vault[&first]);

    bin.ok(&["rotate", "data-keys", "--reason", "resumed"]);
    assert!(rewrite_states(app)
        .await
        .iter()
        .all(|s| s.ends_with(" swapped")));
    // The swapped month was skipped, the others rewritten.
    assert_eq!(oids(app, "vault").await[&first], swapped);
    check_oids(app, "vault", &vault, &l.closed).await;
    assert_eq!(counts(app, "vault").await, rows, "rows per partition");
    check_data_keys_done(app, &old, &l.input).await;
    l.app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_written_into_a_closed_month_during_its_rewrite_are_kept() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let vault = oids(app, "vault").await;
    let before = counts(app, "vault").await;
    let old = live_data_keys(app).await;
    let (bin, login) = rotator(app).await;
    // Every swap begins with SHARE UPDATE EXCLUSIVE on the parent, which
    // this holds: the first closed months are read and filled, then their
    // swaps wait, while workers go on writing (their ROW EXCLUSIVE does not
    // conflict).
    let mut hold = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE ONLY vault IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let child = bin
        .command(&["rotate", "data-keys", "--reason", "late rows"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    waits_on(app, &login, "vault").await;
    // Late rows into the month being rewritten, after its rows were read;
    // and this month's.
    let late = events(720, 40);
    let first_day = l.days[0].with_day(15).unwrap();
    load(&app.as_login(&l.worker), app, &late, first_day);
    let now = events(721, 30);
    load(&app.as_login(&l.worker), app, &now, Utc::now().date_naive());
    let first = format!("vault_{}", l.closed[0]);
    assert_eq!(
        counts(app, "vault").await[&first],
        before[&first] + 40,
        "the late rows are in the old partition"
    );
    hold.rollback().await.unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("partition=\"{first}\"")) && stderr.contains("late=40"),
        "the swap copied the 40 late rows: {stderr}"
    );

    let input = format!("{}{late}{now}", l.input);
    let raw = common::raw_pii(&input);
    let leaked = common::leaked(&out.stderr, &raw);
    assert!(leaked.is_empty(), "the rotator's output holds PII");

    check_oids(app, "vault", &vault, &l.closed).await;
    let after = counts(app, "vault").await;
    assert_eq!(after[&first], before[&first] + 40);
    check_data_keys_done(app, &old, &input).await;
    l.app.finish().await;
}
