//! The first hour with the CLI, as a user and as an operator runs it: each
//! way a connection can fail is one sentence that says what is wrong and
//! what to do (never a password), and the binary behaves in scripts:
//! signals, pipes, JSON on stdout and stderr, flags over the environment.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::common::{self, app::with_user, app::TestApp};

/// The last line of stderr: the error `main` prints.
fn last_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn events(n: usize) -> String {
    common::gen_events(&["-n", &n.to_string(), "--seed", "23"])
}

/// A server on a loopback port that answers every connection the way
/// Postgres refuses one: an `ErrorResponse` with SQLSTATE `code` after
/// the start-up packet (declining TLS first, if asked).
async fn refusing_server(code: &'static str, message: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if sock.read_exact(&mut head).await.is_err() {
                    return;
                }
                let mut len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
                if u32::from_be_bytes(head[4..].try_into().unwrap()) == 80877103 {
                    // SSLRequest: no TLS here; the start-up packet follows.
                    let _ = sock.write_all(b"N").await;
                    if sock.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
                }
                let mut rest = vec![0u8; len.saturating_sub(8)];
                if sock.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let mut fields = Vec::new();
                for (tag, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', code),
                    (b'M', message),
                ] {
                    fields.push(tag);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut msg = vec![b'E'];
                msg.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
                msg.extend_from_slice(&fields);
                let _ = sock.write_all(&msg).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    port
}

/// Every way of failing to reach Postgres is said as what it is, and what
/// to do; the password in the URL is never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_say_what_is_wrong_and_what_to_do() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let secret = "hunter2-not-shown";
    let with = |url: &str| {
        let out = app.bin().env("DATABASE_URL", url).run(&["keys", "list"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let line = last_line(&out);
        assert!(
            line.starts_with("pii-vault: error: cannot open the database"),
            "{line}"
        );
        assert!(!line.contains(secret), "password shown: {line}");
        assert!(!line.contains("(Other)"), "a bare code: {line}");
        line
    };

    let missing = with(&with_user(app.url(), "no_such_login_fh", secret));
    assert!(
        missing.contains("does not exist") && missing.contains("SQLSTATE 28000"),
        "{missing}"
    );

    let nologin = format!("fh_nologin_{}", std::process::id());
    app.exec(&format!("CREATE ROLE {nologin} NOLOGIN")).await;
    let line = with(&with_user(app.url(), &nologin, secret));
    app.exec(&format!("DROP ROLE {nologin}")).await;
    assert!(
        line.contains("may not log in (NOLOGIN") && line.contains("LOGIN IN ROLE"),
        "{line}"
    );

    let no_db = app.url().replace(app.db_name(), "no_such_database_fh");
    let line = with(&no_db);
    assert!(
        line.contains("database named in the URL does not exist")
            && line.contains("3D000")
            && line.contains("createdb"),
        "{line}"
    );

    // The test cluster trusts every local login: a server of our own
    // refuses the password, and then has no connection slot left.
    let port = refusing_server("28P01", "password authentication failed for user \"app\"").await;
    let line = with(&format!("postgres://app:{secret}@127.0.0.1:{port}/db"));
    assert!(
        line.contains("password authentication failed") && line.contains("check the password"),
        "{line}"
    );
    let port = refusing_server("53300", "sorry, too many clients already").await;
    let line = with(&format!("postgres://app:{secret}@127.0.0.1:{port}/db"));
    assert!(
        line.contains("no free connection slots") && line.contains("max_connections"),
        "{line}"
    );

    // Nothing listens: refused at once, not "timed out" after a wait.
    let port = common::free_port();
    let line = with(&format!("postgres://app:{secret}@127.0.0.1:{port}/db"));
    assert!(
        line.contains(&format!("connection refused at 127.0.0.1:{port}"))
            && line.contains("is Postgres running there"),
        "{line}"
    );
    assert!(!line.contains("timed out"), "{line}");

    // A host that does not resolve (.invalid never does).
    let line = with(&format!(
        "postgres://app:{secret}@no-such-host.invalid:5432/db"
    ));
    assert!(
        line.contains("no-such-host.invalid:5432")
            && (line.contains("not known") || line.contains("no answer")),
        "{line}"
    );
    assert!(!line.contains("uncategorized"), "{line}");
    app.finish().await;
}

/// An SQLite file that cannot be created: its directory is missing, or not
/// writable (for a user who is not root, who may write anywhere).
#[test]
fn an_sqlite_file_that_cannot_be_created_says_where_and_why() {
    let app = TestApp::embedded();
    let missing = app.path("no/such/dir/pii-vault.db");
    let out = app.run(&[
        "--database-url",
        &format!("sqlite:{}", missing.display()),
        "migrate",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let line = last_line(&out);
    assert!(
        line.contains("cannot create or open the SQLite file")
            && line.contains("writable")
            && line.contains("--database-url"),
        "{line}"
    );
    assert!(!line.contains("(Other)"), "{line}");

    let dir = app.path("read-only");
    std::fs::create_dir(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(dir.join("probe"), b"").is_ok() {
        // Root writes anyway: nothing to show here.
        return;
    }
    let out = app.run(&[
        "--database-url",
        &format!("sqlite:{}/pii-vault.db", dir.display()),
        "keys",
        "list",
    ]);
    let line = last_line(&out);
    assert!(
        line.contains("cannot create or open the SQLite file") && line.contains("writable"),
        "{line}"
    );
}

/// Reads `child`'s stderr until a line contains `what`; returns what it read.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    what: &str,
) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(what) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "never saw {what:?}; stderr:\n{seen}"
    );
    seen
}

fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGINT (or SIGTERM) stops a file run short of its end: status 130
/// (143), and the file is said to be unfinished; running the same command
/// again finishes it, storing each line once.
#[tokio::test]
async fn a_signal_during_a_file_run_exits_130_or_143_and_the_rerun_finishes() {
    let app = TestApp::embedded();
    let one = events(10_000);
    // Lines are told apart by their number too: ten copies are 100 000 logins.
    let input = app.write("big.jsonl", &one.repeat(10));
    let total = 100_000u64;
    let mut stored = 0;
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let mut child = app.spawn(&["run", "--from-file", &input]);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        read_until(&mut lines, "reading the file").await;
        kill(child.id().unwrap(), signal);
        let mut rest = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(code), "SIG{signal}: {rest}");
        assert!(
            rest.contains(&format!("stopped by SIG{signal}"))
                && rest.contains("the file is unfinished: run the same command again"),
            "{rest}"
        );
        let (s, _, _) = common::summary(rest.as_bytes());
        stored += s;
    }
    assert!(stored < total, "the runs were not stopped short: {stored}");
    let out = app.ok_output(&["run", "--from-file", &input]);
    let (s, dups, rejected) = common::summary(&out.stderr);
    assert_eq!((stored + s, rejected), (total, 0), "dups {dups}");
    let db = app.sqlite().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows as u64, total);
}

/// Under `--log-format json` every line on stderr is one JSON object: the
/// logs, the run's summary (with its counts as fields), a command's error,
/// and a command line that does not parse.
#[test]
fn with_json_logs_every_stderr_line_is_a_json_object() {
    let app = TestApp::embedded();
    let mut input = events(300);
    input.push_str("{not json\n");
    let input = app.write("in.jsonl", &input);
    let parse_all = |stderr: &[u8]| -> Vec<serde_json::Value> {
        let text = String::from_utf8_lossy(stderr);
        assert!(!text.trim().is_empty());
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l}\nall of stderr:\n{text}"))
            })
            .collect()
    };
    let out = app.ok_output(&["--log-format", "json", "run", "--from-file", &input]);
    let lines = parse_all(&out.stderr);
    let summary = lines.last().unwrap();
    assert_eq!(summary["level"], "INFO");
    assert_eq!(
        (
            summary["stored"].as_u64(),
            summary["rejected"].as_u64(),
            summary["duplicates"].as_u64()
        ),
        (Some(300), Some(1), Some(0)),
        "{summary}"
    );
    assert!(summary["message"].as_str().unwrap().contains("300 stored"));

    let out = app.bin().env("PII_VAULT_LOG_FORMAT", "json").run(&[
        "--database-url",
        "sqlite:/no/such/dir/x.db",
        "migrate",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines = parse_all(&out.stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(last["message"]
        .as_str()
        .unwrap()
        .starts_with("cannot open the database"));

    let out = app.run(&["--log-format", "json", "keys", "lisst"]);
    assert_eq!(out.status.code(), Some(2));
    let lines = parse_all(&out.stderr);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["level"], "ERROR");

    // The reveal's notes and its over-the-policy message too.
    let out = app.run(&[
        "--log-format",
        "json",
        "reveal",
        "--user-id",
        "nobody",
        "--reason",
        "t",
    ]);
    parse_all(&out.stderr);
}

/// `pii-vault … | head -1`: the reader goes away, and pii-vault ends
/// quietly with status 0 (no panic, no status 101).
#[tokio::test]
async fn a_closed_stdout_ends_the_command_quietly_with_status_0() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &events(200));
    app.ok(&["run", "--from-file", &input]);
    for args in [
        &["keys", "list", "--format", "json"][..],
        &["keys", "list"],
        &["audit", "--format", "json"],
        &["audit"],
        &["keys", "allowed"],
    ] {
        let mut child = app
            .bin()
            .tokio_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before pii-vault has written anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A reveal over the policy with `--format json` says so on stdout: one
/// JSON object with the request id and its status (exit status 3).
#[test]
fn a_reveal_over_the_policy_prints_its_request_as_json() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &events(200));
    app.ok(&["run", "--from-file", &input]);
    app.ok(&["policy", "set", "--max-users-per-reveal", "1"]);
    let user = events(200)
        .lines()
        .next()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["user_id"].clone())
        .unwrap();
    let user = user.as_str().unwrap();
    // One user is within the policy; every login of an IP shared by
    // several users is not: find such a token through the reveal.
    let out = app.ok_output(&[
        "reveal",
        "--user-id",
        user,
        "--reason",
        "t",
        "--format",
        "json",
    ]);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    let mut over = None;
    for field in ["--masked-ip", "--masked-device-id"] {
        let token = first[&field[2..].replace('-', "_")].as_str().unwrap();
        let out = app.run(&[
            "reveal", field, token, "--reason", "bulk", "--format", "json",
        ]);
        if out.status.code() == Some(3) {
            over = Some(out);
            break;
        }
    }
    let out = over.expect("a token shared by several users (the generator pools IPs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "pending_approval", "{v}");
    let id = v["request_id"].as_i64().expect("a request id");
    assert_eq!(v["revealed"], 0);
    assert_eq!(v["fetch"], format!("pii-vault reveal --request {id}"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Nothing was revealed"));
}

/// `keys allowed` and `honeytoken plant` have `--format json`, and
/// `PII_VAULT_FORMAT` sets the default of every command that prints results.
#[test]
fn json_output_everywhere_and_its_default_from_the_environment() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &events(50));
    app.ok(&["run", "--from-file", &input]);

    let out = app.ok_output(&["keys", "allowed", "--format", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let keks: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(keks.len(), 1, "{stdout}");
    assert!(keks[0]["kek_id"].as_str().unwrap().starts_with("local:"));

    let out = app.ok_output(&[
        "honeytoken",
        "plant",
        "--count",
        "2",
        "--over",
        "1h",
        "--format",
        "json",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["planted_users"], 2, "{v}");
    assert_eq!(v["over_seconds"], 3600);
    assert!(v["logins"].as_u64().unwrap() >= 2);

    let json = app.bin().env("PII_VAULT_FORMAT", "json");
    for args in [
        &["keys", "list"][..],
        &["keys", "allowed"],
        &["policy", "show"],
    ] {
        let out = json.ok_output(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.trim().is_empty(), "{args:?}");
        for line in stdout.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
        }
    }
    // `text` is the table, and a flag wins over the environment.
    let out = app
        .bin()
        .env("PII_VAULT_FORMAT", "text")
        .ok_output(&["keys", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("id "));
    let out = json.ok_output(&["keys", "list", "--format", "table"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("id "));
}

/// A worker's `PII_VAULT_QUEUE_URL` in the environment does not stop a
/// `run --from-file` typed by hand; typing both inputs is a usage error.
#[test]
fn a_typed_input_wins_over_the_queue_url_in_the_environment() {
    let app = TestApp::embedded();
    let input = app.write("in.jsonl", &events(20));
    let bin = app.bin().env(
        "PII_VAULT_QUEUE_URL",
        "http://127.0.0.1:1/000000000000/never-used",
    );
    let out = bin.ok_output(&["run", "--from-file", &input]);
    assert_eq!(common::summary(&out.stderr), (20, 0, 0));

    let out = app.run(&[
        "run",
        "--from-file",
        &input,
        "--queue-url",
        "http://127.0.0.1:1/000000000000/q",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used together"));
    let out = app.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `PII_VAULT_SOURCE_ID` (a file loader's setting) in a queue worker's
/// environment does not make `run --queue-url` a usage error; typed
/// without `--from-file`, `--source-id` is one.
#[test]
fn a_source_id_in_the_environment_does_not_stop_a_queue_worker() {
    let app = TestApp::embedded();
    // Nothing listens on port 1: the run gets as far as the queue and
    // fails there (exit 1), past the parsing of its command line.
    let out = app.bin().env("PII_VAULT_SOURCE_ID", "nightly").run(&[
        "run",
        "--queue-url",
        "http://127.0.0.1:1/000000000000/q",
        "--until-empty",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("source-id"), "{stderr}");

    let out = app.run(&[
        "run",
        "--queue-url",
        "http://127.0.0.1:1/000000000000/q",
        "--source-id",
        "nightly",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("goes with --from-file"));
}

/// On a terminal, log lines written while the progress bar is drawn each
/// start on a line of their own: the bar is cleared first (`\r`, erase
/// line) and drawn again below, never torn by a line written over it. Run
/// under `script`, which gives the binary a pseudo-terminal and records
/// every byte it writes there.
#[test]
fn log_lines_never_tear_the_progress_bar_on_a_terminal() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("`script` (util-linux) is needed to give the binary a terminal");
    }
    let app = TestApp::embedded();
    // Malformed lines make a WARN line each, spread over the whole file.
    let text = common::gen_events(&["-n", "30000", "--seed", "29", "--malformed-pct", "2"]);
    app.write("events.jsonl", &text);
    let typescript = app.path("terminal.out");
    let out = std::process::Command::new("script")
        .arg("-qec")
        .arg(format!(
            "{} run --from-file events.jsonl",
            common::bin().display()
        ))
        .arg(&typescript)
        .current_dir(app.dir())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PII_VAULT_LOG", "info")
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = std::fs::read(&typescript).unwrap();
    let count = |needle: &[u8]| {
        screen
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    };
    let bars = count(b"[00:00:");
    let warnings = count(b"rejected message quarantined");
    assert!(
        bars >= 2 && warnings >= 100,
        "bar drawn {bars} times, {warnings} warnings"
    );
    // Every log line (they start with a dimmed timestamp) follows a newline
    // or the erase-line sequence of a cleared bar.
    let starts = (0..screen.len()).filter(|&i| screen[i..].starts_with(b"\x1b[2m20"));
    let mut cleared = 0;
    for at in starts {
        let before = &screen[..at];
        if before.ends_with(b"\x1b[2K") {
            cleared += 1;
        } else {
            assert!(
                before.is_empty() || before.ends_with(b"\n"),
                "a log line written over the bar: …{}",
                String::from_utf8_lossy(&before[before.len().saturating_sub(120)..])
            );
        }
    }
    assert!(
        cleared >= 1,
        "no log line was written while the bar was on screen"
    );
}

/// `--role-prefix` is for Postgres roles: an SQLite file has none, and a
/// prefix that would need quoting is a usage error.
#[test]
fn a_role_prefix_is_refused_where_it_means_nothing_or_is_malformed() {
    let app = TestApp::embedded();
    let out = app.run(&["migrate", "--role-prefix", "acme_vault"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        last_line(&out).contains("an SQLite file has no roles"),
        "{}",
        last_line(&out)
    );
    for bad in ["Acme", "acme-vault", "pg_vault", "acme_"] {
        let out = app.run(&["migrate", "--role-prefix", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("role"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
