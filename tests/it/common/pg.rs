//! A fresh Postgres database per test in the throwaway cluster that
//! `PII_VAULT_TEST_PG` names.
//!
//! One database per test rather than one per run: tests then run in
//! parallel without seeing each other's rows, and each one can start from an
//! empty schema (or, for the legacy-migration test, from a legacy one).
//!
//! Declare it with `#[path = "common/pg.rs"] mod pg;`; it does not depend on
//! `common`, so a test binary can use either alone.
#![allow(dead_code)]

use sqlx::{Connection, PgConnection};

/// A database created for one test.
pub struct FreshDb {
    admin_url: String,
    pub name: String,
    /// Connection URL of the new database (the admin URL with its database
    /// replaced).
    pub url: String,
}

impl FreshDb {
    /// Creates `t_<random>` in the cluster of `admin_url`.
    pub async fn create(admin_url: &str) -> FreshDb {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(admin_url)
            .await
            .expect("cannot connect to the PII_VAULT_TEST_PG cluster");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("cannot create a test database");
        conn.close().await.ok();
        FreshDb {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        }
    }

    /// Drops the database, ending any connection still open to it. Called at
    /// the end of a passing test; a failing one leaves its database behind
    /// for inspection (the cluster is throwaway).
    pub async fn drop_database(self) {
        let mut conn = PgConnection::connect(&self.admin_url)
            .await
            .expect("cannot connect to the PII_VAULT_TEST_PG cluster");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .expect("cannot drop a test database");
        conn.close().await.ok();
    }
}

/// `url` with its database (the path) replaced by `db`, keeping userinfo,
/// host, port and query parameters.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{db}", &base[..path]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[test]
fn with_database_replaces_only_the_path() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "t_1"),
        "postgres://postgres@127.0.0.1:5432/t_1"
    );
    assert_eq!(
        with_database("postgres://u:p@h/postgres?sslmode=disable", "t_2"),
        "postgres://u:p@h/t_2?sslmode=disable"
    );
    assert_eq!(
        with_database("postgresql://h:1", "t_3"),
        "postgresql://h:1/t_3"
    );
}
