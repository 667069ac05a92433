//! Two vaults on one cluster: `migrate --role-prefix` gives a database
//! roles of its own, so that a login granted one vault's worker role can do
//! nothing in the other (roles belong to the cluster, grants to a
//! database).

use super::{denied, ROLES};
use crate::common;
use crate::common::app::TestApp;
use crate::common::pg::FreshDb;

use sqlx::{Connection as _, PgConnection, PgPool};

/// Every privilege `role` holds on the tables, views, columns, sequences
/// and functions of the database `pool` is connected to, as
/// `object:privilege` lines (sorted).
async fn privileges(pool: &PgPool, role: &str) -> Vec<String> {
    sqlx::query_scalar(
        "WITH objs AS ( \
           SELECT c.oid, c.relname::text AS name, c.relkind FROM pg_class c \
           WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r','v','p','S')) \
         SELECT o.name || ':' || p FROM objs o, \
           unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) p \
         WHERE CASE WHEN o.relkind <> 'S' THEN has_table_privilege($1, o.oid, p) ELSE false END \
         UNION ALL \
         SELECT o.name || ':USAGE' FROM objs o WHERE CASE WHEN o.relkind = 'S' THEN has_sequence_privilege($1, o.oid, 'USAGE') ELSE false END \
         UNION ALL \
         SELECT o.name || '.' || a.attname || ':' || p FROM objs o \
           JOIN pg_attribute a ON a.attrelid = o.oid AND a.attnum > 0 AND NOT a.attisdropped, \
           unnest(ARRAY['SELECT','INSERT','UPDATE']) p \
         WHERE CASE WHEN o.relkind <> 'S' THEN has_column_privilege($1, o.oid, a.attnum, p) \
           AND NOT has_table_privilege($1, o.oid, p) ELSE false END \
         UNION ALL \
         SELECT p.oid::regprocedure::text || ':EXECUTE' FROM pg_proc p \
         WHERE p.pronamespace = current_schema()::regnamespace \
           AND has_function_privilege($1, p.oid, 'EXECUTE') \
         ORDER BY 1",
    )
    .bind(role)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_prefix_gives_a_second_vault_on_the_cluster_roles_of_its_own() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let admin = common::service_env("PII_VAULT_TEST_PG").unwrap();
    let other = FreshDb::create(&admin).await;
    let prefix = format!("tv{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let owner_b = app.bin().env("DATABASE_URL", &other.url);

    let stderr = owner_b.ok(&["migrate", "--role-prefix", &prefix]);
    assert!(stderr.contains("is up to date"), "{stderr}");
    let b = PgPool::connect(&other.url).await.unwrap();
    let made: Vec<(String, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname LIKE $1 ORDER BY 1",
    )
    .bind(format!("{prefix}\\_%"))
    .fetch_all(&b)
    .await
    .unwrap();
    let mut expected: Vec<(String, bool)> = ROLES
        .iter()
        .map(|r| (r.replacen("pii_vault", &prefix, 1), false))
        .collect();
    expected.sort();
    assert_eq!(made, expected, "the prefixed roles, NOLOGIN");

    // The grants are the default database's, role for role: nothing of
    // the files was left under the default names, nothing was lost.
    for role in ROLES {
        let mine = role.replacen("pii_vault", &prefix, 1);
        let in_b = privileges(&b, &mine).await;
        assert!(!in_b.is_empty(), "{mine} holds nothing");
        assert_eq!(in_b, privileges(app.pool(), role).await, "{mine} vs {role}");
        assert_eq!(
            privileges(&b, role).await,
            Vec::<String>::new(),
            "{role} in the prefixed database"
        );
        assert_eq!(
            privileges(app.pool(), &mine).await,
            Vec::<String>::new(),
            "{mine} in the default database"
        );
    }

    // Later migrates keep the prefix; another one is refused, either way.
    let status = String::from_utf8(owner_b.ok_output(&["migrate", "--status"]).stdout).unwrap();
    assert!(
        status.contains(&format!("roles: {prefix}_worker,")),
        "{status}"
    );
    owner_b.ok(&["migrate"]);
    for (bin, asked, has) in [
        (&owner_b, "pii_vault", prefix.as_str()),
        (&app.bin(), prefix.as_str(), "pii_vault"),
    ] {
        let out = bin.run(&["migrate", "--role-prefix", asked]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("first migrated with the role prefix {has}")),
            "{stderr}"
        );
    }
    let recorded: String = sqlx::query_scalar("SELECT role_prefix FROM vault_settings")
        .fetch_one(&b)
        .await
        .unwrap();
    assert_eq!(recorded, prefix);

    // The binary, under a login of each vault's worker role, in the
    // prefixed vault: only the prefixed one stores.
    let events = common::gen_events(&["-n", "12", "--seed", "5"]);
    app.write("events.jsonl", &events);
    let run = ["run", "--from-file", "events.jsonl", "--no-progress"];
    let default_worker = app.login_as(super::WORKER).await;
    let stray = app
        .bin()
        .env(
            "DATABASE_URL",
            &with_database_of(&default_worker.url, &other.name),
        )
        .run(&run);
    let stderr = String::from_utf8_lossy(&stray.stderr);
    assert!(!stray.status.success(), "{stderr}");
    let own_worker = app.login_as(&format!("{prefix}_worker")).await;
    let stderr = app
        .bin()
        .env(
            "DATABASE_URL",
            &with_database_of(&own_worker.url, &other.name),
        )
        .ok(&run);
    assert_eq!(common::summary(stderr.as_bytes()), (12, 0, 0), "{stderr}");

    // The same by hand, as the default worker's login with plain SQL.
    let mut conn = PgConnection::connect(&with_database_of(&default_worker.url, &other.name))
        .await
        .unwrap();
    for sql in [
        "SELECT message_id FROM user_logins",
        "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) \
         VALUES ('m', 'u', 'k', '\\x00', '\\x00')",
    ] {
        match sqlx::query(sql).execute(&mut conn).await {
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {}
            other => panic!("{sql}: expected 42501, got {other:?}"),
        }
    }
    conn.close().await.ok();
    // And the prefixed worker in the default vault.
    let own_in_a = PgPool::connect(&own_worker.url).await.unwrap();
    denied(&own_in_a, "SELECT message_id FROM user_logins").await;
    own_in_a.close().await;

    // A revealer of the prefixed vault reveals there; the default
    // revealer is refused by the database.
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    let user = first["user_id"].as_str().unwrap().to_string();
    let reveal = [
        "reveal",
        "--user-id",
        &user,
        "--reason",
        "INC-1",
        "--format",
        "json",
    ];
    let own_revealer = app.login_as(&format!("{prefix}_revealer")).await;
    let shown = app
        .bin()
        .env(
            "DATABASE_URL",
            &with_database_of(&own_revealer.url, &other.name),
        )
        .ok_output(&reveal);
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&user));
    let default_revealer = app.login_as(super::REVEALER).await;
    let refused = app
        .bin()
        .env(
            "DATABASE_URL",
            &with_database_of(&default_revealer.url, &other.name),
        )
        .run(&reveal);
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());

    b.close().await;
    app.finish().await;
    other.drop_database().await;
    let mut admin_conn = PgConnection::connect(&admin).await.unwrap();
    for role in ROLES {
        sqlx::query(&format!(
            "DROP ROLE {}",
            role.replacen("pii_vault", &prefix, 1)
        ))
        .execute(&mut admin_conn)
        .await
        .unwrap();
    }
    admin_conn.close().await.ok();
}

/// A login's URL pointed at another database of the cluster.
fn with_database_of(login_url: &str, db: &str) -> String {
    common::pg::with_database(login_url, db)
}
