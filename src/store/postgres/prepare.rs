//! `migrate --prepare-partitions`: the indexes migration 0017 needs, built
//! online beforehand.
//!
//! 0017 attaches the single-table `user_logins` and `vault` as partitions
//! of their new partitioned tables. Attaching needs each to carry the
//! partitioned tables' indexes; an equal index already there is adopted as
//! it is, a missing one is built inside the migration, under the locks it
//! holds on both tables. On a large database that is minutes of writers
//! waiting; built here with `CREATE INDEX CONCURRENTLY` it is minutes of
//! writers going on, and the migration only checks. Each statement is its
//! own transaction (CONCURRENTLY cannot run in one); an interrupted build
//! leaves an invalid index, which the next run drops and builds again.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::Connection as _;

use super::CONNECT_TIMEOUT;
use crate::store::StoreError;

/// The indexes, by name, and how to build each online. Their definitions
/// are those of 0017's partitioned indexes, so that ATTACH adopts them.
const INDEXES: &[(&str, &str)] = &[
    (
        "user_logins_dated_key",
        "CREATE UNIQUE INDEX CONCURRENTLY user_logins_dated_key ON user_logins \
         (message_id, create_date) NULLS NOT DISTINCT",
    ),
    (
        "vault_dated_key",
        "CREATE UNIQUE INDEX CONCURRENTLY vault_dated_key ON vault \
         (message_id, create_date) NULLS NOT DISTINCT",
    ),
    (
        "user_logins_by_id",
        "CREATE INDEX CONCURRENTLY user_logins_by_id ON user_logins (id)",
    ),
];

pub(in crate::store) async fn prepare_partitions(
    url: &str,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<u32, StoreError> {
    let opts = PgConnectOptions::from_str(url)?.application_name("pii-vault");
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&opts))
        .await
        .map_err(|_| StoreError::Transient("timed out connecting to the database".into()))??;
    let kind: Option<String> = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('user_logins')",
    )
    .fetch_one(&mut conn)
    .await?;
    match kind.as_deref() {
        None => {
            return Err(StoreError::Permanent(
                "this database has no user_logins: run `pii-vault migrate` (a new database is partitioned from the start)"
                    .into(),
            ))
        }
        Some("p") => {
            say("user_logins and vault are partitioned already: nothing to prepare");
            return Ok(0);
        }
        Some(_) => {}
    }
    let mut built = 0;
    for (name, create) in INDEXES {
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        )
        .bind(name)
        .fetch_optional(&mut conn)
        .await?;
        match valid {
            Some(true) => {
                say(&format!("{name}: there already"));
                continue;
            }
            Some(false) => {
                say(&format!(
                    "{name}: left invalid by an interrupted build; dropping it"
                ));
                sqlx::query(&format!("DROP INDEX CONCURRENTLY {name}"))
                    .execute(&mut conn)
                    .await?;
            }
            None => {}
        }
        say(&format!("{name}: building (online; writers go on)"));
        let started = std::time::Instant::now();
        sqlx::query(create).execute(&mut conn).await?;
        say(&format!(
            "{name}: built in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        built += 1;
    }
    let _ = conn.close().await;
    Ok(built)
}
