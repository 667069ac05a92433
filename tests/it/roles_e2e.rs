//! Every role's job done by the binary under that role's own login, in one
//! run, while a worker login writes: the way a deployment splits the work
//! (README, "Roles"), against Postgres and LocalStack (SQS + KMS).
//!
//! - The schema owner (the admin of the fresh database) runs `migrate` with
//!   KMS key A and sets a reveal policy of one user per reveal.
//! - A worker login runs `run --queue-url` as a daemon throughout, fed in
//!   waves, and `run --from-file` once.
//! - An analyst login reads `user_logins` (and finds an IP token shared by
//!   several users there), not the vault.
//! - Revealer alice reveals one user (served) and the shared token (over the
//!   policy: exit status 3, a pending request); revealer bob approves it;
//!   alice fetches it, once; her `audit` names her login.
//! - The rotator login rotates the data keys, the token key and the KMS key
//!   (A to B) while waves arrive, forgets one user while another wave
//!   arrives, and finally erases everything by date.
//! - `audit --alarms` is the owner's alone.
//!
//! Then: exactly once (stored + quarantined + erased-from-quarantine = lines
//! sent, by the generator's manifest), every audit row written by the login
//! that did the job (none by the worker), and no raw IP or device id in any
//! process's output but what a reveal prints on stdout.
//!
//! Needs `PII_VAULT_TEST_PG` and LocalStack, like `production.rs`. The
//! database, its logins and the binary are the [`TestApp`]'s; every command
//! claims to be [`ACTOR`], so an audit row's `actor` can only come from the
//! database login.

use crate::common::app::{Bin, Login, TestApp, ACTOR, ANALYST, REVEALER, ROTATOR, WORKER};
use crate::common::{self, aws as aws_helpers, production as prod};

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pii_vault::domain::{CanonicalIp, LoginEvent};
use prod::{Finished, Revealed, Spawned};

/// Longest any single command may take before the test fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- ledger

/// Runs the fixture's binary as one login or another and keeps what every
/// process printed, for the leak check at the end.
struct Ledger<'a> {
    app: &'a TestApp,
    /// (what, bytes to scan): every stream of every process, but the stdout
    /// of the reveals.
    outputs: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Ledger<'_> {
    /// The binary as `login`, under KMS key `kms`.
    fn bin(&self, login: &Login, kms: &str) -> Bin {
        self.app.as_login(login).kms(kms)
    }

    fn cmd(&self, login: &Login, kms: &str, args: &[&str]) -> tokio::process::Command {
        self.bin(login, kms).tokio_command(args)
    }

    fn keep(&self, what: &str, bytes: Vec<u8>) {
        self.outputs.lock().unwrap().push((what.to_string(), bytes));
    }

    /// Runs `args` as `login`; it must succeed.
    async fn ok(&self, login: &Login, kms: &str, args: &[&str]) -> Finished {
        let what = format!("`{}` as {}", args.join(" "), login.name);
        let out = prod::run_ok(self.cmd(login, kms, args), COMMAND_LIMIT, &what).await;
        self.keep(&what, out.all_output());
        out
    }

    /// Runs `args` as `login`; returns its output whatever its status.
    async fn run(&self, login: &Login, kms: &str, args: &[&str]) -> Finished {
        let what = format!("`{}` as {}", args.join(" "), login.name);
        let out = prod::output_within(self.cmd(login, kms, args), COMMAND_LIMIT, &what).await;
        self.keep(&what, out.all_output());
        out
    }

    /// Runs `args` as `login`; it must fail with exit status 1 and an error
    /// containing each of `said`.
    async fn refused(&self, login: &Login, kms: &str, args: &[&str], said: &[&str]) {
        let out = self.run(login, kms, args).await;
        let err = out.stderr_text();
        assert_eq!(
            out.status.code(),
            Some(1),
            "`{}` as {}: expected a refusal, got {}:\n{err}",
            args.join(" "),
            login.name,
            out.status
        );
        for s in said {
            assert!(
                err.contains(s),
                "`{}` as {}: the error does not say {s:?}:\n{err}",
                args.join(" "),
                login.name
            );
        }
        assert!(out.stdout.is_empty(), "a refused command printed a result");
    }

    /// A served `reveal … --format json` as `login`: the rows it printed,
    /// and its stderr (the only part of its output kept for the leak check).
    async fn reveal(&self, login: &Login, kms: &str, args: &[&str]) -> (Vec<Revealed>, String) {
        let mut all = vec!["reveal"];
        all.extend_from_slice(args);
        all.extend(["--format", "json"]);
        let what = format!("`{}` as {}", all.join(" "), login.name);
        let out = prod::run_ok(self.cmd(login, kms, &all), COMMAND_LIMIT, &what).await;
        self.keep(&what, out.stderr.clone());
        (prod::parse_reveal(&out.stdout_text()), out.stderr_text())
    }
}

// ------------------------------------------------------------------- data

/// The originals of one valid input line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Original {
    user_id: String,
    ip: String,
    device_id: String,
}

/// The originals of each valid line (the generator's manifest, not the
/// parser under test, says which lines it broke).
fn originals(gen: &common::Generated) -> Vec<Option<Original>> {
    let broken: HashSet<usize> = gen.malformed.iter().copied().collect();
    gen.text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if broken.contains(&i) {
                return None;
            }
            LoginEvent::parse(line.as_bytes())
                .unwrap_or_else(|e| panic!("line {i}, valid by the generator, is rejected: {e}"));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            Some(Original {
                user_id: v["user_id"].as_str().unwrap().to_string(),
                ip: v["ip"].as_str().unwrap().to_string(),
                device_id: v["device_id"].as_str().unwrap().to_string(),
            })
        })
        .collect()
}

fn canonical(ip: &str) -> String {
    CanonicalIp::parse(ip)
        .expect("a revealed IP parses")
        .expose()
        .to_string()
}

/// A revealed row as an [`Original`]; `None` if its originals are gone.
fn as_original(r: &Revealed) -> Option<Original> {
    match (&r.ip, &r.device_id) {
        (Some(ip), Some(device_id)) => Some(Original {
            user_id: r.user_id.clone(),
            ip: ip.clone(),
            device_id: device_id.clone(),
        }),
        (None, None) => None,
        _ => panic!("a revealed row with one original of two"),
    }
}

/// Asserts that every revealed row is a login that was sent: its user,
/// IP and device id together, at most as often as they were sent. Counts
/// only in the messages: the values are PII of the test input.
fn assert_all_sent(revealed: &[Revealed], sent: &[Original], what: &str) {
    let mut left: BTreeMap<&Original, usize> = BTreeMap::new();
    for o in sent {
        *left.entry(o).or_default() += 1;
    }
    let got: Vec<Original> = revealed
        .iter()
        .map(|r| as_original(r).unwrap_or_else(|| panic!("{what}: a row without its originals")))
        .collect();
    for o in &got {
        let n = left.get_mut(o);
        assert!(
            matches!(n, Some(n) if *n > 0),
            "{what}: a revealed row ({}) is no login that was sent (or more of it than sent)",
            o.user_id
        );
        *left.get_mut(o).unwrap() -= 1;
    }
}

/// The numbers of the first line of `text` that starts with `prefix`, in
/// order.
fn numbers_after(text: &str, prefix: &str) -> Vec<i64> {
    let line = text
        .lines()
        .find_map(|l| l.find(prefix).map(|i| &l[i + prefix.len()..]))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

fn audit_lines(out: &Finished) -> Vec<serde_json::Value> {
    out.stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit printed {e}: {l}")))
        .collect()
}

// ------------------------------------------------------------------- test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_job_as_its_own_login_while_a_worker_writes() {
    let Some((pg_url, _)) = prod::services() else {
        return;
    };
    let started = Instant::now();
    let app = TestApp::postgres_on(&pg_url).await;
    let cli = Ledger {
        app: &app,
        outputs: Mutex::new(Vec::new()),
    };
    let (sqs, kms) = (aws_helpers::sqs().await, aws_helpers::kms().await);
    let queue = aws_helpers::create_queue(&sqs).await;
    let (key_a, arn_a) = aws_helpers::create_key(&kms).await;
    let (key_b, arn_b) = aws_helpers::create_key(&kms).await;

    // The owner migrates (allow-listing A, creating the token and line-id
    // keys under it) and sets a policy under which a reveal of more than one
    // user needs a second person.
    let owner = app.owner_login().await;
    cli.ok(&owner, &key_a, &["migrate"]).await;
    cli.ok(
        &owner,
        &key_a,
        &["policy", "set", "--max-users-per-reveal", "1"],
    )
    .await;

    let worker = app.login_as(WORKER).await;
    let analyst = app.login_as(ANALYST).await;
    let alice = app.login_as(REVEALER).await;
    let bob = app.login_as(REVEALER).await;
    let rotator = app.login_as(ROTATOR).await;

    // A revealer reads the policy, and cannot lift it.
    let shown = cli
        .ok(&alice, &key_a, &["policy", "show", "--format", "json"])
        .await;
    let shown: serde_json::Value = serde_json::from_str(shown.stdout_text().trim()).unwrap();
    assert_eq!(shown["max_users_per_reveal"], 1, "{shown}");
    assert_eq!(shown["changed_by"], owner.name.as_str(), "{shown}");
    cli.refused(
        &alice,
        &key_a,
        &["policy", "set", "--max-users-per-reveal", "100"],
        &["permission denied", "42501"],
    )
    .await;

    // Small pools, so that users, IPs and devices recur in the file and in
    // every wave, and every IP is shared by several users.
    let gen = common::gen_events_recorded(&[
        "-n",
        "1500",
        "--seed",
        "77",
        "--ips",
        "16",
        "--devices",
        "40",
        "--users",
        "10",
        "--malformed-pct",
        "3",
    ]);
    let lines: Vec<String> = gen.text.lines().map(str::to_string).collect();
    let per_line = originals(&gen);
    let valid: Vec<Original> = per_line.iter().flatten().cloned().collect();
    let malformed = per_line.iter().filter(|o| o.is_none()).count();
    let (file_lines, queued) = lines.split_at(300);
    let file_valid = per_line[..300].iter().flatten().count();
    let (queued_valid, queued_malformed) = (
        per_line[300..].iter().flatten().count(),
        per_line[300..].iter().filter(|o| o.is_none()).count(),
    );
    assert!(
        file_valid < 300 && queued_malformed > 0,
        "malformed lines in both parts"
    );
    let waves: Vec<&[String]> = queued.chunks(200).collect();
    assert_eq!(waves.len(), 6);
    std::fs::write(app.dir().join("events.jsonl"), file_lines.join("\n") + "\n").unwrap();
    let raw = common::raw_pii(&gen.text);
    assert!(!raw.is_empty());

    // U is revealed, U2 forgotten; both have logins in the file.
    let file_users: BTreeSet<&str> = per_line[..300]
        .iter()
        .flatten()
        .map(|o| o.user_id.as_str())
        .collect();
    let mut file_users = file_users.into_iter();
    let (u, u2) = (file_users.next().unwrap(), file_users.next().unwrap());
    let sent_of = |user: &str| -> Vec<Original> {
        valid
            .iter()
            .filter(|o| o.user_id == user)
            .cloned()
            .collect()
    };

    let committed = |n: usize| {
        let pool = app.pool().clone();
        async move {
            prod::wait_until(
                Duration::from_secs(60),
                &format!("{n} events committed"),
                || {
                    let pool = pool.clone();
                    async move {
                        let got = prod::count(
                            &pool,
                            "SELECT (SELECT count(*) FROM user_logins) + (SELECT count(*) FROM quarantine)",
                        )
                        .await as usize;
                        if got >= n {
                            Ok(())
                        } else {
                            Err(format!("{got} committed"))
                        }
                    }
                },
            )
            .await
        }
    };

    // The worker login runs as a daemon under key A until SIGTERM.
    let daemon = Spawned::spawn(
        cli.cmd(&worker, &key_a, &["run", "--queue-url", &queue]),
        app.dir(),
        "worker",
    );
    let mut sent = 0usize;

    // Wave 0 while the same login loads the file.
    let (_, from_file) = tokio::join!(
        prod::send_paced(&sqs, &queue, waves[0], Duration::from_secs(2)),
        cli.ok(
            &worker,
            &key_a,
            &["run", "--from-file", "events.jsonl", "--no-progress"],
        )
    );
    sent += waves[0].len() + file_lines.len();
    assert_eq!(
        common::summary(&from_file.stderr),
        (file_valid as u64, 0, (300 - file_valid) as u64),
        "the file run's summary"
    );
    committed(sent).await;
    let before_reveals = app
        .scalar(&format!(
            "SELECT count(*) FROM user_logins WHERE user_id = '{u}'"
        ))
        .await;

    // The analyst reads user_logins, finds an IP token of several users
    // there, and is refused the vault.
    let analyst_pool = prod::pool(&analyst.url).await;
    let (shared, users_behind): (String, i64) = sqlx::query_as(
        "SELECT masked_ip, count(DISTINCT user_id) FROM user_logins GROUP BY masked_ip \
         ORDER BY count(DISTINCT user_id) DESC, masked_ip LIMIT 1",
    )
    .fetch_one(&analyst_pool)
    .await
    .unwrap();
    assert!(users_behind >= 2, "no IP token shared by two users");
    match sqlx::query("SELECT count(*) FROM vault")
        .execute(&analyst_pool)
        .await
    {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {}
        other => panic!("the analyst reading the vault: expected 42501, got {other:?}"),
    }
    analyst_pool.close().await;

    // Wave 1 while the revealers work.
    let (_, (request_id, pending_rows)) = tokio::join!(
        prod::send_paced(&sqs, &queue, waves[1], Duration::from_secs(3)),
        async {
            // One user: within the policy, served at once.
            let (rows, err) = cli
                .reveal(
                    &alice,
                    &key_a,
                    &["--user-id", u, "--reason", "INC-1 account takeover"],
                )
                .await;
            assert!(
                rows.len() as i64 >= before_reveals && rows.len() <= sent_of(u).len(),
                "reveal of {u}: {} rows, {before_reveals} committed before it, {} sent in all",
                rows.len(),
                sent_of(u).len()
            );
            assert!(rows.iter().all(|r| r.user_id == u));
            assert_all_sent(&rows, &valid, "reveal --user-id during the load");
            assert!(
                err.contains(&format!("revealed {} login(s) for user_id={u}", rows.len())),
                "{err}"
            );

            // A token of several users: over the policy, a pending request.
            let out = cli
                .run(
                    &alice,
                    &key_a,
                    &[
                        "reveal",
                        "--masked-ip",
                        &shared,
                        "--reason",
                        "INC-2 shared address",
                        "--format",
                        "json",
                    ],
                )
                .await;
            let err = out.stderr_text();
            assert_eq!(out.status.code(), Some(3), "{err}");
            // No rows: stdout holds the request, for a script.
            let pending: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| panic!("a pending reveal printed rows"));
            assert_eq!(pending["status"], "pending_approval");
            assert_eq!(pending["revealed"], 0);
            assert!(err.contains("is over the reveal policy"), "{err}");
            let id = numbers_after(&err, "Request ")[0];
            assert_eq!(pending["request_id"].as_i64(), Some(id));
            let n = numbers_after(&err, "this reveal (")[0];
            assert!(
                err.contains(&format!("pii-vault approve {id} --reason TEXT"))
                    && err.contains(&format!("pii-vault reveal --request {id}")),
                "{err}"
            );

            // Not by the requester: the second person is another login.
            cli.refused(
                &alice,
                &key_a,
                &["approve", &id.to_string(), "--reason", "me myself"],
                &[&format!("request {id} was made by this login")],
            )
            .await;
            let approved = cli
                .ok(
                    &bob,
                    &key_a,
                    &["approve", &id.to_string(), "--reason", "INC-2 checked"],
                )
                .await;
            assert!(
                approved
                    .stderr_text()
                    .contains(&format!("request {id} approved")),
                "{}",
                approved.stderr_text()
            );

            // Alice fetches it, once: every login behind the token when she
            // asked, of several users, all of one IP.
            let (rows, _) = cli
                .reveal(&alice, &key_a, &["--request", &id.to_string()])
                .await;
            assert_eq!(rows.len() as i64, n, "the rows fixed at the request");
            assert!(rows.iter().all(|r| r.masked_ip == shared));
            let users: BTreeSet<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
            assert!(users.len() >= 2, "{} user(s) behind the token", users.len());
            let ips: BTreeSet<String> = rows
                .iter()
                .map(|r| canonical(r.ip.as_deref().expect("an original ip")))
                .collect();
            assert_eq!(ips.len(), 1, "one token, several IPs");
            assert_all_sent(&rows, &valid, "reveal --request");
            cli.refused(
                &alice,
                &key_a,
                &["reveal", "--request", &id.to_string(), "--format", "json"],
                &[&format!("reveal request {id} was already fetched")],
            )
            .await;

            // Her trail, newest first: her login wrote her entries, bob's
            // wrote his, whatever the client claimed.
            let trail = cli.ok(&alice, &key_a, &["audit", "--format", "json"]).await;
            let trail = audit_lines(&trail);
            let newest: Vec<(&str, &str, &str)> = trail[..4]
                .iter()
                .map(|e| {
                    assert_eq!(e["claimed_actor"], ACTOR, "{e}");
                    (
                        e["action"].as_str().unwrap(),
                        e["actor"].as_str().unwrap(),
                        e["target"].as_str().unwrap(),
                    )
                })
                .collect();
            let by_ip = format!("masked_ip={shared}");
            let by_user = format!("user_id={u}");
            let request = format!("request {id}");
            assert_eq!(
                newest,
                [
                    ("reveal", alice.name.as_str(), by_ip.as_str()),
                    ("approve", bob.name.as_str(), request.as_str()),
                    ("reveal-request", alice.name.as_str(), by_ip.as_str()),
                    ("reveal", alice.name.as_str(), by_user.as_str()),
                ]
            );
            assert_eq!(trail[2]["id"], id, "the request is its audit row");
            assert_eq!(trail[2]["row_count"], n);
            (id, n)
        }
    );
    sent += waves[1].len();

    // Waves 2 to 4 while the rotator login rotates (under key A, as
    // configured before the KMS key moves).
    let mut rotations = Vec::new();
    for (wave, args) in [
        (waves[2], &["rotate", "data-keys"][..]),
        (waves[3], &["rotate", "token-key"][..]),
        (waves[4], &["rotate", "kek", "--to", &key_b][..]),
    ] {
        let what = format!("`{}` as {}", args.join(" "), rotator.name);
        let out = prod::send_during(
            &sqs,
            &queue,
            wave,
            cli.cmd(&rotator, &key_a, args),
            COMMAND_LIMIT,
            &what,
        )
        .await;
        cli.keep(&what, out.all_output());
        rotations.push(out);
        sent += wave.len();
    }
    assert!(rotations[0].stderr_text().contains("re-encrypted "));
    assert!(rotations[1]
        .stderr_text()
        .contains("token key v2 is current; re-tokenised "));
    assert!(rotations[2]
        .stderr_text()
        .contains("every stored key is now wrapped by it"));

    // Wave 5 while the rotator forgets U2.
    let what = format!("`forget --user-id {u2}` as {}", rotator.name);
    let forgot = prod::send_during(
        &sqs,
        &queue,
        waves[5],
        cli.cmd(
            &rotator,
            &key_b,
            &[
                "forget",
                "--user-id",
                u2,
                "--reason",
                "GDPR art. 17 request",
            ],
        ),
        COMMAND_LIMIT,
        &what,
    )
    .await;
    cli.keep(&what, forgot.all_output());
    sent += waves[5].len();
    assert_eq!(sent, lines.len());
    let erased = numbers_after(&forgot.stderr_text(), "pii-vault: erased ");
    let (forgot_vault, forgot_quarantined) = (erased[0], erased[1]);
    assert!(forgot_vault > 0, "U2 had logins in the file");

    // Drained, then stopped with SIGTERM.
    committed(sent - forgot_quarantined as usize).await;
    prod::wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;
    daemon.terminate().await;
    let daemon = daemon.wait_within(Duration::from_secs(30)).await;
    daemon.assert_success("the worker (after SIGTERM)");
    cli.keep("the worker daemon", daemon.all_output());
    let (stored, duplicates, rejected) = common::summary(&daemon.stderr);
    assert_eq!(
        (stored, rejected),
        (queued_valid as u64, queued_malformed as u64),
        "the worker's summary ({duplicates} duplicates)"
    );

    // Exactly once: each valid line one login, each malformed one
    // quarantined (or erased from quarantine with U2).
    assert_eq!(
        app.scalar("SELECT count(*) FROM user_logins").await,
        valid.len() as i64
    );
    assert_eq!(
        app.scalar("SELECT count(DISTINCT message_id) FROM user_logins")
            .await,
        valid.len() as i64
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM quarantine").await + forgot_quarantined,
        malformed as i64
    );
    // Every login re-tokenised or written under the new token key, and
    // every stored key now wrapped by B.
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM user_logins \
             WHERE masked_ip NOT LIKE 't2\\_%' OR masked_device_id NOT LIKE 't2\\_%'"
        )
        .await,
        0
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND kek_id <> '{arn_b}'"
        ))
        .await,
        0,
        "keys not wrapped by B ({arn_a} was A)"
    );

    // `audit --alarms` is the owner's alone.
    let alarms = cli
        .ok(&owner, &key_b, &["audit", "--alarms", "--format", "json"])
        .await;
    assert_eq!(alarms.stdout_text(), "", "no honeytoken was touched");
    for login in [&alice, &rotator] {
        cli.refused(
            login,
            &key_b,
            &["audit", "--alarms", "--format", "json"],
            &["permission denied", "audit_alarms"],
        )
        .await;
    }

    // After the rotations, under B: U reveals every login sent for U; U2
    // every login, those written before the erasure without originals.
    let (rows, _) = cli
        .reveal(
            &alice,
            &key_b,
            &["--user-id", u, "--reason", "INC-1 follow-up"],
        )
        .await;
    let mut got: Vec<Original> = rows
        .iter()
        .map(|r| as_original(r).expect("U's originals"))
        .collect();
    let mut want = sent_of(u);
    got.sort();
    want.sort();
    assert!(
        got == want,
        "reveal of U after the rotations: {} rows, {} sent, or their originals differ",
        got.len(),
        want.len()
    );
    let (rows, err) = cli
        .reveal(
            &alice,
            &key_b,
            &["--user-id", u2, "--reason", "INC-3 check erasure"],
        )
        .await;
    assert_eq!(
        rows.len(),
        sent_of(u2).len(),
        "forget keeps the masked rows"
    );
    let gone = rows.iter().filter(|r| as_original(r).is_none()).count();
    assert_eq!(
        gone as i64, forgot_vault,
        "exactly the erased originals are gone"
    );
    let kept: Vec<Revealed> = rows
        .into_iter()
        .filter(|r| as_original(r).is_some())
        .collect();
    assert_all_sent(&kept, &sent_of(u2), "reveal of U2 after forget");
    assert!(
        err.contains(&format!(
            "{forgot_vault} login(s) have no recoverable originals"
        )),
        "{err}"
    );

    // Last, retention: everything is dated today, so a cut-off of
    // tomorrow (UTC) erases every original and every quarantined body.
    let (vault_rows, quarantined) = (
        app.scalar("SELECT count(*) FROM vault").await,
        app.scalar("SELECT count(*) FROM quarantine").await,
    );
    assert!(vault_rows > 0 && quarantined > 0);
    let tomorrow = (chrono::Utc::now().date_naive() + chrono::Days::new(1)).to_string();
    let retention = cli
        .ok(
            &rotator,
            &key_b,
            &[
                "forget",
                "--before",
                &tomorrow,
                "--reason",
                "retention policy",
            ],
        )
        .await;
    let erased = numbers_after(&retention.stderr_text(), "pii-vault: erased ");
    assert_eq!((erased[0], erased[1]), (vault_rows, quarantined));
    assert_eq!(app.scalar("SELECT count(*) FROM vault").await, 0);
    assert_eq!(app.scalar("SELECT count(*) FROM quarantine").await, 0);
    assert_eq!(
        app.scalar("SELECT count(*) FROM user_logins").await,
        valid.len() as i64,
        "masked logins stay"
    );

    // The whole trail: each entry by the login that did the job, none by
    // the worker.
    let trail: Vec<(String, String, String, i64, i64)> =
        sqlx::query_as("SELECT action, actor, target, row_count, id FROM audit_log ORDER BY id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    let actions: Vec<(&str, &str)> = trail
        .iter()
        .map(|(a, who, ..)| (a.as_str(), who.as_str()))
        .collect();
    let (o, a, b, r) = (
        owner.name.as_str(),
        alice.name.as_str(),
        bob.name.as_str(),
        rotator.name.as_str(),
    );
    assert_eq!(
        actions,
        [
            ("allow-kek", o),
            ("keys-init", o),
            ("policy-set", o),
            ("reveal", a),
            ("reveal-request", a),
            ("approve", b),
            ("reveal", a),
            ("rotate-data-keys", r),
            ("rotation-done", r),
            ("rotate-token-key", r),
            ("rotation-done", r),
            ("rotate-kek", r),
            ("rotation-done", r),
            ("forget", r),
            ("reveal", a),
            ("reveal", a),
            ("retention", r),
        ]
    );
    assert!(trail.iter().all(|(_, who, ..)| who != &worker.name));
    let request_row = &trail[4];
    assert_eq!((request_row.4, request_row.3), (request_id, pending_rows));
    let forget_row = trail.iter().find(|t| t.0 == "forget").unwrap();
    assert_eq!(
        (forget_row.2.as_str(), forget_row.3),
        (
            format!("user_id={u2}").as_str(),
            forgot_vault + forgot_quarantined
        )
    );
    let retention_row = trail.last().unwrap();
    assert!(
        retention_row.2.starts_with(&format!("before={tomorrow} ")),
        "{retention_row:?}"
    );
    assert_eq!(retention_row.3, vault_rows + quarantined);

    // No raw IP or device id anywhere but on a reveal's stdout.
    for (what, bytes) in cli.outputs.lock().unwrap().iter() {
        prod::assert_no_leak(bytes, &raw, what);
    }

    app.finish().await;
    eprintln!("test took {:.1}s", started.elapsed().as_secs_f64());
}
