//! Operations basics, through the binary: `healthcheck` and its exit
//! statuses, `--version` with the commit, the build-info and last-batch
//! gauges, completions and the man page, `migrate --status` / `--dry-run`,
//! `run --dry-run`, `DATABASE_URL_FILE`, a byte order mark, and re-runs that
//! do not announce old rejections as new.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, app::TestApp, free_port, pg::FreshDb};

const VALID: &str = r#"{"user_id": "u1", "app_version": "2.3.0", "device_type": "ios", "ip": "203.0.113.7", "locale": "US", "device_id": "123-45-6789"}"#;
const VALID2: &str = r#"{"user_id": "u2", "app_version": 7, "device_type": "android", "ip": "2001:db8::1", "locale": null, "device_id": "dev-2"}"#;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> Option<String>) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metrics(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The commit `--version` names.
fn version_commit(app: &TestApp) -> String {
    let out = app.ok_output(&["--version"]);
    let text = stdout(&out);
    let commit = text
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no commit in --version: {text}"));
    commit.to_string()
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let app = TestApp::embedded();
    let out = app.ok_output(&["--version"]);
    let text = stdout(&out);
    assert!(text.starts_with("pii-vault 0."), "{text}");
    let commit = version_commit(&app);
    // The tests build from a git checkout: the commit is known.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| stdout(&o).trim().to_string());
    if let Some(head) = head {
        assert!(
            commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{text}"
        );
        assert!(
            head.starts_with(&commit),
            "built from {commit}, HEAD is {head}"
        );
    }
}

#[test]
fn healthcheck_says_ready_not_ready_and_unreachable_by_exit_status() {
    let app = TestApp::embedded();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let addr = format!("127.0.0.1:{port}");

    // Nothing listening: 2.
    let out = app.run(&["healthcheck", "--url", &url, "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));

    // A ready worker: 0, and its metrics carry the build and the last batch.
    let mut worker = app
        .command(&[
            "run",
            "--from-file",
            "-",
            "--source-id",
            "hc",
            "--metrics-addr",
            &addr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = worker.stdin.take().unwrap();
    writeln!(stdin, "{VALID}").unwrap();
    stdin.flush().unwrap();
    let said = wait_for("a ready healthcheck", Duration::from_secs(60), || {
        let out = app.run(&["healthcheck", "--url", &url]);
        (out.status.code() == Some(0)).then(|| stdout(&out))
    });
    assert!(said.starts_with("ready: "), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    // The default URL: the port of PII_VAULT_METRICS_ADDR, on the loopback.
    let out = app
        .bin()
        .env("PII_VAULT_METRICS_ADDR", &format!("0.0.0.0:{port}"))
        .run(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let commit = version_commit(&app);
    let body = wait_for("the first batch committed", Duration::from_secs(30), || {
        metrics(port).filter(|b| {
            b.lines().any(|l| {
                l.strip_prefix("pii_vault_last_batch_committed_timestamp_seconds ")
                    .is_some_and(|v| v != "0")
            })
        })
    });
    let build = body
        .lines()
        .find(|l| l.starts_with("pii_vault_build_info{"))
        .unwrap_or_else(|| panic!("no build info in:\n{body}"));
    assert!(
        build.contains(&format!("commit=\"{commit}\"")) && build.ends_with("} 1"),
        "{build}"
    );
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    let at: i64 = body
        .lines()
        .find_map(|l| l.strip_prefix("pii_vault_last_batch_committed_timestamp_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now - 120..=now + 5).contains(&at), "{at} vs now {now}");
    assert!(body.contains("# TYPE pii_vault_last_batch_committed_timestamp_seconds gauge"));

    drop(stdin);
    let status = worker.wait().unwrap();
    assert!(status.success());

    // Gone again: 2.
    let out = app.run(&["healthcheck", "--url", &url, "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn healthcheck_exits_1_when_the_worker_answers_not_ready() {
    let app = TestApp::embedded();
    // A worker whose KMS does not answer serves /readyz, not ready.
    let dead = free_port();
    let port = free_port();
    let mut worker = app
        .bin()
        .env("PII_VAULT_KMS_KEY_ID", "alias/pii-vault-healthcheck")
        .env("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{dead}"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .command(&[
            "run",
            "--from-file",
            "-",
            "--source-id",
            "hc",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let said = wait_for("a not-ready healthcheck", Duration::from_secs(60), || {
        let out = app.run(&["healthcheck", "--url", &url]);
        (out.status.code() == Some(1)).then(|| stderr(&out))
    });
    assert!(said.contains("not ready") && said.contains("503"), "{said}");
    let _ = worker.kill();
    let _ = worker.wait();

    // Any answer outside 2xx is "not ready"; an answer that is not HTTP is "unreachable".
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for (i, conn) in listener.incoming().take(2).enumerate() {
            let mut conn = conn.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let answer: &[u8] = if i == 0 {
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nboom\n"
            } else {
                b"SSH-2.0-OpenSSH\r\n"
            };
            conn.write_all(answer).unwrap();
        }
    });
    let url = format!("http://127.0.0.1:{fake}/readyz");
    let out = app.run(&["healthcheck", "--url", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("500: boom"), "{}", stderr(&out));
    let out = app.run(&["healthcheck", "--url", &url]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    server.join().unwrap();
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let app = TestApp::embedded();
    for shell in ["bash", "zsh", "fish"] {
        let out = app.ok_output(&["completions", shell]);
        let text = stdout(&out);
        assert!(
            text.contains("healthcheck") && text.contains("--database-url"),
            "{shell}: {}",
            &text[..text.len().min(300)]
        );
    }
    let man = stdout(&app.ok_output(&["man"]));
    assert!(
        man.contains(".TH pii-vault 1"),
        "{}",
        &man[..man.len().min(300)]
    );
    assert!(
        man.contains("healthcheck"),
        "the man page lists the commands"
    );
    app.ok(&["man", "--dir", "man"]);
    for page in ["pii-vault.1", "pii-vault-run.1", "pii-vault-migrate.1"] {
        let text = std::fs::read_to_string(app.path("man").join(page)).unwrap();
        assert!(
            text.starts_with(".ie"),
            "{page}: {}",
            &text[..text.len().min(100)]
        );
    }
    // Neither made a database or a key.
    assert!(!app.path("pii-vault.db").exists());
    assert!(!app.path("keys").exists());
}

#[test]
fn migrate_status_and_dry_run_on_sqlite_change_nothing() {
    let app = TestApp::embedded();
    let status = stdout(&app.ok_output(&["migrate", "--status"]));
    assert!(status.contains("does not exist yet"), "{status}");
    assert!(status.contains("0001 pending"), "{status}");
    assert!(
        status.lines().any(|l| l.starts_with("0 applied,")),
        "{status}"
    );
    let dry = stdout(&app.ok_output(&["migrate", "--dry-run"]));
    assert!(
        dry.contains("would apply") && dry.contains("0001 init"),
        "{dry}"
    );
    assert!(dry.contains("nothing changed"), "{dry}");
    assert!(
        !app.path("pii-vault.db").exists(),
        "a read-only look made the file"
    );

    app.ok(&["migrate"]);
    let status = stdout(&app.ok_output(&["migrate", "--status"]));
    assert!(status.contains("0001 applied"), "{status}");
    assert!(status.contains(", 0 pending"), "{status}");
    let dry = stdout(&app.ok_output(&["migrate", "--dry-run"]));
    assert!(dry.contains("nothing to apply"), "{dry}");
}

#[tokio::test]
async fn migrate_status_and_dry_run_on_postgres_change_nothing() {
    let Some(admin) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let app = TestApp::embedded();
    let fresh = FreshDb::create(&admin).await;
    let bin = app.bin().env("DATABASE_URL", &fresh.url);
    let out = bin.ok_output(&["migrate", "--dry-run"]);
    let dry = stdout(&out);
    assert!(
        dry.contains("would apply") && dry.contains("0001 init"),
        "{dry}"
    );
    assert!(dry.contains("would re-apply"), "{dry}");
    let status = stdout(&bin.ok_output(&["migrate", "--status"]));
    assert!(
        status.contains("0001 pending") && status.lines().any(|l| l.starts_with("0 applied,")),
        "{status}"
    );
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&fresh.url).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(tables, 0, "--status / --dry-run created something");
        conn.close().await.unwrap();
    }
    fresh.drop_database().await;

    // A migrated database: everything applied.
    let Some(pg) = TestApp::postgres().await else {
        return;
    };
    let status = stdout(&pg.ok_output(&["migrate", "--status"]));
    assert!(status.contains(", 0 pending"), "{status}");
    assert!(!status.contains("pending "), "{status}");
    let dry = stdout(&pg.ok_output(&["migrate", "--dry-run"]));
    assert!(dry.contains("nothing to apply"), "{dry}");
    pg.finish().await;
}

#[test]
fn run_dry_run_validates_a_file_and_stores_nothing() {
    let app = TestApp::embedded();
    let file = app.write(
        "day.jsonl",
        &format!("{VALID}\n{{\"user_id\": \"u3\"}}\nnot json\n{VALID2}\n"),
    );
    let out = app.ok_output(&["run", "--from-file", &file, "--dry-run"]);
    let err = stderr(&out);
    assert!(err.contains("dry run: 2 valid"), "{err}");
    assert!(
        err.contains("2 rejected (missing_field: 1, not_json: 1)"),
        "{err}"
    );
    assert!(err.contains("nothing stored"), "{err}");
    assert!(!err.contains("u3") && !err.contains("203.0.113.7"), "{err}");
    assert!(
        !app.path("pii-vault.db").exists(),
        "a dry run made the database"
    );
    assert!(!app.path("keys").exists(), "a dry run made a key");
    // Only with a file.
    let out = app.run(&["run", "--queue-url", "http://q", "--dry-run"]);
    assert!(!out.status.success());
}

#[test]
fn the_database_url_can_come_from_a_file() {
    let app = TestApp::embedded();
    let other = app.path("other.db");
    let secret = app.write("db-url", &format!("sqlite:{}\n", other.display()));
    let bin = app.bin().env(
        "DATABASE_URL_FILE",
        &app.path(&secret).display().to_string(),
    );
    bin.ok(&["migrate", "--schema-only"]);
    assert!(other.exists(), "the URL in the file was not used");
    assert!(!app.path("pii-vault.db").exists());
    let status = stdout(&bin.ok_output(&["migrate", "--status"]));
    assert!(status.contains(", 0 pending"), "{status}");

    // Both: an error, not a guess.
    let out = bin
        .env("DATABASE_URL", &app.sqlite_url())
        .run(&["migrate", "--status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("DATABASE_URL_FILE"),
        "{}",
        stderr(&out)
    );
    // A missing file: named.
    let out = app
        .bin()
        .env("DATABASE_URL_FILE", "no-such-file")
        .run(&["migrate", "--status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-file"), "{}", stderr(&out));
}

#[test]
fn a_byte_order_mark_does_not_quarantine_the_first_line() {
    let app = TestApp::embedded();
    let file = app.write("bom.jsonl", &format!("\u{feff}{VALID}\n{VALID2}\n"));
    let out = app.ok_output(&["run", "--from-file", &file]);
    assert_eq!(common::summary(&out.stderr), (2, 0, 0), "{}", stderr(&out));
}

#[test]
fn a_rerun_does_not_announce_old_rejections_as_new() {
    let app = TestApp::embedded();
    let file = app.write(
        "mixed.jsonl",
        &format!("{VALID}\nnot json\n{{\"ip\": 1}}\n{VALID2}\n"),
    );
    let first = app.ok_output(&["run", "--from-file", &file]);
    assert_eq!(common::summary(&first.stderr), (2, 0, 2));
    assert_eq!(
        stderr(&first)
            .matches("rejected message quarantined")
            .count(),
        2,
        "{}",
        stderr(&first)
    );
    let again = app.ok_output(&["run", "--from-file", &file]);
    assert_eq!(common::summary(&again.stderr), (0, 4, 0));
    assert!(
        !stderr(&again).contains("rejected message quarantined"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn every_option_has_a_description_and_globals_have_their_own_heading() {
    use clap::CommandFactory as _;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, globals: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
            if arg.is_global_set() && arg.get_help_heading() != Some("Global options") {
                globals.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing, globals);
        }
    }
    let (mut missing, mut globals) = (Vec::new(), Vec::new());
    walk(
        &pii_vault::cli::Cli::command(),
        "pii-vault",
        &mut missing,
        &mut globals,
    );
    assert!(
        missing.is_empty(),
        "options without a description: {missing:?}"
    );
    assert!(
        globals.is_empty(),
        "global options among a command's own: {globals:?}"
    );
}

#[test]
fn sqlite_keys_list_counts_the_uses_of_a_rotations_data_keys() {
    let app = TestApp::embedded();
    let file = app.write("k.jsonl", &format!("{VALID}\n{VALID2}\nnot json\n"));
    app.ok(&["run", "--from-file", &file]);
    app.ok(&["rotate", "data-keys", "--reason", "test"]);
    let out = stdout(&app.ok_output(&["keys", "list", "--format", "json"]));
    let active: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|k| k["purpose"] == "vault" && k["state"] != "destroyed")
        .collect();
    assert!(!active.is_empty(), "{out}");
    // The worker's data key is destroyed; its two vault rows and one
    // quarantined body were re-sealed under the rotation's keys.
    let uses: i64 = active
        .iter()
        .map(|k| k["usage_count"].as_i64().unwrap())
        .sum();
    assert_eq!(uses, 3, "{out}");
}
