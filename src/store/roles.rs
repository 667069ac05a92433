//! The names of a database's roles. Postgres roles belong to the cluster,
//! so two vaults on one cluster need names of their own, or a login
//! granted one vault's worker role could load the other: `migrate
//! --role-prefix` gives them `<prefix>_worker`, `<prefix>_revealer`, ….

use std::fmt;
use std::str::FromStr;

/// What the migration files call the roles (`pii_vault_worker`, …), and
/// what a database migrated without `--role-prefix` keeps.
pub const DEFAULT_ROLE_PREFIX: &str = "pii_vault";

/// The roles the migration files create and grant to, after the prefix.
/// `migrate --role-prefix` rewrites each of these names and nothing else
/// (functions, tables and the alarm channel keep their `pii_vault_` names:
/// they are per database already).
pub const ROLE_SUFFIXES: &[&str] = &[
    "worker", "analyst", "revealer", "rotator", "auditor", "searcher",
];

/// Room for the longest role name (`<prefix>_revealer`) within Postgres's
/// 63-byte identifiers.
const MAX_LEN: usize = 40;

/// A prefix checked to make role names that need no quoting anywhere
/// (lower-case letters, digits, underscores) and that Postgres accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePrefix(String);

impl RolePrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_ROLE_PREFIX
    }

    /// The database's role names under this prefix.
    pub fn role_names(&self) -> Vec<String> {
        ROLE_SUFFIXES
            .iter()
            .map(|r| format!("{}_{r}", self.0))
            .collect()
    }
}

impl Default for RolePrefix {
    fn default() -> Self {
        RolePrefix(DEFAULT_ROLE_PREFIX.to_string())
    }
}

impl fmt::Display for RolePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RolePrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let first = s.bytes().next();
        let last = s.bytes().last();
        if s.is_empty() || s.len() > MAX_LEN {
            return Err(format!("a role prefix has 2 to {MAX_LEN} characters"));
        }
        if !ok_chars
            || !first.is_some_and(|b| b.is_ascii_lowercase())
            || last == Some(b'_')
            || s.len() < 2
        {
            return Err(
                "a role prefix is lower-case letters, digits and underscores, starts with a \
                 letter and does not end with an underscore (e.g. acme_vault)"
                    .into(),
            );
        }
        if s.starts_with("pg_") {
            return Err("role names starting with pg_ are reserved by Postgres".into());
        }
        Ok(RolePrefix(s.to_string()))
    }
}

/// What `migrate` is asked to do beyond applying what is pending.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// `--role-prefix`: the role names for a database migrated for the
    /// first time; for one already migrated, it must match what it has.
    pub role_prefix: Option<RolePrefix>,
    /// `--network-tokens` (`Some(true)`) / `--no-network-tokens`
    /// (`Some(false)`); `None` leaves the setting as it is.
    pub network_tokens: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_that_make_plain_role_names_are_accepted() {
        for ok in ["acme_vault", "pii_vault", "v2", "a_b_c9"] {
            assert_eq!(ok.parse::<RolePrefix>().unwrap().as_str(), ok);
        }
    }

    #[test]
    fn prefixes_that_need_quoting_or_are_reserved_are_refused() {
        let long = "a".repeat(MAX_LEN + 1);
        for bad in [
            "",
            "a",
            "Acme",
            "acme-vault",
            "9lives",
            "acme_",
            "_acme",
            "acme vault",
            "pg_vault",
            "acmé",
            &long,
        ] {
            assert!(bad.parse::<RolePrefix>().is_err(), "{bad:?} accepted");
        }
    }
}
