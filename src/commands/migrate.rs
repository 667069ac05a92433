//! `pii-vault migrate`: schema, allow-list, initial keys.

use crate::cli::{Cli, MigrateArgs};

pub async fn migrate(cli: &Cli, args: &MigrateArgs) -> anyhow::Result<()> {
    if args.status || args.dry_run {
        return status(cli, args.dry_run).await;
    }
    if args.prepare_partitions {
        let url = cli.database_url();
        let built =
            crate::store::prepare_partitions(url, &mut |step| eprintln!("pii-vault: {step}"))
                .await?;
        eprintln!(
            "pii-vault: {} ready for the migrate that partitions it ({built} index(es) built now); \
             run `pii-vault migrate`",
            super::redact_url(url)
        );
        return Ok(());
    }
    let store = super::open_store(cli).await?;
    let options = crate::store::MigrateOptions {
        role_prefix: args.role_prefix.clone(),
        network_tokens: match (args.network_tokens, args.no_network_tokens) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    };
    store.migrate_with(&options).await?;
    eprintln!(
        "pii-vault: database {} is up to date",
        super::redact_url(cli.database_url())
    );
    match options.network_tokens {
        Some(false) => eprintln!(
            "pii-vault: network tokens are off: masked_ip_net was emptied and the database now \
             refuses it; restart running workers"
        ),
        Some(true) => eprintln!(
            "pii-vault: network tokens are on: restart running workers, then run `pii-vault \
             rotate token-key` to fill masked_ip_net on the logins stored without it"
        ),
        None => {}
    }
    if !args.schema_only {
        let wrapper = super::open_wrapper(cli).await?;
        super::keys::init(&*store, &*wrapper).await?;
    }
    Ok(())
}

/// `--status`: every migration, applied or pending. `--dry-run`: the
/// pending ones only, as what `migrate` would apply. Neither changes
/// anything nor opens the store (which would migrate an SQLite file).
async fn status(cli: &Cli, dry_run: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let url = cli.database_url();
    let shown = super::redact_url(url);
    let status = crate::store::migration_status(url)
        .await
        .with_context(|| format!("cannot read the migrations of the database {shown}"))?;
    let pending: Vec<_> = status.migrations.iter().filter(|m| !m.applied).collect();
    if !status.exists {
        println!("database {shown} does not exist yet (nothing was created)");
    }
    if let Some(prefix) = &status.role_prefix {
        println!("roles: {}", prefix.role_names().join(", "));
    }
    if dry_run {
        if pending.is_empty() {
            println!("nothing to apply: database {shown} is up to date");
        } else {
            println!("would apply {} migration(s) to {shown}:", pending.len());
            for m in &pending {
                println!("  {:04} {}", m.version, m.description);
            }
        }
        if !status.reapplied.is_empty() {
            println!(
                "would re-apply {} function file(s) (every migrate does): {}",
                status.reapplied.len(),
                status.reapplied.join(", ")
            );
        }
        println!("dry run: nothing changed");
    } else {
        for m in &status.migrations {
            let state = if m.applied { "applied" } else { "pending" };
            println!("{:04} {state:<8} {}", m.version, m.description);
        }
        println!(
            "{} applied, {} pending",
            status.migrations.len() - pending.len(),
            pending.len()
        );
        if let Some(partitions) = &status.partitions {
            println!("vault and user_logins: {partitions}");
        }
    }
    Ok(())
}
