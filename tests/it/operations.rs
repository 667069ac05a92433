//! What an on-call engineer relies on, on the embedded default: metrics that
//! agree with the summary and that a Prometheus parser reads, health
//! endpoints that answer as HTTP says, a readiness probe that cannot spend
//! the KMS quota (this one with LocalStack), clean shutdown on SIGTERM, JSON
//! logs that tie each line to its batch, and no PII in any of it.

use crate::common::{self, app::TestApp, aws as aws_helpers};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Events with a fixed seed, `malformed` percent of them broken.
fn events(n: usize, malformed: u32) -> String {
    common::gen_events(&[
        "-n",
        &n.to_string(),
        "--seed",
        "11",
        "--malformed-pct",
        &malformed.to_string(),
    ])
}

use common::free_port;

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path).map(|r| (r.status, r.body))
}

struct HttpResponse {
    status: u16,
    /// Header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request, read to the end of the connection (the server
/// closes it after one response).
fn http(port: u16, method: &str, path: &str) -> Option<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `/metrics` read as a scraper would, with a parser of the Prometheus text
/// format; panics on anything a scraper would not accept.
fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    // The parser skips lines it does not understand; a scraper would fail
    // the scrape, so every line must be a comment or a sample it reads.
    for line in body.lines() {
        let info = prometheus_parse::LineInfo::parse(line);
        assert!(
            line.starts_with('#') || matches!(info, prometheus_parse::LineInfo::Sample { .. }),
            "not a sample: {line:?}"
        );
        if let prometheus_parse::LineInfo::Sample { value, .. } = info {
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "bad value in {line:?}"
            );
        }
    }
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// Every histogram's buckets: bounds increasing, counts cumulative (never
/// decreasing), ending with `+Inf`, which equals `_count`. Returns how many
/// histograms there were.
fn check_histograms(scrape: &prometheus_parse::Scrape) -> usize {
    let mut seen = 0;
    for sample in &scrape.samples {
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            continue;
        };
        seen += 1;
        let name = &sample.metric;
        assert!(!buckets.is_empty(), "{name}: no buckets");
        for pair in buckets.windows(2) {
            assert!(
                pair[0].less_than < pair[1].less_than,
                "{name}: bounds out of order: {pair:?}"
            );
            assert!(
                pair[0].count <= pair[1].count,
                "{name}: buckets not cumulative: {pair:?}"
            );
        }
        let inf = buckets.last().unwrap();
        assert!(inf.less_than.is_infinite(), "{name}: no +Inf bucket");
        let count = scrape
            .samples
            .iter()
            .find(|s| s.metric == format!("{name}_count") && s.labels == sample.labels)
            .unwrap_or_else(|| panic!("{name}: no _count"));
        let count = match count.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            ref v => panic!("{name}_count: {v:?}"),
        };
        assert_eq!(inf.count, count, "{name}: +Inf bucket is not _count");
    }
    seen
}

/// The value of the first sample called `name`.
fn sample_value(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref v => panic!("{name}: {v:?}"),
        })
        .unwrap_or_else(|| panic!("no {name}"))
}

/// The value of the sample `name` with the label `label` = `value`.
fn labeled(scrape: &prometheus_parse::Scrape, name: &str, label: &str, value: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get(label) == Some(value))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref v => panic!("{name}: {v:?}"),
        })
        .unwrap_or_else(|| panic!("no {name}{{{label}=\"{value}\"}}"))
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn spawn_stdin_worker(app: &TestApp, extra: &[&str]) -> Child {
    let args = [
        &["run", "--from-file", "-", "--source-id", "stdin-test"][..],
        extra,
    ]
    .concat();
    app.command(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn metrics_agree_with_the_summary_and_sigterm_drains_cleanly() {
    let app = TestApp::embedded();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = spawn_stdin_worker(&app, &["--metrics-addr", &addr, "--log-format", "json"]);
    let input = events(400, 5);
    let mut stdin = worker.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    stdin.flush().unwrap();

    wait_for(
        || {
            http_get(port, "/metrics")
                .is_some_and(|(_, b)| b.contains("pii_vault_messages_acked_total 400"))
        },
        "400 acked",
    );
    let (status, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let stored = metric(&body, "pii_vault_logins_stored_total");
    let rejected = metric(&body, "pii_vault_rejected_total");
    assert_eq!(stored + rejected, 400);
    assert!(rejected > 0);
    let by_reason: u64 = body
        .lines()
        .filter(|l| l.starts_with("pii_vault_rejected_by_reason_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(by_reason, rejected);
    assert_eq!(metric(&body, "pii_vault_in_flight"), 0);
    assert!(body.contains("pii_vault_batch_seconds_bucket{le=\"+Inf\"}"));
    // Ours are prefixed; the standard process metrics are not.
    let unprefixed: Vec<&str> = body
        .lines()
        .filter(|l| {
            !(l.starts_with("pii_vault_") || l.starts_with("process_") || l.starts_with("# "))
        })
        .collect();
    assert!(unprefixed.is_empty(), "unprefixed metric: {unprefixed:?}");

    // As a scraper reads it.
    let scrape = parse_metrics(&body);
    assert_eq!(check_histograms(&scrape), 2, "batch_size and batch_seconds");
    let parsed_count = |name: &str| sample_value(&scrape, name);
    assert_eq!(
        parsed_count("pii_vault_batch_size_count"),
        parsed_count("pii_vault_batch_seconds_count")
    );
    if cfg!(target_os = "linux") {
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(scrape.samples.iter().any(|s| s.metric == name), "no {name}");
        }
        assert!(parsed_count("process_resident_memory_bytes") > 1e6);
        let started = parsed_count("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= now + 1.0 && now - started < 600.0,
            "start time {started} vs now {now}"
        );
    }
    // OpenMetrics when asked for, as Prometheus does.
    let om = {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        om.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text")
            && om.ends_with("# EOF\n"),
        "{om}"
    );

    // HTTP as clients expect it: the query string is not part of the route,
    // HEAD is GET without the body, other methods are refused politely.
    let with_query = http(port, "GET", "/metrics?x=1").unwrap();
    assert_eq!(with_query.status, 200);
    assert!(with_query
        .body
        .contains("pii_vault_messages_acked_total 400"));
    let head = http(port, "HEAD", "/metrics").unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD with a body: {:?}", head.body);
    assert!(head
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    assert_eq!(http(port, "HEAD", "/healthz").unwrap().status, 200);
    let post = http(port, "POST", "/metrics").unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    assert_eq!(
        http_get(port, "/readyz?verbose").unwrap(),
        (200, "ready\n".to_string())
    );
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);
    assert_eq!(http_get(port, "/metricsx").unwrap().0, 404);

    // SIGTERM while stdin is still open: the worker stops by itself and
    // exits 0 (stdin is closed only afterwards). The bound is a guard
    // against a hang, far above any shutdown, not a timing assertion.
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(worker.wait_with_output()));
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the worker did not stop on SIGTERM while its input stayed open")
        .unwrap();
    drop(stdin);
    assert!(out.status.success(), "exit {:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        common::summary(err.as_bytes()),
        (stored, 0, rejected),
        "summary and metrics disagree"
    );

    // JSON logs: every line parses as JSON, the summary too.
    for line in err.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|_| panic!("not JSON: {line}"));
    }
    assert!(err.contains("shutting down"));
    // No PII in the logs or in the metrics.
    let raw = common::raw_pii(&input);
    assert!(common::leaked(&[err.as_bytes(), body.as_bytes()].concat(), &raw).is_empty());
}

#[test]
fn a_taken_metrics_port_and_a_bad_database_url_are_one_line_errors() {
    let app = TestApp::embedded();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = app.run(&[
        "run",
        "--from-file",
        "-",
        "--source-id",
        "stdin-test",
        "--metrics-addr",
        &addr,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on --metrics-addr"), "{err}");

    let out = app.run(&[
        "--database-url",
        "postgres://app:hunter2@127.0.0.1:1/db",
        "run",
        "--from-file",
        "-",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("pii-vault: error: cannot open the database"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "password leaked: {err}");

    let out = app.run(&["--database-url", "mysql://x", "migrate"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported database URL scheme"));
}

#[test]
fn piped_runs_show_no_progress_bar_and_help_explains() {
    let app = TestApp::embedded();
    app.write("in.jsonl", &events(50, 0));
    let out = app.run(&["run", "--from-file", "in.jsonl"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\r') && !err.contains("\u{1b}["),
        "terminal control codes in piped output"
    );

    let help = app.run(&["run", "--help"]);
    let h = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--queue-url",
        "PII_VAULT_QUEUE_URL",
        "--from-file",
        "--until-empty",
        "--concurrency",
        "--metrics-addr",
    ] {
        assert!(h.contains(needle), "run --help lacks {needle}");
    }
}

/// `/readyz` checks the key-encryption key with a KMS `DescribeKey`; probes
/// reuse a result for 5 s and share a check in progress, so a burst of 20
/// probes costs one `DescribeKey` (counted by the worker's own
/// `pii_vault_kms_requests_total`), and the next check is made only once the
/// result is 5 s old. Nothing here depends on how fast the machine is: a
/// burst that took longer than the interval may cost one check per interval
/// begun, and the expiry is found by probing until a check happens, which
/// must not be before the interval has passed.
#[test]
fn readyz_calls_kms_at_most_once_per_interval() {
    if aws_helpers::endpoint().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, key_arn) =
        rt.block_on(async { aws_helpers::create_key(&aws_helpers::kms().await).await });
    let app = TestApp::embedded();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = app
        .command(&[
            "run",
            "--from-file",
            "-",
            "--source-id",
            "stdin-test",
            "--metrics-addr",
            &addr,
            "--kms-key-id",
            &key_arn,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = worker.stdin.take().unwrap();
    wait_for(
        || http_get(port, "/metrics").is_some(),
        "the worker's /metrics",
    );
    let describe_keys = || {
        let (_, body) = http_get(port, "/metrics").unwrap();
        labeled(
            &parse_metrics(&body),
            "pii_vault_kms_requests_total",
            "operation",
            "DescribeKey",
        )
    };
    let ready = || {
        assert_eq!(
            http_get(port, "/readyz"),
            Some((200, "ready\n".to_string()))
        )
    };
    let burst = |n: usize| {
        let probes: Vec<_> = (0..n)
            .map(|_| std::thread::spawn(move || http_get(port, "/readyz")))
            .collect();
        for p in probes {
            assert_eq!(p.join().unwrap(), Some((200, "ready\n".to_string())));
        }
    };
    let interval = Duration::from_secs(5);

    // Start-up describes the key (it must exist and be enabled); nothing
    // has probed yet, so the burst's first probe makes the one check.
    let before = describe_keys();
    assert!(
        before >= 1.0,
        "start-up made no DescribeKey: the counter counts nothing"
    );
    let started = Instant::now();
    burst(20);
    // The first check started after `started`; its result is reused for
    // the interval, so the burst costs one check per interval it spans.
    let took = started.elapsed();
    let after = describe_keys();
    let allowed = 1 + (took.as_millis() / interval.as_millis()) as u64;
    assert!(
        after - before >= 1.0 && after - before <= allowed as f64,
        "20 probes over {took:?}: {} DescribeKey calls, at most {allowed} allowed",
        after - before
    );

    // Probes keep getting the cached result until it is older than the
    // interval; then one of them checks again: wait for that check.
    let mut probes = 0;
    loop {
        ready();
        probes += 1;
        let now = describe_keys();
        if now > after {
            assert_eq!(now - after, 1.0, "an expired result was checked twice");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no new check after {probes} probes over {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every result it may have replaced was made after `started`: at
    // least an interval has passed since, or the cache let a probe through
    // early.
    assert!(
        started.elapsed() >= interval,
        "a new check only {:?} after the burst began",
        started.elapsed()
    );

    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    drop(stdin);
    let out = worker.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With `--log-format json`, every line logged while a batch is protected
/// and committed carries the batch's span: its id and size, and, on the
/// line that reports it done, its outcome and counts. Lines of one batch
/// agree with each other and the batches add up to the input. No PII.
#[test]
fn json_logs_carry_the_batch_span() {
    let app = TestApp::embedded();
    let input = events(300, 10);
    app.write("in.jsonl", &input);
    let out = app.bin().env("PII_VAULT_LOG", "debug,sqlx=warn").run(&[
        "run",
        "--from-file",
        "in.jsonl",
        "--batch-size",
        "40",
        "--log-format",
        "json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let (stored, duplicates, rejected) = common::summary(err.as_bytes());
    assert_eq!((stored + rejected, duplicates), (300, 0));

    let lines: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| !l.contains(" stored, "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    // batch id -> (size, outcome fields of its "batch committed" line)
    let mut batches = std::collections::BTreeMap::new();
    let mut quarantined = 0;
    for line in &lines {
        let Some(span) = line.get("span").filter(|s| s["name"] == "batch") else {
            continue;
        };
        let id = span["batch_id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no batch_id: {line}"));
        let size = span["batch_size"]
            .as_u64()
            .unwrap_or_else(|| panic!("no batch_size: {line}"));
        let entry = batches.entry(id).or_insert((size, None));
        assert_eq!(entry.0, size, "batch {id} changed size: {line}");
        match line["message"].as_str() {
            Some("rejected message quarantined") => {
                quarantined += 1;
                assert!(line["reason"].is_string(), "{line}");
            }
            Some("batch committed") => {
                assert_eq!(span["outcome"], "committed", "{line}");
                let counts = (
                    span["stored"].as_u64().unwrap(),
                    span["duplicates"].as_u64().unwrap(),
                    span["rejected"].as_u64().unwrap(),
                );
                assert_eq!(counts.0 + counts.1 + counts.2, size, "{line}");
                entry.1 = Some(counts);
            }
            _ => {}
        }
    }
    assert_eq!(
        quarantined, rejected,
        "every quarantine line is in a batch span"
    );
    assert!(batches.len() >= 300 / 40, "{} batches", batches.len());
    let done: Vec<_> = batches.values().filter_map(|(_, c)| *c).collect();
    assert_eq!(
        done.len(),
        batches.len(),
        "a batch without its committed line: {batches:?}"
    );
    assert_eq!(
        batches.values().map(|(size, _)| size).sum::<u64>(),
        300,
        "batch sizes do not add up to the input"
    );
    assert_eq!(done.iter().map(|c| c.0).sum::<u64>(), stored);
    assert_eq!(done.iter().map(|c| c.2).sum::<u64>(), rejected);

    let raw = common::raw_pii(&input);
    assert!(
        common::leaked(err.as_bytes(), &raw).is_empty(),
        "PII in the logs"
    );
}
