//! `pii-vault migrate`: schema, allow-list, initial keys.

use crate::cli::{Cli, MigrateArgs};

pub async fn migrate(cli: &Cli, args: &MigrateArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    store.migrate().await?;
    eprintln!(
        "pii-vault: database {} is up to date",
        super::redact_url(cli.database_url())
    );
    if !args.schema_only {
        let wrapper = super::open_wrapper(cli).await?;
        super::keys::init(&*store, &*wrapper).await?;
    }
    Ok(())
}
