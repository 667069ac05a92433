//! A full disk under the database. The embedded default's SQLite file sits
//! on a small tmpfs that a run fills: the run must stop with a clear error
//! and a non-zero exit, leave no batch half committed, and, once there is
//! room again, the same command must finish the file, storing each valid
//! line exactly once.
//!
//! Mounting a tmpfs needs root; elsewhere these tests say so and skip (the
//! CI machine runs them as root).

use crate::common::app::TestApp;
use crate::common::{self, faults as faults_helpers};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted by the test at `path`; unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `path` (created); `None` if this
    /// process may not mount (not root).
    fn mount(path: &Path, mib: u32) -> Option<Tmpfs> {
        if !faults_helpers::is_root() {
            eprintln!("skipped: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs at {} failed", path.display());
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Gives the filesystem `mib` MiB: the operator freeing space.
    fn resize(&self, mib: u32) {
        self.resize_bytes(u64::from(mib) * 1024 * 1024);
    }

    /// Sets the filesystem's size in bytes (rounded up to pages).
    fn resize_bytes(&self, bytes: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount of {} failed", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// What the stored logins hold, by `(user_id, device_type, app_version,
/// locale)`, with how often each is there.
async fn stored(url: &str) -> BTreeMap<(String, String, String, Option<String>), u32> {
    let db = sqlx::SqlitePool::connect(url).await.unwrap();
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT user_id, device_type, app_version, locale FROM user_logins")
            .fetch_all(&db)
            .await
            .unwrap();
    db.close().await;
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry(r).or_insert(0) += 1;
    }
    out
}

/// Counts that must agree whatever was committed: each login has its vault
/// row, and SQLite finds the file sound. Returns the logins and the
/// quarantined lines stored.
async fn assert_whole(url: &str, when: &str) -> (i64, i64) {
    let db = sqlx::SqlitePool::connect(url).await.unwrap();
    let logins: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins")
        .fetch_one(&db)
        .await
        .unwrap();
    let vault: i64 = sqlx::query_scalar("SELECT count(*) FROM vault")
        .fetch_one(&db)
        .await
        .unwrap();
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_logins l WHERE NOT EXISTS \
         (SELECT 1 FROM vault v WHERE v.message_id = l.message_id)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let quarantined: i64 = sqlx::query_scalar("SELECT count(*) FROM quarantine")
        .fetch_one(&db)
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    assert_eq!(check, "ok", "{when}: integrity_check");
    assert_eq!(
        (logins, orphans),
        (vault, 0),
        "{when}: logins and vault rows disagree"
    );
    (logins, quarantined)
}

/// SQLite's disk fills partway through a file: the run ends with exit 1 and
/// an error that says the disk is full and what to do; the batches committed
/// before are whole; after the operator makes room, the same command stores
/// the rest, and every valid line is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full_stops_cleanly_and_the_same_command_finishes_after() {
    let app = TestApp::embedded();
    let Some(disk) = Tmpfs::mount(&app.path("disk"), 8) else {
        return;
    };
    let ev = faults_helpers::gen_events(20_000, 2020);
    let input = app.write("in.jsonl", &(ev.bodies.join("\n") + "\n"));
    let url = "sqlite:disk/pii-vault.db";
    let bin = app.bin().env("DATABASE_URL", url);
    // Batches of 500: several commit before the disk is full (the write-ahead
    // log of a batch is about 0.7 MiB).
    let args = [
        "run",
        "--from-file",
        &input,
        "--batch-size",
        "500",
        "--no-progress",
    ];

    let full = bin.run(&args);
    let stderr = String::from_utf8_lossy(&full.stderr).into_owned();
    assert_eq!(
        full.status.code(),
        Some(1),
        "a full disk must fail the run:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("disk holding the SQLite database is full")
            && last.contains("run the same command again"),
        "the last line must say what happened and what to do: {last}"
    );
    assert!(!last.contains("panicked"), "{last}");
    let sqlite_url = format!("sqlite:{}", disk.path.join("pii-vault.db").display());
    let (before, rejected_before) = assert_whole(&sqlite_url, "after the disk filled").await;
    assert!(
        before > 0 && before < ev.valid_count(),
        "the disk should fill partway ({before} of {} stored)",
        ev.valid_count()
    );

    disk.resize(512);
    let rerun = bin.ok_output(&args);
    let (stored_now, duplicates, rejected) = common::summary(&rerun.stderr);
    assert_eq!(
        (stored_now as i64, rejected as i64),
        (
            ev.valid_count() - before,
            ev.malformed_count() - rejected_before
        ),
        "the rerun stores exactly what was missing"
    );
    assert_eq!(
        duplicates as i64,
        before + rejected_before,
        "and counts what was there as duplicates"
    );
    assert_eq!(
        assert_whole(&sqlite_url, "after the rerun").await,
        (ev.valid_count(), ev.malformed_count())
    );

    // Exactly once, by content, against the generator's own record.
    let got = stored(&sqlite_url).await;
    let mut want = BTreeMap::new();
    for v in &ev.valid {
        *want.entry(v.clone()).or_insert(0u32) += 1;
    }
    assert_eq!(
        got, want,
        "stored logins differ from the generator's valid events"
    );

    let leaks = crate::common::production::leaked_fast(
        &common::files_bytes(&disk.path, "pii-vault.db"),
        &ev.raw,
    );
    assert!(
        leaks.is_empty(),
        "database holds {} plaintext values",
        leaks.len()
    );
    for out in [&full.stderr, &full.stdout, &rerun.stderr, &rerun.stdout] {
        let leaks = crate::common::production::leaked_fast(out, &ev.raw);
        assert!(
            leaks.is_empty(),
            "output holds {} plaintext values",
            leaks.len()
        );
    }
    drop(disk);
}

/// The Postgres server's disk fills under a running worker (the test's
/// tables live in a tablespace on a small tmpfs; the server's log stays on
/// its own disk, as it would on a separate WAL volume): commits fail with
/// SQLSTATE 53100, the worker holds the batch and retries, its messages
/// stay in SQS, `/readyz` says not ready; once the operator makes room the
/// worker finishes, `/readyz` is ready again, and every event is stored
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_disk_full_holds_messages_not_ready_and_finishes_after() {
    use crate::faults::{assert_exactly_once, complete, services, setup, step, worker};
    use faults_helpers::{readyz, wait_until};
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    let Some((shared_pg, _)) = services() else {
        return;
    };
    let started = Instant::now();
    // The server (user postgres) must reach the mount point.
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let Some(disk) = Tmpfs::mount(&base.path().join("ts"), 64) else {
        return;
    };
    let chown = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&disk.path)
        .status()
        .unwrap();
    assert!(chown.success());
    let (app, q, ev) = setup(&shared_pg, 3000, 4501).await;
    let space = format!("ts_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&shared_pg).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLESPACE {space} LOCATION '{}'",
        disk.path.display()
    ))
    .execute(&admin)
    .await
    .unwrap();
    app.exec(&format!(
        "ALTER TABLE ALL IN TABLESPACE pg_default SET TABLESPACE {space}"
    ))
    .await;
    app.exec(&format!(
        "ALTER INDEX ALL IN TABLESPACE pg_default SET TABLESPACE {space}"
    ))
    .await;
    let used: i64 = app
        .scalar(&format!("SELECT pg_tablespace_size('{space}')"))
        .await;
    // Room for what is there and about a third of the load.
    disk.resize_bytes(used as u64 + 1024 * 1024);

    let port = faults_helpers::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut w = worker(
        &app,
        &q,
        "w",
        &[
            "--visibility-timeout",
            "30",
            "--batch-size",
            "100",
            "--metrics-addr",
            &metrics,
        ],
    )
    .await;
    q.send(&ev.bodies).await;
    step(started, "waiting for the disk to fill");
    wait_until(
        Duration::from_secs(120),
        "a write refused for want of space",
        || async {
            w.output()
                .contains("the database server's disk is full (SQLSTATE 53100)")
                .then_some(())
        },
    )
    .await;
    wait_until(Duration::from_secs(60), "/readyz not ready", || async {
        (readyz(port).await == Some(503)).then_some(())
    })
    .await;
    w.assert_running("while the disk was full");
    let (visible, in_flight) = q.counts().await;
    assert!(
        visible + in_flight > 0,
        "the messages of uncommitted batches must stay in the queue"
    );
    let stored = app.count("user_logins").await;
    assert!(
        stored < ev.valid_count(),
        "the disk filled too late to prove anything"
    );

    step(started, "room made");
    disk.resize(256);
    wait_until(
        Duration::from_secs(180),
        "every event stored, the queue empty",
        || async { complete(&app, &q, &ev).await.then_some(()) },
    )
    .await;
    wait_until(Duration::from_secs(60), "/readyz ready again", || async {
        (readyz(port).await == Some(200)).then_some(())
    })
    .await;
    w.signal("TERM");
    w.wait_success(Duration::from_secs(60)).await;
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    sqlx::query(&format!("DROP TABLESPACE {space}"))
        .execute(&admin)
        .await
        .unwrap();
    step(started, "done");
}
