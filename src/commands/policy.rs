//! `pii-vault policy set | show`: the reveal policy, which limits reveals
//! and searches. Changing it needs the schema owner's login (no role is
//! granted UPDATE on it), and the database writes the audit row of every
//! change itself.

use crate::cli::{Cli, OutputFormat, PolicyCommand};
use crate::store::{PolicyChange, RevealPolicy};

pub async fn policy(cli: &Cli, cmd: &PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Set {
            max_users_per_reveal,
            max_reveals_per_day,
            max_searches_per_day,
        } => {
            let change = PolicyChange {
                max_users_per_reveal: *max_users_per_reveal,
                max_reveals_per_day: *max_reveals_per_day,
                max_searches_per_day: *max_searches_per_day,
            };
            anyhow::ensure!(
                change != PolicyChange::default(),
                "nothing to set: give --max-users-per-reveal, --max-reveals-per-day and/or --max-searches-per-day"
            );
            let store = super::open_store(cli).await?;
            let p = store.set_policy(&change).await?;
            eprintln!("pii-vault: reveal policy set (recorded in the audit trail)");
            print_policy(&p, OutputFormat::Table)
        }
        PolicyCommand::Show(args) => {
            let store = super::open_store(cli).await?;
            print_policy(&store.policy().await?, args.format)
        }
    }
}

fn print_policy(p: &RevealPolicy, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string(p)?),
        OutputFormat::Table => print!(
            "{}",
            crate::output::table(
                &[
                    "max users per reveal",
                    "max reveals per login per 24 h",
                    "max searches per login per 24 h",
                    "changed",
                    "by"
                ],
                &[vec![
                    p.max_users_per_reveal.to_string(),
                    p.max_reveals_per_day.to_string(),
                    p.max_searches_per_day.to_string(),
                    p.changed_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                    p.changed_by.clone(),
                ]]
            )
        ),
    }
    Ok(())
}
