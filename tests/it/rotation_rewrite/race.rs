//! A worker whose late rows into a closed month meet that month's swap: its
//! insert waits behind the swap's SHARE lock request, then the two lock
//! the parent and the month in opposite orders and Postgres ends one of
//! them as a deadlock. Whichever it is tries again (the swap in
//! `rotation/rewrite.rs`, the worker's batch as any transient fault): the
//! rotation finishes, every late row is stored once, under the new token
//! version, in the rewritten month.

use std::process::Stdio;

use chrono::Datelike;

use super::{check_oids, counts, events, loaded, oids, rotator, waits_on};
use crate::common;
use crate::rotation::reveal_and_check;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_writing_into_a_month_being_swapped_loses_nothing() {
    let Some(l) = loaded().await else {
        return;
    };
    let app = &l.app;
    let logins = oids(app, "user_logins").await;
    let before = counts(app, "user_logins").await;
    let (bin, login) = rotator(app).await;
    // The second closed month's swap waits behind this lock (one partition
    // at a time: the first is swapped by then).
    let (second, hold) = super::hold_second_month(&l, "user_logins").await;
    let rotation = bin
        .command(&["rotate", "token-key", "--jobs", "1", "--reason", "race"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    waits_on(app, &login, &second).await;
    // Late rows into that month: the worker's insert queues behind the
    // swap's request.
    let late = events(730, 40);
    let file = app.write("late.jsonl", &late);
    let day = l.days[1].with_day(20).unwrap().to_string();
    let worker = app
        .as_login(&l.worker)
        .env("PII_VAULT_CLOCK", &day)
        .command(&["run", "--from-file", &file, "--no-progress"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    waits_on(app, &l.worker, &second).await;
    hold.rollback().await.unwrap();

    let wrote = worker.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&wrote.stderr);
    assert!(wrote.status.success(), "{stderr}");
    assert_eq!(common::try_summary(&stderr), Some((40, 0, 0)), "{stderr}");
    let rotated = rotation.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&rotated.stderr);
    assert!(rotated.status.success(), "{stderr}");

    check_oids(app, "user_logins", &logins, &l.closed).await;
    let mut want = before.clone();
    *want.get_mut(&second).unwrap() += 40;
    assert_eq!(counts(app, "user_logins").await, want);
    let (all, distinct) = (
        app.scalar("SELECT count(*) FROM user_logins").await,
        app.scalar("SELECT count(DISTINCT message_id) FROM user_logins")
            .await,
    );
    assert_eq!(all, distinct, "every login once");
    let input = format!("{}{late}", l.input);
    let (n, versions) = reveal_and_check(app, &input);
    assert_eq!(n, input.lines().count());
    assert_eq!(versions, ["t2".to_string()].into());
    let raw = common::raw_pii(&input);
    assert!(common::leaked(&rotated.stderr, &raw).is_empty());
    l.app.finish().await;
}
