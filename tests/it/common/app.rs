//! The one test fixture, [`TestApp`]: what a test of pii-vault starts from.
//!
//! - A working directory of its own (a temporary directory, removed with the
//!   fixture): the binary runs there, so the local key file (`keys/`) and,
//!   in the embedded flavour, the SQLite file (`pii-vault.db`) are inside it.
//! - A database: [`TestApp::postgres`] makes a fresh database in the
//!   `PII_VAULT_TEST_PG` cluster (skipping as [`common::service_env`] says),
//!   migrated by its owner, whose `PgStore` is [`TestApp::owner`]; logins
//!   granted one of pii-vault's roles come from [`TestApp::login_as`].
//!   [`TestApp::embedded`] is the embedded default instead: no database URL
//!   at all, as a new user runs it (the binary makes the SQLite file).
//! - The binary, through [`Bin`], with one environment policy (below).
//!
//! The event generator is `common::gen_events` / `common::gen_events_recorded`.
//!
//! # The environment of every run of the binary
//!
//! Every process starts from this test process's environment with every
//! variable pii-vault (or sqlx, or the AWS SDK) would read removed: all of
//! `PII_VAULT_*`, `DATABASE_URL`, `RUST_LOG`, `AWS_*` and libpq's `PG*`.
//! Then it gets:
//! - the LocalStack settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`) when the test run has LocalStack
//!   (`PII_VAULT_TEST_AWS` and `AWS_ENDPOINT_URL` set), else none;
//! - `PII_VAULT_ACTOR` = [`ACTOR`], so that a claimed actor never comes from
//!   `$USER`, and `PII_VAULT_LOG` = [`LOG_FILTER`];
//! - `DATABASE_URL` of the fixture's owner (Postgres flavour) or of the
//!   login it runs as ([`TestApp::as_login`]), `PII_VAULT_KMS_KEY_ID` when
//!   the fixture has a KMS key ([`TestApp::with_kms`]);
//! - whatever the test adds with [`Bin::env`] (last, so it wins);
//! - the test's directory as working directory, and stdin from /dev/null
//!   unless the test pipes it.
//!
//! # Cleanup
//!
//! [`TestApp::finish`] closes the pools, drops the database and then the
//! login users (roles outlive databases). A fixture dropped without
//! `finish` (a failing test, a panic) still drops its login users, from a
//! thread of its own with a runtime of its own (never blocking on the
//! test's runtime), and leaves the database for inspection; when no panic is
//! under way it drops the database too. The cluster is throwaway either way.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pii_vault::store::postgres::PgStore;
use pii_vault::store::Store;
use sqlx::{Connection, PgConnection, PgPool, SqlitePool};

use crate::common::{self, pg::FreshDb};

pub const WORKER: &str = "pii_vault_worker";
pub const ANALYST: &str = "pii_vault_analyst";
pub const REVEALER: &str = "pii_vault_revealer";
pub const ROTATOR: &str = "pii_vault_rotator";
pub const AUDITOR: &str = "pii_vault_auditor";
pub const SEARCHER: &str = "pii_vault_searcher";
pub const ROLES: [&str; 6] = [WORKER, ANALYST, REVEALER, ROTATOR, AUDITOR, SEARCHER];

/// What every command claims to be (`PII_VAULT_ACTOR`): the same for all,
/// so that an audit row's `actor` can only come from the database login.
pub const ACTOR: &str = "oncall@test";

/// `PII_VAULT_LOG` of every run: all of pii-vault's own lines down to debug
/// (where a value could slip into a log, so the leak checks see them), the
/// libraries at their defaults (no AWS SDK per-request chatter).
pub const LOG_FILTER: &str =
    "info,pii_vault=debug,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn";

/// A login user granted one of pii-vault's roles: its name (what
/// `session_user` and the audit trail say) and its connection URL.
#[derive(Debug, Clone)]
pub struct Login {
    pub name: String,
    pub url: String,
}

/// The fixture; see the module documentation.
pub struct TestApp {
    dir: tempfile::TempDir,
    kms_key_id: Option<String>,
    pg: Option<Postgres>,
    finished: bool,
}

struct Postgres {
    admin_url: String,
    fresh: Option<FreshDb>,
    url: String,
    name: String,
    owner: Arc<PgStore>,
    /// Login users made for this test, dropped at the end.
    logins: Mutex<Vec<String>>,
    /// Pools of the stores handed out by `store_as`, closed at the end.
    pools: Mutex<Vec<PgPool>>,
}

impl TestApp {
    /// The embedded default: a directory, no database URL.
    pub fn embedded() -> TestApp {
        TestApp {
            dir: tempfile::tempdir().unwrap(),
            kms_key_id: None,
            pg: None,
            finished: false,
        }
    }

    /// A fresh, migrated Postgres database in the `PII_VAULT_TEST_PG`
    /// cluster; `None` (skip) under `PII_VAULT_SKIP_SERVICES=1` without it.
    pub async fn postgres() -> Option<TestApp> {
        let admin = common::service_env("PII_VAULT_TEST_PG")?;
        Some(TestApp::postgres_on(&admin).await)
    }

    /// A fresh database in the cluster of `admin_url` (a superuser's URL),
    /// migrated by that superuser, its owner here.
    pub async fn postgres_on(admin_url: &str) -> TestApp {
        let fresh = FreshDb::create(admin_url).await;
        let owner = PgStore::connect(&fresh.url)
            .await
            .expect("connect to the test database");
        owner.migrate().await.expect("migrate the test database");
        TestApp {
            dir: tempfile::tempdir().unwrap(),
            kms_key_id: None,
            pg: Some(Postgres {
                admin_url: admin_url.to_string(),
                url: fresh.url.clone(),
                name: fresh.name.clone(),
                fresh: Some(fresh),
                owner: Arc::new(owner),
                logins: Mutex::new(Vec::new()),
                pools: Mutex::new(Vec::new()),
            }),
            finished: false,
        }
    }

    /// Every run of the binary gets `PII_VAULT_KMS_KEY_ID=key`.
    pub fn with_kms(mut self, key: &str) -> TestApp {
        self.kms_key_id = Some(key.to_string());
        self
    }

    // ------------------------------------------------------------ files

    /// The test's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` in the working directory; returns `name`.
    pub fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.path(name), text).unwrap();
        name.to_string()
    }

    // --------------------------------------------------------- database

    fn pg(&self) -> &Postgres {
        self.pg
            .as_ref()
            .expect("a Postgres fixture (TestApp::postgres), not the embedded one")
    }

    /// The owner's connection URL.
    pub fn url(&self) -> &str {
        &self.pg().url
    }

    /// The database's name (login users are named after it).
    pub fn db_name(&self) -> &str {
        &self.pg().name
    }

    /// The owner's store (the cluster's superuser, who ran the migrations).
    pub fn owner(&self) -> &PgStore {
        &self.pg().owner
    }

    /// The owner's store, shared (e.g. as an `Arc<dyn Store>`).
    pub fn owner_arc(&self) -> Arc<PgStore> {
        self.pg().owner.clone()
    }

    /// The owner's pool.
    pub fn pool(&self) -> &PgPool {
        self.owner().pool()
    }

    /// The owner as a [`Login`].
    pub async fn owner_login(&self) -> Login {
        let name: String = sqlx::query_scalar("SELECT session_user::text")
            .fetch_one(self.pool())
            .await
            .unwrap();
        Login {
            name,
            url: self.url().to_string(),
        }
    }

    /// A new login user that is a member of `role`, made as a deployment
    /// would (`CREATE ROLE … LOGIN`, `GRANT role TO …`), named
    /// `<database>_<n>_<role without pii_vault_>`.
    pub async fn login_as(&self, role: &str) -> Login {
        let pg = self.pg();
        let name = {
            let mut logins = pg.logins.lock().unwrap();
            let name = format!(
                "{}_{}_{}",
                pg.name,
                logins.len(),
                role.trim_start_matches("pii_vault_")
            );
            logins.push(name.clone());
            name
        };
        let password = uuid::Uuid::new_v4().simple().to_string();
        self.exec(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            .await;
        self.exec(&format!("GRANT {role} TO {name}")).await;
        Login {
            url: with_user(&pg.url, &name, &password),
            name,
        }
    }

    /// A new login of `role` connected through `PgStore` (closed by `finish`).
    pub async fn store_as(&self, role: &str) -> PgStore {
        let login = self.login_as(role).await;
        let store = PgStore::connect(&login.url).await.unwrap();
        store.ping().await.unwrap();
        self.pg().pools.lock().unwrap().push(store.pool().clone());
        store
    }

    /// Runs `sql` as the owner; returns the rows it affected.
    pub async fn exec(&self, sql: &str) -> u64 {
        sqlx::query(sql)
            .execute(self.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .rows_affected()
    }

    /// `SELECT count(*) FROM table`, as the owner.
    pub async fn count(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT count(*) FROM {table}")).await
    }

    /// One `bigint` that `sql` returns, as the owner.
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The `text` column of every row `sql` returns, as the owner.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        sqlx::query_scalar(sql)
            .fetch_all(self.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A session of the owner's of its own, inside a transaction left open
    /// after `sql` (the locks that took held until it rolls back): another
    /// transaction that a command under test has to wait for.
    pub async fn hold_open(&self, sql: &str) -> PgConnection {
        let mut c = PgConnection::connect(self.url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut c).await.unwrap();
        sqlx::query(sql)
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c
    }

    /// The embedded database's URL (the file the binary makes by default).
    pub fn sqlite_url(&self) -> String {
        format!("sqlite:{}", self.path("pii-vault.db").display())
    }

    /// One connection to the embedded database.
    pub async fn sqlite(&self) -> SqlitePool {
        sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(&self.sqlite_url())
            .await
            .unwrap()
    }

    // ----------------------------------------------------------- binary

    /// The binary as this fixture's owner (Postgres) or as a new user
    /// (embedded).
    pub fn bin(&self) -> Bin {
        let mut vars = Vec::new();
        if let Some(pg) = &self.pg {
            vars.push(("DATABASE_URL".to_string(), pg.url.clone()));
        }
        if let Some(key) = &self.kms_key_id {
            vars.push(("PII_VAULT_KMS_KEY_ID".to_string(), key.clone()));
        }
        Bin {
            dir: self.dir.path().to_path_buf(),
            vars,
        }
    }

    /// The binary as `login`.
    pub fn as_login(&self, login: &Login) -> Bin {
        self.bin().env("DATABASE_URL", &login.url)
    }

    /// [`Bin::run`] as the owner.
    pub fn run(&self, args: &[&str]) -> Output {
        self.bin().run(args)
    }

    /// [`Bin::ok`] as the owner.
    pub fn ok(&self, args: &[&str]) -> String {
        self.bin().ok(args)
    }

    /// [`Bin::ok_output`] as the owner.
    pub fn ok_output(&self, args: &[&str]) -> Output {
        self.bin().ok_output(args)
    }

    /// [`Bin::command`] as the owner.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        self.bin().command(args)
    }

    /// [`Bin::spawn`] as the owner.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        self.bin().spawn(args)
    }

    // ---------------------------------------------------------- the end

    /// Closes the pools, drops the database, then the login users.
    pub async fn finish(mut self) {
        self.finished = true;
        let Some(mut pg) = self.pg.take() else {
            return;
        };
        let pools: Vec<PgPool> = std::mem::take(&mut *pg.pools.lock().unwrap());
        for p in pools {
            p.close().await;
        }
        pg.owner.pool().close().await;
        if let Some(fresh) = pg.fresh.take() {
            fresh.drop_database().await;
        }
        let logins = std::mem::take(&mut *pg.logins.lock().unwrap());
        drop_roles(&pg.admin_url, &logins)
            .await
            .unwrap_or_else(|e| panic!("drop the test's login users: {e}"));
    }
}

impl Drop for TestApp {
    /// Without `finish`: the login users go (and the database, unless a
    /// panic is under way: then it stays for inspection), from a thread
    /// with a runtime of its own, bounded in time.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(mut pg) = self.pg.take() else {
            return;
        };
        let logins = std::mem::take(&mut *pg.logins.lock().unwrap());
        let panicking = std::thread::panicking();
        let fresh = if panicking { None } else { pg.fresh.take() };
        if let (true, Some(f)) = (panicking, &pg.fresh) {
            eprintln!("the test's database {} is left for inspection", f.name);
        }
        if logins.is_empty() && fresh.is_none() {
            return;
        }
        let admin = pg.admin_url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    if let Some(f) = fresh {
                        f.drop_database().await;
                    }
                    if let Err(e) = drop_roles(&admin, &logins).await {
                        eprintln!("could not drop the test's login users: {e}");
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// `DROP ROLE IF EXISTS` each of `logins`, as the cluster's superuser.
async fn drop_roles(admin_url: &str, logins: &[String]) -> Result<(), sqlx::Error> {
    if logins.is_empty() {
        return Ok(());
    }
    let mut conn = PgConnection::connect(admin_url).await?;
    for login in logins {
        sqlx::query(&format!("DROP ROLE IF EXISTS {login}"))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await.ok();
    Ok(())
}

/// `url` with its user and password replaced.
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    let start = url.find("://").expect("a URL") + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{}{user}:{password}@{host}", &url[..start])
}

#[test]
fn with_user_replaces_only_the_userinfo() {
    assert_eq!(
        with_user("postgres://postgres@127.0.0.1:5432/t_1", "u", "p"),
        "postgres://u:p@127.0.0.1:5432/t_1"
    );
    assert_eq!(
        with_user("postgresql://a:b@h/db?sslmode=disable", "u", "p"),
        "postgresql://u:p@h/db?sslmode=disable"
    );
    assert_eq!(
        with_user("postgres://h:1/db", "u", "p"),
        "postgres://u:p@h:1/db"
    );
}

// ------------------------------------------------------------------ runner

/// The binary under test, with the environment policy of the module
/// documentation. Cheap to clone; each builder method returns a new one.
#[derive(Debug, Clone)]
pub struct Bin {
    dir: PathBuf,
    /// Set after the policy, in order (a later one wins).
    vars: Vec<(String, String)>,
}

/// Whether the policy removes `name` from a process's environment.
fn scrubbed(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with("PII_VAULT_")
        || name.starts_with("AWS_")
        || name.starts_with("PG")
        || name == "DATABASE_URL"
        || name == "RUST_LOG"
}

/// The LocalStack settings of this test run, when it has LocalStack (the
/// rule of `aws::endpoint`: both `PII_VAULT_TEST_AWS` and
/// `AWS_ENDPOINT_URL`, so that a stray variable never reaches real AWS).
fn aws_services() -> Vec<(String, String)> {
    let set = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    if set("PII_VAULT_TEST_AWS").is_none() || set("AWS_ENDPOINT_URL").is_none() {
        return Vec::new();
    }
    [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ]
    .iter()
    .filter_map(|v| set(v).map(|value| (v.to_string(), value)))
    .collect()
}

impl Bin {
    /// The same, with `name=value` added to its environment.
    pub fn env(&self, name: &str, value: &str) -> Bin {
        let mut b = self.clone();
        b.vars.push((name.to_string(), value.to_string()));
        b
    }

    /// The same, with `PII_VAULT_KMS_KEY_ID=key`.
    pub fn kms(&self, key: &str) -> Bin {
        self.env("PII_VAULT_KMS_KEY_ID", key)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `pii-vault ARGS…` under the policy, not started yet.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(common::bin());
        c.args(args).current_dir(&self.dir).stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if scrubbed(&name) {
                c.env_remove(name);
            }
        }
        c.envs(aws_services())
            .env("PII_VAULT_ACTOR", ACTOR)
            .env("PII_VAULT_LOG", LOG_FILTER);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// [`Bin::command`] for tokio, killed when dropped.
    pub fn tokio_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::from(self.command(args));
        c.kill_on_drop(true);
        c
    }

    /// Runs to completion; returns what it printed, whatever its status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot start pii-vault {args:?}: {e}"))
    }

    /// Runs to completion, which must succeed; returns its stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ok_output(args);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs to completion, which must succeed; returns what it printed.
    pub fn ok_output(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pii-vault {args:?} exited with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A daemon (`run --queue-url`, `audit --follow`): started, its stdout
    /// and stderr piped, killed when dropped.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        self.tokio_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start pii-vault {args:?}: {e}"))
    }
}
