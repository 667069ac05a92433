//! The Postgres schema is one thing however a database got there: a fresh
//! database and one upgraded from every earlier version (each prefix of the
//! versioned migrations applied first, then `migrate`) give the same
//! `pg_dump --schema-only`, functions, triggers and grants included. This
//! is what lets `migrations/postgres/functions/` hold the current text of
//! every function while the versioned files stay frozen history: a change
//! that only works on a fresh database (or only on an upgraded one) fails
//! here.

use std::path::Path;

use pii_vault::store::postgres::PgStore;
use pii_vault::store::Store;

use crate::common::{self, pg};

/// `pg_dump --schema-only` of `url`, with its privileges (grants are part
/// of the boundary) and without the lines that name the database itself.
fn schema_of(url: &str) -> String {
    let out = std::process::Command::new(common::pg_program("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--exclude-table=_sqlx_migrations",
        ])
        .arg(url)
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The versioned migration files, in order.
fn versioned() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_database_and_every_upgraded_one_have_the_same_schema() {
    let Some(admin) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let fresh = pg::FreshDb::create(&admin).await;
    let store = PgStore::connect(&fresh.url).await.unwrap();
    store.migrate().await.unwrap();
    // Twice: re-applying the functions changes nothing either.
    store.migrate().await.unwrap();
    store.pool().close().await;
    let want = schema_of(&fresh.url);
    assert!(
        want.contains("CREATE FUNCTION") && want.contains("GRANT"),
        "the dump holds functions and grants"
    );

    let files = versioned();
    assert!(files.len() >= 10, "{files:?}");
    for k in 1..files.len() {
        let old = pg::FreshDb::create(&admin).await;
        // The release that had migrations 1..=k: sqlx applies them from a
        // directory that holds just those.
        let dir = tempfile::tempdir().unwrap();
        for f in &files[..k] {
            std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        let pool = sqlx::PgPool::connect(&old.url).await.unwrap();
        sqlx::migrate::Migrator::new(dir.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap_or_else(|e| panic!("migrations 1..={k}: {e}"));
        pool.close().await;
        let store = PgStore::connect(&old.url).await.unwrap();
        store
            .migrate()
            .await
            .unwrap_or_else(|e| panic!("upgrade from {k}: {e}"));
        store.pool().close().await;
        let got = schema_of(&old.url);
        if got != want {
            let diff: Vec<String> = want
                .lines()
                .zip(got.lines())
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(10)
                .map(|(i, (a, b))| format!("line {i}:\n  fresh:    {a}\n  upgraded: {b}"))
                .collect();
            panic!(
                "upgraded from migration {k} ({} lines) differs from fresh ({} lines):\n{}",
                got.lines().count(),
                want.lines().count(),
                diff.join("\n")
            );
        }
        old.drop_database().await;
    }
    fresh.drop_database().await;
}
