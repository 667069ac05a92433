//! Faults survived: real worker processes (`pii-vault run`) against the real
//! services (PostgreSQL, LocalStack SQS and KMS) while the database
//! restarts or crashes (with a rotation and a reveal in flight too), a
//! worker is SIGKILLed, SQS or KMS become unreachable (refused,
//! or silent like a network partition), SQS goes away between commit and
//! acknowledgement, and workers are stopped. Each test ends the same way:
//! every valid event is in `user_logins` exactly once (by count, by distinct
//! `message_id` and by content), with its vault row; every malformed one is
//! in `quarantine`; the queue is empty, nothing visible or in flight; and no
//! raw IP or device id is in the database or in anything a worker printed.
//!
//! Every process runs as its role's own database login, as in production:
//! each worker as a worker login of its own (so that `pg_stat_activity`
//! tells its sessions apart), rotations as a rotator login, reveals as a
//! revealer login; only `migrate` runs as the schema owner.
//!
//! Tests that stop or crash PostgreSQL use a private cluster of their own,
//! durable like production (`fsync`, `synchronous_commit`,
//! `full_page_writes` on)
//! ([`faults_helpers::PrivatePg`]); the shared one serves the tests running
//! beside them. SQS and KMS are taken away by a TCP proxy
//! ([`faults_helpers::Proxy`]) that the worker reaches LocalStack through.
//! Without the services these tests fail (or skip, under
//! `PII_VAULT_SKIP_SERVICES=1`); see DEVELOPERS.md. A failing test shows
//! what each worker logged; `PII_VAULT_FAULTS_SHOW_LOGS=1` shows it always.

use crate::common::app::{TestApp, REVEALER, ROTATOR, WORKER};
use crate::common::aws::Queue;
use crate::common::production::leaked_fast as leaked;
use crate::common::{self, aws as aws_helpers, faults as faults_helpers};

use std::time::{Duration, Instant};

use faults_helpers::{
    db_counts, free_port, wait_until, DbCounts, Events, PrivatePg, Proxy, ProxyMode, Worker,
};
use sqlx::Connection as _;
use tokio::io::AsyncWriteExt as _;

/// How long a message received by a worker stays invisible to the others
/// in these tests (`run --visibility-timeout`), instead of the default 120 s.
const VISIBILITY_SECS: &str = "5";

/// One test's fixture in the cluster of `admin_url`, migrated by the binary
/// with a fresh KMS key that every run of it then uses; a fresh queue; and
/// `n` generated events (not sent yet).
pub(crate) async fn setup(admin_url: &str, n: usize, seed: u64) -> (TestApp, Queue, Events) {
    let queue = Queue::create().await;
    let (key_id, _) = aws_helpers::create_key(&aws_helpers::kms().await).await;
    let app = TestApp::postgres_on(admin_url).await.with_kms(&key_id);
    // The binary's migrate allow-lists the key and creates the keys under it.
    app.ok(&["migrate"]);
    (app, queue, faults_helpers::gen_events(n, seed))
}

/// `pii-vault run --queue-url … --no-progress ARGS` as a worker process,
/// under a worker login of its own.
pub(crate) async fn worker(app: &TestApp, q: &Queue, name: &str, args: &[&str]) -> Worker {
    worker_with_env(app, q, name, args, &[]).await
}

pub(crate) async fn worker_with_env(
    app: &TestApp,
    q: &Queue,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Worker {
    let login = app.login_as(WORKER).await;
    let bin = env
        .iter()
        .fold(app.as_login(&login), |b, (k, v)| b.env(k, v));
    let all = [&["run", "--queue-url", &q.url, "--no-progress"][..], args].concat();
    Worker::spawn_as(name, &login.name, bin.tokio_command(&all))
}

/// Times `needle` occurs in what `w` printed so far.
fn occurrences(w: &Worker, needle: &str) -> usize {
    w.output().matches(needle).count()
}

/// The line a worker logs when a write to the database fails and is retried.
const DB_RETRY: &str = "batch write failed, retrying";

/// Waits until `w` has logged more database retries than `before`: a write
/// it tried while the database was away failed and will be tried again.
/// It must keep running meanwhile.
async fn retried_since(w: &mut Worker, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while occurrences(w, DB_RETRY) <= before {
        w.assert_running("while the database was away");
        assert!(
            Instant::now() < deadline,
            "{} retried no write within 60 s of the database going away; its output:\n{}",
            w.name,
            w.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.assert_running("while the database was away");
}

pub(crate) async fn counts(app: &TestApp) -> DbCounts {
    db_counts(app.url()).await.expect("the database answers")
}

/// Whether the run is complete: every event stored or quarantined, and
/// nothing left in the queue, visible or in flight.
pub(crate) async fn complete(app: &TestApp, q: &Queue, ev: &Events) -> bool {
    let want = ev.valid_count() + ev.malformed_count();
    match db_counts(app.url()).await {
        Some(c) if c.logins + c.quarantined >= want => q.counts().await == (0, 0),
        _ => false,
    }
}

/// The end state every fault test must reach: exactly once, nothing
/// left, no plaintext PII anywhere.
pub(crate) async fn assert_exactly_once(
    app: &TestApp,
    q: &Queue,
    ev: &Events,
    workers: &[&Worker],
) {
    let c = counts(app).await;
    let (valid, malformed) = (ev.valid_count(), ev.malformed_count());
    assert_eq!(
        c,
        DbCounts {
            logins: valid,
            distinct_logins: valid,
            vault: valid,
            quarantined: malformed,
            distinct_quarantined: malformed,
        },
        "want {valid} logins (each once, each with its vault row) and {malformed} quarantined"
    );
    assert!(
        faults_helpers::stored_logins(app.url()).await == ev.valid,
        "user_logins does not hold exactly the valid events of the input"
    );
    assert_eq!(q.counts().await, (0, 0), "the queue must be empty");

    let raw = &ev.raw;
    let db = faults_helpers::database_bytes(app.url()).await;
    let leaks = leaked(&db, raw);
    assert!(
        leaks.is_empty(),
        "the database holds {} plaintext values",
        leaks.len()
    );
    for w in workers {
        let leaks = leaked(&w.output_bytes(), raw);
        assert!(
            leaks.is_empty(),
            "worker {} printed {} plaintext IPs or device ids",
            w.name,
            leaks.len()
        );
    }
}

/// Notes the time since `t0` and what happens next on stderr (shown by the
/// test runner when a test fails), so a failure shows where time went.
pub(crate) fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

/// Whether both the database and the AWS services of the test run are
/// there (a failure otherwise; a skip under `PII_VAULT_SKIP_SERVICES=1`).
pub(crate) fn services() -> Option<(String, String)> {
    let pg = common::service_env("PII_VAULT_TEST_PG")?;
    common::service_env("PII_VAULT_TEST_AWS")?;
    let aws = aws_helpers::endpoint()?;
    Some((pg, aws))
}

/// Waits until `user_logins` holds more than `than` rows and returns the counts.
async fn rows_above(app: &TestApp, than: i64, limit: Duration) -> DbCounts {
    wait_until(
        limit,
        &format!("more than {than} stored logins"),
        || async { db_counts(app.url()).await.filter(|c| c.logins > than) },
    )
    .await
}

// ------------------------------------------------------------------ 1. database

/// PostgreSQL is stopped (`pg_ctl stop -m fast`, as in an operator's
/// restart) while the worker writes, stays away for longer than the
/// worker's connection-acquire timeout, and comes back: the worker keeps
/// running, retries with backoff, and then finishes the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_postgres_restart() {
    if services().is_none() {
        return;
    }
    let started = Instant::now();
    step(started, "private cluster");
    let pg = PrivatePg::start().await;
    step(started, "database, queue, key");
    let (app, q, ev) = setup(&pg.admin_url, 1500, 101).await;
    step(started, "sending");
    q.send(&ev.bodies[0..1500]).await;
    step(started, "worker");

    let mut w = worker(
        &app,
        &q,
        "w1",
        &["--until-empty", "--concurrency", "2", "--batch-size", "50"],
    )
    .await;
    let before = rows_above(&app, 0, Duration::from_secs(60)).await;
    step(started, "stopping the database");
    let retries = occurrences(&w, DB_RETRY);
    pg.stop_fast().await;
    step(started, "stopped");
    assert!(
        before.logins < ev.valid_count(),
        "the worker finished before the database went away; the test proves nothing"
    );
    // Away until a write has failed and is being retried (the store gives
    // up on a connection after its acquire timeout, 10 s): whatever the
    // worker was doing at the stop, it has then met the outage.
    retried_since(&mut w, retries).await;
    step(started, "starting the database");
    pg.start_again().await;
    step(started, "waiting for the worker");

    let (stored, duplicates, rejected) = w.wait_success(Duration::from_secs(90)).await;
    let log = w.output();
    assert!(
        log.contains(DB_RETRY),
        "no database retry in the log:\n{log}"
    );
    assert_eq!(stored as i64, ev.valid_count(), "summary: {stored} stored");
    assert!(
        rejected as i64 <= ev.malformed_count() && stored + duplicates + rejected >= 1500,
        "every message is counted in the summary (a redelivery as a duplicate): \
         {stored} stored, {duplicates} duplicates, {rejected} rejected"
    );
    step(started, "checking");
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    step(started, "dropping");
    app.finish().await;
    drop(pg);
    step(started, "done");
}

// ------------------------------------------------------------------ 2. SIGKILL

/// A worker is killed with SIGKILL while it holds messages; they come back
/// after the visibility timeout, and a second worker drains the queue. What
/// the first committed but never acknowledged is redelivered and counted as
/// a duplicate, not stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_loses_nothing_and_doubles_nothing() {
    let Some((shared_pg, _)) = services() else {
        return;
    };
    let started = Instant::now();
    let (app, q, ev) = setup(&shared_pg, 1200, 202).await;
    q.send(&ev.bodies[0..1200]).await;

    // A holds its messages for 15 s: longer than B needs for the rest, so
    // that B's drain has to wait for them.
    step(started, "worker A");
    let mut a = worker(
        &app,
        &q,
        "A",
        &[
            "--visibility-timeout",
            "15",
            "--concurrency",
            "2",
            "--batch-size",
            "50",
        ],
    )
    .await;
    rows_above(&app, 0, Duration::from_secs(60)).await;
    step(started, "SIGKILL A");
    a.kill9().await;
    // A statement A had sent may still commit until the server notices
    // that A is gone: count once A's sessions have ended.
    faults_helpers::wait_sessions_gone(app.url(), a.login(), Duration::from_secs(30)).await;
    let after_kill = counts(&app).await;
    assert!(
        after_kill.logins < ev.valid_count(),
        "worker A finished before it was killed; the test proves nothing"
    );
    let (_, in_flight) = q.counts().await;
    assert!(
        in_flight > 0,
        "worker A held no messages when it was killed"
    );

    // B drains the queue, A's messages included once they are visible again.
    step(started, "worker B");
    let mut b = worker(
        &app,
        &q,
        "B",
        &["--until-empty", "--visibility-timeout", VISIBILITY_SECS],
    )
    .await;
    let (stored, duplicates, rejected) = b.wait_success(Duration::from_secs(90)).await;
    step(started, "checking");
    assert!(
        b.output().contains("some are in flight"),
        "B never waited for A's messages: {}",
        b.output()
    );
    assert_eq!(
        stored as i64,
        ev.valid_count() - after_kill.logins,
        "B stores exactly what A had not committed"
    );
    assert!(duplicates + rejected + stored <= 1200);
    assert_exactly_once(&app, &q, &ev, &[&a, &b]).await;
    app.finish().await;
    step(
        started,
        &format!("done (B: {stored} stored, {duplicates} duplicates, {rejected} rejected)"),
    );
}

// ------------------------------------------------------------------ 3. SQS and KMS

/// KMS, then SQS, become unreachable for about 5 s each (a proxy between
/// the worker and LocalStack cuts every connection and refuses new ones):
/// first KMS, just as the worker needs its data key for its first batch;
/// then SQS, while the worker is receiving. The worker retries both with
/// backoff, keeps running, and ends with every event stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_sqs_and_kms_outages() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let upstream = faults_helpers::endpoint_addr(&endpoint);
    let sqs_proxy = Proxy::start(upstream).await;
    let kms_proxy = Proxy::start(upstream).await;
    let (app, q, ev) = setup(&shared_pg, 800, 303).await;
    let half = 400;

    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let (sqs_url, kms_url) = (sqs_proxy.url(), kms_proxy.url());
    let mut w = worker_with_env(
        &app,
        &q,
        "w",
        &[
            "--visibility-timeout",
            "10",
            "--concurrency",
            "2",
            "--batch-size",
            "50",
            "--metrics-addr",
            &metrics_addr,
        ],
        &[
            ("AWS_ENDPOINT_URL", &sqs_url),
            ("AWS_ENDPOINT_URL_SQS", &sqs_url),
            ("AWS_ENDPOINT_URL_KMS", &kms_url),
        ],
    )
    .await;
    // Up: it has unwrapped its token key and connected to the queue.
    wait_until(Duration::from_secs(60), "the worker's /metrics", || async {
        faults_helpers::scrape(port).await.map(|_| ())
    })
    .await;

    // KMS away before the first message: the first batch cannot get its data key.
    step(started, "KMS away");
    kms_proxy.set(ProxyMode::Refuse);
    let outage = Instant::now();
    q.send(&ev.bodies[0..half]).await;
    wait_until(
        Duration::from_secs(60),
        "a KMS retry in the log",
        || async {
            w.output()
                .contains("cannot get a data key, retrying")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(outage.elapsed())).await;
    w.assert_running("while KMS was unreachable");
    assert_eq!(counts(&app).await.logins, 0, "stored without a data key?");
    step(started, "KMS back");
    kms_proxy.set(ProxyMode::Forward);
    wait_until(
        Duration::from_secs(60),
        "the first half written",
        || async {
            db_counts(app.url())
                .await
                .filter(|c| c.logins + c.quarantined >= half as i64)
        },
    )
    .await;

    // SQS away: the second half waits in the queue until it is back.
    step(started, "SQS away");
    sqs_proxy.set(ProxyMode::Refuse);
    let outage = Instant::now();
    q.send(&ev.bodies[half..800]).await;
    wait_until(
        Duration::from_secs(60),
        "an SQS retry in the log",
        || async {
            w.output()
                .contains("receive failed, retrying")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(outage.elapsed())).await;
    w.assert_running("while SQS was unreachable");
    let during = counts(&app).await;
    assert!(
        during.logins + during.quarantined <= half as i64,
        "received while SQS was unreachable?"
    );
    step(started, "SQS back");
    sqs_proxy.set(ProxyMode::Forward);

    wait_until(Duration::from_secs(90), "the queue drained", || async {
        complete(&app, &q, &ev).await.then_some(())
    })
    .await;
    w.signal("TERM");
    let (stored, duplicates, rejected) = w.wait_success(Duration::from_secs(30)).await;
    assert_eq!(stored as i64, ev.valid_count());
    assert_eq!(rejected as i64, ev.malformed_count());
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, &format!("done ({duplicates} duplicates)"));
}

/// The network between the worker and AWS swallows packets for about 5 s
/// while the worker holds messages: connections open at that moment, and
/// those opened during it, never get an answer, not even afterwards (as when
/// a NAT or a load balancer forgets them). The worker's receives and
/// deletions must time out and be retried on fresh connections rather than
/// wait forever, and the `--until-empty` run must end with the queue empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_recovers_from_a_network_blackhole() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let proxy = Proxy::start(faults_helpers::endpoint_addr(&endpoint)).await;
    let n = 1000;
    let (app, q, ev) = setup(&shared_pg, n, 606).await;
    q.send(&ev.bodies[0..n]).await;

    step(started, "worker");
    let url = proxy.url();
    let mut w = worker_with_env(
        &app,
        &q,
        "w",
        &[
            "--until-empty",
            "--visibility-timeout",
            "10",
            "--concurrency",
            "2",
            "--batch-size",
            "50",
        ],
        &[("AWS_ENDPOINT_URL", &url)],
    )
    .await;
    let before = rows_above(&app, 0, Duration::from_secs(60)).await;
    step(started, "blackhole");
    proxy.set(ProxyMode::Blackhole);
    assert!(
        before.logins < ev.valid_count(),
        "the worker finished before the blackhole; the test proves nothing"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.assert_running("while the network swallowed its requests");
    step(started, "network back");
    proxy.set(ProxyMode::Forward);

    let (stored, _, rejected) = w.wait_success(Duration::from_secs(120)).await;
    step(started, "checking");
    assert_eq!(
        (stored as i64, rejected as i64),
        (ev.valid_count(), ev.malformed_count())
    );
    assert!(
        proxy.swallowed() > 0,
        "no connection went silent; the test proves nothing"
    );
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, "done");
}

/// SQS becomes unreachable between the commit of a batch and its
/// acknowledgement (the worker holds every message of a `--until-empty` run,
/// its inserts held back by a table lock, when SQS goes away and the lock is
/// released). The deletions must be retried until SQS is back, so that
/// the run ends with the queue empty rather than with committed messages
/// waiting out their visibility timeout to be processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_outlast_an_sqs_outage() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let proxy = Proxy::start(faults_helpers::endpoint_addr(&endpoint)).await;
    let n = 300;
    let (app, q, ev) = setup(&shared_pg, n, 505).await;
    q.send(&ev.bodies[0..n]).await;

    // Hold back every insert into user_logins until the lock is released.
    let mut locker = sqlx::PgConnection::connect(app.url()).await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE user_logins IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    step(started, "worker");
    let url = proxy.url();
    let mut w = worker_with_env(
        &app,
        &q,
        "w",
        &[
            "--until-empty",
            "--visibility-timeout",
            "30",
            "--concurrency",
            "2",
            "--batch-size",
            "50",
        ],
        &[("AWS_ENDPOINT_URL", &url)],
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "every message received and held",
        || async { (q.counts().await == (0, n as u64)).then_some(()) },
    )
    .await;
    assert_eq!(counts(&app).await.logins, 0, "written through the lock?");

    step(started, "SQS away; commits released");
    proxy.set(ProxyMode::Refuse);
    let outage = Instant::now();
    lock.rollback().await.unwrap();
    wait_until(Duration::from_secs(30), "the batches committed", || async {
        db_counts(app.url())
            .await
            .filter(|c| c.logins + c.quarantined >= n as i64)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(outage.elapsed())).await;
    w.assert_running("while its acknowledgements could not be sent");
    assert_eq!(
        q.counts().await,
        (0, n as u64),
        "deleted while SQS was unreachable?"
    );
    step(started, "SQS back");
    proxy.set(ProxyMode::Forward);

    let (stored, duplicates, rejected) = w.wait_success(Duration::from_secs(60)).await;
    step(started, "checking");
    assert_eq!(
        (stored as i64, duplicates, rejected as i64),
        (ev.valid_count(), 0, ev.malformed_count())
    );
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, "done");
}

// ------------------------------------------------------------------ 4. all of it

/// The combined run: two workers consume a known input; one is
/// SIGKILLed, the database restarts under the other, which is then stopped
/// with SIGTERM; a third finishes the queue, and its `/metrics` counters
/// agree with its summary; a final `--until-empty` drain finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_kill_restart_and_stop_keep_every_event_exactly_once() {
    if services().is_none() {
        return;
    }
    let started = Instant::now();
    let pg = PrivatePg::start().await;
    let n = 1600;
    let (app, q, ev) = setup(&pg.admin_url, n, 404).await;
    let parts = [0..500, 500..900, 900..1300, 1300..n];
    let daemon = [
        "--visibility-timeout",
        VISIBILITY_SECS,
        "--concurrency",
        "2",
        "--batch-size",
        "50",
    ];

    step(started, "workers A and B");
    q.send(&ev.bodies[parts[0].clone()]).await;
    let mut a = worker(&app, &q, "A", &daemon).await;
    let mut b = worker(&app, &q, "B", &daemon).await;

    // SIGKILL A once work is under way.
    rows_above(&app, 0, Duration::from_secs(60)).await;
    step(started, "SIGKILL A");
    a.kill9().await;
    faults_helpers::wait_sessions_gone(app.url(), a.login(), Duration::from_secs(30)).await;
    let killed = counts(&app).await;
    q.send(&ev.bodies[parts[1].clone()]).await;

    // Restart the database under B once it writes the new messages.
    let seen = rows_above(&app, killed.logins, Duration::from_secs(60)).await;
    step(started, "stopping the database");
    let retries = occurrences(&b, DB_RETRY);
    pg.stop_fast().await;
    retried_since(&mut b, retries).await;
    step(started, "starting the database");
    pg.start_again().await;
    b.assert_running("after the database came back");

    // SIGTERM B as soon as it writes again: it finishes its batch and exits 0.
    let restarted = counts(&app).await;
    assert!(restarted.logins >= seen.logins);
    q.send(&ev.bodies[parts[2].clone()]).await;
    rows_above(&app, restarted.logins, Duration::from_secs(60)).await;
    step(started, "SIGTERM B");
    b.signal("TERM");
    let b_summary = b.wait_success(Duration::from_secs(60)).await;
    assert!(
        b.output().contains("shutting down"),
        "B did not log its shutdown"
    );

    // C finishes the queue; its metrics agree with its summary.
    step(started, "worker C");
    q.send(&ev.bodies[parts[3].clone()]).await;
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut c = worker(
        &app,
        &q,
        "C",
        &[&daemon[..], &["--metrics-addr", &metrics_addr]].concat(),
    )
    .await;
    wait_until(
        Duration::from_secs(120),
        "the queue drained by C",
        || async { complete(&app, &q, &ev).await.then_some(()) },
    )
    .await;
    let body = wait_until(Duration::from_secs(30), "C's /metrics", || {
        faults_helpers::scrape(port)
    })
    .await;
    let scraped = (
        faults_helpers::metric(&body, "pii_vault_logins_stored_total"),
        faults_helpers::metric(&body, "pii_vault_duplicates_total"),
        faults_helpers::metric(&body, "pii_vault_rejected_total"),
    );
    step(started, "SIGTERM C");
    c.signal("TERM");
    let c_summary = c.wait_success(Duration::from_secs(30)).await;
    assert_eq!(
        c_summary, scraped,
        "C's summary (stored, duplicates, rejected) and its /metrics disagree"
    );
    assert!(c_summary.0 > 0, "C stored nothing: {c_summary:?}");
    let leaks = leaked(body.as_bytes(), &ev.raw);
    assert!(leaks.is_empty(), "/metrics holds plaintext PII");

    // A final drain finds nothing left.
    step(started, "worker D");
    let mut d = worker(
        &app,
        &q,
        "D",
        &["--until-empty", "--visibility-timeout", VISIBILITY_SECS],
    )
    .await;
    assert_eq!(d.wait_success(Duration::from_secs(60)).await, (0, 0, 0));

    step(started, "checking");
    assert_exactly_once(&app, &q, &ev, &[&a, &b, &c, &d]).await;
    app.finish().await;
    drop(pg);
    step(started, &format!("done (B {b_summary:?}, C {c_summary:?})"));
}

// ------------------------------------------------------------------ 5. Postgres crash

/// Rows of `vault` and `quarantine` still sealed under a data key that a
/// finished data-key rotation retired, or under a destroyed key.
async fn rows_under_retired_keys(app: &TestApp) -> i64 {
    app.scalar(
        "WITH retired AS ( \
           SELECT unnest(old_keys) AS id FROM rotation_jobs \
           WHERE kind = 'rotate-data-keys' AND finished_at IS NOT NULL \
           UNION SELECT id FROM vault_keys WHERE state = 'destroyed') \
         SELECT (SELECT count(*) FROM vault WHERE key_id IN (SELECT id FROM retired)) \
              + (SELECT count(*) FROM quarantine WHERE key_id IN (SELECT id FROM retired))",
    )
    .await
}

/// Waits until `/readyz` on `port` answers `status` (the worker's checks
/// are cached for up to 5 s, so this takes up to that long); a 503 must
/// name the database as what is unreachable.
async fn readyz_becomes(w: &mut Worker, port: u16, status: u16, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        w.assert_running(when);
        let answer = faults_helpers::http_get(port, "/readyz").await;
        let got = answer.as_ref().map(|(s, _)| *s);
        if let Some((503, body)) = &answer {
            assert!(
                body.contains("database: unreachable"),
                "{}'s /readyz: {body}",
                w.name
            );
        }
        if got == Some(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s /readyz still says {got:?}, not {status}, {when}",
            w.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The postmaster and every backend are SIGKILLed at once (a crash of the
/// database's machine or container) while two SQS workers write, a file
/// worker waits for more of its input (which comes while the database is
/// away), a data-key rotation is halfway (held by row locks on the rows it
/// has yet to do) and a reveal waits for a lock inside its audited
/// transaction; then the server starts again and runs crash recovery. The
/// workers keep running and retry with backoff (the file worker with the
/// input it got meanwhile), the SQS workers' `/readyz` says not ready while
/// the database is away and ready again after; the reveal fails without printing a row (or,
/// had it committed, printed what its committed audit row says); the
/// rotation, run again, resumes its job and finishes it; and in the end
/// every valid event is stored exactly once, none under a key the rotation
/// retired, with no plaintext in any table, dump, process output or the
/// server's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_rotation_and_reveal_survive_a_postgres_crash() {
    if services().is_none() {
        return;
    }
    let started = Instant::now();
    let pg = PrivatePg::start().await;
    let n = 3600;
    let (app, q, ev) = setup(&pg.admin_url, n, 707).await;
    // Through SQS: 0..first before the crash, first..sqs while it happens.
    // Through a file worker's stdin: sqs..half before, half..n after.
    let (first, sqs, half) = (1000, 3000, 3300);
    let lines = |r: std::ops::Range<usize>| ev.bodies[r].join("\n") + "\n";
    let daemon = [
        "--visibility-timeout",
        VISIBILITY_SECS,
        "--concurrency",
        "2",
        "--batch-size",
        "20",
    ];

    step(started, "workers A and B, the first part");
    let ports = [free_port(), free_port()];
    let metrics = ports.map(|p| format!("127.0.0.1:{p}"));
    let mut a = worker(
        &app,
        &q,
        "A",
        &[&daemon[..], &["--metrics-addr", &metrics[0]]].concat(),
    )
    .await;
    let mut b = worker(
        &app,
        &q,
        "B",
        &[&daemon[..], &["--metrics-addr", &metrics[1]]].concat(),
    )
    .await;
    step(started, "file worker F");
    let file_login = app.login_as(WORKER).await;
    let mut f_cmd = app.as_login(&file_login).tokio_command(&[
        "run",
        "--from-file",
        "-",
        "--source-id",
        "crash-stdin",
        "--no-progress",
        "--batch-size",
        "20",
    ]);
    f_cmd.stdin(std::process::Stdio::piped());
    let mut f = Worker::spawn_as("F", &file_login.name, f_cmd);
    let mut f_input = f.take_stdin().expect("F's stdin");
    f_input
        .write_all(lines(sqs..half).as_bytes())
        .await
        .unwrap();
    f_input.flush().await.unwrap();
    q.send(&ev.bodies[0..first]).await;
    let before_part = (first + half - sqs) as i64;
    wait_until(
        Duration::from_secs(120),
        "the first part written",
        || async {
            db_counts(app.url())
                .await
                .filter(|c| c.logins + c.quarantined >= before_part)
        },
    )
    .await;
    readyz_becomes(&mut a, ports[0], 200, "before the crash").await;
    readyz_becomes(&mut b, ports[1], 200, "before the crash").await;

    // The rotation, under a rotator login, in small chunks; once it has
    // committed some, the rows it has yet to do are locked (by the owner,
    // skipping those its chunk in progress holds), so that it is halfway
    // when the server dies.
    step(started, "rotation");
    let rotator = app.login_as(ROTATOR).await;
    let rotate = ["rotate", "data-keys", "--jobs", "2", "--chunk-rows", "10"];
    let mut rotation = Worker::spawn_as(
        "rotation",
        &rotator.name,
        app.as_login(&rotator).tokio_command(&rotate),
    );
    wait_until(
        Duration::from_secs(60),
        "the rotation's first chunks",
        || async {
            let done = app
                .scalar(
                    "SELECT coalesce(sum(r.rows_done), 0)::bigint FROM rotation_ranges r \
                 JOIN rotation_jobs j ON j.id = r.job_id WHERE j.finished_at IS NULL",
                )
                .await;
            (done > 0).then_some(())
        },
    )
    .await;
    let mut holder = sqlx::PgConnection::connect(app.url()).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    let locked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM vault WHERE key_id IN ( \
           SELECT unnest(old_keys) FROM rotation_jobs \
           WHERE kind = 'rotate-data-keys' AND finished_at IS NULL) \
         FOR UPDATE OF vault SKIP LOCKED) held",
    )
    .fetch_one(&mut *held)
    .await
    .unwrap();
    rotation.assert_running("before the crash");
    assert!(
        locked > 0,
        "the rotation had nothing left to do; the test proves nothing"
    );
    wait_until(
        Duration::from_secs(60),
        "the rotation to wait for a row lock",
        || async {
            faults_helpers::sessions_of(app.url(), &rotator.name)
                .await
                .filter(|s| s.iter().any(|s| s.waits_for_a_lock()))
        },
    )
    .await;

    // The reveal, under a revealer login: its audited transaction waits for
    // the row of its daily quota, which the owner's transaction holds.
    step(started, "reveal");
    let revealer = app.login_as(REVEALER).await;
    let user: String = sqlx::query_scalar("SELECT user_id FROM user_logins LIMIT 1")
        .fetch_one(app.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO reveal_quota (login, last_at) VALUES ($1, now()) \
         ON CONFLICT (login) DO UPDATE SET last_at = excluded.last_at",
    )
    .bind(&revealer.name)
    .execute(&mut *held)
    .await
    .unwrap();
    let reveal_args = [
        "reveal",
        "--user-id",
        &user,
        "--reason",
        "fault test",
        "--format",
        "json",
    ];
    let reveal = app
        .as_login(&revealer)
        .tokio_command(&reveal_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reveal = tokio::spawn(reveal.wait_with_output());
    wait_until(
        Duration::from_secs(60),
        "the reveal to wait for a lock",
        || async {
            faults_helpers::sessions_of(app.url(), &revealer.name)
                .await
                .filter(|s| s.iter().any(|s| s.waits_for_a_lock()))
        },
    )
    .await;

    // The second part, sent while the workers write it and the server dies.
    let written = counts(&app).await;
    let crash = async {
        rows_above(&app, written.logins, Duration::from_secs(60)).await;
        a.assert_running("before the crash");
        b.assert_running("before the crash");
        let before = counts(&app).await;
        step(started, "crash");
        pg.crash().await;
        before
    };
    let ((), before_crash) = tokio::join!(q.send(&ev.bodies[first..sqs]), crash);
    // Of the `sqs` messages and the file's first `half - sqs` lines, some
    // were still to be written when the server died.
    assert!(
        before_crash.logins + before_crash.quarantined < half as i64,
        "the workers had written everything before the crash; the test proves nothing"
    );
    drop(held);
    drop(holder);

    // While it is away: the workers keep running, retry, and are not ready.
    // F gets the rest of its input now, and must retry its writes.
    step(started, "database away");
    let f_retries = occurrences(&f, DB_RETRY);
    f_input.write_all(lines(half..n).as_bytes()).await.unwrap();
    drop(f_input);
    retried_since(&mut f, f_retries).await;
    readyz_becomes(&mut a, ports[0], 503, "while the database was away").await;
    readyz_becomes(&mut b, ports[1], 503, "while the database was away").await;
    a.assert_running("while the database was away");
    b.assert_running("while the database was away");

    step(started, "restart: crash recovery");
    pg.start_again().await;
    readyz_becomes(&mut a, ports[0], 200, "after the database came back").await;
    readyz_becomes(&mut b, ports[1], 200, "after the database came back").await;
    let (retried_a, retried_b) = (occurrences(&a, DB_RETRY), occurrences(&b, DB_RETRY));
    assert!(
        retried_a + retried_b > 0,
        "neither worker retried a write across the crash"
    );

    // The reveal in flight: nothing shown without its audit row committed.
    let reveal = tokio::time::timeout(Duration::from_secs(120), reveal)
        .await
        .expect("the reveal still runs 120 s after the crash")
        .unwrap()
        .unwrap();
    let revealed = String::from_utf8_lossy(&reveal.stdout).into_owned();
    let audited = app
        .scalar(&format!(
            "SELECT count(*) FROM audit_log WHERE action = 'reveal' AND actor = '{}'",
            revealer.name
        ))
        .await;
    let reveal_outcome = if reveal.status.success() {
        assert!(audited == 1 && revealed.contains("\"ip\""), "{revealed}");
        "served"
    } else {
        assert!(revealed.is_empty(), "a failed reveal printed: {revealed}");
        assert_eq!(audited, 0, "an audit row of a reveal that failed");
        "failed"
    };
    // Run again, it is served and audited.
    let out = app.as_login(&revealer).ok_output(&reveal_args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ip\""));
    let reveal_stderr = [reveal.stderr, out.stderr].concat();

    // The rotation: its run ends (it cannot hold a job across a crash of
    // the database); run again, it resumes its job and finishes it.
    step(started, "rotation again");
    let status = rotation.wait(Duration::from_secs(120)).await;
    let again = if status.success() {
        None
    } else {
        assert!(
            rotation
                .output()
                .contains("error: database unreachable or connection lost"),
            "the rotation failed ({status}) for another reason: {}",
            rotation.output()
        );
        let out = app.as_login(&rotator).ok_output(&rotate);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains("resuming rotate-data-keys job"),
            "the rerun did not resume the job: {stderr}"
        );
        Some(stderr)
    };
    assert_eq!(
        app.scalar("SELECT count(*) FROM rotation_jobs WHERE finished_at IS NULL")
            .await,
        0,
        "the rotation's job is still open"
    );

    step(started, "drain");
    wait_until(Duration::from_secs(180), "the queue drained", || async {
        complete(&app, &q, &ev).await.then_some(())
    })
    .await;
    a.signal("TERM");
    b.signal("TERM");
    let sa = a.wait_success(Duration::from_secs(60)).await;
    let sb = b.wait_success(Duration::from_secs(60)).await;
    // F ends at the end of its input.
    let sf = f.wait_success(Duration::from_secs(60)).await;
    // A batch whose commit reached the disk but whose acknowledgement died
    // with the server is written again, found there, and counted as a
    // duplicate: the summaries add up to at least every message, and
    // store no more than the valid ones.
    let (stored, duplicates, rejected) =
        (sa.0 + sb.0 + sf.0, sa.1 + sb.1 + sf.1, sa.2 + sb.2 + sf.2);
    assert!(
        stored as i64 <= ev.valid_count() && stored + duplicates + rejected >= n as u64,
        "the workers' summaries: A {sa:?}, B {sb:?}, F {sf:?}"
    );

    step(started, "checking");
    assert_exactly_once(&app, &q, &ev, &[&a, &b, &f, &rotation]).await;
    assert_eq!(
        rows_under_retired_keys(&app).await,
        0,
        "rows left under a key the finished rotation retired"
    );
    let dump = crate::common::production::pg_dump(app.url(), &app.path("dump.sql")).await;
    let mut elsewhere = vec![
        ("a pg_dump of the database", dump),
        ("the server's log", pg.log().into_bytes()),
        ("the reveals' stderr", reveal_stderr),
    ];
    if let Some(stderr) = again {
        elsewhere.push(("the second rotation's output", stderr.into_bytes()));
    }
    for (what, bytes) in elsewhere {
        let leaks = leaked(&bytes, &ev.raw);
        assert!(
            leaks.is_empty(),
            "{what} holds {} plaintext values",
            leaks.len()
        );
    }
    app.finish().await;
    drop(pg);
    step(
        started,
        &format!(
            "done (A {sa:?}, B {sb:?}, F {sf:?}, retries {retried_a} + {retried_b}, \
             reveal {reveal_outcome}, rotation {status})"
        ),
    );
}
