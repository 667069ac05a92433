//! Key rotation and erasure on the embedded default, with a worker consuming
//! while the rotations run; and on Postgres at scale: rotations stopped,
//! killed and resumed, parallel ranges, a worker writing meanwhile.

use crate::common;
use crate::common::app::{Bin, TestApp, ROTATOR, WORKER};

use std::collections::HashMap;
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use pii_vault::domain::CanonicalIp;

/// Events from small pools of IPs, devices and users, so values repeat
/// across the chunks fed before, during and after each rotation.
fn events(seed: u64, n: usize) -> String {
    common::gen_events(&[
        "-n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
        "--ips",
        "40",
        "--devices",
        "40",
        "--users",
        "30",
    ])
}

/// Reveals every user and checks the originals, and that tokens are one
/// version and consistent: equal values, equal tokens; different values,
/// different tokens.
fn check_reveals(app: &TestApp, input: &str) -> usize {
    let (rows, versions) = reveal_and_check(app, input);
    assert_eq!(
        versions.len(),
        1,
        "tokens of several versions: {versions:?}"
    );
    rows
}

/// Reveals every user of `input` with a JSON `reveal --user-id`, which must
/// succeed; checks that the originals are the user's and that tokens are
/// consistent (equal IPs, equal tokens; different IPs, different tokens).
/// Returns the rows revealed and the token versions seen.
pub(crate) fn reveal_and_check(
    app: &TestApp,
    input: &str,
) -> (usize, std::collections::HashSet<String>) {
    let mut want: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for l in input.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        want.entry(v["user_id"].as_str().unwrap().into())
            .or_default()
            .push((
                v["ip"].as_str().unwrap().into(),
                v["device_id"].as_str().unwrap().into(),
            ));
    }
    let (mut ip_tok, mut tok_ip, mut versions) = (
        HashMap::new(),
        HashMap::new(),
        std::collections::HashSet::new(),
    );
    let mut rows = 0;
    for (user, originals) in &want {
        let out = app.ok_output(&[
            "reveal",
            "--user-id",
            user,
            "--reason",
            "rotation test",
            "--format",
            "json",
        ]);
        let mut got: Vec<(String, String)> = vec![];
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (ip, dev) = (
                v["ip"]
                    .as_str()
                    .expect("an original ip, not a lost row")
                    .to_string(),
                v["device_id"].as_str().unwrap().to_string(),
            );
            let mip = v["masked_ip"].as_str().unwrap().to_string();
            versions.insert(mip.split('_').next().unwrap().to_string());
            let canon = CanonicalIp::parse(&ip).unwrap().expose().to_string();
            assert_eq!(
                ip_tok.entry(canon.clone()).or_insert(mip.clone()),
                &mip,
                "one IP, two tokens"
            );
            assert_eq!(
                tok_ip.entry(mip).or_insert(canon.clone()),
                &canon,
                "one token, two IPs"
            );
            got.push((ip, dev));
            rows += 1;
        }
        let mut expected = originals.clone();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "originals of {user}");
    }
    (rows, versions)
}

#[tokio::test]
async fn rotations_while_a_worker_consumes_lose_nothing() {
    let app = TestApp::embedded();
    // Only run, migrate and keys init create the embedded database.
    app.ok(&["migrate"]);
    // This test reveals every user after every step: more than a day's
    // worth of reveals under the default policy.
    app.ok_output(&["policy", "set", "--max-reveals-per-day", "100000"]);
    let chunks: Vec<String> = (0..4).map(|i| events(100 + i, 150)).collect();
    let all: String = chunks.concat();

    let mut worker = app
        .command(&[
            "run",
            "--from-file",
            "-",
            "--source-id",
            "stream",
            "--batch-size",
            "20",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = worker.stdin.take().unwrap();
    // (The policy's `set` made the file.)
    let db = app.sqlite().await;
    let rotations: [&[&str]; 3] = [
        &["rotate", "data-keys"],
        &["rotate", "token-key"],
        &["rotate", "data-keys"],
    ];
    let mut fed = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        // Half of the chunk, committed before the rotation starts (waited
        // for, not slept on); the other half fed while it runs, in a thread,
        // so worker and rotation overlap; then the next chunk, which the
        // worker can only commit under the new keys: its old ones were
        // retired, so it must notice.
        let lines: Vec<String> = chunk.lines().map(str::to_string).collect();
        let (before, during) = lines.split_at(lines.len() / 2);
        stdin
            .write_all((before.join("\n") + "\n").as_bytes())
            .unwrap();
        stdin.flush().unwrap();
        fed += before.len() as i64;
        wait_for_logins(&db, fed).await;
        match rotations.get(i) {
            Some(r) => {
                let writer = std::thread::spawn({
                    let during = during.join("\n") + "\n";
                    move || {
                        stdin.write_all(during.as_bytes()).unwrap();
                        stdin.flush().unwrap();
                        stdin
                    }
                });
                app.ok_output(r);
                stdin = writer.join().unwrap();
            }
            None => {
                stdin
                    .write_all((during.join("\n") + "\n").as_bytes())
                    .unwrap();
                stdin.flush().unwrap();
            }
        }
        fed += during.len() as i64;
        wait_for_logins(&db, fed).await;
    }
    drop(stdin);
    let out = worker.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // The worker noticed both rotations by itself (the commit fence), not by luck.
    assert!(log.contains("data key retired by a rotation"), "{log}");
    assert!(
        log.contains("token key rotated; switching to the new version"),
        "{log}"
    );
    assert_eq!(common::summary(&out.stderr), (600, 0, 0), "{log}");

    // A final token rotation and data-key rotation with the worker stopped.
    app.ok_output(&["rotate", "token-key"]);
    app.ok_output(&["rotate", "data-keys"]);

    assert_eq!(check_reveals(&app, &all), 600);

    let dangling: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault v JOIN vault_keys k ON k.id = v.key_id WHERE k.state = 'destroyed' OR k.wrapped IS NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(dangling, 0, "vault rows refer to destroyed keys");
    let destroyed_with_blob: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault_keys WHERE state = 'destroyed' AND wrapped IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        destroyed_with_blob, 0,
        "a destroyed key kept its wrapped material"
    );
    let destroyed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vault_keys WHERE state = 'destroyed'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        destroyed >= 3,
        "old data and token keys should be destroyed, found {destroyed}"
    );
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't3\\_%' ESCAPE '\\'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(stale, 0);

    // Re-running the same input (same source id) after the rotations
    // stores nothing new: every line is a duplicate.
    app.write("all.jsonl", &all);
    let again = app.ok_output(&["run", "--from-file", "all.jsonl", "--source-id", "stream"]);
    assert_eq!(common::summary(&again.stderr), (0, 600, 0));
    db.close().await;
}

/// Waits (up to a minute) until `user_logins` holds `n` rows.
async fn wait_for_logins(db: &sqlx::SqlitePool, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
            .fetch_one(db)
            .await
            .unwrap_or(0);
        if have >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker committed {have} of {n} logins within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn forget_erases_originals_but_keeps_masked_rows() {
    let app = TestApp::embedded();
    let input = events(7, 120);
    app.write("in.jsonl", &input);
    app.ok_output(&["run", "--from-file", "in.jsonl"]);
    let first: serde_json::Value = serde_json::from_str(input.lines().next().unwrap()).unwrap();
    let user = first["user_id"].as_str().unwrap();

    let before = app.ok_output(&[
        "reveal",
        "--user-id",
        user,
        "--reason",
        "before",
        "--format",
        "json",
    ]);
    let n = String::from_utf8_lossy(&before.stdout).lines().count();
    assert!(n >= 1);
    let f = app.ok_output(&[
        "forget",
        "--user-id",
        user,
        "--reason",
        "erasure request 42",
    ]);
    assert!(String::from_utf8_lossy(&f.stderr).contains(&format!("erased {n} vault row(s)")));
    // Counted in the database, not taken from the product's own message.
    let db = app.sqlite().await;
    let count = |sql: &'static str| {
        let db = db.clone();
        let user = user.to_string();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(user)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM vault WHERE user_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM quarantine WHERE user_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM user_logins WHERE user_id = $1").await,
        n as i64
    );
    let others: i64 = sqlx::query_scalar("SELECT count(*) FROM vault")
        .fetch_one(&db)
        .await
        .unwrap();
    let all_valid = input.lines().count() as i64;
    assert_eq!(
        others,
        all_valid - n as i64,
        "other users' vault rows must stay"
    );
    db.close().await;

    let after = app.ok_output(&[
        "reveal",
        "--user-id",
        user,
        "--reason",
        "after",
        "--format",
        "json",
    ]);
    for line in String::from_utf8_lossy(&after.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v["ip"].is_null() && v["device_id"].is_null(),
            "forgotten originals came back"
        );
        assert!(
            v["masked_ip"].as_str().unwrap().starts_with("t1_"),
            "masked rows should stay"
        );
    }
    assert_eq!(String::from_utf8_lossy(&after.stdout).lines().count(), n);
    assert!(String::from_utf8_lossy(&after.stderr).contains("no recoverable originals"));

    // Other users are untouched, and forget is on the audit trail.
    let other = input
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["user_id"] != first["user_id"])
        .unwrap();
    let o = app.ok_output(&[
        "reveal",
        "--user-id",
        other["user_id"].as_str().unwrap(),
        "--reason",
        "x",
        "--format",
        "json",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(other["device_id"].as_str().unwrap()));
    let audit = app.ok_output(&["audit", "--format", "json"]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("\"action\":\"forget\""));
    assert!(String::from_utf8_lossy(&audit.stdout).contains("erasure request 42"));
}

/// A row a rotation cannot open (here: its ciphertext tampered with) is
/// named and skipped; everything else is rotated, the key the bad row needs
/// is kept, and the exit status says something was skipped. Every job is
/// in the audit trail before it ran.
#[tokio::test]
async fn rotations_skip_and_report_rows_they_cannot_open() {
    let app = TestApp::embedded();
    let input = events(11, 60);
    app.write("in.jsonl", &input);
    let out = app.ok_output(&["run", "--from-file", "in.jsonl", "--no-progress"]);
    let (stored, _, _) = common::summary(&out.stderr);
    assert!(stored > 10, "{stored}");

    let db = app.sqlite().await;
    let victim: String =
        sqlx::query_scalar("SELECT message_id FROM vault ORDER BY message_id LIMIT 1 OFFSET 3")
            .fetch_one(&db)
            .await
            .unwrap();
    sqlx::query("UPDATE vault SET ciphertext = zeroblob(length(ciphertext)) WHERE message_id = $1")
        .bind(&victim)
        .execute(&db)
        .await
        .unwrap();
    let old_key: String = sqlx::query_scalar("SELECT key_id FROM vault WHERE message_id = $1")
        .bind(&victim)
        .fetch_one(&db)
        .await
        .unwrap();

    let out = app.run(&["rotate", "data-keys", "--reason", "quarterly"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("re-encrypted {} row(s)", stored - 1)),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 sealed row(s) could not be opened") && stderr.contains(&victim),
        "{stderr}"
    );
    assert!(common::leaked(&out.stderr, &common::raw_pii(&input)).is_empty());
    // Every other row moved; the bad one stays under its old key, which is
    // kept (retired, not destroyed), so nothing more was lost.
    let under_old: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE key_id = $1")
        .bind(&old_key)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(under_old, 1);
    let state: String = sqlx::query_scalar("SELECT state FROM vault_keys WHERE id = $1")
        .bind(&old_key)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(state, "retired");

    // Token rotation: the same row cannot be re-tokenised; the rest are,
    // and the old token key stays retired rather than destroyed.
    let out = app.run(&["rotate", "token-key"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("re-tokenised {} login(s)", stored - 1))
            && stderr.contains(&victim),
        "{stderr}"
    );
    let v1: String =
        sqlx::query_scalar("SELECT state FROM vault_keys WHERE purpose = 'token' AND version = 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(v1, "retired");
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't2\\_%' ESCAPE '\\'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(stale, 1);

    let actions: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT action, reason, row_count FROM audit_log WHERE action LIKE 'rotate-%' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(actions.len(), 2);
    assert_eq!(
        (actions[0].0.as_str(), actions[0].1.as_str(), actions[0].2),
        ("rotate-data-keys", "quarterly", stored as i64)
    );
    assert_eq!(
        (actions[1].0.as_str(), actions[1].1.as_str()),
        ("rotate-token-key", "scheduled key rotation")
    );
    db.close().await;
}

// ------------------------------------------------- Postgres: at scale

/// A fixture whose Postgres database the binary loaded with `events`: the
/// owner runs `migrate` and sets a policy for the many reveals of the
/// checks, a worker login runs `run --from-file`; `None` (skip) without a
/// test cluster.
async fn loaded(events: &str) -> Option<TestApp> {
    let app = TestApp::postgres().await?;
    app.ok(&["migrate"]);
    app.ok(&["policy", "set", "--max-reveals-per-day", "100000"]);
    let name = format!("events-{}.jsonl", uuid::Uuid::new_v4().simple());
    app.write(&name, events);
    let worker = app.login_as(WORKER).await;
    app.as_login(&worker)
        .ok(&["run", "--from-file", &name, "--source-id", &name]);
    Some(app)
}

/// The binary as a rotator login of its own, as a rotation job runs.
async fn rotator(app: &TestApp) -> Bin {
    app.as_login(&app.login_as(ROTATOR).await)
}

/// Runs `bin` with `args` and SIGKILLs it once the open job of `app` has
/// done `rows` rows (within a minute, before it ends by itself).
async fn kill_once_done(app: &TestApp, bin: &Bin, args: &[&str], rows: i64) -> Output {
    let mut child = bin.command(args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rows_done(app).await < rows {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the rotation ended before it was killed"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    settle(app).await;
    out
}

/// Waits until no session of the binary is left working on the database.
/// A chunk is one statement: one that a killed (or stopped) run had sent
/// still commits after the process is gone, so counts are read after.
/// (The fixture's owner store is a `pii-vault` session too, idle between
/// the test's own queries: only sessions running a statement count.)
async fn settle(app: &TestApp) {
    common::wait_until(
        Duration::from_secs(30),
        "the rotation's sessions to end",
        || async {
            let left = app
                .scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = 'pii-vault' \
                       AND state <> 'idle' AND pid <> pg_backend_pid()",
                )
                .await;
            (left == 0).then_some(())
        },
    )
    .await
}

/// Rows the open job's ranges have done, once its sessions are gone.
async fn settled_rows_done(app: &TestApp) -> i64 {
    settle(app).await;
    rows_done(app).await
}

/// Rows the open job's ranges say are done.
async fn rows_done(app: &TestApp) -> i64 {
    app.scalar(
        "SELECT coalesce(sum(r.rows_done), 0)::bigint FROM rotation_ranges r \
         JOIN rotation_jobs j ON j.id = r.job_id WHERE j.finished_at IS NULL",
    )
    .await
}

async fn open_jobs(app: &TestApp) -> i64 {
    app.scalar("SELECT count(*) FROM rotation_jobs WHERE finished_at IS NULL")
        .await
}

/// The token versions [`reveal_and_check`] saw.
fn versions_revealed(app: &TestApp, input: &str) -> std::collections::HashSet<String> {
    reveal_and_check(app, input).1
}

fn big_events(seed: u64, n: usize) -> String {
    common::gen_events(&[
        "-n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
        "--ips",
        "300",
        "--devices",
        "300",
        "--users",
        "12",
    ])
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The number in "re-encrypted N row(s)" / "re-tokenised N login(s)": the
/// first `word` followed by a number (pii-vault's debug lines, which every
/// run logs, name the word too, without one).
fn count_after(stderr: &str, word: &str) -> i64 {
    stderr
        .match_indices(word)
        .find_map(|(at, _)| {
            stderr[at + word.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no '{word} N' in: {stderr}"))
}

/// A data-key rotation stopped after a few chunks, then SIGKILLed in the
/// middle, then run again: the rerun says it resumes, re-encrypts exactly
/// the rows not done yet (the killed runs' own new keys are not taken for
/// old ones), and at the end every row opens, no row is under an old key
/// and the old keys are destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_data_key_rotation_resumes_where_it_stopped() {
    let input = big_events(31, 6000);
    let Some(pg) = loaded(&input).await else {
        return;
    };
    let total = pg.scalar("SELECT count(*) FROM vault").await;
    assert_eq!(total, 6000);
    let old = pg
        .strings("SELECT id FROM vault_keys WHERE purpose = 'vault' AND state <> 'destroyed'")
        .await;

    // 1. Stopped by the test hook after 3 chunks of 100 rows.
    let rot = rotator(&pg).await;
    let out = rot.env("PII_VAULT_TEST_STOP_AFTER_CHUNKS", "3").run(&[
        "rotate",
        "data-keys",
        "--jobs",
        "2",
        "--chunk-rows",
        "100",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("stopped after"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(open_jobs(&pg).await, 1);
    let done1 = settled_rows_done(&pg).await;
    assert!(
        (300..=400).contains(&done1),
        "rows done after 3 chunks: {done1}"
    );
    let first_keys = pg
        .strings("SELECT unnest(new_keys) FROM rotation_jobs WHERE finished_at IS NULL")
        .await;
    let under_first: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE key_id = ANY($1)")
        .bind(&first_keys)
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(under_first, done1, "each committed chunk moved its cursor");

    // 2. A real SIGKILL once it has made progress of its own.
    let killed = kill_once_done(
        &pg,
        &rot,
        &["rotate", "data-keys", "--jobs", "2", "--chunk-rows", "50"],
        done1 + 500,
    )
    .await;
    assert!(!killed.status.success());
    assert!(
        stderr_of(&killed).contains("resuming rotate-data-keys job"),
        "{}",
        stderr_of(&killed)
    );
    assert_eq!(open_jobs(&pg).await, 1, "the killed job stays open");
    let done2 = settled_rows_done(&pg).await;
    assert!(done2 < total, "killed before the end: {done2}");

    // 3. The rerun finishes the rest, and only the rest.
    let stderr = rot.ok(&["rotate", "data-keys", "--jobs", "2", "--chunk-rows", "200"]);
    assert!(stderr.contains("resuming rotate-data-keys job"), "{stderr}");
    let resealed = count_after(&stderr, "re-encrypted");
    assert_eq!(done2 + resealed, total, "{stderr}");
    assert_eq!(open_jobs(&pg).await, 0);

    // The first run's rows were not re-sealed again by the later runs.
    let still_first: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE key_id = ANY($1)")
        .bind(&first_keys)
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(still_first, done1);
    let under_old: i64 = sqlx::query_scalar("SELECT count(*) FROM vault WHERE key_id = ANY($1)")
        .bind(&old)
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(under_old, 0);
    let old_states: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT state FROM vault_keys WHERE id = ANY($1)")
            .bind(&old)
            .fetch_all(pg.pool())
            .await
            .unwrap();
    assert_eq!(old_states, ["destroyed"]);
    assert_eq!(
        pg.scalar(
            "SELECT count(*) FROM vault v JOIN vault_keys k ON k.id = v.key_id WHERE k.state = 'destroyed'"
        )
        .await,
        0,
        "no row under a destroyed key"
    );
    assert_eq!(versions_revealed(&pg, &input).len(), 1);
    pg.finish().await;
}

/// A token-key rotation stopped twice, then SIGKILLed, then run again keeps
/// one new version throughout (no third version), re-tokenises only the
/// logins not done, and destroys the old version only at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_token_key_rotation_keeps_its_version_and_resumes() {
    let input = big_events(32, 6000);
    let Some(pg) = loaded(&input).await else {
        return;
    };
    let total = pg.scalar("SELECT count(*) FROM user_logins").await;
    let versions = || async {
        pg.strings("SELECT version || ':' || state FROM vault_keys WHERE purpose = 'token' ORDER BY version")
            .await
    };
    assert_eq!(versions().await, ["1:active"]);

    let rot = rotator(&pg).await;
    for stop in ["2", "3"] {
        let out = rot.env("PII_VAULT_TEST_STOP_AFTER_CHUNKS", stop).run(&[
            "rotate",
            "token-key",
            "--jobs",
            "3",
            "--chunk-rows",
            "100",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr_of(&out).contains("stopped after"),
            "{}",
            stderr_of(&out)
        );
        assert_eq!(
            versions().await,
            ["1:retired", "2:active"],
            "one new version"
        );
    }
    // 2 + 3 chunks of 100, and at most one more per other range of each
    // run (the ranges run on their own tasks).
    let done1 = settled_rows_done(&pg).await;
    assert!((500..=900).contains(&done1), "{done1}");
    assert_eq!(
        pg.scalar("SELECT count(*) FROM user_logins WHERE masked_ip LIKE 't2\\_%'")
            .await,
        done1
    );

    let killed = kill_once_done(
        &pg,
        &rot,
        &["rotate", "token-key", "--jobs", "2", "--chunk-rows", "50"],
        done1 + 500,
    )
    .await;
    assert!(stderr_of(&killed).contains("resuming rotate-token-key job"));
    assert_eq!(versions().await, ["1:retired", "2:active"]);
    let done2 = settled_rows_done(&pg).await;
    assert!(done2 < total);

    let stderr = rot.ok(&["rotate", "token-key"]);
    assert!(stderr.contains("resuming rotate-token-key job"), "{stderr}");
    assert!(stderr.contains("token key v2 is current"), "{stderr}");
    assert_eq!(
        done2 + count_after(&stderr, "re-tokenised"),
        total,
        "{stderr}"
    );
    assert_eq!(versions().await, ["1:destroyed", "2:active"]);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM user_logins WHERE masked_ip NOT LIKE 't2\\_%' OR masked_device_id NOT LIKE 't2\\_%'")
            .await,
        0
    );
    assert_eq!(open_jobs(&pg).await, 0);
    assert_eq!(versions_revealed(&pg, &input), ["t2".to_string()].into());
    pg.finish().await;
}

/// How the tokens group the rows: what a token rotation must keep.
async fn token_shape(pg: &TestApp) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT masked_ip), count(DISTINCT masked_device_id), \
         count(DISTINCT (user_id, masked_ip, masked_device_id)) FROM user_logins",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap()
}

/// Four ranges at once give what one range gives (the same grouping by
/// token, every row re-sealed, every row opens), and a worker writing
/// during the rotations loses nothing: rows it commits under the retired
/// keys are refused and written again under fresh ones, and caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_ranges_match_one_range_while_a_worker_writes() {
    let first = big_events(41, 3000);
    let later = big_events(42, 1500);
    let Some(one) = loaded(&first).await else {
        return;
    };
    let four = loaded(&first).await.unwrap();
    let before = token_shape(&one).await;
    assert_eq!(before, token_shape(&four).await);

    let o1 = one.ok(&["rotate", "token-key", "--jobs", "1", "--chunk-rows", "97"]);
    let o4 = four.ok(&["rotate", "token-key", "--jobs", "4", "--chunk-rows", "97"]);
    assert_eq!(count_after(&o1, "re-tokenised"), 3000);
    assert_eq!(count_after(&o4, "re-tokenised"), 3000);
    assert_eq!(token_shape(&one).await, before);
    assert_eq!(token_shape(&four).await, before);
    assert_eq!(
        four.scalar("SELECT count(*) FROM rotation_ranges WHERE tbl = 'user_logins'")
            .await,
        4
    );
    let o1 = one.ok(&["rotate", "data-keys", "--jobs", "1", "--chunk-rows", "97"]);
    let o4 = four.ok(&["rotate", "data-keys", "--jobs", "4", "--chunk-rows", "97"]);
    assert_eq!(count_after(&o1, "re-encrypted"), 3000);
    assert_eq!(count_after(&o4, "re-encrypted"), 3000);
    assert_eq!(
        four.scalar("SELECT count(DISTINCT tbl || no) FROM rotation_ranges r JOIN rotation_jobs j ON j.id = r.job_id WHERE j.kind = 'rotate-data-keys'").await,
        5,
        "four vault ranges and the quarantine"
    );
    versions_revealed(&one, &first);
    versions_revealed(&four, &first);
    one.finish().await;

    // Online: a worker login feeds more events while a rotator login runs
    // both rotations.
    let name = "later.jsonl";
    std::fs::write(four.path(name), &later).unwrap();
    let worker = four
        .as_login(&four.login_as(WORKER).await)
        .command(&[
            "run",
            "--from-file",
            name,
            "--source-id",
            name,
            "--batch-size",
            "20",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while four.scalar("SELECT count(*) FROM user_logins").await < 3100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker wrote nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rot = rotator(&four).await;
    rot.ok(&["rotate", "token-key", "--jobs", "4", "--chunk-rows", "50"]);
    rot.ok(&["rotate", "data-keys", "--jobs", "4", "--chunk-rows", "50"]);
    let out = worker.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(four.scalar("SELECT count(*) FROM user_logins").await, 4500);
    let all = first.clone() + &later;
    assert_eq!(versions_revealed(&four, &all), ["t3".to_string()].into());
    assert_eq!(
        four.scalar(
            "SELECT count(*) FROM vault v JOIN vault_keys k ON k.id = v.key_id WHERE k.state = 'destroyed'"
        )
        .await,
        0
    );
    four.finish().await;
}

/// The embedded default keeps its rotation jobs too: a token rotation
/// stopped halfway and run again keeps its version and finishes the rest.
#[tokio::test]
async fn an_interrupted_rotation_resumes_on_the_embedded_default() {
    let app = TestApp::embedded();
    app.ok(&["migrate"]);
    app.ok_output(&["policy", "set", "--max-reveals-per-day", "100000"]);
    let input = events(51, 600);
    app.write("in.jsonl", &input);
    app.ok_output(&["run", "--from-file", "in.jsonl"]);
    for kind in ["token-key", "data-keys"] {
        let out = app
            .bin()
            .env("PII_VAULT_TEST_STOP_AFTER_CHUNKS", "2")
            .run(&["rotate", kind, "--chunk-rows", "100"]);
        assert!(!out.status.success(), "{kind} stops");
        let again = app.ok_output(&["rotate", kind, "--chunk-rows", "100"]);
        let stderr = String::from_utf8_lossy(&again.stderr).to_string();
        assert!(
            stderr.contains(&format!("resuming rotate-{kind} job")),
            "{stderr}"
        );
        let word = if kind == "token-key" {
            "re-tokenised"
        } else {
            "re-encrypted"
        };
        assert_eq!(count_after(&stderr, word), 400, "{stderr}");
    }
    let db = app.sqlite().await;
    let versions: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, state FROM vault_keys WHERE purpose = 'token' ORDER BY version",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        versions,
        [(1, "destroyed".to_string()), (2, "active".to_string())],
        "one new token version"
    );
    db.close().await;
    assert_eq!(check_reveals(&app, &input), 600);
}
