//! Helpers for the fault tests (`faults.rs`): a private PostgreSQL cluster
//! that a test may stop and start without disturbing the shared one, a TCP
//! proxy that can cut the worker off from LocalStack, worker processes
//! (started from the fixture's command) whose output is captured while they
//! run, and what the checks every fault test ends with read.
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
/// comes back on the same port. Stopping it breaks nobody else's test.
/// Dropped: stopped (`-m immediate`) and removed.
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
                 max_connections = 100\nfsync = off\nsynchronous_commit = off\n\
                 full_page_writes = off\nlog_min_messages = warning\n",
                pg.port,
                pg.dir.path().display()
            );
            // Written by us (root or the owner); the server only reads it.
            std::fs::write(data.join("postgresql.conf"), conf).unwrap();
            if pg.ctl(&["start"]).await.success() {
                pg.admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
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

    /// Starts it again on the same port and waits until it accepts connections.
    pub async fn start_again(&self) {
        assert!(self.ctl(&["start"]).await.success(), "pg_ctl start");
    }
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
            child,
            output,
            readers,
        }
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

/// The body of `GET /metrics` on 127.0.0.1:`port`, if it answers.
pub async fn scrape(port: u16) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let fetch = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
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
