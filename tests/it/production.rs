//! Production scenarios end to end: the real binary, a fresh Postgres
//! database, LocalStack SQS and KMS, workers as separate processes, set up
//! the way the README tells a new user to (`migrate` with `DATABASE_URL`,
//! then workers with `PII_VAULT_KMS_KEY_ID` and `--queue-url`).
//!
//! - Two workers drain 20,000 events at once: every valid event is stored
//!   exactly once, every malformed one quarantined, the queue ends empty, and
//!   neither the database dump nor the workers' output holds a raw IP or
//!   device id.
//! - One worker consumes while the key-encryption key, the data keys and
//!   the token key are rotated under it; afterwards the old KMS key is
//!   disabled and everything still reveals, with one token version
//!   throughout; `forget` then erases one user's originals.
//!
//! Needs `PII_VAULT_TEST_PG` and LocalStack (`PII_VAULT_TEST_AWS`,
//! `AWS_ENDPOINT_URL`), as set by `scripts/test.sh`; fails without them (skips
//! under `PII_VAULT_SKIP_SERVICES=1`).

use crate::common::app::{Bin, TestApp};
use crate::common::{self, aws as aws_helpers, production as prod};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use pii_vault::domain::{CanonicalIp, LoginEvent};
use prod::{run_ok, Revealed, Spawned};

/// Longest any single command may take before the test fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// The originals of one valid input line.
#[derive(Debug, Clone)]
struct Original {
    user_id: String,
    ip: String,
    canonical_ip: String,
    device_id: String,
}

/// The originals of each input line, `None` for the lines the generator
/// broke (its own record, not the parser under test, says which), and the
/// number of those. A line the generator left valid must parse as an event.
fn originals(gen: &common::Generated) -> (Vec<Option<Original>>, usize) {
    let broken: HashSet<usize> = gen.malformed.iter().copied().collect();
    let per_line = gen
        .text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if broken.contains(&i) {
                // Rejected as an event, with a reason that names no value.
                let Err(rejection) = LoginEvent::parse(line.as_bytes()) else {
                    panic!("line {i}, broken by the generator, parses");
                };
                let raw = common::raw_pii(line);
                let leaks = common::leaked(rejection.to_string().as_bytes(), &raw);
                assert!(
                    !rejection.code().is_empty() && leaks.is_empty(),
                    "line {i}: rejection {} ({}) quotes a value",
                    rejection.code(),
                    leaks.len()
                );
                return None;
            }
            let ev = LoginEvent::parse(line.as_bytes())
                .unwrap_or_else(|e| panic!("line {i}, valid by the generator, is rejected: {e}"));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ip = v["ip"].as_str().unwrap().to_string();
            assert_eq!(ev.ip_raw.expose(), &ip);
            Some(Original {
                user_id: v["user_id"].as_str().unwrap().to_string(),
                canonical_ip: canonical(&ip),
                ip,
                device_id: v["device_id"].as_str().unwrap().to_string(),
            })
        })
        .collect();
    (per_line, broken.len())
}

fn canonical(ip: &str) -> String {
    CanonicalIp::parse(ip)
        .expect("a revealed IP parses")
        .expose()
        .to_string()
}

/// `reveal --user-id USER --reason … --format json`.
async fn reveal_user(bin: &Bin, user: &str) -> (Vec<Revealed>, String) {
    let out = run_ok(
        bin.tokio_command(&[
            "reveal",
            "--user-id",
            user,
            "--reason",
            "production e2e check",
            "--format",
            "json",
        ]),
        COMMAND_LIMIT,
        "reveal --user-id",
    )
    .await;
    (prod::parse_reveal(&out.stdout_text()), out.stderr_text())
}

/// Asserts that `revealed` holds exactly the (ip, device_id) pairs of
/// `want`, as sent.
fn assert_same_originals(revealed: &[Revealed], want: &[&Original], user: &str) {
    let mut got: Vec<(String, String)> = revealed
        .iter()
        .map(|r| {
            assert_eq!(r.user_id, user);
            (
                r.ip.clone().expect("an original ip"),
                r.device_id.clone().expect("an original device_id"),
            )
        })
        .collect();
    let mut want: Vec<(String, String)> = want
        .iter()
        .map(|o| (o.ip.clone(), o.device_id.clone()))
        .collect();
    got.sort();
    want.sort();
    // Counts only in the message: the values are PII of the test input.
    assert!(
        got == want,
        "reveal of user {user}: {} login(s) revealed, {} expected, or their originals differ",
        got.len(),
        want.len()
    );
}

/// Sorted group sizes of `values`: equal values form one group.
fn group_sizes<'a>(values: impl Iterator<Item = &'a str>) -> Vec<i64> {
    let mut groups: HashMap<&str, i64> = HashMap::new();
    for v in values {
        *groups.entry(v).or_default() += 1;
    }
    let mut sizes: Vec<i64> = groups.into_values().collect();
    sizes.sort_unstable();
    sizes
}

async fn token_group_sizes(pool: &sqlx::PgPool, column: &str) -> Vec<i64> {
    let mut sizes: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM user_logins GROUP BY {column}"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    sizes.sort_unstable();
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_two_workers_exactly_once() {
    let Some((pg_url, _)) = prod::services() else {
        return;
    };
    let test_started = Instant::now();
    let app = TestApp::postgres_on(&pg_url).await;
    let (sqs, kms) = (aws_helpers::sqs().await, aws_helpers::kms().await);
    let queue = aws_helpers::create_queue(&sqs).await;
    let (key_id, _key_arn) = aws_helpers::create_key(&kms).await;
    let alias = aws_helpers::create_alias(&kms, &key_id).await;

    run_ok(
        app.bin().kms(&alias).tokio_command(&["migrate"]),
        COMMAND_LIMIT,
        "migrate",
    )
    .await;
    // The checks below reveal a shared address behind more users than the
    // default policy lets one login reveal without a second person.
    run_ok(
        app.bin().kms(&alias).tokio_command(&[
            "policy",
            "set",
            "--max-users-per-reveal",
            "100000",
            "--max-reveals-per-day",
            "100000",
        ]),
        COMMAND_LIMIT,
        "policy set",
    )
    .await;

    let gen = common::gen_events_recorded(&["-n", "20000", "--malformed-pct", "2", "--seed", "5"]);
    let bodies: Vec<String> = gen.text.lines().map(str::to_string).collect();
    assert_eq!(bodies.len(), 20_000);
    let (per_line, malformed) = originals(&gen);
    let valid: Vec<Original> = per_line.into_iter().flatten().collect();
    assert!(
        (200..=800).contains(&malformed),
        "about 2% of the input should be malformed, got {malformed}"
    );
    let loading = Instant::now();
    prod::send_parallel(&sqs, &queue, &bodies, 32).await;
    let loaded_in = loading.elapsed();
    assert_eq!(
        aws_helpers::queue_counts(&sqs, &queue).await,
        (20_000, 0),
        "every event should be in the queue before the workers start"
    );

    // Two workers at once, as two replicas of a deployment: one names the
    // KMS key by its alias, the other by its id.
    let run = [
        "run",
        "--queue-url",
        &queue,
        "--until-empty",
        "--concurrency",
        "4",
    ];
    let consuming = Instant::now();
    let first = Spawned::spawn(
        app.bin().kms(&alias).tokio_command(&run),
        app.dir(),
        "worker-1",
    );
    let second = Spawned::spawn(
        app.bin().kms(&key_id).tokio_command(&run),
        app.dir(),
        "worker-2",
    );
    let limit = Duration::from_secs(120);
    let (first, second) = tokio::join!(first.wait_within(limit), second.wait_within(limit));
    let consumed_in = consuming.elapsed();
    first.assert_success("worker 1");
    second.assert_success("worker 2");
    let (s1, d1, r1) = common::summary(&first.stderr);
    let (s2, d2, r2) = common::summary(&second.stderr);
    eprintln!(
        "20,000 events ({} valid, {malformed} malformed): loaded in {:.1}s; two workers \
         (--concurrency 4) consumed them in {:.1}s ({:.0} events/s); worker 1: {s1} stored, \
         {d1} duplicates, {r1} rejected; worker 2: {s2} stored, {d2} duplicates, {r2} rejected",
        valid.len(),
        loaded_in.as_secs_f64(),
        consumed_in.as_secs_f64(),
        20_000.0 / consumed_in.as_secs_f64()
    );
    assert_eq!(
        s1 + s2,
        valid.len() as u64,
        "the workers' stored counts must add up to the valid events"
    );
    assert_eq!(
        r1 + r2,
        malformed as u64,
        "the workers' rejected counts must add up to the malformed events"
    );
    assert!(
        s1 > 0 && s2 > 0,
        "both workers should have taken part ({s1} and {s2} stored)"
    );

    // Exactly once in the database.
    let pool = prod::pool(app.url()).await;
    assert_eq!(
        prod::count(&pool, "SELECT count(*) FROM user_logins").await,
        valid.len() as i64
    );
    assert_eq!(
        prod::count(&pool, "SELECT count(DISTINCT message_id) FROM user_logins").await,
        valid.len() as i64,
        "a message id is stored twice"
    );
    assert_eq!(
        prod::count(&pool, "SELECT count(*) FROM vault").await,
        valid.len() as i64,
        "every login has exactly one vault row"
    );
    assert_eq!(
        prod::count(&pool, "SELECT count(*) FROM quarantine").await,
        malformed as i64
    );
    assert_eq!(
        prod::count(
            &pool,
            "SELECT count(*) FROM user_logins l JOIN quarantine q USING (message_id)"
        )
        .await,
        0,
        "a message is both stored and quarantined"
    );

    // Nothing left in the queue, visible or in flight.
    assert_eq!(aws_helpers::queue_counts(&sqs, &queue).await, (0, 0));

    // No raw IP or device id in a dump of the database or in the workers' output.
    let raw = common::raw_pii(&gen.text);
    assert!(
        raw.len() > 5_000,
        "the input should have thousands of distinct IPs and devices"
    );
    let dump = prod::pg_dump(app.url(), &app.dir().join("dump.sql")).await;
    assert!(
        dump.len() > 1_000_000,
        "the dump looks empty ({} bytes)",
        dump.len()
    );
    assert!(
        String::from_utf8_lossy(&dump).contains("COPY public.vault_y"),
        "the dump should hold the vault's data (its monthly partitions)"
    );
    prod::assert_no_leak(&dump, &raw, "the pg_dump of the database");
    // The fast leak check agrees with common::leaked on a sample.
    let sample: Vec<String> = raw.iter().step_by(raw.len() / 20).cloned().collect();
    assert!(common::leaked(&dump, &sample).is_empty());
    prod::assert_no_leak(&first.all_output(), &raw, "worker 1's stdout/stderr");
    prod::assert_no_leak(&second.all_output(), &raw, "worker 2's stdout/stderr");

    // Tokens group exactly like the originals: equal (canonical) IPs share a
    // masked_ip, different ones never do; the same for device ids.
    assert_eq!(
        token_group_sizes(&pool, "masked_ip").await,
        group_sizes(valid.iter().map(|o| o.canonical_ip.as_str())),
        "masked_ip groups differ from the groups of equal IPs"
    );
    assert_eq!(
        token_group_sizes(&pool, "masked_device_id").await,
        group_sizes(valid.iter().map(|o| o.device_id.as_str())),
        "masked_device_id groups differ from the groups of equal device ids"
    );
    // Spot check through KMS Decrypt: the most shared masked_ip reveals one
    // IP, on as many logins as the input has events with that IP.
    let (token, n): (String, i64) = sqlx::query_as(
        "SELECT masked_ip, count(*) FROM user_logins GROUP BY masked_ip ORDER BY 2 DESC, 1 LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(n > 1, "the input repeats IPs by construction");
    let shared = run_ok(
        app.bin().kms(&alias).tokio_command(&[
            "reveal",
            "--masked-ip",
            &token,
            "--reason",
            "production e2e check",
            "--format",
            "json",
        ]),
        COMMAND_LIMIT,
        "reveal --masked-ip",
    )
    .await;
    let shared = prod::parse_reveal(&shared.stdout_text());
    assert_eq!(shared.len() as i64, n);
    let ips: HashSet<String> = shared
        .iter()
        .map(|r| canonical(r.ip.as_deref().expect("an original ip")))
        .collect();
    assert_eq!(ips.len(), 1, "one masked_ip revealed several IPs");
    let ip = ips.into_iter().next().unwrap();
    assert_eq!(
        valid.iter().filter(|o| o.canonical_ip == ip).count() as i64,
        n,
        "the token's logins are not exactly the events with its IP"
    );

    // A few users reveal exactly their originals.
    let users: std::collections::BTreeSet<&str> =
        valid.iter().map(|o| o.user_id.as_str()).collect();
    let picked: Vec<&str> = users.into_iter().step_by(97).take(4).collect();
    assert!(picked.len() >= 3);
    for user in picked {
        let want: Vec<&Original> = valid.iter().filter(|o| o.user_id == user).collect();
        let (got, _) = reveal_user(&app.bin().kms(&key_id), user).await;
        assert_same_originals(&got, &want, user);
        // Within one user too: one token per canonical IP.
        let mut tok: HashMap<String, &str> = HashMap::new();
        for r in &got {
            let c = canonical(r.ip.as_deref().unwrap());
            assert_eq!(*tok.entry(c).or_insert(&r.masked_ip), r.masked_ip);
        }
    }

    pool.close().await;
    app.finish().await;
    eprintln!("test took {:.1}s", test_started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_while_consuming_then_old_kms_key_disabled() {
    let Some((pg_url, _)) = prod::services() else {
        return;
    };
    let test_started = Instant::now();
    let app = TestApp::postgres_on(&pg_url).await;
    let (sqs, kms) = (aws_helpers::sqs().await, aws_helpers::kms().await);
    let queue = aws_helpers::create_queue(&sqs).await;
    let (key_a, arn_a) = aws_helpers::create_key(&kms).await;
    let (key_b, arn_b) = aws_helpers::create_key(&kms).await;

    run_ok(
        app.bin().kms(&key_a).tokio_command(&["migrate"]),
        COMMAND_LIMIT,
        "migrate",
    )
    .await;
    run_ok(
        app.bin().kms(&key_a).tokio_command(&[
            "policy",
            "set",
            "--max-users-per-reveal",
            "100000",
            "--max-reveals-per-day",
            "100000",
        ]),
        COMMAND_LIMIT,
        "policy set",
    )
    .await;

    // Small pools, so that every IP, device and user recurs in every wave.
    let gen = common::gen_events_recorded(&[
        "-n",
        "1800",
        "--seed",
        "21",
        "--ips",
        "60",
        "--devices",
        "60",
        "--users",
        "24",
        "--malformed-pct",
        "3",
    ]);
    let bodies: Vec<String> = gen.text.lines().map(str::to_string).collect();
    let (per_line, malformed) = originals(&gen);
    assert!(malformed > 0);
    let valid: Vec<Original> = per_line.iter().flatten().cloned().collect();
    let waves: Vec<&[String]> = bodies.chunks(300).collect();
    assert_eq!(waves.len(), 6);
    let pool = prod::pool(app.url()).await;

    // The worker runs as a daemon under key A until it is sent SIGTERM.
    let worker = Spawned::spawn(
        app.bin()
            .kms(&key_a)
            .tokio_command(&["run", "--queue-url", &queue]),
        app.dir(),
        "worker",
    );
    let mut sent = 0usize;
    let consumed = |n: usize| {
        let pool = pool.clone();
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
    let rotate = |kms_key: &str, args: &[&str]| app.bin().kms(kms_key).tokio_command(args);
    let mut rotator_output = Vec::new();

    // Wave 0 before any rotation: committed under key A, token key v1.
    prod::send_paced(&sqs, &queue, waves[0], Duration::from_secs(1)).await;
    sent += waves[0].len();
    consumed(sent).await;
    let under_a = prod::count(
        &pool,
        &format!("SELECT count(*) FROM vault_keys WHERE kek_id = '{arn_a}'"),
    )
    .await;
    assert!(
        under_a >= 2,
        "the worker should have made its token key and data key under A"
    );

    // Wave 1 while the key-encryption key moves from A to B. The rotator
    // itself still runs with A as its configured key.
    rotator_output.push(
        prod::send_during(
            &sqs,
            &queue,
            waves[1],
            rotate(&key_a, &["rotate", "kek", "--to", &key_b]),
            COMMAND_LIMIT,
            "rotate kek",
        )
        .await,
    );
    sent += waves[1].len();

    // Wave 2 between rotations.
    prod::send_paced(&sqs, &queue, waves[2], Duration::from_secs(1)).await;
    sent += waves[2].len();
    consumed(sent).await;

    // Wave 3 while the vault is re-encrypted under a fresh data key (B from now on).
    rotator_output.push(
        prod::send_during(
            &sqs,
            &queue,
            waves[3],
            rotate(&key_b, &["rotate", "data-keys"]),
            COMMAND_LIMIT,
            "rotate data-keys",
        )
        .await,
    );
    sent += waves[3].len();

    // Wave 4 while the token key is rotated and user_logins re-tokenised.
    rotator_output.push(
        prod::send_during(
            &sqs,
            &queue,
            waves[4],
            rotate(&key_b, &["rotate", "token-key"]),
            COMMAND_LIMIT,
            "rotate token-key",
        )
        .await,
    );
    sent += waves[4].len();

    // Wave 5 after the rotations.
    prod::send_paced(&sqs, &queue, waves[5], Duration::from_secs(1)).await;
    sent += waves[5].len();
    assert_eq!(sent, bodies.len());
    consumed(sent).await;
    prod::wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;

    worker.terminate().await;
    let worker = worker.wait_within(Duration::from_secs(30)).await;
    worker.assert_success("the worker (after SIGTERM)");
    let log = worker.stderr_text();
    for line in log.lines().filter(|l| {
        l.contains("rotat")
            || l.contains("new data key")
            || l.contains("KMS key")
            || l.contains("stored,")
    }) {
        eprintln!("worker: {line}");
    }
    let (stored, duplicates, rejected) = common::summary(&worker.stderr);
    assert_eq!(
        (stored, rejected),
        (valid.len() as u64, malformed as u64),
        "the worker's summary ({duplicates} duplicates)"
    );
    // It switched keys by itself, through the commit fence.
    assert!(
        log.matches("data key retired by a rotation").count() >= 2,
        "the worker should have noticed both data-key retirements (kek and data-keys):\n{}",
        prod::tail(&log, 60)
    );
    assert!(
        log.contains("token key rotated; switching to the new version"),
        "the worker should have switched token keys by itself:\n{}",
        prod::tail(&log, 60)
    );
    assert!(
        log.contains("new keys are now wrapped under another KMS key"),
        "the worker should have followed the KEK to B by itself"
    );

    // Nothing needs key A any more: disable it.
    kms.disable_key()
        .key_id(&key_a)
        .send()
        .await
        .expect("DisableKey A");

    // Exactly once, and no row under a destroyed key.
    assert_eq!(
        prod::count(&pool, "SELECT count(*) FROM user_logins").await,
        valid.len() as i64
    );
    assert_eq!(
        prod::count(&pool, "SELECT count(DISTINCT message_id) FROM user_logins").await,
        valid.len() as i64
    );
    assert_eq!(
        prod::count(&pool, "SELECT count(*) FROM quarantine").await,
        malformed as i64
    );
    for table in ["vault", "quarantine"] {
        let dangling = prod::count(
            &pool,
            &format!(
                "SELECT count(*) FROM {table} t JOIN vault_keys k ON k.id = t.key_id \
                 WHERE k.state = 'destroyed' OR k.wrapped IS NULL"
            ),
        )
        .await;
        assert_eq!(dangling, 0, "{table} rows refer to destroyed keys");
    }
    let keys: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT id, purpose, state, kek_id FROM vault_keys ORDER BY created_at, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let still_needing_other: Vec<&(String, String, String, String)> = keys
        .iter()
        .filter(|(_, _, state, kek)| state != "destroyed" && kek != &arn_b)
        .collect();
    assert!(
        still_needing_other.is_empty(),
        "keys not wrapped by B after `rotate kek`: {still_needing_other:?}"
    );
    assert!(
        keys.iter()
            .any(|(_, p, s, _)| p == "vault" && s == "destroyed"),
        "`rotate data-keys` should have destroyed the old data keys: {keys:?}"
    );
    let versions: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(masked_ip, '_', 1) FROM user_logins \
         UNION SELECT DISTINCT split_part(masked_device_id, '_', 1) FROM user_logins",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        versions,
        vec!["t2".to_string()],
        "every token should be of version 2 after one token rotation"
    );

    // Every user reveals the originals of all their events, under B alone;
    // equal IPs carry one token across the waves (before, during and after
    // the rotations), different IPs never share one.
    let mut by_user: BTreeMap<&str, Vec<&Original>> = BTreeMap::new();
    for o in &valid {
        by_user.entry(o.user_id.as_str()).or_default().push(o);
    }
    let reveals: Vec<(&str, Vec<Revealed>)> = stream::iter(by_user.keys().copied())
        .map(|user| {
            let bin = app.bin().kms(&key_b);
            async move { (user, reveal_user(&bin, user).await.0) }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let (mut ip_token, mut token_ip) = (HashMap::new(), HashMap::new());
    let (mut dev_token, mut token_dev) = (HashMap::new(), HashMap::new());
    let mut seen_ids: HashSet<String> = HashSet::new();
    for (user, got) in &reveals {
        assert_same_originals(got, &by_user[user], user);
        for r in got {
            let ip = canonical(r.ip.as_deref().unwrap());
            let dev = r.device_id.clone().unwrap();
            assert_eq!(
                ip_token.entry(ip.clone()).or_insert(r.masked_ip.clone()),
                &r.masked_ip,
                "one IP, two tokens"
            );
            assert_eq!(
                token_ip.entry(r.masked_ip.clone()).or_insert(ip),
                &canonical(r.ip.as_deref().unwrap()),
                "one token, two IPs"
            );
            assert_eq!(
                dev_token
                    .entry(dev.clone())
                    .or_insert(r.masked_device_id.clone()),
                &r.masked_device_id,
                "one device id, two tokens"
            );
            assert_eq!(
                token_dev
                    .entry(r.masked_device_id.clone())
                    .or_insert(dev.clone()),
                &dev,
                "one token, two device ids"
            );
            seen_ids.insert(r.message_id.clone());
        }
    }
    assert_eq!(seen_ids.len(), valid.len(), "every login revealed once");
    // The IPs recur across the waves, so the checks above compared rows
    // committed before, during and after the rotations.
    let ips_per_wave: Vec<HashSet<String>> = per_line
        .chunks(300)
        .map(|w| w.iter().flatten().map(|o| o.canonical_ip.clone()).collect())
        .collect();
    let in_every_wave = ips_per_wave[0]
        .iter()
        .filter(|ip| ips_per_wave.iter().all(|w| w.contains(*ip)))
        .count();
    assert!(
        in_every_wave >= 10,
        "only {in_every_wave} IPs recur in every wave"
    );

    // The dump after all this holds no raw values; neither do the logs.
    let raw = common::raw_pii(&gen.text);
    let dump = prod::pg_dump(app.url(), &app.dir().join("dump.sql")).await;
    prod::assert_no_leak(&dump, &raw, "the pg_dump after the rotations");
    prod::assert_no_leak(&worker.all_output(), &raw, "the worker's output");
    for out in &rotator_output {
        prod::assert_no_leak(&out.all_output(), &raw, "a rotation's output");
    }

    // With A disabled, a further data-key rotation still works: nothing
    // stored needs A.
    run_ok(
        rotate(&key_b, &["rotate", "data-keys"]),
        COMMAND_LIMIT,
        "rotate data-keys after A was disabled",
    )
    .await;

    // Erasure: one user's originals are gone, the others' are not.
    let (forgotten, kept) = {
        let mut users = by_user.keys().copied();
        (users.next().unwrap(), users.next().unwrap())
    };
    run_ok(
        app.bin().kms(&key_b).tokio_command(&[
            "forget",
            "--user-id",
            forgotten,
            "--reason",
            "erasure request e2e",
        ]),
        COMMAND_LIMIT,
        "forget",
    )
    .await;
    let (after, err) = reveal_user(&app.bin().kms(&key_b), forgotten).await;
    assert_eq!(
        after.len(),
        by_user[forgotten].len(),
        "forget keeps the masked rows"
    );
    assert!(
        after
            .iter()
            .all(|r| r.ip.is_none() && r.device_id.is_none()),
        "forgotten originals came back"
    );
    assert!(err.contains("no recoverable originals"), "{err}");
    let (other, _) = reveal_user(&app.bin().kms(&key_b), kept).await;
    assert_same_originals(&other, &by_user[kept], kept);

    pool.close().await;
    app.finish().await;
    eprintln!("test took {:.1}s", test_started.elapsed().as_secs_f64());
}

#[test]
fn leaked_fast_agrees_with_leaked() {
    let raw: Vec<String> = [
        "10.1.2.3",
        "2001:db8:a::1",
        "123-45-6789",
        "abcdef",
        "1.2.3.44",
        "device id with spaces",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for hay in [
        &b"x 10.1.2.3 y"[..],
        b"ffff10.1.2.3ffff",
        b"110.1.2.34",
        b"2001:db8:a::12 and 123-45-67890",
        b"\\x00abcdef00 device id with spaces",
        b"1.2.3.4 10.1.2 123-45-678",
        b"",
    ] {
        assert_eq!(
            prod::leaked_fast(hay, &raw),
            common::leaked(hay, &raw),
            "{}",
            String::from_utf8_lossy(hay)
        );
    }
}

#[test]
fn leaked_hex_finds_values_stored_as_bytea_in_a_dump() {
    let raw = vec!["198.51.100.7".to_string(), "555-12-3456".to_string()];
    let dump = format!(
        "COPY t (b) FROM stdin;\n\\\\x00ff{}00\n\\\\x{}\n\\.\n",
        hex::encode("198.51.100.7"),
        hex::encode("nothing here")
    );
    assert_eq!(
        prod::leaked_hex(dump.as_bytes(), &raw),
        vec!["198.51.100.7"]
    );
    // An odd offset is not a byte boundary: no false hit.
    let shifted = format!("\\\\x0{}", hex::encode("555-12-3456"));
    assert!(prod::leaked_hex(shifted.as_bytes(), &raw).is_empty());
}
