//! Helpers for the fault tests (`faults.rs`): a private PostgreSQL cluster
//! at production settings that a test may stop, crash and start without
//! disturbing the shared one, a TCP proxy that can cut the worker off from
//! LocalStack, worker processes (started from the fixture's command) whose
//! output is captured while they run, what the database says about the
//! sessions of a login, and what the checks every fault test ends with
//! read.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

// ------------------------------------------------------------------ waiting

pub use crate::common::{free_port, wait_until};

// ------------------------------------------------------------------ PostgreSQL

/// Whether this process runs as root (PostgreSQL then has to run as the
/// `postgres` user, as in `scripts/services.sh`).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL cluster of one test's own, made like the shared one in
/// `scripts/services.sh`: `initdb` in a fresh temporary directory (owned by
/// `postgres` when running as root), 127.0.0.1 only, its unix socket inside
/// that directory, trust auth, settings in its `postgresql.conf` so that it
/// comes back on the same port. Unlike the shared one it runs durable, as
/// production does (`fsync`, `synchronous_commit` and `full_page_writes`
/// on), so that a commit acknowledged before a crash is there after crash
/// recovery, and one that was not acknowledged may be or may not. Stopping
/// or crashing it breaks nobody else's test. Dropped: stopped (`-m
/// immediate`) and removed.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`, superuser.
    pub admin_url: String,
    as_root: bool,
}

impl PrivatePg {
    pub async fn start() -> PrivatePg {
        let as_root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("pii-vault-faults-pg.")
            .tempdir()
            .unwrap();
        if as_root {
            let mut chown = std::process::Command::new("chown");
            chown.arg("postgres:").arg(dir.path());
            run_ok(chown).await;
        }
        let data = dir.path().join("data");
        let mut pg = PrivatePg {
            port: 0,
            admin_url: String::new(),
            as_root,
            dir,
        };
        let initdb = crate::common::pg_program("initdb");
        let mut cmd = pg.as_pg(&initdb);
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync"]);
        run_ok(cmd).await;
        let base_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        // A port picked now may be taken before the server binds it: try a few.
        for _ in 0..3 {
            pg.port = free_port();
            let conf = format!(
                "{base_conf}\n# pii-vault fault-test cluster\n\
                 listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
                 max_connections = 100\nfsync = on\nsynchronous_commit = on\n\
                 full_page_writes = on\nlog_min_messages = warning\n",
                pg.port,
                pg.dir.path().display()
            );
            // Written by us (root or the owner); the server only reads it.
            std::fs::write(data.join("postgresql.conf"), conf).unwrap();
            if pg.ctl(&["start"]).await.success() {
                pg.admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
                pg.assert_durable().await;
                return pg;
            }
        }
        panic!(
            "the private PostgreSQL cluster did not start; its log:\n{}",
            std::fs::read_to_string(pg.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// `program` as the postgres user when we are root.
    fn as_pg(&self, program: &Path) -> std::process::Command {
        if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }

    /// Runs `pg_ctl -D DATA -l LOG -w -t 60 ARGS…` (as postgres).
    pub async fn ctl(&self, args: &[&str]) -> ExitStatus {
        let mut cmd = self.as_pg(&crate::common::pg_program("pg_ctl"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Command::from(cmd).status().await.unwrap()
    }

    /// Stops the server the way an operator's restart does (`-m fast`:
    /// open transactions are rolled back, connections cut).
    pub async fn stop_fast(&self) {
        assert!(
            self.ctl(&["stop", "-m", "fast"]).await.success(),
            "pg_ctl stop"
        );
    }

    /// Starts it again on the same port and waits until it accepts connections
    /// (after a crash: once crash recovery has replayed the WAL).
    pub async fn start_again(&self) {
        assert!(
            self.ctl(&["start"]).await.success(),
            "pg_ctl start; the server's log:\n{}",
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Asserts that the server runs with the durability settings of
    /// production, as `SHOW` reports them (a later `postgresql.conf` line
    /// or an override elsewhere would win over ours).
    async fn assert_durable(&self) {
        let mut c = PgConnection::connect(&self.admin_url).await.unwrap();
        let settings: (String, String, String) = sqlx::query_as(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
                    current_setting('full_page_writes')",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        c.close().await.ok();
        assert_eq!(
            settings,
            ("on".into(), "on".into(), "on".into()),
            "fsync, synchronous_commit, full_page_writes"
        );
    }

    /// Crashes the server: SIGKILL to the postmaster and every process it
    /// started (backends, checkpointer, WAL writer, …) at once, as when the
    /// machine or the container dies: nothing is flushed, no backend says
    /// goodbye to its client, and the next start runs crash recovery.
    /// Returns once none of those processes is left.
    pub async fn crash(&self) {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let postmaster: u32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("the postmaster's pid on the first line of postmaster.pid");
        let mut doomed = vec![postmaster];
        doomed.extend(children_of(postmaster));
        assert!(
            doomed.len() > 2,
            "the postmaster {postmaster} has no children: is the server running?"
        );
        // `pg_ctl start` makes the postmaster a session (and group) leader;
        // its children stay in its group. One kill(2) to the group reaches
        // them all at once; the list covers any that left it.
        let group = process_group(postmaster);
        let mut kill = std::process::Command::new("kill");
        kill.arg("-KILL").arg("--");
        if group == Some(postmaster) {
            kill.arg(format!("-{postmaster}"));
        }
        kill.args(doomed.iter().map(u32::to_string));
        // Some may be gone already (a backend whose client left): its
        // failure is no failure; that all are gone is checked below.
        let _ = kill.stderr(Stdio::null()).status().unwrap();
        wait_until(
            Duration::from_secs(30),
            "every process of the cluster gone",
            || async {
                let left: Vec<u32> = doomed.iter().copied().filter(|p| alive(*p)).collect();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still alive: {left:?}"))
                }
            },
        )
        .await;
    }
}

/// The pids of the processes whose parent is `parent` (from `/proc`).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if proc_stat(pid).is_some_and(|s| s.ppid == parent) {
            out.push(pid);
        }
    }
    out
}

/// What `/proc/PID/stat` says of a process: its state, parent and group.
struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID PGRP …": COMM may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    Some(ProcStat {
        state: f.next()?.chars().next()?,
        ppid: f.next()?.parse().ok()?,
        pgrp: f.next()?.parse().ok()?,
    })
}

fn process_group(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|s| s.pgrp)
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let mut cmd = self.as_pg(&crate::common::pg_program("pg_ctl"));
        let _ = cmd
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn run_ok(cmd: std::process::Command) {
    let out = Command::from(cmd).output().await.unwrap();
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a database holds after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DbCounts {
    pub logins: i64,
    pub distinct_logins: i64,
    pub vault: i64,
    pub quarantined: i64,
    pub distinct_quarantined: i64,
}

/// Counts of `user_logins`, `vault` and `quarantine`; `None` while the
/// database cannot be reached.
pub async fn db_counts(url: &str) -> Option<DbCounts> {
    let mut c = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(url))
        .await
        .ok()?
        .ok()?;
    let (logins, distinct_logins): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM user_logins")
            .fetch_one(&mut c)
            .await
            .ok()?;
    let vault: i64 = sqlx::query_scalar("SELECT count(*) FROM vault")
        .fetch_one(&mut c)
        .await
        .ok()?;
    let (quarantined, distinct_quarantined): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM quarantine")
            .fetch_one(&mut c)
            .await
            .ok()?;
    c.close().await.ok();
    Some(DbCounts {
        logins,
        distinct_logins,
        vault,
        quarantined,
        distinct_quarantined,
    })
}

/// `(user_id, device_type, app_version, locale)` of every `user_logins` row, sorted.
pub async fn stored_logins(url: &str) -> Vec<(String, String, String, Option<String>)> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT user_id, device_type, app_version, locale FROM user_logins")
            .fetch_all(&mut c)
            .await
            .unwrap();
    c.close().await.ok();
    rows.sort();
    rows
}

/// What every table of the database holds, for the plaintext-PII check:
/// every column of every base table in the schema (found in the catalog, so
/// a table added later is scanned too; the audit trail, the allow-list and
/// the alarm tables included), text columns as text and `bytea` columns as
/// their raw bytes (as they are stored, not hex-encoded, which could never
/// match a value).
pub async fn database_bytes(url: &str) -> Vec<u8> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = Vec::new();
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.table_name::text, c.column_name::text, c.data_type::text \
         FROM information_schema.columns c JOIN information_schema.tables t \
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
         WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
         ORDER BY c.table_name, c.ordinal_position",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let tables: std::collections::BTreeSet<&str> = columns.iter().map(|c| c.0.as_str()).collect();
    for must in [
        "user_logins",
        "vault",
        "quarantine",
        "vault_keys",
        "audit_log",
    ] {
        assert!(tables.contains(must), "{must} is not scanned: {tables:?}");
    }
    for (table, column, data_type) in columns {
        let values: Vec<Option<Vec<u8>>> = if data_type == "bytea" {
            sqlx::query_scalar(&format!("SELECT \"{column}\" FROM \"{table}\""))
                .fetch_all(&mut c)
                .await
                .unwrap()
        } else {
            sqlx::query_scalar::<_, Option<String>>(&format!(
                "SELECT \"{column}\"::text FROM \"{table}\""
            ))
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.map(String::into_bytes))
            .collect()
        };
        for v in values.into_iter().flatten() {
            out.extend_from_slice(&v);
            out.push(b'\n');
        }
    }
    c.close().await.ok();
    out
}

/// One session of a login, as `pg_stat_activity` shows it.
#[derive(Debug, Clone)]
pub struct Session {
    pub pid: i32,
    pub state: Option<String>,
    /// `Lock` while it waits for a lock another session holds.
    pub wait_event_type: Option<String>,
    pub query: Option<String>,
}

impl Session {
    /// Whether it is waiting for a lock (a heavyweight lock: a table, a
    /// row's transaction, …).
    pub fn waits_for_a_lock(&self) -> bool {
        self.wait_event_type.as_deref() == Some("Lock")
    }
}

/// `pid, state, wait_event_type, query` of `pg_stat_activity`.
type SessionRow = (i32, Option<String>, Option<String>, Option<String>);

/// The sessions of the login user `login` in the database of `url` (a
/// superuser's or the owner's URL, who see every session's state); `None`
/// while the database cannot be reached.
pub async fn sessions_of(url: &str, login: &str) -> Option<Vec<Session>> {
    let mut c = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(url))
        .await
        .ok()?
        .ok()?;
    let rows: Vec<SessionRow> = sqlx::query_as(
        "SELECT pid, state, wait_event_type, query FROM pg_stat_activity \
         WHERE datname = current_database() AND usename = $1",
    )
    .bind(login)
    .fetch_all(&mut c)
    .await
    .ok()?;
    c.close().await.ok();
    Some(
        rows.into_iter()
            .map(|(pid, state, wait_event_type, query)| Session {
                pid,
                state,
                wait_event_type,
                query,
            })
            .collect(),
    )
}

/// Waits until the login user `login` has no session left in the database
/// of `url`: after its process was killed, the server ends each of its
/// backends only when it next reads from the dead connection, so a
/// statement the process had sent may still commit until then.
pub async fn wait_sessions_gone(url: &str, login: &str, limit: Duration) {
    wait_until(
        limit,
        &format!("the sessions of {login} to end"),
        || async {
            match sessions_of(url, login).await {
                Some(s) if s.is_empty() => Ok(()),
                Some(s) => Err(format!("{s:?}")),
                None => Err("the database does not answer".into()),
            }
        },
    )
    .await
}

// ------------------------------------------------------------------ events

/// A generated input: the message bodies and what a run must make of them.
pub struct Events {
    pub bodies: Vec<String>,
    /// `(user_id, device_type, app_version, locale)` of each valid event, sorted.
    pub valid: Vec<(String, String, String, Option<String>)>,
    pub malformed: usize,
    /// Every raw IP and device id of the input (`common::raw_pii`).
    pub raw: Vec<String>,
}

/// `python3 scripts/gen-events.py -n N --malformed-pct 2 --seed SEED`.
pub fn gen_events(n: usize, seed: u64) -> Events {
    let gen = crate::common::gen_events_recorded(&[
        "-n",
        &n.to_string(),
        "--malformed-pct",
        "2",
        "--seed",
        &seed.to_string(),
    ]);
    let text = gen.text.clone();
    let bodies: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(bodies.len(), n);
    // What a stored login must hold, read from the lines the generator left
    // valid (its own record), not from the parser under test.
    let mut valid: Vec<_> = gen
        .valid()
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = |k: &str| match &v[k] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (
                text("user_id"),
                text("device_type"),
                text("app_version"),
                v["locale"].as_str().map(str::to_string),
            )
        })
        .collect();
    valid.sort();
    let malformed = gen.malformed.len();
    assert!(malformed > 0, "the input should carry malformed events");
    let raw = crate::common::raw_pii(&text);
    assert!(raw.len() > 20, "too few raw values to check for leaks");
    Events {
        bodies,
        valid,
        malformed,
        raw,
    }
}

impl Events {
    pub fn valid_count(&self) -> i64 {
        self.valid.len() as i64
    }

    pub fn malformed_count(&self) -> i64 {
        self.malformed as i64
    }
}

// ------------------------------------------------------------------ workers

/// A `pii-vault` process whose stdout and stderr are collected while it runs.
/// Dropped while still running: killed.
pub struct Worker {
    pub name: String,
    /// The database login it runs as, when it has one of its own
    /// ([`Worker::spawn_as`]): whose sessions `pg_stat_activity` shows.
    pub login: Option<String>,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Worker {
    /// Starts `cmd` (the fixture's `Bin::tokio_command`, killed on drop)
    /// with its stdout and stderr piped into the collected output.
    pub fn spawn(name: &str, mut cmd: Command) -> Worker {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pii-vault");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for mut r in [
            Box::new(out) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(err),
        ] {
            let sink = output.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        Worker {
            name: name.to_string(),
            login: None,
            child,
            output,
            readers,
        }
    }

    /// [`Worker::spawn`] of a command that runs as the database login
    /// `login` (the fixture's `as_login`), which no other process uses.
    pub fn spawn_as(name: &str, login: &str, cmd: Command) -> Worker {
        let mut w = Worker::spawn(name, cmd);
        w.login = Some(login.to_string());
        w
    }

    /// Its login ([`Worker::spawn_as`]).
    pub fn login(&self) -> &str {
        self.login
            .as_deref()
            .unwrap_or_else(|| panic!("{} runs as no login of its own", self.name))
    }

    /// Its stdin, when the command was given a piped one
    /// (`run --from-file -`); dropping it is the end of the input.
    pub fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker still running")
    }

    /// Everything it printed so far (stdout and stderr, interleaved).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    pub fn output_bytes(&self) -> Vec<u8> {
        self.output.lock().unwrap().clone()
    }

    /// Whether it is still running (it has not exited).
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Panics, showing its output, if it has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "worker {} exited ({status}) {when}; its output:\n{}",
                self.name,
                self.output()
            );
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Waits for it to exit (panics after `limit`), then for its output.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!(
                "worker {} still running after {limit:?}; its output:\n{}",
                self.name,
                self.output()
            ),
        };
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        status
    }

    /// Waits for a clean exit (status 0) and returns the summary numbers.
    pub async fn wait_success(&mut self, limit: Duration) -> (u64, u64, u64) {
        let status = self.wait(limit).await;
        assert!(
            status.success(),
            "worker {} exited with {status}; its output:\n{}",
            self.name,
            self.output()
        );
        crate::common::try_summary(&self.output()).unwrap_or_else(|| {
            panic!(
                "worker {}: no summary line in:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Kills it with SIGKILL and reaps it.
    pub async fn kill9(&mut self) {
        self.signal("KILL");
        let status = self.wait(Duration::from_secs(10)).await;
        assert!(!status.success(), "a SIGKILLed worker cannot exit 0");
    }
}

impl Drop for Worker {
    /// When the test fails, shows what the worker logged (its debug lines
    /// left out), since nothing else will.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PII_VAULT_FAULTS_SHOW_LOGS").is_some() {
            eprintln!("---- worker {} logged (debug lines left out):", self.name);
            for l in self.output().lines().filter(|l| !l.contains(" DEBUG ")) {
                eprintln!("{l}");
            }
        }
    }
}

// ------------------------------------------------------------------ metrics

/// The body of `GET /metrics` on 127.0.0.1:`port`, if it answers 200.
pub async fn scrape(port: u16) -> Option<String> {
    match http_get(port, "/metrics").await {
        Some((200, body)) => Some(body),
        _ => None,
    }
}

/// The status of `GET /readyz` on 127.0.0.1:`port` (200 ready, 503 not),
/// if it answers at all.
pub async fn readyz(port: u16) -> Option<u16> {
    http_get(port, "/readyz").await.map(|(status, _)| status)
}

/// `GET path` on 127.0.0.1:`port`: the status and the body, if it answers
/// within 10 s (a `/readyz` check takes up to 3 s).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let fetch = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ok()
        .flatten()
}

/// The value of an unlabelled counter or gauge in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

// ------------------------------------------------------------------ proxy

/// What a [`Proxy`] does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Pass bytes both ways.
    Forward,
    /// Cut every open connection and close each new one as soon as it is
    /// accepted, before a byte is read: to the client the service is gone.
    Refuse,
    /// Swallow: open connections stop passing anything, and new ones are
    /// accepted and then never answered. Those connections stay dead even
    /// after the mode goes back to `Forward` (as when a NAT or a load
    /// balancer forgets them): only a client-side timeout gets out.
    Blackhole,
}

/// A TCP forwarder on 127.0.0.1 in front of one upstream address, whose
/// [`ProxyMode`] a test switches to take the upstream away and bring it back.
/// Runs on the test's tokio runtime; stops (resetting every connection)
/// when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    task: tokio::task::JoinHandle<()>,
    swallowed: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watcher) = watch::channel(ProxyMode::Forward);
        let swallowed = Arc::new(AtomicUsize::new(0));
        let count = swallowed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let now = *watcher.borrow();
                match now {
                    ProxyMode::Forward => {
                        tokio::spawn(forward(client, upstream, watcher.clone(), count.clone()));
                    }
                    // Reset rather than a polite FIN.
                    ProxyMode::Refuse => drop(reset(client)),
                    ProxyMode::Blackhole => {
                        count.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(hold(vec![client], watcher.clone()));
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            task,
            swallowed,
        }
    }

    /// Connections that went silent in `Blackhole` mode so far.
    pub fn swallowed(&self) -> usize {
        self.swallowed.load(Ordering::Relaxed)
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL*`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(ProxyMode::Refuse);
    }
}

/// Sets SO_LINGER to 0, so that dropping the socket sends a reset.
fn reset(s: TcpStream) -> TcpStream {
    let _ = s.set_zero_linger();
    s
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
    swallowed: Arc<AtomicUsize>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        drop(reset(client));
        return;
    };
    let changed = async {
        match mode.wait_for(|m| *m != ProxyMode::Forward).await {
            Ok(m) => *m,
            Err(_) => ProxyMode::Refuse,
        }
    };
    let now = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        m = changed => m,
    };
    match now {
        ProxyMode::Blackhole => {
            swallowed.fetch_add(1, Ordering::Relaxed);
            hold(vec![client, server], mode).await
        }
        _ => drop(reset(client)),
    }
}

/// Keeps `sockets` open and silent until the proxy refuses or stops.
async fn hold(sockets: Vec<TcpStream>, mut mode: watch::Receiver<ProxyMode>) {
    let _ = mode.wait_for(|m| *m == ProxyMode::Refuse).await;
    for s in sockets {
        drop(reset(s));
    }
}

/// The `host:port` of an `http://HOST:PORT` endpoint (loopback only).
pub fn endpoint_addr(endpoint: &str) -> SocketAddr {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http:// endpoint: {endpoint}"));
    let hostport = rest.trim_end_matches('/');
    let addr: SocketAddr = hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .unwrap_or_else(|_| panic!("not HOST:PORT: {hostport}"));
    assert!(
        addr.ip().is_loopback(),
        "the proxy only fronts loopback services"
    );
    addr
}
