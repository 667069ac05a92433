//! KMS faults, and a reveal's audit failing closed: real processes, each as
//! its role's own database login, against Postgres and LocalStack, with KMS
//! reached through a fault-injecting proxy per process
//! ([`AwsProxy`]: throttling, 5xx, resets, multi-second latency, outages,
//! held calls) that also records every KMS call the process made.
//!
//! - A running worker keeps writing under the data key it holds while KMS
//!   fails, and replaces it (a rotation retired it) once KMS answers; a
//!   worker that must call KMS backs off and is not ready meanwhile
//!   (`/readyz` 503), from its start on; nothing is lost or doubled.
//! - A reveal with KMS away fails with a clear error and adds no audit row;
//!   with vault keys that cannot be unwrapped, it prints nothing and its
//!   recorded request stays unfetched.
//! - A reveal whose audit row cannot be committed (its insert waits on the
//!   chain's lock past `lock_timeout`; its connection is terminated while
//!   it waits) shows nothing.
//! - `rotate kek` killed half-way, inside a `ReEncrypt`, resumes.
//! - The KMS calls of a whole run (workers, reveals, each rotation,
//!   retention) replayed against each role's example key policy in
//!   `keys/`: every call allowed, and what SECURITY.md says a role must
//!   not do, denied.
//!
//! Every test ends with exactly once (by the generator's manifest), no
//! plaintext IP or device id in any table or in any process's output but a
//! served reveal's stdout, and, where SQS is used, the queue empty.

use crate::common::app::{Bin, Login, TestApp, REVEALER, ROTATOR, SEARCHER, WORKER};
use crate::common::aws::Queue;
use crate::common::aws_proxy::{AwsProxy, Call, Fault, Plan};
use crate::common::faults::{self as fh, db_counts, wait_until, Events, Worker};
use crate::common::kms_policy::{self, Decision, Policy, Request};
use crate::common::production::{self as prod, Finished};
use crate::common::{self, aws as aws_helpers};

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::Connection as _;

/// The longest any one wait or command may take before the test fails.
const LIMIT: Duration = Duration::from_secs(90);

fn services() -> Option<(String, String)> {
    prod::services()
}

/// A database migrated by the binary (as the owner, straight to KMS) under
/// a fresh KMS key; `n` generated events.
struct Fixture {
    app: TestApp,
    key_id: String,
    endpoint: String,
    ev: Events,
}

async fn setup(pg: &str, endpoint: &str, n: usize, seed: u64) -> Fixture {
    let (key_id, _) = aws_helpers::create_key(&aws_helpers::kms().await).await;
    let app = TestApp::postgres_on(pg).await.with_kms(&key_id);
    app.ok(&["migrate"]);
    Fixture {
        app,
        key_id,
        endpoint: endpoint.to_string(),
        ev: fh::gen_events(n, seed),
    }
}

impl Fixture {
    /// The binary as `login`, its KMS calls through `proxy`.
    fn via(&self, login: &Login, proxy: &AwsProxy) -> Bin {
        self.app
            .as_login(login)
            .env("AWS_ENDPOINT_URL_KMS", &proxy.url())
    }

    /// A proxy in front of KMS recording under `label`.
    async fn proxy(&self, label: &str) -> AwsProxy {
        AwsProxy::start(&self.endpoint, label).await
    }

    /// `run --from-file` of `bodies` as `login`, through `proxy`.
    async fn load_file(
        &self,
        login: &Login,
        proxy: &AwsProxy,
        name: &str,
        bodies: &[String],
    ) -> Finished {
        let file = self.app.write(name, &(bodies.join("\n") + "\n"));
        prod::run_ok(
            self.via(login, proxy)
                .tokio_command(&["run", "--from-file", &file, "--no-progress"]),
            LIMIT,
            &format!("run --from-file {name}"),
        )
        .await
    }
}

async fn wait_ready(port: u16, want: u16, what: &str) {
    wait_until(LIMIT, what, || async {
        match crate::common::faults::readyz(port).await {
            Some(s) if s == want => Ok(()),
            other => Err(format!("/readyz {other:?}")),
        }
    })
    .await
}

/// The value of a sample (`name{labels}`) in a Prometheus text body.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

/// Stored + quarantined rows.
async fn rows(app: &TestApp) -> i64 {
    db_counts(app.url())
        .await
        .map_or(-1, |c| c.logins + c.quarantined)
}

/// Exactly once by the generator's manifest (every valid event one login
/// with its vault row, every malformed one quarantined; once `erased` by
/// retention, the logins alone), no plaintext in any table or in `outputs`.
async fn assert_end_state(app: &TestApp, ev: &Events, erased: bool, outputs: &[(String, Vec<u8>)]) {
    let c = db_counts(app.url()).await.expect("the database answers");
    let (valid, malformed) = (ev.valid_count(), ev.malformed_count());
    assert_eq!(
        (c.logins, c.distinct_logins),
        (valid, valid),
        "every valid event stored exactly once"
    );
    let (vault, quarantined) = if erased { (0, 0) } else { (valid, malformed) };
    assert_eq!(c.vault, vault, "vault rows");
    assert_eq!(
        (c.quarantined, c.distinct_quarantined),
        (quarantined, quarantined),
        "every malformed event quarantined exactly once (none after retention)"
    );
    assert!(
        fh::stored_logins(app.url()).await == ev.valid,
        "user_logins does not hold exactly the valid events of the input"
    );
    let db = fh::database_bytes(app.url()).await;
    let leaks = common::leaked(&db, &ev.raw);
    assert!(
        leaks.is_empty(),
        "the database holds {} plaintext values",
        leaks.len()
    );
    for (what, bytes) in outputs {
        let leaks = common::leaked(bytes, &ev.raw);
        assert!(
            leaks.is_empty(),
            "{what} printed {} plaintext values",
            leaks.len()
        );
    }
}

/// A user id of a valid event, and how many logins it has.
fn some_user(ev: &Events) -> (String, usize) {
    let user = ev.valid[0].0.clone();
    let n = ev.valid.iter().filter(|v| v.0 == user).count();
    (user, n)
}

// ------------------------------------------------------------------ worker

/// The worker starts while KMS is out (not ready, retrying, not exiting),
/// writes once it answers, keeps writing under the data key it holds while
/// every KMS call fails, and, once a rotation retired that key, rides out
/// throttling, 5xx, resets, an outage and multi-second latency while it
/// needs a fresh one (not ready meanwhile), then writes under the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rides_out_kms_faults_and_loses_nothing() {
    let Some((pg, endpoint)) = services() else {
        return;
    };
    let fx = setup(&pg, &endpoint, 600, 2001).await;
    let app = &fx.app;
    let q = Queue::create().await;
    let worker = app.login_as(WORKER).await;
    let rotator = app.login_as(ROTATOR).await;
    let kms = fx.proxy("worker").await;
    let port = common::free_port();
    let metrics = format!("127.0.0.1:{port}");

    // KMS out before the worker starts.
    kms.set(Plan::all(Fault::Outage));
    let mut w = Worker::spawn(
        "worker",
        fx.via(&worker, &kms).tokio_command(&[
            "run",
            "--queue-url",
            &q.url,
            "--no-progress",
            "--visibility-timeout",
            "10",
            "--batch-size",
            "25",
            "--writers",
            "1",
            "--metrics-addr",
            &metrics,
        ]),
    );
    wait_ready(port, 503, "/readyz 503 while KMS is out at start-up").await;
    wait_until(LIMIT, "a start-up KMS retry in the log", || async {
        w.output()
            .contains("checking the key-encryption key: KMS does not answer, retrying")
            .then_some(())
    })
    .await;
    w.assert_running("while KMS was out at start-up");
    kms.pass();
    wait_ready(port, 200, "/readyz 200 once KMS answers").await;

    // Wave 1 with KMS up: the worker takes its data key.
    let (wave1, wave2, wave3) = (
        &fx.ev.bodies[..200],
        &fx.ev.bodies[200..400],
        &fx.ev.bodies[400..],
    );
    q.send(wave1).await;
    wait_until(LIMIT, "wave 1 written", || async {
        (rows(app).await >= 200).then_some(())
    })
    .await;
    let generated = kms.calls_of("GenerateDataKey").len();
    assert_eq!(generated, 1, "one data key for wave 1");

    // Every KMS call fails: wave 2 is written under the key in hand.
    kms.set(Plan::all(Fault::ServerError(500)));
    q.send(wave2).await;
    wait_until(LIMIT, "wave 2 written while KMS fails", || async {
        (rows(app).await >= 400).then_some(())
    })
    .await;
    assert_eq!(
        kms.calls_of("GenerateDataKey").len(),
        generated,
        "the worker asked KMS for a data key while it held one"
    );
    wait_ready(port, 503, "/readyz 503 while KMS fails").await;

    // A rotation retires the worker's data key; the worker must ask KMS
    // for a fresh one while it is throttled, fails, resets, is out, slow.
    let rot = fx.proxy("rotator").await;
    let rotated = prod::run_ok(
        fx.via(&rotator, &rot)
            .tokio_command(&["rotate", "data-keys"]),
        LIMIT,
        "rotate data-keys",
    )
    .await;
    kms.set(Plan::all(Fault::Throttle));
    q.send(wave3).await;
    for (fault, what) in [
        (Fault::Throttle, "throttled"),
        (Fault::ServerError(503), "a 503"),
        (Fault::Reset, "a reset"),
    ] {
        kms.set(Plan::all(fault));
        kms.wait_for(&format!("GenerateDataKey {what}"), LIMIT, |c| {
            c.operation == "GenerateDataKey" && c.fault == fault
        })
        .await;
    }
    let retries_before = w
        .output()
        .matches("cannot get a data key, retrying")
        .count();
    kms.set(Plan::all(Fault::Outage));
    wait_until(LIMIT, "a data-key retry during the outage", || async {
        (w.output()
            .matches("cannot get a data key, retrying")
            .count()
            > retries_before)
            .then_some(())
    })
    .await;
    w.assert_running("through throttling, 5xx, resets and an outage");
    let body = fh::scrape(port).await.expect("/metrics answers");
    assert!(
        sample(&body, "pii_vault_retries_total{dependency=\"kms\"}") >= 1.0,
        "KMS retries are counted"
    );
    assert!(rows(app).await < 600, "wave 3 written without a data key?");
    kms.set(Plan::all(Fault::Latency(Duration::from_secs(3))));
    kms.wait_for("a slow GenerateDataKey answered", LIMIT, |c| {
        c.operation == "GenerateDataKey"
            && matches!(c.fault, Fault::Latency(_))
            && c.status == Some(200)
    })
    .await;
    kms.pass();
    wait_until(LIMIT, "every event written and the queue empty", || async {
        (rows(app).await >= 600 && q.counts().await == (0, 0)).then_some(())
    })
    .await;
    wait_ready(port, 200, "/readyz 200 again").await;
    w.signal("TERM");
    let (stored, _, rejected) = w.wait_success(LIMIT).await;
    assert_eq!(stored as i64, fx.ev.valid_count());
    assert_eq!(rejected as i64, fx.ev.malformed_count());
    let worker_keys = app
        .scalar(&format!(
            "SELECT count(*) FROM vault_keys WHERE purpose = 'vault' AND created_by = '{}'",
            worker.name
        ))
        .await;
    assert_eq!(
        worker_keys, 2,
        "the worker's first data key, and the one after the rotation"
    );
    assert_eq!(q.counts().await, (0, 0), "the queue must be empty");
    assert_end_state(
        app,
        &fx.ev,
        false,
        &[
            ("the worker".into(), w.output_bytes()),
            ("rotate data-keys".into(), rotated.all_output()),
        ],
    )
    .await;
    drop(w);
    fx.app.finish().await;
}

// ------------------------------------------------------------------ reveal

/// The audit rows and reveal requests there are.
async fn trail(app: &TestApp) -> (i64, i64) {
    (
        app.count("audit_log").await,
        app.count("reveal_requests").await,
    )
}

/// A failed reveal: exit 1, nothing on stdout, its stderr saying each of
/// `said`.
fn assert_refused(out: &Finished, what: &str, said: &[&str]) {
    let err = out.stderr_text();
    assert_eq!(out.status.code(), Some(1), "{what}: {}\n{err}", out.status);
    assert!(
        out.stdout.is_empty(),
        "{what} printed a result:\n{}",
        out.stdout_text()
    );
    for s in said {
        assert!(
            err.contains(s),
            "{what}: the error does not say {s:?}:\n{err}"
        );
    }
}

/// KMS out: the reveal fails before it records anything. Vault keys that
/// cannot be unwrapped (Decrypt fails, DescribeKey answers): it fails after
/// recording its request, which stays unfetched, and prints nothing. Once
/// KMS answers, a reveal shows the user's logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_without_kms_shows_nothing_and_records_no_showing() {
    let Some((pg, endpoint)) = services() else {
        return;
    };
    let fx = setup(&pg, &endpoint, 120, 2002).await;
    let app = &fx.app;
    let worker = app.login_as(WORKER).await;
    let revealer = app.login_as(REVEALER).await;
    let wk = fx.proxy("worker").await;
    let loaded = fx
        .load_file(&worker, &wk, "logins.jsonl", &fx.ev.bodies)
        .await;
    let (user, logins) = some_user(&fx.ev);
    let kms = fx.proxy("revealer").await;
    let reveal = |bin: Bin| {
        let user = user.clone();
        async move {
            prod::output_within(
                bin.tokio_command(&[
                    "reveal",
                    "--user-id",
                    &user,
                    "--reason",
                    "kms faults",
                    "--format",
                    "json",
                ]),
                LIMIT,
                "reveal",
            )
            .await
        }
    };

    // KMS out: refused before anything is recorded.
    let before = trail(app).await;
    kms.set(Plan::all(Fault::Outage));
    let out = reveal(fx.via(&revealer, &kms)).await;
    assert_refused(
        &out,
        "a reveal with KMS out",
        &["KMS DescribeKey", "cannot connect"],
    );
    assert_eq!(
        trail(app).await,
        before,
        "a reveal with KMS out left an audit row"
    );

    // DescribeKey answers, Decrypt fails: the request is recorded, not fetched.
    kms.set(Plan::only(Fault::ServerError(500), &["Decrypt"]));
    let failed = reveal(fx.via(&revealer, &kms)).await;
    assert_refused(
        &failed,
        "a reveal whose keys cannot be unwrapped",
        &["nothing was revealed", "KMS Decrypt: InternalFailure"],
    );
    assert_eq!(
        trail(app).await,
        (before.0 + 1, before.1 + 1),
        "the request is on the record"
    );
    let unfetched = app
        .scalar("SELECT count(*) FROM reveal_requests WHERE fetched_at IS NULL")
        .await;
    assert_eq!(
        unfetched, 1,
        "the failed reveal's request must stay unfetched"
    );

    // KMS answers: the reveal is served.
    kms.pass();
    let served = reveal(fx.via(&revealer, &kms)).await;
    served.assert_success("a reveal with KMS up");
    let shown = prod::parse_reveal(&served.stdout_text());
    assert_eq!(shown.len(), logins, "the user's logins");
    assert!(shown
        .iter()
        .all(|r| r.ip.is_some() && r.device_id.is_some()));
    assert_eq!(
        app.scalar("SELECT count(*) FROM reveal_requests WHERE fetched_at IS NOT NULL")
            .await,
        1,
        "only the served reveal is fetched"
    );
    assert_end_state(
        app,
        &fx.ev,
        false,
        &[
            ("run --from-file".into(), loaded.all_output()),
            ("the refused reveal".into(), out.all_output()),
            ("the failed reveal".into(), failed.all_output()),
            ("the served reveal's stderr".into(), served.stderr.clone()),
        ],
    )
    .await;
    fx.app.finish().await;
}

/// The backend of `login` waiting on a lock, once there is one.
async fn waiting_backend(app: &TestApp, login: &Login) -> i32 {
    wait_until(
        LIMIT,
        "the reveal waiting on the audit chain's lock",
        || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&login.name)
            .fetch_optional(app.pool())
            .await
            .unwrap()
        },
    )
    .await
}

/// Another session holds the audit chain's head: the reveal's audit insert
/// gives up at `lock_timeout` (55P03), or its connection is terminated
/// while it waits (57P01). Either way nothing is recorded and nothing is
/// shown. A connection cut once the request committed loses nothing and
/// shows nothing off the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_whose_audit_row_cannot_commit_shows_nothing() {
    let Some((pg, endpoint)) = services() else {
        return;
    };
    let fx = setup(&pg, &endpoint, 80, 2003).await;
    let app = &fx.app;
    let worker = app.login_as(WORKER).await;
    let wk = fx.proxy("worker").await;
    let loaded = fx
        .load_file(&worker, &wk, "logins.jsonl", &fx.ev.bodies)
        .await;
    let (user, logins) = some_user(&fx.ev);
    let kms = fx.proxy("revealer").await;
    let args = [
        "reveal",
        "--user-id",
        &user,
        "--reason",
        "audit fails closed",
        "--format",
        "json",
    ];
    let before = trail(app).await;

    // The chain's head, held by another session.
    let mut holder = app
        .hold_open("SELECT 1 FROM audit_chain WHERE chain = 'trail' FOR UPDATE")
        .await;

    // 1. lock_timeout: the insert gives up.
    let impatient = app.login_as(REVEALER).await;
    app.exec(&format!(
        "ALTER ROLE {} SET lock_timeout = '1s'",
        impatient.name
    ))
    .await;
    let timed_out = prod::output_within(
        fx.via(&impatient, &kms).tokio_command(&args),
        LIMIT,
        "reveal under lock_timeout",
    )
    .await;
    assert_refused(
        &timed_out,
        "a reveal past lock_timeout",
        &[
            "55P03",
            "stayed held by another session past lock_timeout",
            "run the same command again",
        ],
    );

    // 2. The connection is terminated while the insert waits.
    let revealer = app.login_as(REVEALER).await;
    let mut cut = Worker::spawn("reveal", fx.via(&revealer, &kms).tokio_command(&args));
    let pid = waiting_backend(app, &revealer).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(terminated);
    let status = cut.wait(LIMIT).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "a reveal whose connection was cut:\n{}",
        cut.output()
    );
    assert!(
        !cut.output().contains("\"ip\""),
        "a reveal whose connection was cut printed rows"
    );
    assert!(
        cut.output().contains("connection lost: SQLSTATE 57P01"),
        "the cut reveal names the lost connection:\n{}",
        cut.output()
    );
    assert_eq!(
        trail(app).await,
        before,
        "nothing recorded by either reveal"
    );

    // The lock released, a reveal is served and recorded.
    let served = prod::run_ok(
        fx.via(&revealer, &kms).tokio_command(&args),
        LIMIT,
        "reveal",
    )
    .await;
    assert_eq!(prod::parse_reveal(&served.stdout_text()).len(), logins);
    assert_eq!(trail(app).await, (before.0 + 1, before.1 + 1));

    // 3. The connection is cut after the request committed, while the
    // reveal waits on KMS (its first Decrypt held): the request is on the
    // record, so the reveal may go on, on a fresh connection, and what it
    // shows is what that record names, its fetch recorded.
    let late_login = app.login_as(REVEALER).await;
    kms.set(Plan::only(Fault::Hold, &["Decrypt"]));
    let late = tokio::spawn(prod::output_within(
        fx.via(&late_login, &kms).tokio_command(&args),
        LIMIT,
        "the reveal whose connection is cut after its request",
    ));
    kms.wait_for("the reveal's held Decrypt", LIMIT, |c| {
        c.operation == "Decrypt" && c.fault == Fault::Hold
    })
    .await;
    assert_eq!(
        trail(app).await,
        (before.0 + 2, before.1 + 2),
        "the request committed"
    );
    let cut_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
    )
    .bind(&late_login.name)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(cut_after >= 1, "the reveal holds a connection");
    kms.pass();
    let late = late.await.unwrap();
    late.assert_success("the reveal whose connection was cut after its request");
    assert_eq!(
        prod::parse_reveal(&late.stdout_text()).len(),
        logins,
        "the rows its record names"
    );
    assert_eq!(
        trail(app).await,
        (before.0 + 2, before.1 + 2),
        "no other record"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM reveal_requests WHERE fetched_at IS NOT NULL")
            .await,
        2,
        "both served reveals are fetched"
    );
    assert_end_state(
        app,
        &fx.ev,
        false,
        &[
            ("run --from-file".into(), loaded.all_output()),
            ("the timed-out reveal".into(), timed_out.all_output()),
            ("the cut reveal".into(), cut.output_bytes()),
            ("the served reveal's stderr".into(), served.stderr.clone()),
            ("the late reveal's stderr".into(), late.stderr.clone()),
        ],
    )
    .await;
    drop(cut);
    fx.app.finish().await;
}

// ------------------------------------------------------------------ rotate kek

/// `rotate kek` is killed inside its third `ReEncrypt` (held by the proxy);
/// run again, it moves the keys it had not moved, none twice, and every
/// key ends under the new KMS key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_killed_midway_resumes() {
    let Some((pg, endpoint)) = services() else {
        return;
    };
    let fx = setup(&pg, &endpoint, 90, 2004).await;
    let app = &fx.app;
    let worker = app.login_as(WORKER).await;
    let rotator = app.login_as(ROTATOR).await;
    let wk = fx.proxy("worker").await;
    // Three worker processes: three data keys, beside the token and line-id keys.
    let mut outputs = Vec::new();
    for (i, part) in fx.ev.bodies.chunks(30).enumerate() {
        let out = fx
            .load_file(&worker, &wk, &format!("part{i}.jsonl"), part)
            .await;
        outputs.push((format!("run --from-file part{i}"), out.all_output()));
    }
    let keys = app
        .scalar("SELECT count(*) FROM vault_keys WHERE state <> 'destroyed'")
        .await;
    assert!(keys >= 5, "token, line-id and three data keys: {keys}");
    let (key_b, arn_b) = aws_helpers::create_key(&aws_helpers::kms().await).await;
    let under_b_sql = format!(
        "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND kek_id = '{arn_b}'"
    );
    let under_b = || app.scalar(&under_b_sql);

    let first = fx.proxy("rotator").await;
    first.set(Plan::only(Fault::Hold, &["ReEncrypt"]).after(2));
    let mut r = Worker::spawn(
        "rotate kek",
        fx.via(&rotator, &first)
            .tokio_command(&["rotate", "kek", "--to", &key_b]),
    );
    first
        .wait_for("a held ReEncrypt", LIMIT, |c| {
            c.operation == "ReEncrypt" && c.fault == Fault::Hold
        })
        .await;
    r.kill9().await;
    outputs.push(("the killed rotate kek".into(), r.output_bytes()));
    let moved = under_b().await;
    assert!(
        moved <= 2,
        "{moved} keys moved with two ReEncrypts answered"
    );
    assert!(moved < keys, "the killed run finished?");

    let second = fx.proxy("rotator").await;
    let done = prod::run_ok(
        fx.via(&rotator, &second)
            .tokio_command(&["rotate", "kek", "--to", &key_b]),
        LIMIT,
        "rotate kek, again",
    )
    .await;
    outputs.push(("the second rotate kek".into(), done.all_output()));
    let now = app
        .scalar("SELECT count(*) FROM vault_keys WHERE state <> 'destroyed'")
        .await;
    assert_eq!(under_b().await, now, "every key under the new KMS key");
    let again = second.calls_of("ReEncrypt").len() as i64;
    assert_eq!(
        again,
        keys - moved,
        "the resumed run moves what was left, once each"
    );

    // The vault still opens, under B.
    let revealer = app.login_as(REVEALER).await;
    let (user, logins) = some_user(&fx.ev);
    let rv = fx.proxy("revealer").await;
    let served = prod::run_ok(
        fx.via(&revealer, &rv).kms(&key_b).tokio_command(&[
            "reveal",
            "--user-id",
            &user,
            "--reason",
            "after rotate kek",
            "--format",
            "json",
        ]),
        LIMIT,
        "reveal after rotate kek",
    )
    .await;
    assert_eq!(prod::parse_reveal(&served.stdout_text()).len(), logins);
    outputs.push(("the reveal's stderr".into(), served.stderr.clone()));
    assert_end_state(app, &fx.ev, false, &outputs).await;
    drop(r);
    fx.app.finish().await;
}

// ------------------------------------------------------------------ key policies

/// `(action, purpose)` of a policy request, for sets and messages.
fn shape(r: &Request) -> (String, String) {
    (r.action.clone(), r.purpose().to_string())
}

/// The requests a role's KMS calls made.
fn requests(calls: &[Call]) -> Vec<Request> {
    calls
        .iter()
        .filter(|c| c.service == "TrentService")
        .flat_map(kms_policy::requests_of)
        .collect()
}

/// Every request of `role` allowed by its policy; every request in
/// `forbidden` denied.
fn check_role(role: &str, made: &[Request], forbidden: &[(&str, Option<&str>)]) -> Policy {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("keys/kms-policy-{role}.json"));
    let policy = Policy::load(&path);
    let me = kms_policy::role_arn(role);
    assert!(!made.is_empty(), "the {role} made no KMS call");
    for r in made {
        assert_eq!(
            policy.decide(&me, r),
            Decision::Allow,
            "keys/kms-policy-{role}.json refuses a call the {role} makes: {:?}",
            shape(r)
        );
    }
    for (op, purpose) in forbidden {
        let r = Request::new(op, *purpose);
        assert_ne!(
            policy.decide(&me, &r),
            Decision::Allow,
            "keys/kms-policy-{role}.json allows what the {role} must not do: {:?}",
            shape(&r)
        );
    }
    policy
}

const PURPOSES: [Option<&str>; 4] = [
    Some("pii-vault:vault"),
    Some("pii-vault:token"),
    Some("pii-vault:line-ids"),
    None,
];
const ACTIONS: [&str; 9] = [
    "DescribeKey",
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "GetPublicKey",
    "CreateGrant",
];

/// What the policy allows the role beyond what it was seen to call: must
/// be exactly `unused` (paths this run does not take, named there).
fn assert_allows_exactly(
    role: &str,
    policy: &Policy,
    made: &[Request],
    unused: &[(&str, Option<&str>)],
) {
    let me = kms_policy::role_arn(role);
    let seen: BTreeSet<(String, String)> = made.iter().map(shape).collect();
    let mut beyond = BTreeSet::new();
    for op in ACTIONS {
        // These carry no encryption context.
        let contextless = ["DescribeKey", "GetPublicKey", "Sign", "CreateGrant"].contains(&op);
        for p in PURPOSES {
            if contextless && p.is_some() {
                continue;
            }
            let r = Request::new(op, p);
            if policy.decide(&me, &r) == Decision::Allow && !seen.contains(&shape(&r)) {
                beyond.insert(shape(&r));
            }
        }
    }
    let want: BTreeSet<(String, String)> = unused
        .iter()
        .map(|(op, p)| shape(&Request::new(op, *p)))
        .collect();
    assert_eq!(
        beyond, want,
        "keys/kms-policy-{role}.json allows the {role} more (or less) than it calls"
    );
}

/// A whole run, each process's KMS calls recorded by a proxy of its own:
/// workers (queue and file), reveals (before and after the KEK moved), each
/// rotation (the token key's killed once and resumed), retention. Replayed against `keys/kms-policy-*.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kms_call_of_a_run_is_allowed_by_its_roles_policy_and_nothing_more() {
    let Some((pg, endpoint)) = services() else {
        return;
    };
    let fx = setup(&pg, &endpoint, 120, 2005).await;
    let app = &fx.app;
    let q = Queue::create().await;
    let worker = app.login_as(WORKER).await;
    let revealer = app.login_as(REVEALER).await;
    let rotator = app.login_as(ROTATOR).await;
    let searcher = app.login_as(SEARCHER).await;
    let (key_b, _) = aws_helpers::create_key(&aws_helpers::kms().await).await;
    let mut proxies = Vec::new();
    let mut outputs = Vec::new();

    // Workers: a queue, then a file.
    let p = fx.proxy("worker").await;
    q.send(&fx.ev.bodies[..60]).await;
    let out = prod::run_ok(
        fx.via(&worker, &p).tokio_command(&[
            "run",
            "--queue-url",
            &q.url,
            "--until-empty",
            "--no-progress",
        ]),
        LIMIT,
        "run --queue-url",
    )
    .await;
    outputs.push(("run --queue-url".to_string(), out.all_output()));
    let out = fx
        .load_file(&worker, &p, "rest.jsonl", &fx.ev.bodies[60..])
        .await;
    outputs.push(("run --from-file".to_string(), out.all_output()));
    proxies.push(p);

    let (user, logins) = some_user(&fx.ev);
    let reveal = |kms_key: String, proxy: &AwsProxy| {
        fx.via(&revealer, proxy).kms(&kms_key).tokio_command(&[
            "reveal",
            "--user-id",
            &user,
            "--reason",
            "policy replay",
            "--format",
            "json",
        ])
    };
    let p = fx.proxy("revealer").await;
    let out = prod::run_ok(reveal(fx.key_id.clone(), &p), LIMIT, "reveal").await;
    assert_eq!(prod::parse_reveal(&out.stdout_text()).len(), logins);
    outputs.push(("reveal's stderr".to_string(), out.stderr.clone()));
    proxies.push(p);

    // The searcher: the token key's tokens of an address, one version now,
    // two while the token-key rotation below is under way.
    let ip = serde_json::from_str::<serde_json::Value>(&fx.ev.bodies[0]).unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let tokenize = |proxy: &AwsProxy| {
        fx.via(&searcher, proxy).tokio_command(&[
            "tokenize",
            "--ip",
            &ip,
            "--reason",
            "policy replay",
            "--format",
            "json",
        ])
    };
    let tokens_of = |stdout: &str| -> Vec<String> {
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_string())
            .collect()
    };
    let logins_with = |tokens: Vec<String>| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_logins WHERE masked_ip = ANY($1)")
            .bind(tokens)
            .fetch_one(app.pool())
            .await
            .unwrap()
    };
    let p = fx.proxy("searcher").await;
    let out = prod::run_ok(tokenize(&p), LIMIT, "tokenize").await;
    let tokens = tokens_of(&out.stdout_text());
    assert_eq!(tokens.len(), 1);
    let at_ip = logins_with(tokens).await;
    assert!(at_ip >= 1);
    outputs.push(("tokenize".to_string(), out.all_output()));
    proxies.push(p);

    let tomorrow = (chrono::Utc::now().date_naive() + chrono::Days::new(1)).to_string();
    for (args, kms_key) in [
        (vec!["rotate", "data-keys"], &fx.key_id),
        (vec!["rotate", "token-key"], &fx.key_id),
        (vec!["rotate", "kek", "--to", &key_b], &fx.key_id),
        (
            vec!["forget", "--before", &tomorrow, "--reason", "retention"],
            &key_b,
        ),
    ] {
        let what = args.join(" ");
        if args[0] == "forget" {
            // Exactly once before retention erases the originals.
            assert_end_state(app, &fx.ev, false, &outputs).await;
        }
        if args[1] == "token-key" {
            // Killed inside its first Decrypt of a data key: the job and
            // its new token key are stored; the run below resumes it.
            let p = fx.proxy("rotator").await;
            p.set(Plan::only(Fault::Hold, &["Decrypt"]));
            let mut killed = Worker::spawn(
                "rotate token-key",
                fx.via(&rotator, &p).kms(kms_key).tokio_command(&args),
            );
            p.wait_for("a held Decrypt", LIMIT, |c| {
                c.operation == "Decrypt" && c.fault == Fault::Hold
            })
            .await;
            killed.kill9().await;
            outputs.push((
                "the killed rotate token-key".to_string(),
                killed.output_bytes(),
            ));
            p.pass();
            proxies.push(p);
            let p = fx.proxy("searcher").await;
            let out = prod::run_ok(tokenize(&p), LIMIT, "tokenize during a rotation").await;
            let tokens = tokens_of(&out.stdout_text());
            assert_eq!(tokens.len(), 2, "both versions' tokens");
            assert_eq!(
                logins_with(tokens).await,
                at_ip,
                "the same logins, either version"
            );
            outputs.push(("tokenize during a rotation".to_string(), out.all_output()));
            proxies.push(p);
        }
        let p = fx.proxy("rotator").await;
        let out = prod::run_ok(
            fx.via(&rotator, &p).kms(kms_key).tokio_command(&args),
            LIMIT,
            &what,
        )
        .await;
        outputs.push((what, out.all_output()));
        proxies.push(p);
        if args[1] == "kek" {
            // A reveal under the new KMS key, before retention erases all.
            let p = fx.proxy("revealer").await;
            let out = prod::run_ok(reveal(key_b.clone(), &p), LIMIT, "reveal under B").await;
            assert_eq!(prod::parse_reveal(&out.stdout_text()).len(), logins);
            outputs.push(("reveal under B's stderr".to_string(), out.stderr.clone()));
            proxies.push(p);
        }
    }

    let calls: Vec<Call> = proxies.iter().flat_map(AwsProxy::calls).collect();
    let of = |role: &str| {
        requests(
            &calls
                .iter()
                .filter(|c| c.label == role)
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    let (w, rv, rt, sr) = (of("worker"), of("revealer"), of("rotator"), of("searcher"));
    fn every(op: &'static str) -> Vec<(&'static str, Option<&'static str>)> {
        PURPOSES.iter().map(|p| (op, *p)).collect()
    }

    // The worker: never a vault key's plaintext, never a token key of its
    // own making, never moving keys.
    let mut forbidden = vec![
        ("Decrypt", Some("pii-vault:vault")),
        ("Decrypt", None),
        ("GenerateDataKey", Some("pii-vault:token")),
        ("GenerateDataKey", Some("pii-vault:line-ids")),
        ("GenerateDataKey", None),
    ];
    forbidden.extend(every("Encrypt"));
    forbidden.extend(every("ReEncryptFrom"));
    forbidden.extend(every("ReEncryptTo"));
    forbidden.extend(every("Sign"));
    let policy = check_role("worker", &w, &forbidden);
    assert_allows_exactly("worker", &policy, &w, &[]);

    // The revealer: vault keys only, nothing made or moved.
    let mut forbidden = vec![
        ("Decrypt", Some("pii-vault:token")),
        ("Decrypt", Some("pii-vault:line-ids")),
        ("Decrypt", None),
    ];
    for op in [
        "GenerateDataKey",
        "Encrypt",
        "ReEncryptFrom",
        "ReEncryptTo",
        "Sign",
    ] {
        forbidden.extend(every(op));
    }
    let policy = check_role("revealer", &rv, &forbidden);
    assert_allows_exactly("revealer", &policy, &rv, &[]);

    // The searcher: the token key only, nothing made or moved.
    let mut forbidden = vec![
        ("Decrypt", Some("pii-vault:vault")),
        ("Decrypt", Some("pii-vault:line-ids")),
        ("Decrypt", None),
    ];
    for op in [
        "GenerateDataKey",
        "Encrypt",
        "ReEncryptFrom",
        "ReEncryptTo",
        "Sign",
    ] {
        forbidden.extend(every(op));
    }
    let policy = check_role("searcher", &sr, &forbidden);
    assert_allows_exactly("searcher", &policy, &sr, &[]);

    // The rotator: pii-vault's purposes only, never a signature.
    let mut forbidden = vec![
        ("Decrypt", None),
        ("GenerateDataKey", None),
        ("Encrypt", None),
        ("ReEncryptFrom", None),
        ("ReEncryptTo", None),
    ];
    forbidden.extend(every("Sign"));
    let policy = check_role("rotator", &rt, &forbidden);
    assert_allows_exactly(
        "rotator",
        &policy,
        &rt,
        &[
            // `rotate kek` from a local key file to KMS wraps with Encrypt.
            ("Encrypt", Some("pii-vault:vault")),
            ("Encrypt", Some("pii-vault:token")),
            ("Encrypt", Some("pii-vault:line-ids")),
            // `keys init` (the first keys, made by a rotator) generates
            // the line-id key; the token key's rotation is seen here.
            ("GenerateDataKey", Some("pii-vault:line-ids")),
        ],
    );

    assert_eq!(q.counts().await, (0, 0), "the queue must be empty");
    assert_end_state(app, &fx.ev, true, &outputs).await;
    fx.app.finish().await;
}
