//! `pii-vault migrate`.

use crate::cli::Cli;

pub async fn migrate(cli: &Cli) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    store.migrate().await?;
    eprintln!(
        "pii-vault: database {} is up to date",
        super::redact_url(cli.database_url())
    );
    Ok(())
}
