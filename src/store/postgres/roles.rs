//! A database's own role names (`migrate --role-prefix`). The migration and
//! function files name the roles `pii_vault_worker`, …; a database with
//! another prefix gets the same files with those names rewritten, and keeps
//! the prefix in `vault_settings` (migration 0013) so that every later
//! `migrate` rewrites the same way. Applied migrations keep the checksums
//! of the files as shipped, whatever the prefix, so `migrate --status` and
//! sqlx's checks see one history.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::{PgConnection, PgPool};

use crate::store::roles::{RolePrefix, DEFAULT_ROLE_PREFIX, ROLE_SUFFIXES};
use crate::store::StoreError;

/// `sql` with every whole-word `pii_vault_<role>` renamed to
/// `<prefix>_<role>`; borrowed as it is for the default prefix.
pub(super) fn rename_roles<'a>(sql: &'a str, prefix: &RolePrefix) -> Cow<'a, str> {
    if prefix.is_default() {
        return Cow::Borrowed(sql);
    }
    let template = format!("{DEFAULT_ROLE_PREFIX}_");
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut done = 0;
    for (at, _) in sql.match_indices(&template) {
        if at < done || (at > 0 && word(bytes[at - 1])) {
            continue;
        }
        let rest = &sql[at + template.len()..];
        let role = ROLE_SUFFIXES.iter().find(|suffix| {
            rest.starts_with(**suffix)
                && !rest.as_bytes().get(suffix.len()).is_some_and(|b| word(*b))
        });
        if let Some(role) = role {
            out.push_str(&sql[done..at]);
            out.push_str(prefix.as_str());
            out.push('_');
            out.push_str(role);
            done = at + template.len() + role.len();
        }
    }
    out.push_str(&sql[done..]);
    Cow::Owned(out)
}

/// The prefix this `migrate` uses: the one the database recorded, the one
/// asked for on a database never migrated, the default otherwise. Asking
/// for another than the recorded one is refused: the roles it names hold
/// no grants here, and moving the grants is a DBA's job.
pub(super) async fn settle(
    pool: &PgPool,
    asked: Option<&RolePrefix>,
) -> Result<RolePrefix, StoreError> {
    let recorded = recorded(pool).await?;
    match (asked, recorded) {
        (Some(asked), Some(recorded)) if *asked != recorded => Err(StoreError::Permanent(format!(
            "this database's roles are named {recorded}_worker, {recorded}_revealer, …: it was \
             first migrated with the role prefix {recorded}, and a prefix cannot change afterwards \
             (run migrate without --role-prefix, or with --role-prefix {recorded})"
        ))),
        (_, Some(recorded)) => Ok(recorded),
        (Some(asked), None) => Ok(asked.clone()),
        (None, None) => Ok(RolePrefix::default()),
    }
}

/// The recorded prefix: `vault_settings`'s, the default for a database
/// migrated before that table existed, none for a database never migrated.
async fn recorded(pool: &PgPool) -> Result<Option<RolePrefix>, StoreError> {
    recorded_on(&mut *pool.acquire().await?).await
}

pub(super) async fn recorded_on(conn: &mut PgConnection) -> Result<Option<RolePrefix>, StoreError> {
    let settings: bool = sqlx::query_scalar("SELECT to_regclass('vault_settings') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if settings {
        let prefix: String = sqlx::query_scalar("SELECT role_prefix FROM vault_settings")
            .fetch_one(&mut *conn)
            .await?;
        return prefix.parse().map(Some).map_err(|e| {
            StoreError::Permanent(format!("vault_settings holds an unusable role prefix: {e}"))
        });
    }
    let migrated: bool = sqlx::query_scalar(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL \
         AND EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('user_logins'))",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(migrated.then(RolePrefix::default))
}

/// After the migrations ran: two owners migrating a new database at once
/// with different prefixes are serialised by sqlx's lock, and the loser
/// would otherwise apply its functions under names that hold no grants.
pub(super) async fn confirm(pool: &PgPool, prefix: &RolePrefix) -> Result<(), StoreError> {
    match recorded(pool).await? {
        Some(recorded) if recorded == *prefix => Ok(()),
        Some(recorded) => Err(StoreError::Permanent(format!(
            "another migrate set this database's role prefix to {recorded} meanwhile: run \
             migrate again without --role-prefix"
        ))),
        None => Err(StoreError::Permanent(
            "the migrations ran but vault_settings is missing: run migrate again".into(),
        )),
    }
}

/// `shipped` with its role names rewritten for `prefix`, each migration
/// keeping the checksum of the file as shipped.
pub(super) async fn migrator(
    shipped: &Migrator,
    prefix: &RolePrefix,
) -> Result<Migrator, StoreError> {
    let renamed = shipped
        .iter()
        .map(|m| Migration {
            sql: Cow::Owned(rename_roles(&m.sql, prefix).into_owned()),
            ..m.clone()
        })
        .collect();
    Migrator::new(Renamed(renamed))
        .await
        .map_err(|e| StoreError::Permanent(format!("migrations: {e}")))
}

#[derive(Debug)]
struct Renamed(Vec<Migration>);

impl MigrationSource<'static> for Renamed {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> RolePrefix {
        "acme".parse().unwrap()
    }

    #[test]
    fn whole_role_names_are_renamed_in_identifiers_and_literals() {
        let sql = "GRANT x TO pii_vault_worker, pii_vault_auditor; \
                   pg_has_role('pii_vault_revealer', 'MEMBER'); ARRAY['pii_vault_rotator']";
        assert_eq!(
            rename_roles(sql, &acme()),
            "GRANT x TO acme_worker, acme_auditor; \
             pg_has_role('acme_revealer', 'MEMBER'); ARRAY['acme_rotator']"
        );
    }

    #[test]
    fn functions_tables_and_longer_names_are_left_alone() {
        let sql = "pii_vault_reveal_request(x) pii_vault_worker_keys xpii_vault_worker \
                   pii_vault_alarm pii_vault_analyst";
        assert_eq!(
            rename_roles(sql, &acme()),
            "pii_vault_reveal_request(x) pii_vault_worker_keys xpii_vault_worker \
             pii_vault_alarm acme_analyst"
        );
    }

    #[test]
    fn the_default_prefix_borrows_the_text() {
        assert!(matches!(
            rename_roles("pii_vault_worker", &RolePrefix::default()),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn the_recorded_prefix_of_migration_0013_follows_the_rename() {
        let sql = include_str!("../../../migrations/postgres/0013_role_prefix.sql");
        assert!(rename_roles(sql, &acme()).contains("left('acme_worker', -length('_worker'))"));
    }
}
