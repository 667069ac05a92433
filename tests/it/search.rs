//! `pii-vault tokenize`, the analyst's search by a raw value, as an analyst
//! and a searcher run it: the tokens find exactly the logins of that value
//! however it is written (compared with what the generator wrote, never
//! with the code under test), the record holds tokens and never the value,
//! the daily limit refuses the search over it, and a honeytoken's address
//! raises the alarm. The roles' plain-SQL boundaries are in
//! `roles::searcher`.

use std::collections::BTreeMap;

use crate::common;
use crate::common::app::{Bin, TestApp, SEARCHER, WORKER};

type Row = (String, String, Option<String>);

/// The tokens a `tokenize … --format json` printed.
fn tokens_of(out: &std::process::Output) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

fn tokenize(who: &Bin, flag: &str, value: &str) -> std::process::Output {
    who.ok_output(&[
        "tokenize",
        flag,
        value,
        "--reason",
        "FRAUD-1234",
        "--format",
        "json",
    ])
}

/// `(user_id, device_type, locale)` of each event line whose `key` is one
/// of `written`, sorted: what the logins of that value must be.
fn expected(lines: &[String], key: &str, written: &[&str]) -> Vec<Row> {
    let mut out: Vec<Row> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| written.contains(&e[key].as_str().unwrap_or("")))
        .map(|e| {
            (
                e["user_id"].as_str().unwrap().to_string(),
                e["device_type"].as_str().unwrap().to_string(),
                e["locale"].as_str().map(str::to_string),
            )
        })
        .collect();
    out.sort();
    out
}

async fn logins_with(app: &TestApp, column: &str, tokens: &[String]) -> Vec<Row> {
    sqlx::query_as(&format!(
        "SELECT user_id::text, device_type::text, locale::text FROM user_logins \
         WHERE {column} = ANY($1) ORDER BY 1, 2, 3"
    ))
    .bind(tokens)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

/// The most frequent value of `key` among `lines` that `keep` accepts.
fn most_common(lines: &[String], key: &str, keep: impl Fn(&str) -> bool) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in lines {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        if let Some(v) = e[key].as_str().filter(|v| keep(v)) {
            *counts.entry(v.to_string()).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).unwrap().0
}

/// An IPv6 address written out in full, upper case (`2001:db8:a::1` →
/// `2001:0DB8:000A:0000:0000:0000:0000:0001`): written here, independently
/// of the canonical form under test.
fn expanded(v6: &str) -> String {
    let (head, tail) = v6.split_once("::").unwrap_or((v6, ""));
    let head: Vec<&str> = head.split(':').filter(|s| !s.is_empty()).collect();
    let tail: Vec<&str> = tail.split(':').filter(|s| !s.is_empty()).collect();
    let zeros = vec!["0"; 8 - head.len() - tail.len()];
    head.iter()
        .chain(zeros.iter())
        .chain(tail.iter())
        .map(|g| format!("{:0>4}", g.to_uppercase()))
        .collect::<Vec<_>>()
        .join(":")
}

/// The generator's events, plus the same addresses written another way
/// (an IPv4 as IPv4-mapped IPv6, an IPv6 in full): tokenize finds, for
/// each spelling of each, exactly the logins the input had at that
/// address, in any spelling; and a device id's. Outputs, the trail and a
/// dump of the database hold no raw value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_finds_exactly_the_logins_of_a_value_however_it_is_written() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let worker = app.as_login(&app.login_as(WORKER).await);
    let searcher_login = app.login_as(SEARCHER).await;
    let searcher = app.as_login(&searcher_login);
    app.ok(&["migrate"]);

    let generated =
        common::gen_events_recorded(&["-n", "400", "--seed", "21", "--malformed-pct", "5"]);
    let mut lines: Vec<String> = generated.valid().iter().map(|l| l.to_string()).collect();
    let v4 = most_common(&lines, "ip", |ip| !ip.contains(':'));
    let v6 = most_common(&lines, "ip", |ip| ip.contains(':'));
    let device = most_common(&lines, "device_id", |_| true);
    let mapped = format!("::ffff:{v4}");
    let full = expanded(&v6);
    assert_ne!(full, v6);
    // A few more logins at the same addresses, written the other way.
    for (i, ip) in [&mapped, &mapped, &full].into_iter().enumerate() {
        lines.push(
            serde_json::json!({"user_id": format!("extra-{i}"), "app_version": "2.3.0",
                               "device_type": "ios", "ip": ip, "locale": "DE",
                               "device_id": "111-22-3333"})
            .to_string(),
        );
    }
    let input = lines.join("\n") + "\n";
    app.write("events.jsonl", &input);
    let all_input = generated.text.clone() + &input;
    let raw = common::raw_pii(&all_input);
    worker.ok(&["run", "--from-file", "events.jsonl", "--no-progress"]);
    assert_eq!(app.count("user_logins").await, lines.len() as i64);

    let mut outputs = Vec::new();
    let mut searches = 0;
    for (ip, spellings) in [
        (&v4, vec![v4.clone(), mapped.clone(), format!(" {v4} ")]),
        (
            &v6,
            vec![v6.clone(), full.clone(), format!("[{}]", v6.to_uppercase())],
        ),
    ] {
        let written: Vec<&str> = if ip.contains(':') {
            vec![v6.as_str(), full.as_str()]
        } else {
            vec![v4.as_str(), mapped.as_str()]
        };
        let want = expected(&lines, "ip", &written);
        assert!(want.len() >= 3, "the address has logins: {want:?}");
        let mut seen = Vec::new();
        for spelling in spellings {
            let out = tokenize(&searcher, "--ip", &spelling);
            searches += 1;
            let tokens = tokens_of(&out);
            assert_eq!(tokens.len(), 1, "one token key version");
            assert_eq!(logins_with(&app, "masked_ip", &tokens).await, want);
            seen.push(tokens);
            outputs.push(out);
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    }
    let out = tokenize(&searcher, "--device-id", &device);
    searches += 1;
    let tokens = tokens_of(&out);
    assert_eq!(
        logins_with(&app, "masked_device_id", &tokens).await,
        expected(&lines, "device_id", &[device.as_str()])
    );
    // The ready SELECT is the analyst's next step, and it names the token.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "SELECT * FROM user_logins WHERE masked_device_id = '{}';",
            tokens[0]
        )),
        "{stdout}"
    );
    outputs.push(out);

    // The table output: the token and the SELECT, nothing else.
    let out = searcher.ok_output(&["tokenize", "--ip", &v4, "--reason", "FRAUD-1234"]);
    searches += 1;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("masked_ip  t1_") && text.contains("WHERE masked_ip = 't1_"),
        "{text}"
    );
    outputs.push(out);

    // The trail: one `search` row per search, under the searcher's login,
    // with the token and the reason.
    let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
        "SELECT actor, claimed_actor, target, reason, row_count FROM audit_log WHERE action = 'search' ORDER BY id",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), searches);
    for (actor, claimed, target, reason, n) in &rows {
        assert_eq!(actor, &searcher_login.name);
        assert_eq!(claimed, common::app::ACTOR);
        assert!(
            target.starts_with("masked_ip=t1_") || target.starts_with("masked_device_id=t1_"),
            "{target}"
        );
        assert_eq!((reason.as_str(), *n), ("FRAUD-1234", 0));
    }
    assert_eq!(app.count("searches").await, searches as i64);

    // No raw value anywhere: the outputs, the trail, the whole database.
    for out in &outputs {
        assert_eq!(common::leaked(&out.stdout, &raw), Vec::<&str>::new());
        assert_eq!(common::leaked(&out.stderr, &raw), Vec::<&str>::new());
    }
    let dump = common::production::pg_dump(app.url(), &app.path("dump.sql")).await;
    assert_eq!(common::leaked(&dump, &raw), Vec::<&str>::new());
    assert_eq!(
        common::production::leaked_hex(&dump, &raw),
        Vec::<&str>::new()
    );
    app.finish().await;
}

/// A value that is not one is refused before anything is opened, without
/// being repeated; a worker, an analyst or a revealer login cannot tokenize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_refuses_a_bad_value_and_every_login_but_a_searchers() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let searcher = app.as_login(&app.login_as(SEARCHER).await);
    for (flag, bad) in [
        ("--ip", "203.0.113.999"),
        ("--ip", "010.0.113.7"),
        ("--ip", "2001:db8::g7"),
        ("--device-id", "   "),
    ] {
        let out = searcher.run(&["tokenize", flag, bad, "--reason", "x"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("nothing was recorded"),
            "{stderr}"
        );
        if !bad.trim().is_empty() {
            assert!(!stderr.contains(bad), "the value is repeated: {stderr}");
        }
        assert!(out.stdout.is_empty());
    }
    let worker = app.as_login(&app.login_as(WORKER).await);
    let analyst = app.as_login(&app.login_as(common::app::ANALYST).await);
    let revealer = app.as_login(&app.login_as(common::app::REVEALER).await);
    for (who, bin) in [
        ("worker", &worker),
        ("analyst", &analyst),
        ("revealer", &revealer),
    ] {
        let out = bin.run(&["tokenize", "--ip", "198.51.100.23", "--reason", "x"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{who}: {stderr}");
        assert!(stderr.contains("42501"), "{who}: {stderr}");
        assert!(out.stdout.is_empty(), "{who} was shown a token");
        assert!(!stderr.contains("198.51.100.23"), "{who}: {stderr}");
    }
    assert_eq!(app.count("searches").await, 0);
    app.finish().await;
}

/// The daily limit: 200 unless changed; the search over it is refused with
/// a clear message and exit status 3, nothing printed or recorded; it
/// counts per login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_limit_refuses_the_search_over_it() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let policy = app.ok_output(&["policy", "show", "--format", "json"]);
    let p: serde_json::Value = serde_json::from_slice(&policy.stdout).unwrap();
    assert_eq!(p["max_searches_per_day"], 200);

    let alice_login = app.login_as(SEARCHER).await;
    let alice = app.as_login(&alice_login);
    let search = ["tokenize", "--ip", "198.51.100.23", "--reason", "FRAUD-1"];
    // The default: 200 searches of the last 24 hours (recorded here by the
    // owner, to keep the test fast), and the 201st is refused.
    app.exec(&format!(
        "INSERT INTO searches (record, kind, tokens, requested_by, requested_at) \
         SELECT -g, 'ip', ARRAY['t1_{}'], '{}', clock_timestamp() - interval '23 hours' \
         FROM generate_series(1, 199) g",
        "A".repeat(43),
        alice_login.name
    ))
    .await;
    alice.ok(&search);
    let over = alice.run(&search);
    let stderr = String::from_utf8_lossy(&over.stderr);
    assert_eq!(over.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("daily limit of 200 searches") && stderr.contains("max-searches-per-day"),
        "{stderr}"
    );
    assert!(over.stdout.is_empty(), "a token was printed over the limit");
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'search'")
            .await,
        1
    );

    // A lower limit, set by the owner and recorded; another login has its own count.
    app.ok(&["policy", "set", "--max-searches-per-day", "2"]);
    let target: String = sqlx::query_scalar(
        "SELECT target FROM audit_log WHERE action = 'policy-set' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(target.ends_with("max_searches_per_day=2"), "{target}");
    let bob = app.as_login(&app.login_as(SEARCHER).await);
    bob.ok(&search);
    bob.ok(&search);
    let over = bob.run(&search);
    assert_eq!(over.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&over.stderr).contains("daily limit of 2 searches"));
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'search'")
            .await,
        3
    );
    app.finish().await;
}

/// A honeytoken's IP (and device id), searched for, raises the alarm: an
/// alarm row the owner sees and a NOTIFY, while the searcher is told
/// nothing and shown what any search shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searching_a_honeytokens_address_raises_the_alarm() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let worker = app.as_login(&app.login_as(WORKER).await);
    let searcher_login = app.login_as(SEARCHER).await;
    let searcher = app.as_login(&searcher_login);
    app.ok(&["migrate"]);
    app.write(
        "day1.jsonl",
        &common::gen_events(&["-n", "40", "--seed", "7"]),
    );
    worker.ok(&[
        "run",
        "--from-file",
        "day1.jsonl",
        "--no-progress",
        "--batch-size",
        "2",
    ]);
    app.ok(&["honeytoken", "plant", "--count", "1", "--over", "0"]);
    app.write(
        "day2.jsonl",
        &common::gen_events(&["-n", "100", "--seed", "8"]),
    );
    worker.ok(&[
        "run",
        "--from-file",
        "day2.jsonl",
        "--no-progress",
        "--batch-size",
        "2",
    ]);
    let body: String = sqlx::query_scalar(
        "SELECT h.body FROM honeytoken_logins h JOIN user_logins l ON l.message_id IN (h.uuid_id, h.line_id) LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    let trap: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (ip, device) = (
        trap["ip"].as_str().unwrap(),
        trap["device_id"].as_str().unwrap(),
    );

    let mut listener = sqlx::postgres::PgListener::connect(app.url())
        .await
        .unwrap();
    listener.listen("pii_vault_alarm").await.unwrap();
    // An ordinary search first: it notifies too (every search does), and
    // raises no alarm.
    let ordinary = tokenize(&searcher, "--ip", "192.0.2.1");
    let trapped = tokenize(&searcher, "--ip", ip);
    tokenize(&searcher, "--device-id", device);
    for out in [&ordinary, &trapped] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        for word in ["alarm", "honeytoken", "ALARM"] {
            assert!(!stderr.contains(word), "the searcher is told: {stderr}");
        }
    }
    let mut notified = Vec::new();
    for _ in 0..3 {
        let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("no NOTIFY pii_vault_alarm within 10 s")
            .unwrap();
        notified.push(note.payload().parse::<i64>().unwrap());
    }
    let alarms: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT request_id, actor, target FROM audit_alarms ORDER BY id")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(alarms.len(), 2, "{alarms:?}");
    let token = &tokens_of(&trapped)[0];
    assert_eq!(alarms[0].1, searcher_login.name);
    assert_eq!(alarms[0].2, format!("masked_ip={token}"));
    assert!(alarms[1].2.starts_with("masked_device_id=t1_"));
    assert_eq!(&notified[1..], &[alarms[0].0, alarms[1].0]);
    // `audit --alarms`, the owner's view, lists it.
    let out = app.ok_output(&["audit", "--alarms", "--format", "json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(token.as_str()));
    // The searcher cannot look.
    let refused = searcher.run(&["audit", "--alarms"]);
    assert!(!refused.status.success());
    app.finish().await;
}

/// The embedded default: tokenize on a directory without a database fails
/// like reveal, creating nothing; once a run made one, it finds the
/// address's logins and records the search; the limit holds there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_on_the_embedded_default() {
    let app = TestApp::embedded();
    let out = app.run(&["tokenize", "--ip", "198.51.100.23", "--reason", "x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no database at"), "{stderr}");
    assert!(!app.path("pii-vault.db").exists(), "a database was created");
    assert!(!app.path("keys").exists(), "a key file was created");

    let events = common::gen_events(&["-n", "60", "--seed", "5"]);
    app.write("events.jsonl", &events);
    app.ok(&["run", "--from-file", "events.jsonl", "--no-progress"]);
    let lines: Vec<String> = events.lines().map(str::to_string).collect();
    let ip = most_common(&lines, "ip", |ip| !ip.contains(':'));
    let out = app.bin().env("PII_VAULT_FORMAT", "json").ok_output(&[
        "tokenize",
        "--ip",
        &format!("::ffff:{ip}"),
        "--reason",
        "x",
    ]);
    let tokens = tokens_of(&out);
    let pool = app.sqlite().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE masked_ip = $1")
        .bind(&tokens[0])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n as usize, expected(&lines, "ip", &[ip.as_str()]).len());
    let target: String = sqlx::query_scalar("SELECT target FROM audit_log WHERE action = 'search'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(target, format!("masked_ip={}", tokens[0]));
    pool.close().await;

    app.ok(&["policy", "set", "--max-searches-per-day", "2"]);
    app.ok(&["tokenize", "--device-id", "931-83-5636", "--reason", "x"]);
    let over = app.run(&["tokenize", "--ip", &ip, "--reason", "x"]);
    assert_eq!(over.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&over.stderr).contains("daily limit of 2 searches"));
    assert!(over.stdout.is_empty());
    let raw = common::raw_pii(&events);
    assert_eq!(
        common::leaked(&common::files_bytes(app.dir(), "pii-vault.db"), &raw),
        Vec::<&str>::new()
    );
    app.finish().await;
}
