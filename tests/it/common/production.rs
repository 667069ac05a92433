//! Helpers for the production scenarios of `production.rs` and
//! `roles_e2e.rs`: the real binary against Postgres and LocalStack (SQS +
//! KMS), driven the way an operator would drive it (environment variables,
//! `migrate` first, workers as separate processes, signals to stop them).
//! The commands are the fixture's ([`crate::common::app::Bin::tokio_command`]);
//! these run them within a time limit, keep a daemon's output in files,
//! feed SQS while they run, and check dumps and outputs for leaks.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client as SqsClient;
use futures::stream::{self, StreamExt};
use tokio::process::{Child, Command};

/// The services a scenario needs; a panic when they are not there, or
/// `None` (skip) under `PII_VAULT_SKIP_SERVICES=1`. Both must be on a loopback
/// address: these tests create queues and keys and must never reach real AWS
/// or a shared database.
pub fn services() -> Option<(String, String)> {
    let pg = crate::common::service_env("PII_VAULT_TEST_PG")?;
    let aws = crate::common::aws::endpoint()?;
    for url in [&pg, &aws] {
        assert!(
            ["@127.0.0.1:", "//127.0.0.1:", "@localhost:", "//localhost:", "@[::1]:", "//[::1]:"]
                .iter()
                .any(|h| url.contains(h)),
            "{url} is not a loopback address; these tests only run against throwaway local services"
        );
    }
    Some((pg, aws))
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Both streams, for leak checks.
    pub fn all_output(&self) -> Vec<u8> {
        [&self.stdout[..], &self.stderr[..]].concat()
    }

    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} exited with {}:\n{}",
            self.status,
            self.stderr_text()
        );
    }
}

/// Runs `cmd` to completion within `limit`; panics if it takes longer.
pub async fn output_within(mut cmd: Command, limit: Duration, what: &str) -> Finished {
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    Finished {
        status: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

/// Runs `cmd` within `limit` and asserts exit 0.
pub async fn run_ok(cmd: Command, limit: Duration, what: &str) -> Finished {
    let out = output_within(cmd, limit, what).await;
    out.assert_success(what);
    out
}

/// A long-running process (a worker) whose stdout and stderr go to files,
/// so that a chatty process never blocks on a full pipe.
pub struct Spawned {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Spawned {
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Spawned {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Spawned {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// What it has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// Whether it has exited already (then it is reaped).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends SIGTERM to this process (by its id, nothing else).
    pub async fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the exit within `limit`; past it, kills the process and
    /// panics with what it printed.
    pub async fn wait_within(mut self, limit: Duration) -> Finished {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.expect("wait"),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                panic!(
                    "{} did not exit within {limit:?}; its log ends:\n{}",
                    self.name,
                    tail(&self.stderr_so_far(), 40)
                );
            }
        };
        Finished {
            status,
            stdout: std::fs::read(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read(&self.stderr).unwrap_or_default(),
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends `bodies` with SendMessageBatch, 10 a call and `parallel` calls in
/// flight; fails on any failed entry.
pub async fn send_parallel(sqs: &SqsClient, queue_url: &str, bodies: &[String], parallel: usize) {
    let results: Vec<Result<(), String>> = stream::iter(bodies.chunks(10))
        .map(|chunk| send_chunk(sqs, queue_url, chunk))
        .buffer_unordered(parallel)
        .collect()
        .await;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failed.is_empty(),
        "{} SendMessageBatch calls failed, first: {}",
        failed.len(),
        failed[0]
    );
}

/// Sends `bodies` over 3 s while `cmd` (a rotation) starts 0.7 s in, so
/// that it runs with messages arriving; prints and returns its output.
pub async fn send_during(
    sqs: &SqsClient,
    queue_url: &str,
    bodies: &[String],
    cmd: Command,
    limit: Duration,
    what: &str,
) -> Finished {
    let (_, out) = tokio::join!(
        send_paced(sqs, queue_url, bodies, Duration::from_secs(3)),
        async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            run_ok(cmd, limit, what).await
        }
    );
    eprintln!("{}", out.stderr_text().trim_end());
    out
}

/// Sends `bodies` spread evenly over about `over`, 10 a call, one call at a
/// time, so that a worker consumes them while something else happens.
pub async fn send_paced(sqs: &SqsClient, queue_url: &str, bodies: &[String], over: Duration) {
    let chunks: Vec<&[String]> = bodies.chunks(10).collect();
    let gap = over / chunks.len().max(1) as u32;
    let started = tokio::time::Instant::now();
    for (i, chunk) in chunks.into_iter().enumerate() {
        tokio::time::sleep_until(started + gap * i as u32).await;
        send_chunk(sqs, queue_url, chunk)
            .await
            .unwrap_or_else(|e| panic!("SendMessageBatch: {e}"));
    }
}

async fn send_chunk(sqs: &SqsClient, queue_url: &str, chunk: &[String]) -> Result<(), String> {
    let entries = chunk
        .iter()
        .enumerate()
        .map(|(i, b)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(b)
                .build()
                .expect("id and body are set")
        })
        .collect::<Vec<_>>();
    // A few attempts: a LocalStack busy with two workers may drop a call.
    let mut last = String::new();
    for attempt in 0..3 {
        match sqs
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries.clone()))
            .send()
            .await
        {
            Ok(resp) if resp.failed.is_empty() => return Ok(()),
            // Partial failures are not retried: a retry would send the
            // successful entries twice (as new messages).
            Ok(resp) => return Err(format!("{} entries failed", resp.failed.len())),
            Err(e) => {
                last = format!("{e:?}");
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
        }
    }
    Err(last)
}

pub use crate::common::wait_until;

/// Waits until the queue holds no message, visible or in flight.
pub async fn wait_queue_empty(sqs: &SqsClient, queue_url: &str, limit: Duration) {
    wait_until(limit, "an empty queue", || async {
        match crate::common::aws::queue_counts(sqs, queue_url).await {
            (0, 0) => Ok(()),
            counts => Err(format!("{counts:?} (visible, in flight)")),
        }
    })
    .await
}

/// `pg_dump` of the database at `url` into `file` (schema and data, plain
/// SQL); returns the dump.
pub async fn pg_dump(url: &str, file: &Path) -> Vec<u8> {
    let mut cmd = Command::new(crate::common::pg_program("pg_dump"));
    cmd.args(["--no-owner", "--no-privileges", "--file"])
        .arg(file)
        .arg(url)
        .kill_on_drop(true);
    run_ok(cmd, Duration::from_secs(60), "pg_dump").await;
    std::fs::read(file).unwrap()
}

fn pii_byte(b: u8) -> bool {
    b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'-')
}

fn separator(b: u8) -> bool {
    matches!(b, b'.' | b':' | b'-')
}

/// The `raw` values that occur in `haystack`: the same answer as
/// `common::leaked`, fast enough for megabytes of dump against thousands of
/// values.
///
/// IPs and SSN-shaped device ids consist of hex digits, dots, colons and
/// dashes, with at least one of the last three. Such a value can only occur
/// inside a maximal run of those bytes that holds a separator, so only
/// those (short) runs are searched, with a hash set; long hex runs (bytea
/// in a dump) hold no separator and are skipped. Values of any other shape
/// are searched for the slow way.
pub fn leaked_fast<'a>(haystack: &[u8], raw: &'a [String]) -> Vec<&'a str> {
    let (fast, slow): (Vec<&String>, Vec<&String>) = raw.iter().partition(|r| {
        let b = r.as_bytes();
        b.iter().all(|&c| pii_byte(c)) && b.iter().any(|&c| separator(c))
    });
    let wanted: HashSet<&[u8]> = fast.iter().map(|r| r.as_bytes()).collect();
    let lengths: BTreeSet<usize> = wanted.iter().map(|r| r.len()).collect();
    let mut found: HashSet<&[u8]> = HashSet::new();
    let mut i = 0;
    while i < haystack.len() {
        if !pii_byte(haystack[i]) {
            i += 1;
            continue;
        }
        let start = i;
        let mut has_separator = false;
        while i < haystack.len() && pii_byte(haystack[i]) {
            has_separator |= separator(haystack[i]);
            i += 1;
        }
        if !has_separator {
            continue;
        }
        let run = &haystack[start..i];
        for s in 0..run.len() {
            for &len in &lengths {
                if s + len > run.len() {
                    break;
                }
                if let Some(hit) = wanted.get(&run[s..s + len]) {
                    found.insert(*hit);
                }
            }
        }
    }
    let slow: Vec<String> = slow.into_iter().cloned().collect();
    let slow_hits: HashSet<&str> = crate::common::leaked(haystack, &slow)
        .into_iter()
        .map(|s| raw.iter().find(|r| r.as_str() == s).unwrap().as_str())
        .collect();
    raw.iter()
        .map(String::as_str)
        .filter(|r| found.contains(r.as_bytes()) || slow_hits.contains(r))
        .collect()
}

/// Asserts that `haystack` holds none of `raw`, naming how many leaked (and
/// never the values themselves, which would put them in the test log).
pub fn assert_no_leak(haystack: &[u8], raw: &[String], what: &str) {
    // A dump renders `bytea` as hex (`\x3139382e…`): a raw value stored in a
    // bytea column would show only in that form, so look for it too.
    let leaks_hex = leaked_hex(haystack, raw);
    assert!(
        leaks_hex.is_empty(),
        "{what} holds {} plaintext IP(s)/device id(s) of the input, hex-encoded (in a bytea column)",
        leaks_hex.len()
    );
    let leaks = leaked_fast(haystack, raw);
    assert!(
        leaks.is_empty(),
        "{what} holds {} plaintext IP(s)/device id(s) of the input",
        leaks.len()
    );
}

/// The `raw` values whose lowercase hex encoding occurs in `haystack` at a
/// byte boundary of a run of hex digits (how `pg_dump` writes a `bytea`).
/// Runs of hex digits are scanned once, with a hash lookup per offset and
/// length, instead of one pass over the dump per value.
pub fn leaked_hex<'a>(haystack: &[u8], raw: &'a [String]) -> Vec<&'a str> {
    let wanted: std::collections::HashMap<Vec<u8>, &'a str> = raw
        .iter()
        .map(|r| (hex::encode(r).into_bytes(), r.as_str()))
        .collect();
    let lengths: BTreeSet<usize> = wanted.keys().map(Vec::len).collect();
    let hexdigit = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    let mut found = Vec::new();
    let mut i = 0;
    while i < haystack.len() {
        if !hexdigit(haystack[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < haystack.len() && hexdigit(haystack[i]) {
            i += 1;
        }
        let run = &haystack[start..i];
        for s in (0..run.len()).step_by(2) {
            for &len in &lengths {
                if s + len > run.len() {
                    break;
                }
                if let Some(hit) = wanted.get(&run[s..s + len]) {
                    found.push(*hit);
                }
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// Connection pool to a test database, for the assertions.
pub async fn pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("connect to the test database")
}

pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One line of `reveal --format json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Revealed {
    pub message_id: String,
    pub user_id: String,
    pub ip: Option<String>,
    pub device_id: Option<String>,
    pub masked_ip: String,
    pub masked_device_id: String,
}

pub fn parse_reveal(stdout: &str) -> Vec<Revealed> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("reveal printed {e}")))
        .collect()
}
