//! Shared helpers for integration tests. The fixture every test starts
//! from (a database with role logins, the binary's runner) is
//! [`app::TestApp`].
//!
//! Services come from the environment that `scripts/test.sh` sets up:
//! - `PII_VAULT_TEST_PG`: admin URL of a throwaway Postgres cluster
//!   (`postgres://postgres@127.0.0.1:PORT/postgres`); tests create their own
//!   databases in it.
//! - `AWS_ENDPOINT_URL` (+ `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
//!   `AWS_REGION`): LocalStack with SQS and KMS.
//! - `PII_VAULT_SKIP_SERVICES=1`: tests that need a missing service skip
//!   (by default they fail, so a run without services cannot pass quietly).
#![allow(dead_code)]

pub mod app;
pub mod aws;
pub mod aws_proxy;
pub mod faults;
pub mod kms_policy;
pub mod pg;
pub mod production;
pub mod seed;

use std::path::PathBuf;

/// The built binary under test. Tests run it through
/// [`app::TestApp`] / [`app::Bin`], which set its environment.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pii-vault"))
}

/// A PostgreSQL program (`pg_dump`, `initdb`, `pg_ctl`): the one in
/// `PII_VAULT_PG_BIN_DIR` (the binaries `scripts/services.sh` found and ran
/// the shared cluster with, so that versions match), else in
/// `PII_VAULT_PG_BIN`, else `name` itself, looked up on PATH.
pub fn pg_program(name: &str) -> PathBuf {
    ["PII_VAULT_PG_BIN_DIR", "PII_VAULT_PG_BIN"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Whether a missing service may be skipped: only when asked for
/// explicitly (`PII_VAULT_SKIP_SERVICES=1`, for a quick edit-compile loop).
/// Otherwise a test that needs PostgreSQL or LocalStack fails without it,
/// so that a run without the services can never pass by testing nothing.
pub fn services_optional() -> bool {
    std::env::var("PII_VAULT_SKIP_SERVICES").is_ok_and(|v| v == "1")
}

/// The value of `var`, or `None` (the test then skips) when services were
/// explicitly made optional; otherwise a missing variable fails the test.
pub fn service_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if services_optional() => {
            eprintln!("skipping: {var} not set and PII_VAULT_SKIP_SERVICES=1");
            None
        }
        _ => panic!(
            "{var} is not set: run the tests with scripts/test.sh (which starts PostgreSQL and LocalStack), \
             or set PII_VAULT_SKIP_SERVICES=1 to skip the tests that need them"
        ),
    }
}

/// Raw PII values of `samples/logins.jsonl`-style input: every `ip` and
/// `device_id` string found in the JSON lines of `input`.
pub fn raw_pii(input: &str) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in input.lines() {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(line) {
            for k in ["ip", "device_id"] {
                if let Some(serde_json::Value::String(s)) = m.get(k) {
                    let s = s.trim_end_matches('\0').to_string();
                    if s.len() >= 5 {
                        out.insert(s);
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The `raw` values that occur in `haystack` (as text).
pub fn leaked<'a>(haystack: &[u8], raw: &'a [String]) -> Vec<&'a str> {
    raw.iter()
        .filter(|r| haystack.windows(r.len()).any(|w| w == r.as_bytes()))
        .map(String::as_str)
        .collect()
}

/// `(stored, duplicates, rejected)` from the summary line `run` ends with
/// ("pii-vault: N stored, N duplicates, N rejected …").
pub fn summary(stderr: &[u8]) -> (u64, u64, u64) {
    let err = String::from_utf8_lossy(stderr);
    try_summary(&err).unwrap_or_else(|| panic!("no summary in:\n{err}"))
}

/// [`summary`] of text that may not hold one yet (a worker still running).
pub fn try_summary(output: &str) -> Option<(u64, u64, u64)> {
    // Under `--log-format json`, the summary's counts are fields.
    let json = output.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let n = |k: &str| v.get(k)?.as_u64();
        Some((n("stored")?, n("duplicates")?, n("rejected")?))
    });
    if json.is_some() {
        return json;
    }
    let line = output
        .lines()
        .find(|l| l.starts_with("pii-vault: ") && l.contains(" stored, "))?;
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap())
        .collect();
    Some((n[0], n[1], n[2]))
}

/// A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race, fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a polled check returns: done (`Some` / `Ok`), or not yet, with
/// what it saw (`Err`) for the message if it never is.
pub trait Poll {
    type Out;
    fn ready(self) -> Result<Self::Out, String>;
}

impl<T> Poll for Option<T> {
    type Out = T;
    fn ready(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet".into())
    }
}

impl<T> Poll for Result<T, String> {
    type Out = T;
    fn ready(self) -> Result<T, String> {
        self
    }
}

/// Polls `check` every 100 ms until it is ready, or panics after `limit`
/// naming `what` and the last thing it saw.
pub async fn wait_until<P, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> P::Out
where
    P: Poll,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        let last = match check().await.ready() {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `python3 scripts/gen-events.py ARGS…`: generated events as JSON Lines.
pub fn gen_events(args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gen-events.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 scripts/gen-events.py");
    assert!(
        out.status.success(),
        "gen-events.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Generated events with the generator's own record of which lines it broke.
pub struct Generated {
    pub text: String,
    /// 0-based indexes of the lines the generator made malformed, in order.
    pub malformed: Vec<usize>,
}

impl Generated {
    pub fn lines(&self) -> Vec<&str> {
        self.text.lines().collect()
    }

    /// The lines the generator left valid.
    pub fn valid(&self) -> Vec<&str> {
        let broken: std::collections::HashSet<usize> = self.malformed.iter().copied().collect();
        self.text
            .lines()
            .enumerate()
            .filter(|(i, _)| !broken.contains(i))
            .map(|(_, l)| l)
            .collect()
    }
}

/// Like [`gen_events`], with `--manifest`: the expected split of valid and
/// malformed lines comes from the generator, never from the parser under test.
pub fn gen_events_recorded(args: &[&str]) -> Generated {
    let manifest = tempfile::NamedTempFile::new().unwrap();
    let path = manifest.path().to_str().unwrap().to_string();
    let mut all = args.to_vec();
    all.extend(["--manifest", &path]);
    let text = gen_events(&all);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest.path()).unwrap()).unwrap();
    let malformed = m["malformed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap() as usize)
        .collect();
    Generated { text, malformed }
}

/// Every byte of every file in `dir` whose name starts with `prefix` (an
/// SQLite file with its WAL and shared memory), so a row of any table, in
/// any state of checkpointing, is covered.
pub fn files_bytes(dir: &std::path::Path, prefix: &str) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with(prefix) {
            all.extend(std::fs::read(p).unwrap());
        }
    }
    all
}
