//! One module per subcommand; this file holds what they share: opening the
//! store and the key wrapper with clear, actionable start-up errors.

pub mod approve;
pub mod audit;
pub mod forget;
pub mod honeytoken;
pub mod keys;
pub mod migrate;
pub mod policy;
pub mod reveal;
pub mod rotate;
pub mod run;

use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{Cli, Command};
use crate::crypto::KeyWrapper;
use crate::store::{AdminStore, Store};

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate(args) => migrate::migrate(&cli, args).await,
        Command::Run(args) => run::run(&cli, args).await,
        Command::Reveal(args) => reveal::reveal(&cli, args).await,
        Command::Forget(args) => forget::forget(&cli, args).await,
        Command::Rotate(cmd) => rotate::rotate(&cli, cmd).await,
        Command::Keys(cmd) => keys::keys(&cli, cmd).await,
        Command::Audit(args) => audit::audit(&cli, args).await,
        Command::Approve(args) => approve::approve(&cli, args).await,
        Command::Policy(cmd) => policy::policy(&cli, cmd).await,
        Command::Honeytoken(cmd) => honeytoken::honeytoken(&cli, cmd).await,
    }
}

/// Opens the database. The embedded SQLite default migrates itself, so the
/// first command on a fresh machine just works; Postgres is migrated by
/// `pii-vault migrate` (run by an owner role), so workers need no DDL rights.
pub async fn open_store(cli: &Cli) -> anyhow::Result<Arc<dyn Store>> {
    let store = open_admin_store(cli).await?;
    Ok(store)
}

/// Like [`open_store`], with the privileged operations (rotation, forget).
pub async fn open_admin_store(cli: &Cli) -> anyhow::Result<Arc<dyn AdminStore>> {
    let url = cli.database_url();
    let store = crate::store::connect_admin(url).await.with_context(|| {
        format!(
            "cannot open the database {} (check --database-url / DATABASE_URL)",
            redact_url(url)
        )
    })?;
    store
        .ping()
        .await
        .with_context(|| format!("the database {} does not answer", redact_url(url)))?;
    if url.starts_with("sqlite:") {
        store
            .migrate()
            .await
            .context("cannot apply the SQLite migrations")?;
    }
    Ok(store)
}

/// An outcome that is not a failure of the command but must not look like
/// success to a script: `main` prints the message and exits with `code`
/// (3: a reveal over the policy, waiting for approval).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Who the client says is asking, for the audit trail's `claimed_actor`:
/// `--actor`, else `$USER`. The database records its own login beside it.
pub fn claimed_actor(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("USERNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub async fn open_wrapper(cli: &Cli) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    let wrapper = crate::kms::from_config(cli.kms_key_id.as_deref(), &cli.key_dir).await?;
    wrapper
        .check()
        .await
        .with_context(|| format!("the key-encryption key {} cannot be used", wrapper.kek_id()))?;
    Ok(wrapper)
}

/// A database URL without its password, for error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            super::redact_url("sqlite:pii-vault.db"),
            "sqlite:pii-vault.db"
        );
    }
}
